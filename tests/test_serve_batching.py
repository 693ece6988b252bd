"""`ham-mlx serve` as a batching server: logprobs and echo in OpenAI's shapes (values checked
against the model's own log-softmax), the usage chunk, concurrent clients in one batch each
getting its serial answer, and prefix reuse that changes nothing but the work done."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from test_serve import MODEL_ID, Server, continuation, reference, reference_ids

from ham_mlx.model_io import load

openai = pytest.importorskip("openai")

N = 12
ATOL = 0.05  # float16 model: a decode step and one call over the sequence differ by ~1e-2
LONG = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried."
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("batching") / "server.log", "--max-batch", "8")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def local():
    return load(None)


def log_softmax(local, ids: list[int]) -> np.ndarray:
    """[len(ids), V] float32: the model's log-probabilities after each token, in one call."""
    model = local[0]
    logits = model(mx.array([ids]), model.make_cache())[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def texts(local):
    from ham_mlx.serve.tokens import TokenTexts

    return TokenTexts(local[1])


def complete(client, prompt, max_tokens=N, **kwargs):
    kwargs = {"temperature": 0, **kwargs}
    return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens,
                                      **kwargs)  # fmt: skip


def test_completion_logprobs_are_the_models_log_softmax(client, local):
    prompt = "O Romeo, Romeo, wherefore art thou"
    ids, gen = local[1].encode(prompt), reference_ids(local, prompt, N)
    r = complete(client, prompt, logprobs=3)
    choice = r.choices[0]
    assert choice.text == continuation(local, prompt, gen)
    lp = log_softmax(local, ids + gen[:-1])[len(ids) - 1 :]
    t = texts(local)
    got = choice.logprobs
    assert got.tokens == [t.text(g) for g in gen]
    np.testing.assert_allclose(got.token_logprobs, lp[np.arange(N), gen], atol=ATOL)
    for row, top, chosen in zip(lp, got.top_logprobs, gen):
        assert t.text(chosen) in top and 3 <= len(top) <= 4  # 3 alternatives + the chosen one
        best = np.sort(row)[::-1][:3]
        np.testing.assert_allclose(sorted(top.values(), reverse=True)[:3], best, atol=ATOL)
    assert got.text_offset == [len(continuation(local, prompt, gen[:i])) for i in range(N)]
    # streamed: the same tokens and values, chunk by chunk
    chunks = list(complete(client, prompt, logprobs=3, stream=True))
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == got.tokens
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == got.text_offset
    values = sum((c.choices[0].logprobs.token_logprobs for c in chunks), [])
    np.testing.assert_allclose(values, got.token_logprobs, atol=1e-5)


