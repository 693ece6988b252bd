"""`ham-mlx chat`: a conversation in the terminal, the model's caches kept between turns.

Each turn feeds the model only the new turn's tokens: the caches already hold the conversation so
far, the replies included with the token that ended them (HAM and GDN caches cannot be trimmed,
so nothing is ever taken back). The conversation in the caches is, token for token, the one a
fresh run would read: the first turn's prompt, each reply's tokens as generated, then the text
the chat format puts between that reply and the next reply (`ChatSession.turn_text`).

Prompts use the chat template of the model folder's tokenizer_config.json when it has one
(rendered with Jinja as transformers does, by `ham_mlx.serve.chat`), otherwise plain lines:

    System: You are terse.
    User: Hello
    Assistant:
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Chat with a model in the terminal. The model's memory (its HAM, GDN and attention caches) is
kept between turns: each turn processes only the new message, not the whole conversation.

Prompts use the chat template of the model folder's tokenizer_config.json when it has one,
otherwise plain "System: ..." / "User: ..." lines and "Assistant:" (the reply then stops before
a new "User:" line). After each reply a line of statistics: tokens, speed, and what the HAM
layers keep in memory.

In the chat:
  /reset (or r)          start a new conversation (same system prompt)
  /quit (or q), Ctrl-D   quit
  /help (or h)           these commands
  Ctrl-C                 stop the reply being written (at the prompt: quit)

examples:
  ham-mlx chat
  ham-mlx chat --model models/small --system-prompt "You are terse." --max-tokens 128
  ham-mlx chat --kv-budget 0.1 --temp 0.7 --seed 1
"""
HELP = "/reset (r): new conversation | /quit (q), Ctrl-D: quit | Ctrl-C: stop a reply"
QUIT = {"q", "/q", "/quit", "/exit"}
RESET = {"r", "/r", "/reset"}
HELPS = {"h", "/h", "/help", "?"}
PROMPT = ">> "

PLAIN_STOP = ["\nUser:"]
CONFIG = "tokenizer_config.json"
PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
         {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]  # fmt: skip
ANCHOR = "\n"  # encode_continuation: a newline starts a fresh piece in ham_mlx's tokenizers
REPLY_END = "\x00ham-mlx: end of reply\x00"  # marks where a reply ends in the rendered text


def plain_render(messages: list[dict[str, str]]) -> str:
    """The plain chat format: one "Role: content" line per message, then "Assistant:"."""
    lines = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return lines + "Assistant:"


@dataclass
class Formatter:
    """Chat messages to prompt text (ending where the reply begins, BOS text left out: the
    tokenizer adds the BOS id), with the format's stop strings and its end-of-turn text."""

    render_text: Callable[[list[dict[str, str]]], str]
    source: str
    stop: list[str] = field(default_factory=list)
    eos_token: str = ""

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.render_text(messages)
        except Exception as e:  # jinja2's TemplateError (raise_exception), UndefinedError
            if type(e).__module__.split(".")[0] != "jinja2":
                raise
            raise ValueError(f"the chat template ({self.source}) failed: {e}") from e


