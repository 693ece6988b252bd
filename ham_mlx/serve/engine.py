"""The generation worker: one thread runs every job, in arrival order.

MLX must not be driven from several threads at once, so the HTTP handlers never touch the model:
they put a `Job` on the engine's queue and await its pieces, which the worker hands to the
handler's event loop with `call_soon_threadsafe`. A handler that goes away (the client
disconnected) cancels its job; the worker drops it if it is still queued, or stops it after the
current token. When the server stops, `close` ends every job at once with `ShuttingDown`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ham_mlx.generate import GenerationResponse, stream_generate
from ham_mlx.model import Model
from ham_mlx.serve.stop import StopText
from ham_mlx.tokenizer import Tokenizer

log = logging.getLogger("ham_mlx.serve")


@dataclass
class Piece:
    """New text of a job; the last piece has a finish_reason ("stop", "length") and the usage."""

    text: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


def usage(r: GenerationResponse) -> dict[str, Any]:
    """OpenAI's token counts plus HAM's memory: admitted fraction per HAM layer, KV bytes."""
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.generation_tokens,
        "total_tokens": r.prompt_tokens + r.generation_tokens,
        "kv_fraction": r.kv_fraction,
        "kv_bytes": sum(s["kv_bytes"] for s in r.kv),
        "full_kv_bytes": sum(s["full_kv_bytes"] for s in r.kv),
    }


@dataclass
class Job:
    """One generation; create it on the event loop that will read its pieces."""

    prompt: list[int]
    options: dict[str, Any]  # keyword arguments of stream_generate
    stop: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop the job (nobody reads it any more); harmless once it has finished."""
        self.cancelled.set()

    def emit(self, item: Piece | Exception) -> None:
        """Hand a piece (or the generation's exception) to the loop; called by the worker."""
        try:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancel()

    async def results(self) -> AsyncIterator[Piece]:
        """The job's pieces up to the last one; re-raises an exception from the generation."""
        while True:
            item = await self.pieces.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class QueueFull(Exception):
    """More jobs are waiting than the engine accepts."""


class ShuttingDown(Exception):
    """The server is stopping: the job was refused or ended before it finished."""


class Engine:
    """Owns the model and the worker thread that runs every job, first come first served."""

    def __init__(self, model: Model, tokenizer: Tokenizer, max_queue: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue  # jobs allowed to wait besides the running one; 0: no limit
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ham-mlx-worker", daemon=True)

    @property
    def waiting(self) -> int:
        """Jobs queued behind the running one (cancelled ones included until they are dropped)."""
        return self._jobs.qsize()

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def close(self) -> None:
        """End the running and the queued jobs now (with ShuttingDown), then the worker."""
        self._closing.set()
        self._jobs.put(None)

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the worker to end (after `close`)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the generation worker did not stop within %.0f s", timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when max_queue jobs are already waiting."""
        self._check_closing()
        if self.max_queue and self._jobs.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self._generate(job)
            except ShuttingDown as e:
                job.emit(e)
            except Exception as e:  # the job fails, the worker goes on
                log.exception("generation failed")
                job.emit(e)

    def _check_closing(self) -> None:
        if self._closing.is_set():
            raise ShuttingDown("the server is shutting down")

    def _generate(self, job: Job) -> None:
        self._check_closing()
        stops = StopText(job.stop)
        for r in stream_generate(self.model, self.tokenizer, job.prompt, **job.options):
            if job.cancelled.is_set():
                log.info("generation cancelled after %d tokens", r.generation_tokens)
                return
            self._check_closing()
            text, stopped = stops.add(r.text)
            if stopped or r.finish_reason is not None:
                text = text if stopped else text + stops.flush()
                job.emit(Piece(text, "stop" if stopped else r.finish_reason, usage(r)))
                return
            if text:
                job.emit(Piece(text))