def test_chat_logprobs_shape_and_values(client, local):
    from test_serve import chat_prompt

    messages = [{"role": "user", "content": "What light through yonder window breaks?"}]
    prompt, _ = chat_prompt(messages)
    ids, gen = local[1].encode(prompt), reference_ids(local, prompt, 8)
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    n = len(content)
    assert 0 < n <= 8 and [c.token for c in content] == [texts(local).text(g) for g in gen[:n]]
    lp = log_softmax(local, ids + gen[:-1])[len(ids) - 1 :]
    np.testing.assert_allclose([c.logprob for c in content], lp[np.arange(n), gen[:n]],
                               atol=ATOL)  # fmt: skip
    for c, row in zip(content, lp):
        assert bytes(c.bytes) == c.token.encode()
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        np.testing.assert_allclose(c.top_logprobs[0].logprob, row.max(), atol=ATOL)
        assert bytes(c.top_logprobs[0].bytes) == c.top_logprobs[0].token.encode()
    joined = b"".join(bytes(c.bytes) for c in content).decode()
    assert joined.startswith(r.choices[0].message.content)
    plain = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8,
                                           temperature=0)  # fmt: skip
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_echo_scores_the_prompt(client, local):
    """echo + logprobs: the prompt's tokens with their log-probabilities (the first null), as
    evaluation harnesses score text; with max_tokens 0 nothing is generated."""
    prompt = "Friends, Romans, countrymen, lend me your ears"
    ids = local[1].encode(prompt)
    t = texts(local)
    lp = log_softmax(local, ids)
    expected = lp[np.arange(len(ids) - 1), ids[1:]]
    for max_tokens in (0, 1):
        r = complete(client, prompt, max_tokens=max_tokens, logprobs=1, echo=True)
        choice, got = r.choices[0], r.choices[0].logprobs
        n = len(ids) + max_tokens
        assert choice.text.startswith(prompt) and len(got.tokens) == n
        assert got.tokens[: len(ids)] == [t.text(i) for i in ids]
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        np.testing.assert_allclose(got.token_logprobs[1 : len(ids)], expected, atol=ATOL)
        offsets = [len(local[1].decode(ids[:i])) for i in range(len(ids))]
        assert got.text_offset[: len(ids)] == offsets
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    assert choice.text == prompt + reference(local, prompt, 1)
    assert choice.finish_reason == "length"
    pairs = zip(got.top_logprobs[1 : len(ids)], got.token_logprobs[1 : len(ids)])
    greedy = [max(top.values()) == v for top, v in pairs]  # lm-eval's is_greedy
    assert greedy == list(lp[np.arange(len(ids) - 1)].argmax(-1) == np.array(ids[1:]))
    # echo alone: the prompt's text before the completion, no logprobs
    r = complete(client, prompt, max_tokens=4, echo=True)
    assert r.choices[0].text == prompt + reference(local, prompt, 4)
    assert r.choices[0].logprobs is None
    chunks = list(complete(client, prompt, max_tokens=4, echo=True, logprobs=0, stream=True))
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_six_concurrent_clients_get_their_serial_answers(server, local):
    """Six clients at once (some streaming, one seeded sampling, one with logprobs), arriving
    while the others generate: one batch, and each answer equals its prompt generated alone."""
    prompts = [
        "To be, or not to be",
        "Now is the winter",
        LONG,
        "O Romeo, Romeo",
        "Friends, Romans",
        "All the world's a stage, and all the men and women",
    ]
    kwargs = [{}, {"stream": True}, {}, {"stream": True},
              {"temperature": 1.0, "top_p": 0.9, "seed": 11}, {"logprobs": 2}]  # fmt: skip
    sizes = [24, 16, 20, 24, 16, 24]
    expected = []
    for p, kw, n in zip(prompts, kwargs, sizes):
        sampling = {k: kw[k] for k in ("temperature", "top_p", "seed") if k in kw}
        expected.append(reference(local, p, n, **sampling))
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], server.health()["running"])
            time.sleep(0.01)

    def ask(i):
        time.sleep(0.05 * i)  # they arrive while the first ones are generating
        r = complete(server.client(), prompts[i], sizes[i], **kwargs[i])
        if kwargs[i].get("stream"):
            return "".join(c.choices[0].text for c in r)
        return r.choices[0].text

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    finally:
        done.set()
        watcher.join()
    assert answers == expected
    assert peak[0] >= 2  # they did share the batch


