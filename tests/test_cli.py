"""The `ham-mlx` command line as a user meets it: chat in a terminal, stop strings, stdin, pipes
that close early, conflicting options, one name per option, --version, the bundled default.

Process behaviour (terminals, pipes, exit codes) is checked on real subprocesses; the rest through
`ham_mlx.cli.main`. Every generation is greedy on the bundled model, so outputs are exact.
"""

import argparse
import io
import json
import os
import re
import select
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from ham_mlx.chat import ChatSession, load_formatter
from ham_mlx.cli import build_parser, main, stop_text
from ham_mlx.generate import stream_generate
from ham_mlx.model_io import default_model_path, load

EXE = [sys.executable, "-m", "ham_mlx.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "NO_COLOR": "1"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundled():
    return load()


def fresh(model, tokenizer, prompt, max_tokens, stop="\nUser:"):
    """(text cut before `stop`, tokens) of a greedy run from scratch on `prompt`."""
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
    text = "".join(r.text for r in responses)
    return (text[: text.find(stop)] if stop in text else text), [r.token for r in responses]


# ---- chat -------------------------------------------------------------------------------------


class Terminal:
    """A subprocess whose stdin, stdout and stderr are a pseudo-terminal."""

    def __init__(self, argv):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=ENV,
                                     close_fds=True)  # fmt: skip
        os.close(slave)
        self.out = b""

    def read_until(self, count: int, token: bytes = b">> ", timeout: float = 60) -> None:
        """Read until `token` has appeared `count` times in all the output."""
        end = time.monotonic() + timeout
        while self.out.count(token) < count:
            assert time.monotonic() < end, self.text()
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    assert self.proc.poll() is None or self.out.count(token) >= count, self.text()

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def text(self) -> str:
        return self.out.decode(errors="replace").replace("\r\n", "\n")

    def close(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
            while select.select([self.master], [], [], 0.1)[0]:
                self.out += os.read(self.master, 65536)
        except OSError:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)
        return code


def test_chat_in_a_terminal_reuses_the_cache_exactly(bundled):
    """Two turns, /reset, a third turn, Ctrl-D: the second reply is what a fresh run on the whole
    two-turn transcript gives, and the second turn fed the model only its own tokens."""
    model, tokenizer = bundled
    u1, u2, n = "Who are you?", "And where is Romeo?", 12
    term = Terminal([*EXE, "chat", "--max-tokens", str(n)])
    try:
        for count, line in enumerate([u1, u2, "/reset", u1], start=1):
            term.read_until(count)
            term.send(line + "\n")
        term.read_until(5)
        term.send("\x04")  # Ctrl-D at the prompt: quit
    finally:
        code = term.close()
    out = term.text()
    assert code == 0, out
    assert "Traceback" not in out and "/reset (r)" in out

    def turn(user, nth=0):  # the reply printed after the user's line, and its statistics line
        found = re.findall(rf"{re.escape(user)}\n(.*?)\n(prompt (\d+) tok [^\n]*)", out, re.S)
        return found[nth]

    # turn 1 from scratch
    ids1 = tokenizer.encode(f"User: {u1}\nAssistant:")
    text1, g1 = fresh(model, tokenizer, ids1, n)
    assert len(g1) == n and "\nUser:" not in text1  # ended by --max-tokens: the case below
    reply1, stats1, prompt1 = turn(u1)
    assert reply1 == text1 and int(prompt1) == len(ids1) and "admitted" in stats1
    # turn 2: a fresh run on the whole transcript, the first reply's last token included
    anchored = tokenizer.encode(f"\n\nUser: {u2}\nAssistant:", add_bos=False)
    anchor = tokenizer.encode("\n", add_bos=False)
    assert anchored[: len(anchor)] == anchor  # the continuation, without a dummy-prefix space:
    new = [g1[-1], *anchored[len(anchor) :]]
    transcript = ids1 + g1[:-1] + new
    assert tokenizer.decode(transcript) == f"User: {u1}\nAssistant: {text1}\nUser: {u2}\nAssistant:"
    text2, _ = fresh(model, tokenizer, transcript, n)
    reply2, stats2, prompt2 = turn(u2)
    assert reply2 == text2
    assert int(prompt2) == len(new)  # only the new turn went through the model
    # /reset: a new conversation, which starts as the first did
    assert "(new conversation)" in out
    again, _, prompt_again = turn(u1, 1)
    assert again == reply1 and int(prompt_again) == len(ids1)


