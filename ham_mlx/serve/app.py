"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, and the
tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info, as vLLM serves them)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from ham_mlx.generate import prompt_ids
from ham_mlx.model import per_layer
from ham_mlx.serve.chat import ChatTemplate
from ham_mlx.serve.engine import (
    Engine,
    Job,
    Options,
    Piece,
    QueueFull,
    ShuttingDown,
    TokenLogprob,
    merged,
)
from ham_mlx.serve.errors import APIError, error_body, install_error_handlers
from ham_mlx.serve.request_log import RequestLog
from ham_mlx.serve.schemas import Body, ChatRequest, CompletionRequest, GenerationRequest
from ham_mlx.serve.tokens import TokenTexts, tokenize

log = logging.getLogger("ham_mlx.serve")

LOWEST_LOGPROB = -9999.0  # JSON has no -inf; OpenAI-style servers report this instead


def clamp(x: float) -> float:
    return max(x, LOWEST_LOGPROB)


class Logprobs:
    """One choice's `logprobs` in OpenAI's shapes, chunk by chunk (text offsets run on)."""

    def __init__(self, texts: TokenTexts, chat: bool, eos: int | None):
        self.texts = texts
        self.chat = chat
        self.eos = eos
        self.offset = 0

    def render(self, records: list[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat(r) for r in records if r.token != self.eos]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}  # fmt: skip
        for r in records:
            text = self.texts.text(r.token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(r.text)
            if r.logprob is None:  # the first prompt token: nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.texts.text(t): clamp(v) for t, v in r.top}
            top.setdefault(text, clamp(r.logprob))  # the chosen token is always listed
            out["token_logprobs"].append(clamp(r.logprob))
            out["top_logprobs"].append(top)
        return out

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.texts.text(token), "logprob": clamp(logprob),
                "bytes": list(self.texts.bytes(token))}  # fmt: skip

    def _chat(self, r: TokenLogprob) -> dict[str, Any]:
        return self._entry(r.token, r.logprob) | {
            "top_logprobs": [self._entry(t, v) for t, v in r.top]
        }


class Reply:
    """The OpenAI objects answering one request: a text completion or a chat completion."""

    def __init__(self, model: str, chat: bool, logprobs: list[Logprobs] | None = None):
        self.model = model
        self.chat = chat
        self.logprobs = logprobs  # one per choice; None: not asked for
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    def envelope(self, stream: bool, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if stream and self.chat else self.kind
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def choice(
        self, index: int, text: str, records: list, finish: str | None, stream: bool
    ) -> dict:
        out: dict[str, Any] = {"index": index}
        if not self.chat:
            out["text"] = text
        elif stream:
            out["delta"] = {"content": text} if text or finish is None else {}
        else:
            out["message"] = {"role": "assistant", "content": text}
        logprobs = None if self.logprobs is None else self.logprobs[index].render(records)
        return out | {"logprobs": logprobs, "finish_reason": finish}

    def first_chunk(self) -> dict:
        """A chat stream opens with the assistant's role."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}  # fmt: skip
        return self.envelope(True, [choice])


def total_usage(usages: list[dict]) -> dict:
    """One request's usage: its choices' token counts added, HAM's memory averaged/added."""
    if len(usages) == 1:
        return usages[0]
    out = {
        k: sum(u[k] for u in usages)
        for k in ("prompt_tokens", "completion_tokens", "total_tokens", "kv_bytes", "full_kv_bytes")
    }
    out["prompt_tokens_details"] = {
        "cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    }
    out["kv_fraction"] = [sum(f) / len(usages) for f in zip(*(u["kv_fraction"] for u in usages))]
    return out


async def cancel_on_disconnect(request: Request, jobs: list[Job], every: float = 0.25) -> None:
    """Cancel the jobs when the client hangs up before its (non-streamed) answer is ready."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    for job in jobs:
        job.pieces.put_nowait((job.index, ClientGone()))
        job.cancel()


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class ClientGone(Exception):
    """The client disconnected; nobody reads the answer."""


def failure(e: Exception) -> APIError:
    """A job's exception as the error to answer: 503 for a full queue or a stopping server."""
    if isinstance(e, QueueFull):
        return APIError(503, str(e), code="queue_full")
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), code="shutting_down")
    if isinstance(e, ClientGone):  # nobody reads it; the request log shows it
        return APIError(499, "the client disconnected", code="client_closed_request")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}")


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


