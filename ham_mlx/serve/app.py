"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models and /health."""

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
from ham_mlx.serve.engine import Engine, Job, QueueFull, ShuttingDown
from ham_mlx.serve.errors import APIError, error_body, install_error_handlers
from ham_mlx.serve.request_log import RequestLog
from ham_mlx.serve.schemas import ChatRequest, CompletionRequest, GenerationRequest

log = logging.getLogger("ham_mlx.serve")


class Reply:
    """The OpenAI objects answering one request: a text completion or a chat completion."""

    def __init__(self, model: str, chat: bool):
        self.model = model
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, text: str, finish: str | None, usage: dict | None, stream: bool) -> dict:
        """The whole answer, or (stream) one chunk of it."""
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            kind = "text_completion"
            choice["text"] = text
        elif stream:
            kind = "chat.completion.chunk"
            choice["delta"] = {"content": text}
        else:
            kind = "chat.completion"
            choice["message"] = {"role": "assistant", "content": text}
        choice |= {"logprobs": None, "finish_reason": finish}
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": [choice]}  # fmt: skip
        if usage is not None:
            out["usage"] = usage
        return out

    def first_chunk(self) -> dict:
        """A chat stream opens with the assistant's role."""
        chunk = self.body("", None, None, stream=True)
        chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return chunk


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def failure(e: Exception) -> APIError:
    """A job's exception as the error to answer: 503 for a full queue or a stopping server."""
    if isinstance(e, QueueFull):
        return APIError(503, str(e), code="queue_full")
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), code="shutting_down")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}")


def create_app(
    engine: Engine,
    model_id: str,
    template: ChatTemplate,
    max_tokens_limit: int = 4096,
    default_max_tokens: int = 256,
) -> FastAPI:
    """The server's app; it starts the engine's worker on startup and stops it on shutdown."""
    created = int(time.time())
    vocab_size = engine.model.args.vocab_size
    n_ham = len(engine.model.ham_layers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()
        await asyncio.to_thread(engine.join)  # the loop goes on: handlers can still answer
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
            return prompt_ids(engine.tokenizer, prompt, vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param) from None

    def options(body: GenerationRequest, max_tokens: int | None, param: str) -> dict[str, Any]:
        """stream_generate's keyword arguments, once the server's limits are checked."""
        if max_tokens is None:
            max_tokens = min(default_max_tokens, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"{param}={max_tokens} is above this server's limit of "
                           f"{max_tokens_limit} (--max-tokens-limit)", param)  # fmt: skip
        for name in ("threshold", "kv_budget"):
            try:
                per_layer(getattr(body, name), n_ham, name)
            except ValueError as e:
                raise APIError(400, str(e), name) from None
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                  "threshold", "kv_budget", "max_kv_tokens", "kv_policy")  # fmt: skip
        return {"max_tokens": max_tokens, **{f: getattr(body, f) for f in fields}}

    async def answer(request: Request, reply: Reply, job: Job, stream: bool) -> Any:
        try:
            engine.submit(job)
        except (QueueFull, ShuttingDown) as e:
            raise failure(e) from None
        if stream:
            return StreamingResponse(events(request, reply, job), media_type="text/event-stream")
        pieces = []
        try:
            async for piece in job.results():
                pieces.append(piece)
        except Exception as e:
            raise failure(e) from e
        finally:
            job.cancel()  # a no-op when finished; stops the worker if this handler was cancelled
        last = pieces[-1]
        request.state.usage = last.usage
        text = "".join(p.text for p in pieces)
        return reply.body(text, last.finish_reason, last.usage, stream=False)

    async def events(request: Request, reply: Reply, job: Job) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece, usage in the last, then [DONE]."""
        try:
            if reply.chat:
                yield sse(reply.first_chunk())
            async for piece in job.results():
                if piece.usage is not None:
                    request.state.usage = piece.usage
                yield sse(reply.body(piece.text, piece.finish_reason, piece.usage, stream=True))
            yield "data: [DONE]\n\n"
        except Exception as e:
            error = failure(e)
            yield sse(error_body(error.message, error.status, code=error.code))
        finally:
            job.cancel()  # the client disconnected, or the stream is over

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "waiting": engine.waiting}

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
        job = Job(encode(body.prompt, "prompt"), options(body, body.max_tokens, "max_tokens"),
                  body.stop)  # fmt: skip
        return await answer(request, Reply(model_id, chat=False), job, body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]  # fmt: skip
        try:
            text = template.render(messages)
        except TemplateError as e:
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from e
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.max_tokens, "max_tokens"
        job = Job(encode(text, "messages"), options(body, max_tokens, param),
                  body.stop + template.stop)  # fmt: skip
        return await answer(request, Reply(model_id, chat=True), job, body.stream)

    return app
