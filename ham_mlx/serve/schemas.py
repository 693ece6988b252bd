"""Request bodies of the OpenAI-compatible endpoints, with HAM's memory controls as extra fields.

Only what needs no model is checked here (types, ranges); token ids, the number of HAM layers and
the server's max_tokens limit are checked by the app. Unknown fields are ignored, as OpenAI-style
servers do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def per_layer_numbers(value: Any, ok: Callable[[float], bool], expected: str) -> Any:
    """A number or a non-empty list of numbers, each passing `ok`; None passes."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not values or not numbers or not all(ok(v) for v in values):
        raise ValueError(f"must be {expected}, or a list of them (one per HAM layer)")
    return value


MAX_STOP_CHARS = 1024


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The place (`messages[0].content`) of the first string in a JSON value that is not valid
    Unicode (a lone surrogate, which JSON's \\ud800 escapes can spell); None: there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()  # fmt: skip
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
        if isinstance(key, str) and lone_surrogate(key) is not None:
            return path or "body"
        if (found := lone_surrogate(item, where)) is not None:
            return found
    return None


class Body(BaseModel):
    """A request body: unknown fields are ignored; text must be valid Unicode."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        if (where := lone_surrogate(value)) is not None:
            raise ValueError(f"{where}: the text is not valid Unicode (a lone surrogate)")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # a last chunk with the usage and no choices


class GenerationRequest(Body):
    """The fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=0)  # None: the server's --default-max-tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None  # only with stream
    stop: list[str] = []
    # HAM's controls (ham_mlx.generate.stream_generate)
    threshold: float | list[float] | None = None
    kv_budget: float | list[float] | None = None
    max_kv_tokens: int | None = Field(None, ge=1)
    kv_policy: Literal["evict", "reject"] = "evict"

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or len(stops) > 4:
            raise ValueError("must be a string or a list of up to 4 strings")
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must hold non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may have up to {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Any:
        return per_layer_numbers(value, math.isfinite, "a finite number")

    @field_validator("kv_budget", mode="before")
    @classmethod
    def _kv_budget(cls, value: Any) -> Any:
        return per_layer_numbers(value, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


class CompletionRequest(GenerationRequest):
    """POST /v1/completions. `prompt`: text, token ids, or a list of either (one choice each)."""

    prompt: list[str | list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per token; 0: chosen only
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's too)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str) or (_token_ids(value) and value):
            return [value]
        if (
            isinstance(value, list)
            and value
            and all(isinstance(p, str) or _token_ids(p) for p in value)
        ):
            return value
        raise ValueError("must be a string, a list of token ids, or a non-empty list of them")


class Message(BaseModel):
    """One chat message; content is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None:
            return ""
        if not isinstance(value, list):
            return value
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in value
        ):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are served")
        return "".join(p["text"] for p in value)


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per token (logprobs true)
