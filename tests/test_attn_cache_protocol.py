"""mlx-lm's cache protocol on ham_mlx caches (spec §7): trimming (speculative decoding, prefix
reuse) on attention caches, clear refusals for what the caches cannot do (trimming recurrent
state, kv_bits quantization, mlx-lm's own cache classes)."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model

from ham_mlx.cache import AttnCache

mlx_lm_cache = pytest.importorskip("mlx_lm.models.cache")
mlx_lm_generate = pytest.importorskip("mlx_lm.generate")
can_trim, trim = mlx_lm_cache.can_trim_prompt_cache, mlx_lm_cache.trim_prompt_cache

ATTN = {"num_heads": 2, "num_kv_heads": 1, "rope_theta": 10000.0}
WINDOW = {**ATTN, "window_size": 6}
KINDS = {
    "attn": ("attn", "attn"),
    "gdn": ("gdn", "gdn"),
    "ham": ("ham", "ham"),
    "hybrid": ("ham", "gdn", "attn", "ham"),
}


def ids(B: int, n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 61, (B, n)))


def close(a: mx.array, b: mx.array) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=0)


# ---- can_trim / trim --------------------------------------------------------------------------
def test_attention_caches_are_trimmable_recurrent_ones_are_not():
    x = ids(1, 5)
    for layers, attn, want in [
        (("attn", "attn"), ATTN, True),
        (("attn",), WINDOW, True),  # 5 tokens: nothing fell out of the window yet
        (("attn", "gdn"), ATTN, False),
        (("ham", "attn"), ATTN, False),
        (("gdn",), ATTN, False),
        (("ham",), ATTN, False),
        (("ham", "gdn", "attn", "ham"), ATTN, False),
    ]:  # fmt: skip
        model = make_model(layers, attn=attn)
        cache = model.make_cache()
        assert can_trim(cache) is want, layers  # empty
        model(x, cache)
        assert can_trim(cache) is want, layers


def test_a_window_cache_stops_being_trimmable_once_it_drops_entries():
    """Reading the state leaves every entry in place (still trimmable); the entries outside the
    window are dropped when the buffer would otherwise grow, and then trimming is refused."""
    model = make_model(("attn",), attn=WINDOW)
    cache = model.make_cache()
    cache[0].buffer.step = 4  # grow (and drop) after a few tokens
    tokens = ids(1, 20)
    model(tokens[:, :12], cache)
    mx.eval([c.state for c in cache])
    assert can_trim(cache)
    for t in range(12, 20):
        model(tokens[:, t : t + 1], cache)
    assert not can_trim(cache)
    assert trim(cache, 2) == 0  # mlx-lm's trim_prompt_cache leaves it untouched
    assert cache[0].offset == 20
    with pytest.raises(ValueError, match="dropped entries"):
        cache[0].trim(2)


@pytest.mark.parametrize("layers", [("gdn",), ("ham",)])
def test_recurrent_caches_refuse_to_trim(layers):
    model = make_model(layers)
    cache = model.make_cache()
    model(ids(1, 6), cache)
    with pytest.raises(ValueError, match="cannot be trimmed"):
        cache[0].trim(2)
    assert trim(cache, 2) == 0 and cache[0].offset == 6  # mlx-lm: not trimmable, untouched


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("attn", [ATTN, WINDOW], ids=["full", "window"])
def test_trim_then_refeed_equals_never_trimming(B, attn):
    model = make_model(("attn", "attn"), attn=attn, seed=1)
    x = ids(B, 5, seed=2)
    want_cache = model.make_cache()
    want = model(x, want_cache)
    cache = model.make_cache()
    model(x, cache)
    assert can_trim(cache)
    assert trim(cache, 3) == 3
    assert [c.offset for c in cache] == [2, 2]
    close(model(x[:, 2:], cache), want[:, 2:])
    nxt = ids(B, 3, seed=3)
    close(model(nxt, cache), model(nxt, want_cache))


def test_trim_rows_of_different_lengths():
    """Rows right-padded to 12 with 9 and 12 real tokens; trimming 3 takes each row back 3."""
    model = make_model(("attn", "attn"), seed=1)
    x = ids(2, 12, seed=4)
    cache = model.make_cache()
    for c in cache:
        c.prepare(lengths=[9, 12])
    full = model(x, cache)
    for c in cache:
        c.finalize()
    assert trim(cache, 3) == 3
    np.testing.assert_array_equal(cache[0].offsets, [6, 9])
    again = mx.stack([x[0, 6:9], x[1, 9:12]])
    got = model(again, cache)
    close(got[0], full[0, 6:9])
    close(got[1], full[1, 9:12])


def test_trim_more_than_seen_trims_what_there_is():
    model = make_model(("attn",))
    cache = model.make_cache()
    model(ids(1, 4), cache)
    assert trim(cache, 10) == 4
    assert cache[0].offset == 0
    close(model(ids(1, 4), cache), model(ids(1, 4)))


# ---- prefix reuse -----------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2])
def test_prefix_reuse_equals_a_fresh_run(B):
    model = make_model(("attn", "attn"), seed=2)
    p1, p2, p3 = ids(B, 8, seed=5), ids(B, 5, seed=6), ids(B, 6, seed=7)
    cache = model.make_cache()
    model(mx.concatenate([p1, p2], axis=1), cache)
    assert trim(cache, p2.shape[1]) == p2.shape[1]
    got = model(p3, cache)
    want = model(mx.concatenate([p1, p3], axis=1))[:, 8:]
    close(got, want)
    nxt = ids(B, 1, seed=8)
    fresh = model.make_cache()
    model(mx.concatenate([p1, p3], axis=1), fresh)
    close(model(nxt, cache), model(nxt, fresh))


# ---- speculative decoding ---------------------------------------------------------------------
def near_copy(layers, attn, noise: float):
    """The main model with noise on its head: a draft that is right some of the time."""
    draft = make_model(layers, seed=0, attn=attn)
    w = draft.lm_head.weight
    draft.lm_head.weight = w + noise * mx.random.normal(w.shape, key=mx.random.key(5))
    return draft


def greedy(model, prompt, n):
    return [int(t) for t, _ in mlx_lm_generate.generate_step(prompt, model, max_tokens=n)]


def speculative(model, draft, prompt, n, **kw):
    out = list(mlx_lm_generate.speculative_generate_step(prompt, model, draft, max_tokens=n,
                                                         num_draft_tokens=3, **kw))  # fmt: skip
    return [int(t) for t, _, _ in out], sum(bool(d) for _, _, d in out)


@pytest.mark.parametrize("draft_kind", ["random", "near-copy"])
def test_speculative_decoding_gives_the_greedy_tokens(draft_kind):
    layers = ("attn", "attn")
    model = make_model(layers, seed=0)
    if draft_kind == "random":
        draft = make_model(("attn",), seed=1)  # another random model, same vocabulary
    else:
        draft = near_copy(layers, ATTN, 0.05)
    accepted = 0
    for seed in range(3):
        prompt = ids(1, 12, seed=seed)[0]
        want = greedy(model, prompt, 32)
        got, n = speculative(model, draft, prompt, 32)
        assert got == want, seed
        accepted += n
    if draft_kind == "near-copy":
        assert 0 < accepted < 3 * 32  # drafts both accepted and rejected: trims were exercised


def test_speculative_decoding_with_our_caches_passed_in():
    model = make_model(("attn", "attn"), seed=0)
    draft = near_copy(("attn", "attn"), ATTN, 0.05)
    prompt = ids(1, 12, seed=2)[0]
    cache = model.make_cache() + draft.make_cache()
    got, _ = speculative(model, draft, prompt, 24, prompt_cache=cache)
    assert got == greedy(model, prompt, 24)
    assert all(isinstance(c, AttnCache) for c in cache) and cache[0].offset >= 12 + 23


def test_speculative_decoding_refuses_recurrent_caches():
    model = make_model(("ham", "attn"), seed=0)
    draft = make_model(("attn",), seed=1)
    with pytest.raises(ValueError, match="trimmable"):
        speculative(model, draft, ids(1, 6)[0], 4)


def test_speculative_decoding_with_a_window_gives_the_greedy_tokens():
    layers = ("attn", "attn")
    model = make_model(layers, seed=0, attn=WINDOW)
    draft = near_copy(layers, WINDOW, 0.05)
    prompt = ids(1, 12, seed=0)[0]
    assert speculative(model, draft, prompt, 24)[0] == greedy(model, prompt, 24)


# ---- kv_bits and mlx-lm's own caches ----------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kv_bits_is_refused_clearly(kind):
    model = make_model(KINDS[kind])
    with pytest.raises(ValueError, match="^kv_bits"):
        list(mlx_lm_generate.generate_step(ids(1, 8)[0], model, max_tokens=2, kv_bits=4,
                                           quantized_kv_start=0,
                                           prompt_cache=model.make_cache()))  # fmt: skip


def test_kv_bits_is_refused_once_mlx_lm_would_quantize():
    """mlx-lm quantizes from `quantized_kv_start` tokens on (default 5000; before that neither its
    caches nor ours are quantized); at that point our caches refuse."""
    model = make_model(KINDS["hybrid"])
    prompt = ids(1, 5001)[0]
    with pytest.raises(ValueError, match="^kv_bits"):
        list(mlx_lm_generate.generate_step(prompt, model, max_tokens=2, kv_bits=4,
                                           prompt_cache=model.make_cache()))  # fmt: skip


def mlx_lm_caches():
    c = mlx_lm_cache
    return {
        "KVCache": c.KVCache(),
        "RotatingKVCache": c.RotatingKVCache(max_size=8),
        "QuantizedKVCache": c.QuantizedKVCache(),
        "BatchKVCache": c.BatchKVCache(left_padding=[0]),
        "ArraysCache": c.ArraysCache(size=2),
    }


@pytest.mark.parametrize("layer", ["attn", "gdn", "ham"])
@pytest.mark.parametrize("name", sorted(mlx_lm_caches()))
def test_mlx_lm_caches_are_refused_naming_the_class(layer, name):
    model = make_model((layer,))
    with pytest.raises(TypeError, match=name):
        model(ids(1, 4), [mlx_lm_caches()[name]])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mlx_lm_max_kv_size_is_refused_clearly(kind):
    """mlx-lm builds caches with make_prompt_cache(model, max_kv_size): refused, not ignored."""
    from mlx_lm.models.cache import make_prompt_cache

    model = make_model(KINDS[kind])
    with pytest.raises(ValueError, match="^max_kv_size=64: .*max_kv_tokens"):
        make_prompt_cache(model, max_kv_size=64)
    with pytest.raises(ValueError, match="^max_kv_size"):
        list(mlx_lm_generate.generate_step(ids(1, 8)[0], model, max_tokens=2, max_kv_size=64))
    assert len(make_prompt_cache(model)) == len(model.layers)  # without it: our caches
