"""`ham-mlx serve`: a real server process driven by the official openai client and raw HTTP."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from greedy import SeededDraws, mlx_next_logits, tie_aware_greedy

from ham_mlx.cli import main
from ham_mlx.generate import stream_generate
from ham_mlx.model_io import default_model_path, load

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")
pytest.importorskip("mlx_lm")  # the engine runs mlx-lm's BatchGenerator
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MODEL_ID = "ham-mlx-default"
PROMPT = "To be, or not to be, that is"
N = 16  # tokens per request: small, so that the file runs in seconds
LIMIT = 2048  # the server's --max-tokens-limit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m ham_mlx.cli serve` on a free port, its stderr in a file."""

    def __init__(self, log: Path, *args: str):
        self.log = log
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "ham_mlx.cli", "serve", "--port", self.url.split(":")[-1]]
        with open(log, "w") as f:
            self.proc = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.monotonic() + 60
        while not self.healthy():
            assert self.proc.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /health after 60 s:\n{log.read_text()}"
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def post(self, path: str, body: dict | str) -> "httpx.Response":
        content = body if isinstance(body, str) else json.dumps(body)
        headers = {"content-type": "application/json"}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=60)

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "server.log", "--max-tokens-limit", str(LIMIT))
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def local():
    """The same model in this process: the reference answers."""
    return load(None)


def reference_ids(local, prompt, max_tokens=N, **kwargs) -> list[int]:
    """The tokens `ham_mlx.generate` gives for prompt alone (greedy unless kwargs say)."""
    model, tokenizer = local
    kwargs = {"temperature": 0.0, **kwargs}
    steps = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    return [r.token for r in steps if r.token is not None]


def continuation(local, prompt, ids: list[int]) -> str:
    """The text of ids after prompt, decoded in context (a first word keeps its space); EOS and
    what follows is not text."""
    tokenizer = local[1]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    head = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return tokenizer.decode(head + ids)[len(tokenizer.decode(head)) :]


def reference(local, prompt, max_tokens=N, served: str | None = None, **kwargs) -> str:
    """The served answer of prompt, from `ham_mlx.generate`'s tokens for it alone. With served
    (the answer under test), where served took the other side of a near-tie, the reference
    follows it there (tests/greedy.py): the server and `generate` round differently."""
    text = continuation(local, prompt, reference_ids(local, prompt, max_tokens, **kwargs))
    if served is None or served == text:
        return text
    model, tokenizer = local
    head = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    eos = tokenizer.eos_id

    def follows(ids: list[int]) -> bool:
        answer = continuation(local, head, ids)
        return served == answer if ids[-1] == eos else served.startswith(answer)

    if kwargs.get("temperature", 0.0) == 0.0:
        ids = tie_aware_greedy(mlx_next_logits(model), head, max_tokens, follows, eos)
    else:
        sampler = SeededDraws(model, kwargs["seed"], kwargs["temperature"], kwargs["top_p"])
        ids = tie_aware_greedy(sampler.next_logits, head, max_tokens, follows, eos, sampler.draw)
    return continuation(local, head, ids)


def complete(client, prompt=PROMPT, max_tokens=N, **kwargs):
    kwargs = {"temperature": 0, **kwargs}
    return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, **kwargs)


def streamed_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].text for c in chunks), chunks


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--model-id", "--host", "--port", "--max-tokens-limit",
                   "--default-max-tokens", "--max-batch", "--max-queue", "--prefill-step-size",
                   "--prefix-cache-mb"):  # fmt: skip
        assert re.search(rf"{option} \S+\s+\w", out), option
    for field in ("threshold", "kv_budget", "max_kv_tokens", "kv_fraction", "data: [DONE]",
                  "logprobs", "top_logprobs", "echo", "include_usage", "cached_tokens",
                  "/tokenize", "local-completions"):  # fmt: skip
        assert field in out, field


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    health = server.health()
    assert set(health.pop("prefix_cache")) == {"snapshots", "bytes", "hits", "reused_tokens"}
    assert health == {"status": "ok", "model": MODEL_ID, "waiting": 0, "running": 0}


def test_completion_matches_generate(client, local):
    r = complete(client)
    _, tokenizer = local
    assert r.model == MODEL_ID and r.object == "text_completion"
    text = r.choices[0].text
    assert text == reference(local, PROMPT, served=text)
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, N)
    assert r.usage.total_tokens == n_prompt + N
    assert len(r.usage.kv_fraction) == 4  # one per HAM layer
    assert all(0 <= f <= 1 for f in r.usage.kv_fraction)
    assert 0 < r.usage.kv_bytes < r.usage.full_kv_bytes