def _has_template(folder: Path) -> bool:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def load_formatter(folder: str | Path) -> Formatter:
    """The chat format of a model (or exported) folder: its Jinja chat template, else plain."""
    folder = Path(folder)
    try:
        from ham_mlx.serve.chat import load_chat_template
    except ModuleNotFoundError as e:  # jinja2: pip install 'ham-mlx[serve]'
        if e.name != "jinja2":
            raise
        if _has_template(folder):
            print(f"ham-mlx: warning: {folder / CONFIG} has a chat template but {e.name} is not "
                  "installed (pip install jinja2); using plain User:/Assistant: lines",
                  file=sys.stderr)  # fmt: skip
        return Formatter(plain_render, "plain User:/Assistant: lines", list(PLAIN_STOP))
    template = load_chat_template(folder)
    if template.source == "built-in":  # the same format as plain_render
        return Formatter(plain_render, "plain User:/Assistant: lines", list(template.stop))
    stop = list(template.stop)
    try:
        plain = template.render(PROBE) == plain_render(PROBE)
    except Exception:  # a template that refuses these messages (raise_exception) is not plain
        plain = False
    if not stop and plain:
        stop = list(PLAIN_STOP)  # a template that writes the plain format: stop as it does
    return Formatter(template.render, template.source, stop, template.eos_token)


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of text that continues a sequence: no BOS, and none of the space that
    sentencepiece's dummy prefix puts before a text of its own. The text is encoded after an
    anchor whose ids are then dropped (as transformers' Llama tokenizer does); when the anchor's
    ids do not come out unchanged, the text is encoded alone."""
    anchor = tokenizer.encode(ANCHOR, add_bos=False)
    ids = tokenizer.encode(ANCHOR + text, add_bos=False)
    if ids[: len(anchor)] == anchor and len(ids) > len(anchor):
        return ids[len(anchor) :]
    return tokenizer.encode(text, add_bos=False)


@dataclass
class Reply:
    """One reply: its text (cut before a stop string), the tokens generated (the last one, which
    ended it, not yet in the caches), and the final response with the statistics."""

    text: str
    tokens: list[int]
    last: Any  # GenerationResponse
    reason: str  # "stop" (end token), "length", "stop string", "interrupted"


class ChatSession:
    """A conversation whose caches persist between turns.

    `tokens` is everything the conversation has put in the caches, plus the last reply's final
    token, which goes in at the start of the next turn (`pending`).
    """

    def __init__(self, model, tokenizer, formatter: Formatter, system_prompt: str | None = None,
                 stop: list[str] | None = None, controls: dict | None = None,
                 sampling: dict | None = None, seed: int | None = None):  # fmt: skip
        self.model, self.tokenizer, self.formatter = model, tokenizer, formatter
        self.system_prompt = system_prompt
        self.stop = list(stop or [])
        self.stop += [s for s in formatter.stop if s not in self.stop]
        self.controls = dict(controls or {})
        self.sampling = dict(sampling or {})
        self.seed = seed
        self.interrupted = False
        self.reset()

    def reset(self) -> None:
        """A new conversation: empty caches, only the system prompt."""
        import mlx.core as mx

        sp = self.system_prompt
        self.messages: list[dict[str, str]] = [{"role": "system", "content": sp}] if sp else []
        self.cache: list[Any] | None = None
        self.tokens: list[int] = []
        self.pending: list[int] = []
        self.tail = ""  # text after the last reply's content: its stop string or end token
        if self.seed is not None:
            mx.random.seed(self.seed)

    def turn_text(self, user: str) -> str:
        """The text this turn adds: the whole prompt on the first turn; later, what the chat
        format puts after the last reply (less what the caches already hold after it: the stop
        string or end token that ended it), up to where the next reply begins."""
        turn = {"role": "user", "content": user}
        if not self.tokens:
            return self.formatter.render([*self.messages, turn])
        marked = [dict(m) for m in self.messages]
        marked[-1]["content"] += REPLY_END
        text = self.formatter.render([*marked, turn])
        at = text.rfind(REPLY_END)
        if at < 0:  # a template that rewrites replies: only the new turn, formatted alone
            text = self.formatter.render([turn])
        else:
            text = text[at + len(REPLY_END) :]
        if self.tail and text.startswith(self.tail):
            text = text[len(self.tail) :]
        return text

    def turn_ids(self, user: str) -> list[int]:
        """The token ids this turn feeds the caches (the pending end token first)."""
        text = self.turn_text(user)
        if not self.tokens:
            return self.tokenizer.encode(text)
        return [*self.pending, *encode_continuation(self.tokenizer, text)]

    def ask(self, user: str) -> Iterator[str]:
        """Stream the reply to a user message (text pieces); `self.reply` holds it afterwards."""
        from ham_mlx.generate import stream_generate
        from ham_mlx.serve.stop import StopText

        prompt = self.turn_ids(user)
        if self.cache is None:
            self.cache = self.model.make_cache(**self.controls)
        cut = StopText(self.stop)
        shown, whole, generated = [], [], []
        last, reason = None, None
        self.interrupted = False
        stream = stream_generate(self.model, self.tokenizer, prompt, prompt_cache=self.cache,
                                 **self.sampling)  # fmt: skip
        try:
            for last in stream:
                if last.token is not None:
                    generated.append(last.token)
                whole.append(last.text)
                text, hit = cut.add(last.text)
                shown.append(text)
                yield text
                if hit:
                    reason = "stop string"
                    break
                if self.interrupted:
                    reason = "interrupted"
                    break
            if reason != "stop string":
                shown.append(cut.flush())
                yield shown[-1]
        finally:
            stream.close()
        # the caches hold the prompt and every generated token but the last
        self.tokens += prompt[len(self.pending) :] + generated
        self.pending = generated[-1:]
        text, whole_text = "".join(shown), "".join(whole)
        reason = reason or (last.finish_reason if last is not None else "length")
        self.tail = whole_text[len(text) :] if whole_text.startswith(text) else ""
        if reason == "stop":  # the end token, as the chat format writes it
            self.tail += self.formatter.eos_token
        self.messages += [{"role": "user", "content": user},
                          {"role": "assistant", "content": text.strip()}]  # fmt: skip
        self.reply = Reply(text, generated, last, reason)


def read_line(prompt: str) -> str | None:
    """A line from the user; None at end of input (Ctrl-D)."""
    try:
        return input(prompt)
    except EOFError:
        return None


def cmd_chat(a: argparse.Namespace) -> int:
    from ham_mlx.cli import check_model_has_ham, memory_controls, print_summary
    from ham_mlx.model_io import default_model_path, load

    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    folder = Path(a.model) if a.model is not None else default_model_path()
    formatter = load_formatter(folder)
    model, tokenizer = load(a.model)
    check_model_has_ham(a, model)
    sampling = dict(max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p, top_k=a.top_k,
                    min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                    prefill_step_size=a.prefill_step_size)  # fmt: skip
    session = ChatSession(model, tokenizer, formatter, a.system_prompt, a.stop,
                          memory_controls(a), sampling, a.seed)  # fmt: skip
    name = str(folder) if a.model is not None else f"{folder.name} (bundled)"
    print(f"ham-mlx chat: {name}; prompt format: {formatter.source}", file=sys.stderr)
    print(HELP, file=sys.stderr, flush=True)

    def interrupt(signum, frame):
        session.interrupted = True

    while True:
        line = read_line(PROMPT)
        if line is None:
            if tty:
                print()
            return 0
        query = line.strip()
        if not query:
            continue
        if query in QUIT:
            return 0
        if query in RESET:
            session.reset()
            print("(new conversation)", file=sys.stderr, flush=True)
            continue
        if query in HELPS:
            print(HELP, file=sys.stderr, flush=True)
            continue
        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            for piece in session.ask(line):
                print(piece, end="", flush=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        print(flush=True)
        if session.reply.reason == "interrupted":
            print("(reply stopped)", file=sys.stderr)
        if session.reply.last is not None:
            print_summary(session.reply.last)
