"""mlx-lm's own batch generation (`batch_generate`, `BatchGenerator`) on every layer type and a
hybrid: mixed prompt lengths (right padding), rows inserted mid-generation, rows finishing and
being removed, generation continued from returned caches. Every row's greedy tokens must equal
that prompt generated alone (spec §7: padding never changes a row)."""

import ham_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from conftest import LAYER_CONFIGS, make_model

from ham_mlx.interop import mlx_lm_tokenizer
from ham_mlx.model_io import default_model_path, load

mlx_lm_generate = pytest.importorskip("mlx_lm.generate")
BatchGenerator = mlx_lm_generate.BatchGenerator

CONFIGS = ["ham-cosine", "ham-learned", "ham-gva-negeig-sigmoid", "gdn", "attn", "attn-window",
           "mixed"]  # fmt: skip


def alone(model, prompt: list[int], n: int, cache=None) -> list[int]:
    """Greedy tokens of one prompt through a plain loop of ours."""
    cache = model.make_cache() if cache is None else cache
    logits = model(mx.array([prompt]), cache)[:, -1]
    out = []
    for _ in range(n):
        token = int(mx.argmax(logits, axis=-1).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache)[:, -1]
    return out


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 61, n).tolist() for n in lengths]


def run(gen: BatchGenerator, uids: list[int], results: dict) -> dict:
    while responses := gen.next_generated():
        for r in responses:
            results.setdefault(r.uid, []).append(r)
    return results


@pytest.mark.parametrize("name", CONFIGS)
def test_mixed_lengths_equal_each_prompt_alone(name):
    layer_types, kw = LAYER_CONFIGS[name]
    model = make_model(layer_types, **kw)
    batch = prompts(1, [5, 17, 2, 11])
    gen = BatchGenerator(model, max_tokens=12, prefill_step_size=8)
    uids = gen.insert(batch)
    results = run(gen, uids, {})
    gen.close()
    for uid, prompt in zip(uids, batch):
        got = [r.token for r in results[uid]]
        assert got == alone(model, prompt, 12), (name, len(prompt))


@pytest.mark.parametrize("name", ["ham-cosine", "attn", "mixed"])
def test_insertions_mid_generation_and_rows_finishing_early(name):
    layer_types, kw = LAYER_CONFIGS[name]
    model = make_model(layer_types, seed=2, **kw)
    first, later = prompts(2, [9, 3]), prompts(3, [14, 6, 1])
    gen = BatchGenerator(model, max_tokens=10, prefill_step_size=16)
    uids = gen.insert(first, max_tokens=[4, 10])
    results: dict = {}
    for _ in range(3):  # a few steps before the others arrive
        for r in gen.next_generated():
            results.setdefault(r.uid, []).append(r)
    uids += gen.insert(later, max_tokens=[7, 10, 3])
    run(gen, uids, results)
    gen.close()
    for uid, prompt, n in zip(uids, first + later, [4, 10, 7, 10, 3]):
        assert [r.token for r in results[uid]] == alone(model, prompt, n), (name, uid)


@pytest.mark.parametrize("name", ["ham-cosine", "gdn", "attn", "mixed"])
def test_continued_generation_from_returned_caches(name):
    """Rows finish, their caches come back (`extract`), and a second batch continues each from
    its history with a new prompt of its own (`merge` of caches with history)."""
    layer_types, kw = LAYER_CONFIGS[name]
    model = make_model(layer_types, seed=4, **kw)
    batch = prompts(4, [7, 12, 3])
    gen = BatchGenerator(model, max_tokens=6)
    uids = gen.insert(batch, max_tokens=[6, 3, 5])
    results = run(gen, uids, {})
    gen.close()
    finals = [results[u][-1] for u in uids]
    histories = [list(f.all_tokens) for f in finals]  # mlx-lm appends to the lists it is given
    follow = prompts(5, [4, 9, 2])
    gen = BatchGenerator(model, max_tokens=8)
    uids2 = gen.insert(
        follow, caches=[f.prompt_cache for f in finals], all_tokens=[f.all_tokens for f in finals]
    )
    results2 = run(gen, uids2, {})
    gen.close()
    for history, p, uid in zip(histories, follow, uids2):
        assert [r.token for r in results2[uid]] == alone(model, history + p, 8), name


def test_batch_generate_on_the_bundled_model_equals_single_prompts():
    model, tokenizer = load()
    wrapper = mlx_lm_tokenizer(default_model_path())
    texts = ["To be, or not to be", "Now is the winter of our discontent made glorious", "O"]
    ids = [tokenizer.encode(t) for t in texts]
    out = mlx_lm_generate.batch_generate(model, wrapper, ids, max_tokens=24,
                                         return_token_ids=True)  # fmt: skip
    for prompt, got in zip(ids, out.token_ids):
        want = alone(model, prompt, 24)
        if tokenizer.eos_id in want:
            want = want[: want.index(tokenizer.eos_id)]
        assert got == want


def test_padding_never_enters_a_cache_or_counts_as_seen():
    """Right-padded prefill through the caches' own protocol: each row's counts, admitted
    entries and state equal the row run alone."""
    model = make_model(("ham", "gdn", "attn"), seed=6)
    rows = prompts(6, [3, 10])
    padded = mx.array([r + [0] * (10 - len(r)) for r in rows])
    cache = model.make_cache()
    for c in cache:
        c.prepare(lengths=[3, 10], right_padding=[7, 0])
    model(padded, cache)
    for c in cache:
        c.finalize()
    for b, r in enumerate(rows):
        solo = model.make_cache()
        model(mx.array([r]), solo)
        for c, s in zip(cache, solo):
            assert int(c.offsets[b]) == len(r) == s.offset
            one = c.extract(b)
            for x, y in zip(one.state, s.state):
                if isinstance(x, mx.array):
                    np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5, rtol=0)
                else:
                    assert x == y