def test_prefix_reuse_changes_nothing_but_the_work(client, local):
    prompt = (
        "Is this a dagger which I see before me, the handle toward my hand? Come, let me "
        "clutch thee. I have thee not, and yet I see thee still."
    )  # sent by no other test
    n = len(local[1].encode(prompt))
    first = complete(client, prompt, logprobs=2)
    again = complete(client, prompt, logprobs=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1  # all but the last token
    assert again.choices[0].text == first.choices[0].text == reference(local, prompt, N)
    np.testing.assert_allclose(again.choices[0].logprobs.token_logprobs,
                               first.choices[0].logprobs.token_logprobs, atol=1e-5)  # fmt: skip
    assert again.usage.kv_fraction == first.usage.kv_fraction
    # a longer prompt starting with it: the snapshot after the first prompt's tokens
    longer = prompt + " shall we"
    r = complete(client, longer)
    assert r.usage.prompt_tokens_details.cached_tokens == n - 1
    assert r.choices[0].text == reference(local, longer, N)
    # a follow-up that continues the first answer: the snapshot at the end of the first request
    follow = local[1].encode(prompt) + reference_ids(local, prompt, N) + local[1].encode(
        " and", add_bos=False
    )  # fmt: skip
    r = complete(client, follow)
    assert r.usage.prompt_tokens_details.cached_tokens == n + N
    assert r.choices[0].text == reference(local, follow, N)
    # the repetition penalty sees the reused tokens too
    penalty = {"repetition_penalty": 1.5}
    r = complete(client, longer, extra_body=penalty)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert r.choices[0].text == reference(local, longer, N, **penalty)
    # kv_budget adapts τ between calls: such requests never reuse (their output would change)
    budget = {"kv_budget": 0.3}
    r1, r2 = (complete(client, prompt, extra_body=budget) for _ in range(2))
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.usage.prompt_tokens_details.cached_tokens == 0
    assert r1.choices[0].text == r2.choices[0].text


def test_prefix_reuse_where_prompts_diverge(client, local):
    """Answer choices after one context (what a harness sends): from the third on, the shared
    context is not run again, and every score equals the one without reuse."""
    context = "Question: who dies at the end of the play? Answer:"
    ctx = len(local[1].encode(context))
    cached, scores = [], []
    for answer in (" Mercutio and Tybalt", " the nurse and the friar", " Romeo and Juliet",
                   " nobody at all"):  # fmt: skip
        ids = local[1].encode(context + answer)
        r = complete(client, ids, max_tokens=1, logprobs=1, echo=True)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        scores.append(sum(r.choices[0].logprobs.token_logprobs[ctx:-1]))
        lp = log_softmax(local, ids)
        direct = lp[np.arange(ctx - 1, len(ids) - 1), ids[ctx:]].sum()
        np.testing.assert_allclose(scores[-1], direct, atol=ATOL)
    # the first two share no snapshot; the second is run in two parts: the shared context, then
    # its answer, and the state after the context is kept for the next ones
    assert cached[:2] == [0, 0] and cached[2] == cached[3] >= ctx


def test_per_request_controls_in_one_batch(server, local):
    """τ and kv_budget are per row: such requests share the batch and give their answers alone.
    HAM caches of different max_kv_tokens cannot share one: such a request waits for the batch
    to drain, then runs."""
    controls = [{}, {"threshold": 0.6}, {"kv_budget": 0.3}, {"max_kv_tokens": 3,
                                                             "kv_policy": "reject"}]  # fmt: skip
    prompts = [LONG, "To be, or not to be", LONG, LONG]
    alone = [complete(server.client(), p, 24, extra_body=c).choices[0].text
             for p, c in zip(prompts, controls)]  # fmt: skip
    assert alone[0] == reference(local, LONG, 24)
    assert alone[1] == reference(local, prompts[1], 24, threshold=0.6)

    def ask(i):
        time.sleep(0.05 * i)
        return complete(server.client(), prompts[i], 24, extra_body=controls[i]).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == alone


def test_several_prompts_in_one_request(client, local):
    prompts = ["To be, or not to be", "Now is the winter of our discontent"]
    r = complete(client, prompts)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [reference(local, p, N) for p in prompts]
    ids = [len(local[1].encode(p)) for p in prompts]
    assert r.usage.prompt_tokens == sum(ids) and r.usage.completion_tokens == 2 * N
    texts_ = ["", ""]
    for chunk in complete(client, [local[1].encode(p) for p in prompts], stream=True):
        for c in chunk.choices:
            texts_[c.index] += c.text
    assert texts_ == [c.text for c in r.choices]


def test_tokenizer_endpoints(server, local):
    import httpx

    tok = local[1]
    r = httpx.post(server.url + "/tokenize", json={"prompt": "To be"}).json()
    assert r["tokens"] == tok.encode("To be") and r["count"] == len(r["tokens"])
    r = httpx.post(
        server.url + "/tokenize", json={"prompt": "</s> To be", "add_special_tokens": False}
    ).json()
    assert r["tokens"] == [tok.eos_id] + tok.encode(" To be", add_bos=False)
    assert httpx.post(server.url + "/detokenize", json={"tokens": tok.encode("To be")}).json() == {
        "prompt": "To be"
    }
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"]) == ("<s>", "</s>")
    assert "messages" in info["chat_template"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}).status_code == 400


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A random tiny-hybrid model folder (ham, gdn, attn, ham: every cache type in the batch)."""
    from ham_mlx.cli import main

    folder = tmp_path_factory.mktemp("hybrid") / "tiny-hybrid"
    assert main(["init", str(folder), "--preset", "tiny-hybrid", "--seed", "3"]) == 0
    s = Server(folder.parent / "server.log", "--model", str(folder))
    yield s, load(folder)
    assert s.stop() == 0, s.log.read_text()


def test_hybrid_model_batches_and_reuses(hybrid):
    """Attention, GDN and HAM caches in one batch: concurrent answers equal serial ones, prefix
    reuse gives the same answer, and echo scores equal the model's log-softmax."""
    server, local = hybrid
    model_id = server.client().models.list().data[0].id
    prompts = ["To be, or not to be", LONG, "O Romeo, Romeo, wherefore art thou", "Friends"]
    expected = [reference(local, p, 16) for p in prompts]

    def ask(p):
        r = server.client().completions.create(model=model_id, prompt=p, max_tokens=16,
                                                temperature=0)  # fmt: skip
        return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert [a for a, _ in answers] == expected
    again, cached = ask(LONG)
    assert again == expected[1] and cached == len(local[1].encode(LONG)) - 1
    ids = local[1].encode(LONG)
    r = server.client().completions.create(model=model_id, prompt=ids, max_tokens=0, echo=True,
                                           logprobs=0)  # fmt: skip
    lp = log_softmax(local, ids)
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[1:],
                               lp[np.arange(len(ids) - 1), ids[1:]], atol=ATOL)  # fmt: skip