def test_chat_reads_lines_from_a_pipe_and_quits_on_q(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nq\nnot read\n"))
    assert main(["chat", "--max-tokens", "4", "--system-prompt", "You are terse."]) == 0
    cap = capsys.readouterr()
    assert cap.out.count(">> ") == 2 and "generation 4 tok" in cap.err
    assert "prompt format:" in cap.err


def test_chat_session_does_not_feed_a_stop_string_twice(bundled):
    """A reply cut at a stop string: the caches hold the stop string's tokens, so the next turn
    starts after it, and the transcript is the chat format's text exactly."""
    model, tokenizer = bundled
    session = ChatSession(model, tokenizer, load_formatter(default_model_path()), stop=["\n"],
                          sampling={"max_tokens": 24})  # fmt: skip
    first = "".join(session.ask("Who are you?"))
    assert session.reply.reason == "stop string" and session.tail == "\n"
    assert session.turn_text("Speak!") == "User: Speak!\nAssistant:"
    "".join(session.ask("Speak!"))
    text = tokenizer.decode(session.tokens)
    assert text.startswith(f"User: Who are you?\nAssistant: {first}\nUser: Speak!\nAssistant:")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_turns_with_a_jinja_template_and_an_end_token(bundled, tmp_path):
    """After a reply ended by the end token (in the caches), a turn adds the template's text
    from just after that token to where the next reply begins."""
    pytest.importorskip("jinja2", reason="chat templates need jinja2 ('ham-mlx[serve]')")
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    formatter = load_formatter(tmp_path)
    assert formatter.source.endswith("tokenizer_config.json") and formatter.stop == []
    session = ChatSession(*bundled, formatter, system_prompt="Be kind.")
    assert session.turn_text("Hi") == ("<|im_start|>system\nBe kind.<|im_end|>\n"
                                       "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    session.messages += [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]  # fmt: skip
    session.tokens, session.tail = [2, 3], "<|im_end|>"  # as after a reply ended by the end token
    assert session.turn_text("Bye") == "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"


def test_plain_chat_format_without_jinja2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 fails
    monkeypatch.delitem(sys.modules, "ham_mlx.serve.chat", raising=False)
    formatter = load_formatter(default_model_path())  # its tokenizer_config.json has a template
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert formatter.render(messages) == "System: S\nUser: U\nAssistant:"
    assert formatter.stop == ["\nUser:"]
    err = capsys.readouterr().err
    assert "jinja2 is not installed" in err or "chat_template" not in json.loads(
        (default_model_path() / "tokenizer_config.json").read_text())  # fmt: skip


# ---- generate: --stop, --system-prompt, stdin ---------------------------------------------------


def test_generate_stop_strings(bundled, capsys):
    model, tokenizer = bundled
    free, _ = fresh(model, tokenizer, "ROMEO:", 40, stop="\0")
    early, late = free[18:21], free[10:13]
    cut = min(free.find(early), free.find(late))
    assert 0 < cut < len(free) - 3
    assert main(["generate", "--prompt", "ROMEO:", "--max-tokens", "40",
                 "--stop", early, "--stop", late]) == 0  # fmt: skip
    cap = capsys.readouterr()
    assert cap.out == free[:cut] + "\n" and "generation" in cap.err


def test_stop_escapes():
    assert stop_text(r"a\nb\tc\\n") == "a\nb\tc\\n"


def test_generate_system_prompt_uses_the_chat_template(bundled, capsys):
    model, tokenizer = bundled
    expected, _ = fresh(model, tokenizer, "System: Be brief.\nUser: Hi\nAssistant:", 16)
    argv = ["generate", "--prompt", "Hi", "--system-prompt", "Be brief.", "--max-tokens", "16"]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_prompt_dash_reads_stdin(monkeypatch, capsys):
    assert main(["generate", "--prompt", "JULIET:", "--max-tokens", "8"]) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("JULIET:"))
    assert main(["generate", "--prompt", "-", "--max-tokens", "8"]) == 0
    cap = capsys.readouterr()
    assert cap.out == expected and "standard input" not in cap.err  # no hint off a terminal


def test_bare_generate_on_a_terminal_says_what_it_waits_for():
    master, slave = os.openpty()
    proc = subprocess.Popen([*EXE, "generate", "--max-tokens", "8"], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)  # fmt: skip
    os.close(slave)
    try:
        assert select.select([proc.stderr], [], [], 60)[0], "no word on stderr"
        hint = proc.stderr.readline().decode()
        assert "reading the prompt from standard input" in hint and "--prompt" in hint
        os.write(master, b"ROMEO:\n\x04")  # a line, then Ctrl-D: end of input
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0, err
    assert out.strip() and b"generation 8 tok" in err


def test_closed_stdout_pipe_exits_quietly():
    """`ham-mlx generate ... | head -c 10`: no traceback, the status of a tool stopped by
    SIGPIPE (141) or 0."""
    script = 'set -o pipefail; "$@" | head -c 10'
    argv = [*EXE, "generate", "--prompt", "ROMEO:", "--max-tokens", "400"]
    run = subprocess.run(["bash", "-c", script, "sh", *argv], capture_output=True, env=ENV,
                         timeout=120)  # fmt: skip
    assert len(run.stdout) == 10
    assert run.returncode in (0, 141), run.stderr
    assert b"Traceback" not in run.stderr and b"BrokenPipe" not in run.stderr


# ---- options ----------------------------------------------------------------------------------

CONFLICTS = [
    (["generate", "--threshold", "0.3", "--kv-budget", "0.1"], "--threshold and --kv-budget"),
    (["generate", "--kv-policy", "reject"], "no cap is given; add --max-kv-tokens"),
    (["generate", "--onnx", "o", "--kv-policy", "evict", "--max-kv-tokens", "8"],
     "the exported graph can only reject"),
    (["generate", "--onnx", "o", "--model", "m"], "--model and --onnx: give one"),
    (["generate", "--onnx", "o", "--threshold", "0.3"], "τ is baked into the graph"),
    (["generate", "--onnx", "o", "--kv-budget", "0.1"], "τ is baked into the graph"),
    (["generate", "--top-p", "0.9"], "--temp 0 (the default) is greedy"),
    (["generate", "--top-k", "5", "--seed", "1"], "--top-k, --seed: they apply to sampling"),
    (["generate", "--stop", ""], "--stop: give a non-empty text"),
    (["generate", "--kv-budget", "1.5"], "must lie in (0, 1]"),
    (["generate", "--max-kv-tokens", "0"], "must be >= 1"),
    (["generate", "--threshold", "a,b"], "expected a number"),
    (["chat", "--threshold", "0.3", "--kv-budget", "0.1"], "--threshold and --kv-budget"),
    (["chat", "--kv-policy", "evict"], "no cap is given"),
    (["chat", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["export", "m", "o", "--context-length", "512"], "applies with --genai only"),
    (["export", "m", "o", "--quantize", "int8", "--dtype", "float16"], "starts from float32"),
    (["convert", "s", "d", "--q-bits", "8"], "--q-bits applies to quantized weights"),
    (["bench", "--parts", "probe", "--contexts", "16"], "--contexts applies to the decode part"),
    (["bench", "--parts", "decode", "--onnx-fraction", "0.5"], "applies to the onnx part"),
    (["bench", "--parts", "probe", "--prefill-step-size", "64"], "decode, prefill and onnx parts"),
    (["tokenizer", "encode", "--tokenizer", "t", "--input", "x", "--out", "o",
      "--valid-fraction", "1"], "must lie in [0, 1)"),
    (["train", "--config", "c.yaml", "--steps", "0"], "must be >= 1"),
    (["inspect", "--prompt", "x", "--max-tokens", "0"], "must be >= 1"),
    (["init", "m", "--preset", "tiny-gdn", "--threshold", "0.3"], "preset 'tiny-gdn' has none"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", CONFLICTS, ids=[" ".join(a) for a, _ in CONFLICTS])
def test_conflicting_or_inapplicable_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    assert f"usage: ham-mlx {argv[0]}" in err


def test_memory_controls_on_a_model_without_ham_layers(tmp_path, capsys):
    folder = str(tmp_path / "gdn")
    assert main(["init", folder, "--preset", "tiny-gdn"]) == 0
    capsys.readouterr()
    runs = [
        ["generate", "--model", folder, "--prompt", "x", "--threshold", "0.3",
         "--max-kv-tokens", "4"],
        ["chat", "--model", folder, "--kv-budget", "0.2"],
    ]
    for argv, flags in zip(runs, ["--threshold, --max-kv-tokens apply", "--kv-budget applies"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"{flags} to HAM layers, and this model has none" in err


@pytest.mark.parametrize("argv", [
    ["generate", "--onnx", "o", "--max-kv-tokens", "8", "--kv-policy", "reject"],
    ["generate", "--kv-budget", "0.1", "--max-kv-tokens", "8", "--kv-policy", "reject"],
    ["generate", "--temp", "0.7", "--top-p", "0.9", "--seed", "1", "--stop", "\n"],
    ["export", "m", "o", "--genai", "--context-length", "512", "--dtype", "fp16"],
    ["convert", "s", "d", "-q", "--q-bits", "8"],
    ["bench", "--parts", "onnx", "--onnx-fraction", "0.5", "--steps", "2"],
])  # fmt: skip
def test_compatible_options_are_accepted(argv):
    a = build_parser().parse_args(argv)
    a.check(a, a.parser.error)


def test_one_name_per_option_and_the_old_names_warn(capsys):
    p = build_parser()
    a = p.parse_args(["export", "m", "o", "--max-kv", "4"])
    assert a.max_kv_tokens == 4
    assert "--max-kv is deprecated; use --max-kv-tokens" in capsys.readouterr().err
    assert p.parse_args(["export", "m", "o", "--max-kv-tokens", "5"]).max_kv_tokens == 5
    a = p.parse_args(["bench", "--chunk", "64"])
    assert a.prefill_step_size == 64 and "use --prefill-step-size" in capsys.readouterr().err
    sub = next(x for x in p._actions if isinstance(x, argparse._SubParsersAction)).choices
    export_help, bench_help = sub["export"].format_help(), sub["bench"].format_help()
    assert "--max-kv-tokens" in export_help and "--max-kv " not in export_help
    assert "--prefill-step-size" in bench_help and "--chunk" not in bench_help
    for name in ("generate", "chat", "inspect"):
        assert "--prefill-step-size" in sub[name].format_help()
    for name in ("generate", "chat"):
        assert "--max-kv-tokens" in sub[name].format_help()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ham-mlx {version('ham-mlx')}\n"


def test_info_defaults_to_the_bundled_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"{default_model_path()} (bundled)" in out and "parameters" in out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] > 0


ISSUE = re.compile(r"\bissues?\b", re.IGNORECASE)


def test_the_product_never_speaks_of_issues():
    p = build_parser()
    sub = next(x for x in p._actions if isinstance(x, argparse._SubParsersAction)).choices
    for name, parser in sub.items():
        assert not ISSUE.search(parser.format_help()), name
    bench_help = sub["bench"].format_help()
    assert "Targets" in bench_help and "16k context" in bench_help
    files = [f for folder in ("ham_mlx", "export", "convert", "examples")
             for f in (ROOT / folder).rglob("*") if f.suffix in (".py", ".md")]  # fmt: skip
    files += list((ROOT / "docs").glob("*.md"))
    spoken = [str(f.relative_to(ROOT)) for f in files if ISSUE.search(f.read_text("utf-8"))]
    assert not spoken, spoken