def test_stream_completion_matches_plain_and_generate(client, local):
    text, chunks = streamed_text(complete(client, stream=True))
    assert len(chunks) > 2
    assert text == complete(client).choices[0].text == reference(local, PROMPT, served=text)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no usage unless asked for


def test_stream_include_usage_sends_a_last_usage_chunk(client, local):
    """OpenAI's stream_options: a last chunk with "choices": [] and the usage, "usage": null in
    every other chunk."""
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}))
    content, last = chunks[:-1], chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == N
    assert last.usage.prompt_tokens == len(local[1].encode(PROMPT))
    assert len(last.usage.kv_fraction) == 4 and last.usage.kv_bytes > 0
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    text = "".join(c.choices[0].text for c in content)
    assert text == reference(local, PROMPT, served=text)
    assert content[-1].choices[0].finish_reason == "length"


def test_stream_is_openai_server_sent_events(server):
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c for c in chunks)
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = r.read().decode().split("\n\n")
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["object"] == "text_completion" and chunks[-1]["id"] == chunks[0]["id"]


def chat_prompt(messages) -> tuple[str, list[str]]:
    """The served model's chat prompt (its folder's template, or the built-in one) and stops."""
    from ham_mlx.serve.chat import load_chat_template

    template = load_chat_template(default_model_path())
    return template.render(messages), template.stop


def test_chat_matches_generate(client, local):
    messages = [
        {"role": "system", "content": "You speak in verse."},
        {"role": "user", "content": "What of the night?"},
    ]
    prompt, stops = chat_prompt(messages)
    assert "System: You speak in verse.\nUser: What of the night?\nAssistant:" in prompt
    kw = dict(model=MODEL_ID, messages=messages, max_tokens=N, temperature=0)
    r = client.chat.completions.create(**kw)
    expected = reference(local, prompt, served=r.choices[0].message.content)
    for stop in stops:
        expected = expected.split(stop)[0]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(local[1].encode(prompt))
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == expected
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.kv_fraction == r.usage.kv_fraction


def test_token_id_prompt(client, local):
    ids = local[1].encode(PROMPT)
    text = complete(client, prompt=ids).choices[0].text
    assert text == reference(local, PROMPT, served=text)