def create_app(
    engine: Engine,
    model_id: str,
    template: ChatTemplate,
    max_tokens_limit: int = 4096,
    default_max_tokens: int = 256,
    max_prompt_tokens: int = 32768,
) -> FastAPI:
    """The server's app; it starts the engine's worker on startup and stops it on shutdown."""
    created = int(time.time())
    vocab_size = engine.model.args.vocab_size
    n_ham = len(engine.model.ham_layers)
    tokenizer = engine.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()
        await asyncio.to_thread(engine.join, 2.0)  # the loop goes on: handlers can answer
        if not engine.busy:
            log.info("generation worker stopped")

    app = FastAPI(title="ham-mlx", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestLog)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"model '{name}' is not served here; this server serves "
                           f"'{model_id}'", "model", "model_not_found")  # fmt: skip

    def encode(prompt: str | list[int], param: str) -> list[int]:
        try:
            ids = prompt_ids(tokenizer, prompt, vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param) from None
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's "
                           f"limit of {max_prompt_tokens} (--max-prompt-tokens)", param,
                           "context_length_exceeded")  # fmt: skip
        return ids

    def options(
        body: GenerationRequest, max_tokens: int | None, param: str, logprobs: int | None,
        echo: bool = False,
    ) -> Options:  # fmt: skip
        """The engine's options, once the server's limits are checked."""
        if max_tokens is None:
            max_tokens = min(default_max_tokens, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"{param}={max_tokens} is above this server's limit of "
                           f"{max_tokens_limit} (--max-tokens-limit)", param)  # fmt: skip
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true",
                           "stream_options")  # fmt: skip
        for name in ("threshold", "kv_budget"):
            try:
                per_layer(getattr(body, name), n_ham, name)
            except ValueError as e:
                raise APIError(400, str(e), name) from None
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                  "max_kv_tokens", "kv_policy")  # fmt: skip
        controls = {n: tuple(v) if isinstance(v := getattr(body, n), list) else v
                    for n in ("threshold", "kv_budget")}  # fmt: skip
        return Options(max_tokens=max_tokens, logprobs=logprobs, echo=echo, **controls,
                       **{f: getattr(body, f) for f in fields})  # fmt: skip

    def submit(jobs: list[Job]) -> None:
        try:
            engine.submit(jobs)
        except (QueueFull, ShuttingDown) as e:
            raise failure(e) from None

    async def answer(request: Request, reply: Reply, jobs: list[Job], body) -> Any:
        submit(jobs)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(events(request, reply, jobs, usage),
                                     media_type="text/event-stream")  # fmt: skip
        pieces: dict[int, list[Piece]] = {j.index: [] for j in jobs}
        watch = asyncio.create_task(cancel_on_disconnect(request, jobs))
        try:
            async for index, piece in merged(jobs):
                pieces[index].append(piece)
        except Exception as e:
            raise failure(e) from e
        finally:
            watch.cancel()
            for job in jobs:  # no-op when finished; stops the worker if this handler was cancelled
                job.cancel()
        choices = []
        for index, got in pieces.items():
            text = "".join(p.text for p in got)
            records = [r for p in got for r in p.logprobs]
            choices.append(reply.choice(index, text, records, got[-1].finish_reason, False))
        usage = total_usage([got[-1].usage for got in pieces.values()])
        request.state.usage = usage
        return reply.envelope(False, choices) | {"usage": usage}

    async def events(
        request: Request, reply: Reply, jobs: list[Job], include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece; with include_usage a last chunk with the
        usage and no choices (and "usage": null in the others); then [DONE]."""
        extra = {"usage": None} if include_usage else {}
        usages = []
        try:
            if reply.chat:
                yield sse(reply.first_chunk() | extra)
            async for index, piece in merged(jobs):
                if piece.usage is not None:
                    usages.append(piece.usage)
                choice = reply.choice(index, piece.text, piece.logprobs, piece.finish_reason, True)
                yield sse(reply.envelope(True, [choice]) | extra)
            request.state.usage = total_usage(usages)
            if include_usage:
                yield sse(reply.envelope(True, []) | {"usage": request.state.usage})
            yield "data: [DONE]\n\n"
        except Exception as e:
            error = failure(e)
            yield sse(error_body(error.message, error.status, code=error.code))
        finally:
            for job in jobs:  # the client disconnected, or the stream is over
                job.cancel()

    @app.get("/health")
    async def health() -> dict:
        prefix = engine.prefix
        return {
            "status": "ok", "model": model_id, "waiting": engine.waiting,
            "running": engine.running,
            "prefix_cache": {"snapshots": len(prefix), "bytes": prefix.nbytes,
                             "hits": prefix.hits, "reused_tokens": prefix.reused_tokens},
        }  # fmt: skip

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ham-mlx"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompts = [await asyncio.to_thread(encode, p, "prompt") for p in body.prompt]
        opts = options(body, body.max_tokens, "max_tokens", body.logprobs, body.echo)
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [Job(p, opts, body.stop, index=i, pieces=queue) for i, p in enumerate(prompts)]
        logprobs = None
        if body.logprobs is not None:
            logprobs = [Logprobs(engine.texts, False, tokenizer.eos_id) for _ in jobs]
        return await answer(request, Reply(model_id, False, logprobs), jobs, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]  # fmt: skip
        try:
            text = template.render(messages)
        except TemplateError as e:
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from e
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.max_tokens, "max_tokens"
        k = (body.top_logprobs or 0) if body.logprobs else None
        prompt = await asyncio.to_thread(encode, text, "messages")  # long text: off the loop
        job = Job(prompt, options(body, max_tokens, param, k), body.stop + template.stop)
        logprobs = None if k is None else [Logprobs(engine.texts, True, tokenizer.eos_id)]
        return await answer(request, Reply(model_id, True, logprobs), [job], body)

    @app.post("/tokenize")
    async def tokenize_text(body: TokenizeRequest) -> dict:
        check_model(body.model)
        tokens = tokenize(tokenizer, engine.texts, body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {tokenizer.vocab_size})",
                           "tokens")  # fmt: skip
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        def name(i: int | None) -> str | None:
            return None if i is None else engine.texts.text(i)

        return {
            "tokenizer_class": "SentencePiece", "vocab_size": tokenizer.vocab_size,
            "bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eos_id),
            "pad_token": name(tokenizer.pad_id), "chat_template": template.text,
        }  # fmt: skip

    return app