def test_prefix_cache_is_an_lru_of_immutable_snapshots(local):
    from ham_mlx.serve.prefix import PrefixCache, PromptScores

    model, tok = local
    ids = tok.encode(LONG)

    def state_after(tokens):
        cache = model.make_cache()
        model(mx.array([tokens]), cache)
        return cache

    one = sum(c.nbytes for c in state_after(ids[:10]))
    prefix = PrefixCache(max_bytes=int(2.5 * one))
    key = (None, None, "evict")
    for n in (10, 20, 30):
        prefix.store(key, ids[:n], state_after(ids[:n]))
    assert len(prefix) == 2 and prefix.nbytes <= prefix.max_bytes  # the oldest went
    assert prefix.lookup(key, ids[:15]) is None  # the snapshot of 10 tokens was dropped
    assert prefix.lookup(key, ids[:30]).tokens == tuple(ids[:20])  # strict prefixes only
    assert prefix.lookup(key, ids).tokens == tuple(ids[:30])
    assert prefix.lookup((0.5, None, "evict"), ids) is None  # other controls: other snapshots
    assert prefix.lookup(key, ids, depth=1) is None  # none has prompt scores
    # a snapshot is never changed by the requests that start from it
    snap = prefix.lookup(key, ids)
    before = [np.array(a) for c in snap.cache for a in c.state if isinstance(a, mx.array)]
    copy = snap.copy_cache()
    model(mx.array([ids[30:]]), copy)
    after = [np.array(a) for c in snap.cache for a in c.state if isinstance(a, mx.array)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert snap.cache[0].offset == 30 and copy[0].offset == len(ids)
    # scores make a snapshot usable by scoring requests up to their depth
    scores = PromptScores(np.zeros(29, np.float32), np.zeros((29, 5), np.int32),
                          np.zeros((29, 5), np.float32), np.zeros(2048, np.float32))  # fmt: skip
    prefix.store(key, ids[:30], state_after(ids[:30]), scores)
    assert prefix.lookup(key, ids, depth=5).scores is not None
    assert prefix.lookup(key, ids, depth=6) is None
    assert PrefixCache(0).lookup(key, ids) is None  # off


def test_stop_strings_cut_the_tokens_too():
    from ham_mlx.serve.engine import Tail, TokenLogprob

    tail = Tail(["\nUser:"])
    pieces = ["Hi", " there", "\n", "Us", "er", ": bye"]
    out = [tail.add(p, TokenLogprob(i, -1.0, [], p)) for i, p in enumerate(pieces)]
    assert [o[0] for o in out] == ["Hi", " there", "", "", "", ""]
    assert [[r.token for r in o[1]] for o in out] == [[0], [1], [], [], [], []]
    assert out[-1][2]  # stopped: the tokens of "\nUser:" are not the answer's
    tail = Tail(["END"])
    assert tail.add("the E", TokenLogprob(0, -1.0, [], "the E"))[:2] == ("the ", [])
    rest, records = tail.finish()  # no stop: what was held back, and its token
    assert rest == "E" and [r.token for r in records] == [0]
