"""mlx-lm's own console scripts on ham_mlx model folders, as a new user runs them.

Every folder names its mlx-lm module in config.json (`model_file`), so with `--trust-remote-code`
`mlx_lm.generate`, `mlx_lm.chat`, `mlx_lm.server` and `mlx_lm.cache_prompt` load it. Each runs
as a subprocess on a HAM, a GDN, an attention and a hybrid folder, and its greedy text must be
ours (`ham_mlx.generate`, temperature 0). Tiny random-weights presets and few tokens: each
subprocess costs its start-up (~3 s on 2 cores), not its generation.
"""

import ham_mlx  # noqa: F401

# isort: split
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ham_mlx import generate, load, load_prompt_cache
from ham_mlx.generate import stream_generate
from ham_mlx.model_io import default_model_path
from ham_mlx.presets import init_model

pytest.importorskip("mlx_lm")
pytest.importorskip("transformers")

PRESETS = {"ham": "tiny", "gdn": "tiny-gdn", "attn": "tiny-attn", "hybrid": "tiny-hybrid"}
PROMPT = "ROMEO: But soft, what light"
N = 12
ENV = {
    **os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "COLUMNS": "200",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
}  # fmt: skip
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")


def script(name: str) -> list[str]:
    """An mlx-lm console script (`mlx_lm.generate`, ...), beside this Python or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", "mlx_lm", name.split(".", 1)[1]]


def run(command: list[str], stdin: str | None = None, check: bool = True):
    r = subprocess.run(command, input=stdin, capture_output=True, text=True, encoding="utf-8",
                       env=ENV, timeout=180)  # fmt: skip
    if check:
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def generated(stdout: str) -> str:
    """The text `mlx_lm.generate` prints between its two "==========" lines."""
    return stdout.split("==========\n", 1)[1].rsplit("\n==========", 1)[0]


def ours(folder, prompt, max_tokens=N, prompt_cache=None) -> str:
    """Our greedy text, with the unknown piece spelled as the Hugging Face tokenizer spells it
    ("<unk>"; sentencepiece writes " ⁇ "); random weights do generate it."""
    model, tokenizer = load(folder)
    if prompt_cache is not None or isinstance(prompt, list):
        responses = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                    prompt_cache=prompt_cache)  # fmt: skip
        text = "".join(r.text for r in responses)
    else:
        text = generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=0.0)
    return text.replace(" \u2047 ", "<unk>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_lm_cli")
    return {kind: init_model(root / kind, preset, seed=1) for kind, preset in PRESETS.items()}


@pytest.mark.parametrize("kind", PRESETS)
def test_generate_gives_our_greedy_text(folders, kind):
    folder = folders[kind]
    out = run(script("mlx_lm.generate") + [
        "--model", str(folder), "--trust-remote-code", "--prompt", PROMPT, "--max-tokens", str(N),
        "--temp", "0", "--ignore-chat-template",
    ]).stdout  # fmt: skip
    assert generated(out) == ours(folder, PROMPT)


def test_generate_uses_the_folder_chat_template(folders):
    folder = folders["hybrid"]
    out = run(script("mlx_lm.generate") + [
        "--model", str(folder), "--trust-remote-code", "--prompt", "What light?",
        "--system-prompt", "Be brief.", "--max-tokens", str(N),
    ]).stdout  # fmt: skip
    _, tokenizer = load(folder)
    ids = tokenizer.encode("System: Be brief.\nUser: What light?\nAssistant:")
    assert generated(out) == ours(folder, ids)


def test_chat_answers_one_turn_on_the_bundled_model():
    folder = default_model_path()
    out = run(script("mlx_lm.chat") + [
        "--model", str(folder), "--trust-remote-code", "--max-tokens", str(N),
    ], stdin="Who goes there?\nq\n").stdout  # fmt: skip
    _, tokenizer = load(folder)
    want = ours(folder, tokenizer.encode("User: Who goes there?\nAssistant:"))
    assert len(want.strip()) > 0
    # mlx-lm's streaming detokenizer drops the space that opens a SentencePiece answer
    assert want.strip() in ANSI.sub("", out), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_serves_a_hybrid(folders):
    """Concurrent completions (mlx-lm batches them: the caches' merge/filter/extract) and a chat
    completion through the folder's template, each equal to ours."""
    httpx = pytest.importorskip("httpx")
    folder, port = folders["hybrid"], free_port()
    server = subprocess.Popen(
        script("mlx_lm.server") + ["--model", str(folder), "--trust-remote-code", "--port",
                                   str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "mlx_lm.server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)

        def complete(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": N, "temperature": 0}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        prompts = [PROMPT, "JULIET: O Romeo, Romeo, wherefore art thou Romeo?"]
        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(complete, prompts))
        assert texts == [ours(folder, p) for p in prompts]
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": N,
                "temperature": 0}  # fmt: skip
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        _, tokenizer = load(folder)
        want = ours(folder, tokenizer.encode("User: Hello\nAssistant:"))
        assert r.json()["choices"][0]["message"]["content"] == want
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def prompt_cache_file(folders, tmp_path_factory):
    """`mlx_lm.cache_prompt` on the hybrid (the chat template's user turn, left open)."""
    path = tmp_path_factory.mktemp("prompt_cache") / "prefix.safetensors"
    run(script("mlx_lm.cache_prompt") + [
        "--model", str(folders["hybrid"]), "--trust-remote-code", "--prompt", PROMPT,
        "--prompt-cache-file", str(path),
    ])  # fmt: skip
    return path


SUFFIX = " through yonder window"


def continued(folder, path) -> str:
    """Ours, continuing from the file's caches with what mlx_lm.generate adds to a cached
    prompt: the rest of the user turn and the generation prompt."""
    model, tokenizer = load(folder)
    cache = load_prompt_cache(path, model=model)
    ids = tokenizer.encode(SUFFIX + "\nAssistant:", add_bos=False)
    return ours(folder, ids, prompt_cache=cache)


def generate_from_cache(path, command) -> str:
    return generated(run(command + [
        "--trust-remote-code", "--prompt-cache-file", str(path), "--prompt", SUFFIX,
        "--max-tokens", str(N),
    ]).stdout)  # fmt: skip


def test_cache_prompt_writes_a_file_we_read(folders, prompt_cache_file):
    model, tokenizer = load(folders["hybrid"])
    cache, meta = load_prompt_cache(prompt_cache_file, return_metadata=True, model=model)
    assert [type(c).__name__ for c in cache] == ["HAMCache", "GDNCache", "AttnCache", "HAMCache"]
    assert meta["model"] == str(folders["hybrid"])
    assert {c.offset for c in cache} == {len(tokenizer.encode("User: " + PROMPT))}


def test_generate_continues_from_a_cache_prompt_file(folders, prompt_cache_file):
    """mlx-lm's `generate` command, in a process that has imported ham_mlx (what makes mlx-lm's
    `load_prompt_cache` know our cache classes)."""
    code = "import sys, ham_mlx; from mlx_lm.generate import main; main()"
    text = generate_from_cache(prompt_cache_file, [sys.executable, "-c", code])
    assert text == continued(folders["hybrid"], prompt_cache_file)


def test_generate_console_script_continues_from_a_cache_prompt_file(folders, prompt_cache_file):
    """The console script itself. It reads --prompt-cache-file before it loads the model, so in
    a fresh process nothing has imported ham_mlx yet: mlx-lm's `load_prompt_cache` resolves our
    cache classes through the start-up hook installed with the package (ham_mlx_mlx_lm.pth)."""
    command = script("mlx_lm.generate") + [
        "--trust-remote-code", "--prompt-cache-file", str(prompt_cache_file), "--prompt", SUFFIX,
        "--max-tokens", str(N),
    ]  # fmt: skip
    r = run(command, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert generated(r.stdout) == continued(folders["hybrid"], prompt_cache_file)


def test_start_up_hook_registers_cache_classes_without_importing_ham_mlx():
    """The installed start-up file adds a finder only; ham_mlx is imported once mlx-lm's cache
    module is, and then the classes are there under their names."""
    code = (
        "import sys\n"
        "assert 'ham_mlx' not in sys.modules and 'mlx' not in sys.modules\n"
        "assert any(getattr(f, 'ham_mlx_cache_hook', False) for f in sys.meta_path)\n"
        "import mlx_lm.models.cache as c\n"
        "from ham_mlx.cache import CACHE_CLASSES\n"
        "assert all(getattr(c, n) is k for n, k in CACHE_CLASSES.items())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
