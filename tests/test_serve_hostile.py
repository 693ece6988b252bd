"""`ham-mlx serve` against hostile clients: huge stop strings and prompts, lone surrogates,
clients that hang up, SIGTERM in the middle of a long prompt, and fuzzed request bodies. A real
server process over real HTTP."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import http.client
import json
import re
import signal
import threading
import time

import pytest
from test_serve import PROMPT, Server

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MAX_PROMPT = 256
LIMIT = 2048  # --max-tokens-limit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("hostile") / "server.log", "--max-prompt-tokens",
               str(MAX_PROMPT), "--max-tokens-limit", str(LIMIT))  # fmt: skip
    yield s
    assert s.stop() == 0


def test_stop_strings_are_matched_in_linear_time():
    from ham_mlx.serve.stop import StopText

    stops = StopText(["a" * 20_000 + "b", "c" * 30_000])
    start = time.perf_counter()
    for _ in range(300):
        assert stops.add("a") == ("", False)  # could still become the first stop string
    assert time.perf_counter() - start < 1.0
    assert stops.add("b") == ("a" * 300 + "b", False)
    long = StopText(["a" * 2000 + "b"])
    assert [long.add("a") for _ in range(2100)] == [("", False)] * 2000 + [("a", False)] * 100
    assert long.add("bc") == ("", True)
    again = StopText(["abab", "b"])
    assert again.add("xaba") == ("xa", True)  # "b" begins before "abab" ends


def test_stop_strings_are_bounded(server):
    body = {"prompt": PROMPT, "max_tokens": 1}
    r = server.post("/v1/completions", body | {"stop": "x" * 1025})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = server.post("/v1/completions", body | {"stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert server.post("/v1/completions", body | {"stop": "x" * 1024}).status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [1] * (MAX_PROMPT + 1), "max_tokens": 1}),
    ("/v1/completions", {"prompt": "la " * MAX_PROMPT * 2, "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "la " * MAX_PROMPT * 2}]}),
], ids=["ids", "text", "chat"])  # fmt: skip
def test_prompts_beyond_the_limit_get_400(server, path, body):
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"limit of {MAX_PROMPT}" in error["message"]
    assert server.post("/v1/completions", {"prompt": [1] * MAX_PROMPT, "max_tokens": 1}).is_success


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": "ab", "stop": ["\\udfff"], "max_tokens": 1}', "stop[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages[0].content"),
    ("/tokenize", '{"prompt": "\\udc80"}', "prompt"),
    ("/v1/completions", '{"prompt": "ab", "\\ud800": 1}', "body"),
], ids=["prompt", "stop", "chat", "tokenize", "key"])  # fmt: skip
def test_lone_surrogates_get_400_and_the_connection_stays_open(server, path, body, param):
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=60)
    headers = {"content-type": "application/json"}
    conn.request("POST", path, body=body.encode(), headers=headers)
    r = conn.getresponse()
    error = json.loads(r.read())["error"]
    assert r.status == 400 and param in error["message"] and not r.will_close, error
    sock = conn.sock
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 1}),
                 headers=headers)  # fmt: skip
    assert conn.getresponse().status == 200 and conn.sock is sock  # the same connection
    conn.close()


def cancelled_counts(server) -> list[int]:
    return [int(n) for n in re.findall(r"generation cancelled after (\d+) tokens",
                                       server.log.read_text())]  # fmt: skip


def test_a_client_that_hangs_up_on_a_plain_request_stops_it(server):
    before = len(cancelled_counts(server))
    body = {"prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 30
    while len(cancelled_counts(server)) == before:
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        time.sleep(0.1)
    assert cancelled_counts(server)[-1] < LIMIT
    assert re.search(r"POST /v1/completions 499", server.log.read_text())


BAD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
    st.text(st.characters(exclude_categories=()), max_size=8),  # lone surrogates too
    st.lists(st.integers(-5, 3000), max_size=4), st.dictionaries(st.text(max_size=3), st.none()),
)  # fmt: skip
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream",
          "logprobs", "echo", "seed", "threshold", "kv_budget", "max_kv_tokens", "kv_policy",
          "stream_options", "n", "model", "top_logprobs", "max_completion_tokens"]  # fmt: skip
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "bot", 3]),
                                           "content": BAD}), max_size=2)  # fmt: skip
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(BAD, MESSAGES), max_size=6),
    BAD,
    st.binary(max_size=12),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize",
                             "/detokenize"]), body=BODIES)  # fmt: skip
def test_fuzzed_bodies_get_200_or_an_error_of_the_client(server, path, body):
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):  # answers that succeed stay short
            if isinstance(body.get(key), int) and 2 < body[key] <= LIMIT:
                body[key] = 2
        body.setdefault("max_tokens", 2)
        content = json.dumps(body).encode()
    else:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code in (200, 400, 404, 422), (r.status_code, r.text)
    if r.status_code == 404:
        assert r.json()["error"]["code"] == "model_not_found"
    if r.status_code == 200 and path.startswith("/v1") and body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text
    assert server.healthy()


@pytest.mark.slow  # 16 s: a server of its own and a prompt read in one long model call
def test_sigterm_during_a_long_prompt_answers_503_at_once(tmp_path):
    s = Server(tmp_path / "server.log", "--prefill-step-size", "4096")
    answer = {}

    def ask():
        body = {"prompt": [5] * 4000, "max_tokens": 1}
        answer["r"] = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        answer["t"] = time.monotonic()

    asking = threading.Thread(target=ask)
    asking.start()
    deadline = time.monotonic() + 30
    while s.health()["running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # inside the prompt's one long model call
    start = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    asking.join(30)
    r = answer["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert answer["t"] - start < 2.0
    assert s.proc.wait(timeout=15) == 0
