"""Chat messages to prompt text: the model folder's Jinja chat template, or a built-in one.

A folder whose `tokenizer_config.json` has a `chat_template` (as Hugging Face writes it) is
rendered with that template, in a Jinja sandbox, with `messages`, `add_generation_prompt=True`,
`bos_token`, `eos_token` and `raise_exception`. Otherwise the built-in template writes one line
per message and asks for the reply, and the reply stops before a new "User:" line:

    System: You are terse.
    User: Hello
    Assistant:
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONFIG = "tokenizer_config.json"
BUILTIN = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
BUILTIN_STOP = ["\nUser:"]


@dataclass
class ChatTemplate:
    """A compiled template and what it needs: special-token text and default stop strings."""

    template: Template
    source: str  # "built-in" or the file it came from
    stop: list[str] = field(default_factory=list)
    bos_token: str = ""
    eos_token: str = ""
    text: str = ""  # the template's Jinja source

    def render(self, messages: list[dict[str, str]]) -> str:
        """Prompt text for messages [{"role", "content"}], ending where the reply begins.

        A leading BOS written by the template is dropped: the tokenizer adds the BOS id itself.
        """
        text = self.template.render(
            messages=messages, add_generation_prompt=True,
            bos_token=self.bos_token, eos_token=self.eos_token,
        )  # fmt: skip
        return text.removeprefix(self.bos_token) if self.bos_token else text


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token_text(config: dict[str, Any], key: str) -> str:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    token = config.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The chat template of a model folder (its tokenizer_config.json), else the built-in one."""
    file = Path(model_dir) / CONFIG
    try:
        config = json.loads(file.read_text()) if file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from e
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    if not isinstance(source, str) or not source:
        return ChatTemplate(env.from_string(BUILTIN), "built-in", list(BUILTIN_STOP), text=BUILTIN)
    try:
        template = env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"{file}: chat_template does not compile ({e})") from e
    chat = ChatTemplate(
        template, str(file), bos_token=_token_text(config, "bos_token"),
        eos_token=_token_text(config, "eos_token"), text=source,
    )  # fmt: skip
    if _writes_builtin_format(chat):  # e.g. the template ham_mlx writes: stop as the built-in does
        chat.stop = list(BUILTIN_STOP)
    return chat


PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]


def _writes_builtin_format(chat: ChatTemplate) -> bool:
    try:
        return chat.render(PROBE) == Template(BUILTIN).render(
            messages=PROBE, add_generation_prompt=True
        )
    except Exception:  # a template that refuses these messages does not write the plain format
        return False