def test_stop_strings(client, local):
    full = reference(local, PROMPT, served=complete(client).choices[0].text)
    stop = full[5:8]  # cut the answer inside its first word(s)
    expected = full[: full.index(stop)]
    r = complete(client, stop=[stop, "never appears"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens < N
    text, chunks = streamed_text(complete(client, stop=stop, stream=True))
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client, local):
    sampling = dict(temperature=1.0, top_p=0.9, seed=7)
    texts = [complete(client, **sampling).choices[0].text for _ in range(2)]
    expected = reference(local, PROMPT, served=texts[0], **sampling)
    assert texts == [expected, expected]
    assert expected != reference(local, PROMPT)


def kv(client, **controls) -> tuple[list[float], int]:
    r = complete(client, max_tokens=8, extra_body=controls)
    return r.usage.kv_fraction, r.usage.kv_bytes


def test_ham_controls_move_kv_fraction(client):
    assert kv(client, threshold=-1.0)[0] == [1.0] * 4  # every token cached
    assert kv(client, threshold=3.0) == ([0.0] * 4, 0)  # none
    assert kv(client, threshold=[-1, 3, -1, 3])[0] == [1.0, 0.0, 1.0, 0.0]
    low, high = kv(client, threshold=0.3)[0], kv(client, threshold=0.9)[0]
    assert all(a >= b for a, b in zip(low, high)) and sum(low) > sum(high)
    half, tenth = kv(client, kv_budget=0.5)[0], kv(client, kv_budget=0.1)[0]
    assert 0.3 <= sum(half) / 4 <= 0.7 and sum(tenth) < sum(half)
    capped, capped_bytes = kv(client, threshold=-1.0, max_kv_tokens=3)
    assert all(f < 0.5 for f in capped) and capped_bytes < kv(client, threshold=-1.0)[1]


def test_concurrent_clients_get_their_serial_answers(server, local):
    prompts = [PROMPT, "Now is the winter", "O Romeo, Romeo"]
    jobs = [(p, stream) for p in prompts for stream in (False, True)]

    def ask(job):
        prompt, stream = job
        r = complete(server.client(), prompt=prompt, stream=stream)
        return streamed_text(r)[0] if stream else r.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    served = dict(zip(jobs, answers))
    expected = {p: reference(local, p, served=served[p, False]) for p in prompts}
    assert answers == [expected[p] for p, _ in jobs]


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
IMAGE = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
BAD_REQUESTS = {  # id: (path, body, status, the error's param)
    "unknown model": (CMPL, {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    "bad json": (CMPL, '{"prompt": "a",', 400, None),
    "body not an object": (CMPL, "[1, 2]", 400, None),
    "max_tokens above limit": (CMPL, {"prompt": "a", "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    "max_tokens negative": (CMPL, {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    "empty prompt": (CMPL, {"prompt": ""}, 400, "prompt"),
    "empty token prompt": (CMPL, {"prompt": []}, 400, "prompt"),
    "prompt list with a number": (CMPL, {"prompt": ["a", 5]}, 400, "prompt"),
    "logprobs above 20": (CMPL, {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    "stream_options without stream": (
        CMPL,
        {"prompt": "a", "stream_options": {}},
        400,
        "stream_options",
    ),
    "top_logprobs without logprobs": (
        CHAT,
        {"messages": HI, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    "top_logprobs above 20": (
        CHAT,
        {"messages": HI, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    "token id too large": (CMPL, {"prompt": [2, 2048]}, 400, "prompt"),
    "token id negative": (CMPL, {"prompt": [2, -1]}, 400, "prompt"),
    "threshold not a number": (CMPL, {"prompt": "a", "threshold": "low"}, 400, "threshold"),
    "threshold infinite": (CMPL, '{"prompt": "a", "threshold": Infinity}', 400, "threshold"),
    "threshold per layer count": (CMPL, {"prompt": "a", "threshold": [0.5] * 3}, 400, "threshold"),
    "kv_budget zero": (CMPL, {"prompt": "a", "kv_budget": 0}, 400, "kv_budget"),
    "kv_budget above one": (CMPL, {"prompt": "a", "kv_budget": 1.5}, 400, "kv_budget"),
    "max_kv_tokens zero": (CMPL, {"prompt": "a", "max_kv_tokens": 0}, 400, "max_kv_tokens"),
    "kv_policy unknown": (CMPL, {"prompt": "a", "kv_policy": "drop"}, 400, "kv_policy"),
    "temperature negative": (CMPL, {"prompt": "a", "temperature": -1}, 400, "temperature"),
    "n above one": (CMPL, {"prompt": "a", "n": 2}, 400, "n"),
    "empty messages": (CHAT, {"messages": []}, 400, "messages"),
    "unknown role": (CHAT, {"messages": [HI[0] | {"role": "robot"}]}, 400, "messages[0].role"),
    "image content": (CHAT, {"messages": [HI[0] | {"content": IMAGE}]}, 400, "messages[0].content"),
    "chat unknown model": (CHAT, {"model": "x", "messages": HI}, 404, "model"),
}


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS.values(), ids=BAD_REQUESTS)
def test_bad_request_gets_openai_error(server, path, body, status, param):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]
    if status == 404:
        assert "'gpt-4'" in error["message"] or "'x'" in error["message"]
        assert error["code"] == "model_not_found"


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="kv_budget"):
        complete(client, extra_body={"kv_budget": 2})


def test_good_request_after_bad_ones(server, client, local):
    assert server.post("/v1/completions", "{oops").status_code == 400
    text = complete(client).choices[0].text
    assert text == reference(local, PROMPT, served=text)


def test_stream_disconnect_stops_generation(server, client):
    body = {"prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # generating; now hang up
    assert complete(client, max_tokens=2).choices[0].text  # served once the worker is free
    cancelled = re.findall(r"generation cancelled after (\d+) tokens", server.log.read_text())
    assert cancelled and int(cancelled[-1]) < LIMIT // 2


def test_one_log_line_per_request(server, client):
    complete(client, max_tokens=3)
    server.post("/v1/completions", {"prompt": ""})
    log = server.log.read_text()
    assert re.search(r"POST /v1/completions 200 \d+\+3 tok \d+\.\d+s", log)
    assert re.search(r"POST /v1/completions 400 - tok \d+\.\d+s", log)
    complete(client, max_tokens=3)  # the same prompt: its state is reused
    assert re.search(r"POST /v1/completions 200 \d+\+3 tok \d+\.\d+s \(\d+ cached\)",
                     server.log.read_text())  # fmt: skip


def test_stop_text_holds_back_a_possible_stop():
    from ham_mlx.serve.stop import StopText

    stops = StopText(["\nUser:"])
    assert stops.add("Hi there\nUs") == ("Hi there", False)
    assert stops.add("ually") == ("\nUsually", False)
    assert stops.add(" so\nU") == (" so", False)
    assert stops.add("ser: bye") == ("", True)
    tail = StopText(["END"])
    assert tail.add("the EN") == ("the ", False) and tail.flush() == "EN"


def test_chat_templates(tmp_path):
    from jinja2 import TemplateError

    from ham_mlx.serve.chat import load_chat_template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    builtin = load_chat_template(tmp_path)
    assert builtin.source == "built-in" and builtin.stop == ["\nUser:"]
    assert builtin.render(messages) == "System: Be brief.\nUser: Hi\nAssistant:"
    config = {
        "bos_token": "<s>", "eos_token": {"content": "</s>"},
        "chat_template": "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    }  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    folder = load_chat_template(tmp_path)
    assert folder.source.endswith("tokenizer_config.json") and folder.stop == []
    assert folder.render(messages[1:]) == "<|user|>Hi</s><|assistant|>"  # BOS left to encode
    with pytest.raises(TemplateError, match="no system role"):
        folder.render(messages)


def test_generation_error_is_500_and_the_worker_goes_on(local):
    import uvicorn

    from ham_mlx.serve.app import create_app
    from ham_mlx.serve.chat import load_chat_template
    from ham_mlx.serve.engine import Engine

    model, tokenizer = local

    class FailOnce:
        """The model, except that its first cache cannot be made."""

        def __init__(self):
            self.failed = False

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, *args, **kwargs):
            return model(*args, **kwargs)

        def make_cache(self, *args, **kwargs):
            if not self.failed:
                self.failed = True
                raise RuntimeError("no memory for the cache")
            return model.make_cache(*args, **kwargs)

    app = create_app(Engine(FailOnce(), tokenizer), "m", load_chat_template(default_model_path()))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        assert "no memory for the cache" in r.json()["error"]["message"]
        r = httpx.post(url, json=body, timeout=60)
        text = r.json()["choices"][0]["text"]
        assert r.status_code == 200 and text == reference(local, PROMPT, 4, served=text)
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def folder_server(tmp_path_factory):
    """A server for a model folder with a chat template and at most one waiting request."""
    root = tmp_path_factory.mktemp("folder")
    folder = root / "bard"
    shutil.copytree(default_model_path(), folder)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    s = Server(root / "server.log", "--model", str(folder), "--max-batch", "1", "--max-queue", "1")
    yield s
    s.stop()


def test_folder_model_id_and_chat_template(folder_server, local):
    client = folder_server.client()
    assert [m.id for m in client.models.list().data] == ["bard"]
    r = client.chat.completions.create(
        model="bard", messages=[{"role": "user", "content": "Hail"}], max_tokens=N, temperature=0
    )
    prompt = "[user] Hail\n[assistant]"
    assert r.usage.prompt_tokens == len(local[1].encode(prompt))
    text = r.choices[0].message.content
    assert text == reference(local, prompt, served=text)
    assert "chat template: " + str(folder_server.log.parent) in folder_server.log.read_text()


def test_full_queue_gets_503_and_sigterm_ends_everything_at_once(folder_server):
    s = folder_server
    body = {"prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as running:
        lines = running.iter_lines()  # (keep it: dropping it closes the connection)
        assert next(lines).startswith("data: ")
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(s.post, "/v1/completions", {"prompt": "a"})
            deadline = time.monotonic() + 30
            while httpx.get(s.url + "/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = s.post("/v1/completions", {"prompt": "a", "max_tokens": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
            start = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert queued.result().status_code == 503
            assert queued.result().json()["error"]["code"] == "shutting_down"
        rest = [json.loads(x.removeprefix("data: ")) for x in lines if x]
        assert rest[-1]["error"]["code"] == "shutting_down"
        assert all("choices" in x for x in rest[:-1])
    assert s.proc.wait(timeout=15) == 0
    assert time.monotonic() - start < 5
    assert "generation worker stopped" in s.log.read_text()
