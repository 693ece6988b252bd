import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.sample import apply_repetition_penalty, make_logits_processors, make_sampler

# One row of logits with distinct probabilities, shuffled so that rank != index.
PROBS = np.array([0.12, 0.02, 0.3, 0.07, 0.15, 0.04, 0.2, 0.1])
LOGITS = np.log(PROBS) + 1.7
DRAWS = 20_000


def expected_distribution(
    logits: np.ndarray, temperature: float, top_p: float, top_k: int, min_p: float
) -> np.ndarray:
    """The reference: filter on softmax(logits), one rule at a time, then sample at temperature."""
    keep = np.ones(logits.size, dtype=bool)

    def probs() -> np.ndarray:
        p = np.where(keep, np.exp(logits - logits.max()), 0.0)
        return p / p.sum()

    if top_k:
        keep[np.argsort(-logits)[top_k:]] = False
    if top_p < 1:
        p = probs()
        total = 0.0
        for i in np.argsort(-p):
            keep[i] = keep[i] and total < top_p
            total += p[i]
    if min_p:
        p = probs()
        keep &= p >= min_p * p.max()
    scaled = np.where(keep, np.exp((logits - logits.max()) / temperature), 0.0)
    return scaled / scaled.sum()


def frequencies(sampler, logits: np.ndarray, seed: int = 0) -> np.ndarray:
    mx.random.seed(seed)
    tokens = sampler(mx.array(np.tile(logits, (DRAWS, 1)), dtype=mx.float32))
    assert tokens.shape == (DRAWS,)
    return np.bincount(np.array(tokens), minlength=logits.size) / DRAWS


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_temperature_zero_is_argmax(dtype):
    logits = mx.random.normal((16, 300), key=mx.random.key(1)).astype(dtype)
    assert mx.array_equal(make_sampler()(logits), mx.argmax(logits, axis=-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_argmax(temperature):
    logits = mx.random.normal((16, 300), key=mx.random.key(2))
    tokens = make_sampler(temperature, top_k=1)(logits)
    assert mx.array_equal(tokens, mx.argmax(logits, axis=-1))


CASES = {
    "plain": (1.0, 1.0, 0, 0.0),
    "hot": (2.0, 1.0, 0, 0.0),
    "top_k": (1.0, 1.0, 3, 0.0),
    "top_p": (1.0, 0.6, 0, 0.0),
    "min_p": (0.7, 1.0, 0, 0.3),
    "all": (1.5, 0.8, 5, 0.2),
    "all_tight": (1.0, 0.45, 5, 0.5),
}


@pytest.mark.parametrize("temperature, top_p, top_k, min_p", CASES.values(), ids=CASES.keys())
def test_sampled_frequencies(temperature, top_p, top_k, min_p):
    expected = expected_distribution(LOGITS, temperature, top_p, top_k, min_p)
    sampler = make_sampler(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    seen = frequencies(sampler, LOGITS)
    assert np.all(seen[expected == 0] == 0)  # filtered tokens never appear
    np.testing.assert_allclose(seen, expected, atol=0.02)


def test_filters_keep_the_expected_tokens():
    kept = {
        name: set(np.flatnonzero(expected_distribution(LOGITS, *case)))
        for name, case in CASES.items()
    }
    assert kept["top_k"] == {2, 6, 4}
    assert kept["top_p"] == {2, 6, 4}  # 0.3 + 0.2 = 0.5 < 0.6, so 0.15 is needed too
    assert kept["min_p"] == {2, 6, 4, 0, 7}  # p >= 0.09
    assert kept["all"] == {2, 6, 4, 0}
    assert kept["all_tight"] == {2, 6}


def test_same_seed_same_samples():
    logits = mx.random.normal((64, 500), key=mx.random.key(3))
    sampler = make_sampler(1.0, top_p=0.9)
    mx.random.seed(7)
    first = sampler(logits)
    mx.random.seed(7)
    assert mx.array_equal(first, sampler(logits))
    mx.random.seed(8)
    assert not mx.array_equal(first, sampler(logits))


def test_sampler_compiles():
    """Only MLX ops: the sampler traces under mx.compile (a host sync would fail here)."""
    sampler = make_sampler(0.8, top_p=0.9, top_k=20, min_p=0.05)
    compiled = mx.compile(sampler, inputs=mx.random.state, outputs=mx.random.state)
    logits = mx.random.normal((4, 100), key=mx.random.key(4)).astype(mx.bfloat16)
    mx.random.seed(5)
    eager = sampler(logits)
    mx.random.seed(5)
    assert mx.array_equal(compiled(logits), eager)


BAD = [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5)]
BAD += [("min_p", 1.0), ("min_p", -0.2)]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_arguments(name, value):
    with pytest.raises(ValueError, match=f"{name} must be .*got {value}"):
        make_sampler(**{"temperature": 1.0, name: value})


def repetition_reference(logits: np.ndarray, context: np.ndarray, penalty: float) -> np.ndarray:
    out = logits.copy()
    for b in range(logits.shape[0]):
        for t in set(context[b].tolist()):
            out[b, t] = logits[b, t] / penalty if logits[b, t] > 0 else logits[b, t] * penalty
    return out


def test_repetition_penalty():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 20)).astype(np.float32)
    context = np.array([[1, 5, 5, 19, 0], [3, 3, 3, 7, 12]], dtype=np.int32)
    got = apply_repetition_penalty(mx.array(logits), mx.array(context), 1.3)
    np.testing.assert_allclose(np.array(got), repetition_reference(logits, context, 1.3), rtol=1e-6)


def test_logits_processors():
    assert make_logits_processors(None) == [] and make_logits_processors(1.0) == []
    (process,) = make_logits_processors(2.0, context_size=3)
    logits = mx.array([[2.0, -2.0, 4.0, -4.0, 1.0]])
    tokens = mx.array([[0, 1, 2, 3]])  # only the last 3 count: token 0 is not penalised
    assert process(tokens, logits).tolist() == [[2.0, -4.0, 2.0, -8.0, 1.0]]
    assert mx.array_equal(process(tokens[:, :0], logits), logits)


@pytest.mark.parametrize("penalty", [0.0, -1.0])
def test_bad_repetition_penalty(penalty):
    with pytest.raises(ValueError, match="repetition_penalty"):
        make_logits_processors(penalty)


def test_processor_then_sampler_in_a_loop():
    """The pieces compose the way a decode loop uses them."""
    sample = make_sampler(0.0)
    (process,) = make_logits_processors(1e6)
    logits = mx.array([[5.0, 4.0, 3.0]])
    tokens = mx.zeros((1, 0), dtype=mx.uint32)
    for _ in range(3):
        token = sample(process(tokens, logits))
        tokens = mx.concatenate([tokens, token[:, None]], axis=1)
    assert tokens.tolist() == [[0, 1, 2]]
