"""The generation engine: one thread owns the model and runs every request in one batch.

MLX must not be driven from several threads at once, so the HTTP handlers never touch the model:
they put `Job`s in the engine's inbox and await their pieces, which the worker hands to the
handler's event loop with `call_soon_threadsafe`.

Continuous batching: the worker runs mlx-lm's `BatchGenerator` on the model. A request joins the
running batch as soon as it arrives (up to `max_batch` requests at once), with caches of its own
from `model.make_cache(threshold, kv_budget, max_kv_tokens, kv_policy)`; the caches' batch
protocol (merge/extend/filter/extract, right padding that never changes a row) makes every row
compute what the request would compute alone (up to the rounding of batched matrix products:
greedy answers are the serial ones). Each step the generator runs one decoding step of
the whole batch and one chunk of the prompts being read, so a long prompt does not stall the
replies being streamed. Rows that finish leave the batch; their caches come back for the usage
(HAM's memory) and for prefix reuse.

HAM caches with different `max_kv_tokens`/`kv_policy` cannot share a batch (per-row τ and
kv_budget can): a request whose capacity differs from the running batch's waits at the head of
the inbox until the batch drains (those behind it wait too, first come first served), then the
batch takes its capacity.

Requests that need the log-probabilities of their prompt (`echo` with `logprobs`, what
evaluation harnesses use to score text) or no new token at all (`max_tokens` 0) have their
prompt run by the worker itself, one chunk per step between the batch's steps, keeping every
position's logits; then they join the batch with their cache for the last prompt token.

Prefix reuse (`prefix.PrefixCache`): a request starts from the longest snapshot whose tokens
begin its prompt; snapshots are taken after a prompt's tokens but the last, at the end of a
request, and at points where prompts diverge. `usage.prompt_tokens_details.cached_tokens`
reports the tokens reused.

A handler that goes away (the client disconnected) cancels its job: the worker removes it from
the batch at its next step. When the server stops, `close` ends every job with `ShuttingDown`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator

from ham_mlx.buffer_cache import release_between_chunks
from ham_mlx.cache import kv_stats
from ham_mlx.model import per_layer
from ham_mlx.sample import make_logits_processors
from ham_mlx.serve.prefix import PrefixCache, PromptScores
from ham_mlx.serve.sampling import greedy, sampler_for
from ham_mlx.serve.stop import StopText
from ham_mlx.serve.tokens import TokenTexts
from ham_mlx.tokenizer import Tokenizer

log = logging.getLogger("ham_mlx.serve")

SCORE_DEPTH = 5  # alternatives kept per prompt token when scoring, so snapshots serve others
PRIME = 4  # prompt tokens the detokenizer reads first, so that the reply's first space is kept
SCORE_BYTES = 64 << 20  # float32 log-probabilities held at once when scoring a prompt


@dataclass(frozen=True)
class Options:
    """How to answer one prompt (the request's fields, checked by the app)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    threshold: float | tuple[float, ...] | None = None
    kv_budget: float | tuple[float, ...] | None = None
    max_kv_tokens: int | None = None
    kv_policy: str = "evict"
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: off
    echo: bool = False

    @property
    def scores_prompt(self) -> bool:
        """The prompt's tokens get log-probabilities (echo with logprobs)."""
        return self.echo and self.logprobs is not None

    @property
    def split_independent(self) -> bool:
        """Whether admission is the same however the prompt is split into calls: not so with
        kv_budget (τ adapts between calls) or max_kv_tokens with evict (eviction between
        calls). Only such requests use and make prefix snapshots."""
        return self.kv_budget is None and (self.max_kv_tokens is None or self.kv_policy == "reject")


@dataclass
class TokenLogprob:
    """One token of an answer (or of an echoed prompt) with its log-probability."""

    token: int
    logprob: float | None  # None: the first prompt token (nothing predicts it)
    top: list[tuple[int, float]]  # the most likely alternatives, most likely first
    text: str  # the text this token completed ("" while a character's bytes are incomplete)


@dataclass
class Piece:
    """New text of a job; the last piece has a finish_reason ("stop", "length") and the usage."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


@dataclass
class Job:
    """One prompt to answer; create it on the event loop that will read its pieces. Jobs of one
    request may share `pieces` (each item is (index, piece or exception))."""

    prompt: list[int]
    options: Options
    stop: list[str] = field(default_factory=list)
    index: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False  # its last piece (or an exception) has been emitted

    def cancel(self) -> None:
        """Stop the job (nobody reads it any more); harmless once it has finished."""
        self.cancelled.set()

    def emit(self, item: Piece | Exception) -> None:
        """Hand a piece (or the generation's exception) to the loop; called by the worker."""
        if isinstance(item, Exception) or item.finish_reason is not None:
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, (self.index, item))
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancel()

    async def results(self) -> AsyncIterator[Piece]:
        """The job's pieces up to the last one; re-raises an exception from the generation."""
        async for _, piece in merged([self]):
            yield piece


async def merged(jobs: Sequence[Job]) -> AsyncIterator[tuple[int, Piece]]:
    """(index, piece) of jobs sharing one queue, until each has sent its last piece."""
    left = {j.index for j in jobs}
    while left:
        index, item = await jobs[0].pieces.get()
        if isinstance(item, Exception):
            raise item
        yield index, item
        if item.finish_reason is not None:
            left.discard(index)


class QueueFull(Exception):
    """More jobs are waiting than the engine accepts."""


class ShuttingDown(Exception):
    """The server is stopping: the job was refused or ended before it finished."""


class Tail:
    """The reply's text and tokens cut at the first stop string: text that could start a stop
    string is held back (StopText), and so are its tokens; tokens after a stop are dropped."""

    def __init__(self, stops: list[str]):
        self.stops = StopText(stops)
        self.pending: deque[tuple[int, TokenLogprob]] = deque()  # (start in the text, token)
        self.total = 0  # characters generated
        self.sent = 0  # characters released

    def add(self, text: str, record: TokenLogprob | None) -> tuple[str, list, bool]:
        if record is not None:
            self.pending.append((self.total, record))
        self.total += len(text)
        out, stopped = self.stops.add(text)
        self.sent += len(out)
        if stopped:
            records = [r for start, r in self.pending if start < self.sent]
            self.pending.clear()
            return out, records, True
        records = []
        while self.pending and self.pending[0][0] + len(self.pending[0][1].text) <= self.sent:
            records.append(self.pending.popleft()[1])
        return out, records, False

    def finish(self) -> tuple[str, list]:
        out = self.stops.flush()
        self.sent += len(out)
        records = [r for _, r in self.pending]
        self.pending.clear()
        return out, records


@dataclass
class Scoring:
    """A prompt the worker runs itself, keeping each position's log-probabilities."""

    cache: list[Any]
    pos: int  # prompt tokens in the cache
    end: int  # run up to here: n - 1 (then the batch generates) or n (max_tokens 0)
    depth: int | None  # alternatives kept per token; None: no log-probabilities
    cuts: deque[int] = field(default_factory=deque)
    chosen: list[np.ndarray] = field(default_factory=list)
    top_ids: list[np.ndarray] = field(default_factory=list)
    top_logprobs: list[np.ndarray] = field(default_factory=list)
    last: np.ndarray | None = None  # log-probabilities after prompt[:pos]

    def scores(self, length: int) -> PromptScores | None:
        """The scores of a snapshot of the prompt's first `length` (== pos) tokens."""
        if self.depth is None or self.last is None or not self.chosen:
            return None
        chosen, ids, values = self.gathered()
        return PromptScores(chosen[: length - 1], ids[: length - 1], values[: length - 1],
                            self.last)  # fmt: skip

    def gathered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of the tokens 1.. scored so far, and their alternatives."""
        if not self.chosen:
            d = self.depth or 0
            return np.zeros(0, np.float32), np.zeros((0, d), np.int32), np.zeros((0, d), np.float32)
        return (np.concatenate(self.chosen), np.concatenate(self.top_ids),
                np.concatenate(self.top_logprobs))  # fmt: skip


@dataclass
class Run:
    """A job in the worker."""

    job: Job
    snap_key: tuple | None  # prefix snapshots: their controls; None: no reuse
    cached: int = 0  # prompt tokens reused from a snapshot
    generated: int = 0
    uid: int | None = None  # in the batch generator
    cuts: deque[int] = field(default_factory=deque)  # snapshot points of the batch's segments
    scoring: Scoring | None = None
    detok: Any = None
    tail: Tail | None = None
    echo: list[TokenLogprob] = field(default_factory=list)  # the prompt's tokens (echo)


class Float32Logits:
    """The model, with float32 logits: log-probabilities are computed and reported in float32."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        return self.model(inputs, cache).astype(mx.float32)


class Engine:
    """Owns the model, the batch and the worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        max_queue: int = 0,
        *,
        max_batch: int = 8,
        prefill_step_size: int = 512,
        prefix_cache_bytes: int = 256 << 20,
    ):
        if max_batch < 1 or prefill_step_size < 1 or prefix_cache_bytes < 0 or max_queue < 0:
            raise ValueError("max_batch, prefill_step_size: >= 1; prefix_cache_bytes, max_queue: "
                             ">= 0")  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.texts = TokenTexts(tokenizer)
        self.max_queue = max_queue  # jobs allowed to wait for a place in the batch; 0: no limit
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.n_ham = len(model.ham_layers)
        self._inbox: deque[Job] = deque()
        self._open: list[Job] = []  # submitted and not ended: what `close` answers at once
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ham-mlx-worker", daemon=True)
        self._gen: BatchGenerator | None = None
        self._runs: dict[int, Run] = {}  # in the batch generator, by uid
        self._scoring: deque[Run] = deque()
        self._key: tuple | None = None  # the batch's HAM capacity (max_kv_tokens, kv_policy)

    # ---- the handlers' side -------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Jobs waiting for a place in the batch (cancelled ones included until dropped)."""
        return len(self._inbox)

    @property
    def running(self) -> int:
        """Jobs in the batch (or having their prompt scored)."""
        return len(self._runs) + len(self._scoring)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def close(self) -> None:
        """End the running and the queued jobs now (with ShuttingDown), then the worker. Their
        handlers are answered at once, even while the worker is inside a long model call."""
        self._closing.set()
        self._wake.set()
        with self._lock:
            jobs, self._open = self._open, []
        for job in jobs:
            if not job.ended:
                job.emit(ShuttingDown("the server is shutting down"))

    @property
    def busy(self) -> bool:
        """Whether the worker thread is still running."""
        return self._thread.is_alive()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the worker to end (after `close`)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the generation worker did not stop within %.0f s", timeout)

    def submit(self, jobs: Job | Sequence[Job]) -> None:
        """Queue jobs (all or none); QueueFull when they would exceed max_queue waiting."""
        jobs = [jobs] if isinstance(jobs, Job) else list(jobs)
        self._check_closing()
        with self._lock:
            if self.max_queue and len(self._inbox) + len(jobs) > self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            self._inbox.extend(jobs)
            self._open = [j for j in self._open if not (j.ended or j.cancelled.is_set())] + jobs
        self._wake.set()

    def _check_closing(self) -> None:
        if self._closing.is_set():
            raise ShuttingDown("the server is shutting down")

    # ---- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._iterate()
            except Exception as e:  # a bug: the running jobs fail, the worker goes on
                log.exception("the generation worker failed")
                self._fail_running(e)
        self._fail_running(ShuttingDown("the server is shutting down"))
        with self._lock:
            jobs = list(self._inbox)
            self._inbox.clear()
        for job in jobs:
            job.emit(ShuttingDown("the server is shutting down"))

    def _iterate(self) -> None:
        """Admit what fits, then one chunk of a scored prompt and one step of the batch."""
        self._wake.clear()
        self._drop_cancelled()
        self._admit()
        if not self.running:
            self._wake.wait()
            return
        if self._scoring:
            self._guarded(self._scoring[0], self._score_step)
        if self._runs:
            self._step()

    def _fail_running(self, e: Exception, scoring: bool = True) -> None:
        """End the jobs of the batch (and those being scored) with e; a new batch follows."""
        runs = list(self._runs.values()) + (list(self._scoring) if scoring else [])
        self._runs.clear()
        if scoring:
            self._scoring.clear()
        self._gen = None
        for run in runs:
            run.job.emit(e)

    def _snapshot(self, run: Run, tokens, cache: list, scores: PromptScores | None = None):
        """Keep a prefix snapshot; a failure to do so only costs the reuse."""
        if run.snap_key is None:
            return
        try:
            self.prefix.store(run.snap_key, tokens, cache, scores)
        except Exception:
            log.exception("a prefix snapshot could not be kept")

    def _guarded(self, run: Run, step) -> None:
        """Run a step of one job; an exception fails that job only."""
        try:
            step(run)
        except Exception as e:
            log.exception("generation failed")
            self._forget(run)
            run.job.emit(e)

    def _forget(self, run: Run) -> None:
        if run in self._scoring:
            self._scoring.remove(run)
        if run.uid is not None and self._runs.pop(run.uid, None) is not None:
            self._gen.remove([run.uid])

    def _drop_cancelled(self) -> None:
        for run in [*self._runs.values(), *self._scoring]:
            if run.job.cancelled.is_set():
                self._forget(run)
                log.info("generation cancelled after %d tokens", run.generated)

    def _batch_key(self, o: Options) -> tuple | None:
        """Requests with equal keys can share a batch (HAM caches of one capacity)."""
        if not self.n_ham:
            return None
        return (o.max_kv_tokens, o.kv_policy if o.max_kv_tokens is not None else "evict")

    def _snapshot_key(self, o: Options) -> tuple | None:
        """The controls a snapshot was made with; None: this request does not use snapshots."""
        if not self.prefix.enabled or not o.split_independent:
            return None
        threshold = None if o.threshold is None else tuple(per_layer(o.threshold, self.n_ham,
                                                                     "threshold"))  # fmt: skip
        return (threshold, *(self._batch_key(o) or ()))

    def _admit(self) -> None:
        """Move jobs from the inbox into the batch while there is room and capacities agree."""
        while True:
            with self._lock:
                if not self._inbox:
                    return
                job = self._inbox[0]
                if not job.cancelled.is_set():
                    key = self._batch_key(job.options)
                    if self.running >= self.max_batch or (self.running and key != self._key):
                        return
                self._inbox.popleft()
            if job.cancelled.is_set():
                continue
            self._key = key
            try:
                self._start(job)
            except Exception as e:
                log.exception("the request could not start")
                job.emit(e)

    def _generator(self) -> BatchGenerator:
        if self._gen is None:
            eos = self.tokenizer.eos_id
            self._gen = BatchGenerator(
                Float32Logits(self.model), sampler=greedy,
                stop_tokens=None if eos is None else [[eos]],
                completion_batch_size=self.max_batch, prefill_batch_size=self.max_batch,
                prefill_step_size=self.prefill_step_size,
            )  # fmt: skip
        return self._gen

    def _start(self, job: Job) -> None:
        self._check_closing()
        o, prompt = job.options, job.prompt
        n = len(prompt)
        run = Run(job, self._snapshot_key(o), tail=Tail(job.stop))
        depth = None
        if o.scores_prompt:
            depth = min(max(o.logprobs, SCORE_DEPTH), self.texts.vocab_size)
        snap = None
        if run.snap_key is not None:
            snap = self.prefix.lookup(run.snap_key, prompt, depth)
        start = 0 if snap is None else len(snap.tokens)
        cut = None if run.snap_key is None else self.prefix.divergence(run.snap_key, prompt, start)
        if snap is None:
            cache = self.model.make_cache(
                threshold=o.threshold,
                kv_budget=o.kv_budget,
                max_kv_tokens=o.max_kv_tokens,
                kv_policy=o.kv_policy,
            )
        else:
            cache = snap.copy_cache()
        run.cached = start
        run.detok = self.tokenizer.detokenizer()
        if o.echo:  # the prompt's text, token by token; the reply continues it
            run.echo = [TokenLogprob(t, None, [], run.detok.add_token(t)) for t in prompt]
        else:
            for t in prompt[-PRIME:]:
                run.detok.add_token(t)
        cuts = sorted({c for c in (cut, n - 1) if c is not None and start < c <= n - 1})
        if o.scores_prompt or o.max_tokens == 0:
            end = n if o.max_tokens == 0 else n - 1
            run.scoring = Scoring(cache, start, end, depth, deque(c for c in cuts if c < end))
            if depth is not None and snap is not None:
                self._scores_from(run.scoring, snap.scores, prompt[start])
            self._scoring.append(run)
            return
        bounds = [start, *cuts]
        segments = [prompt[a:b] for a, b in zip(bounds, bounds[1:])] + [prompt[n - 1 :]]
        run.cuts = deque(cuts)
        self._insert(run, segments, cache, prompt[:start])

    def _insert(self, run: Run, segments: list[list[int]], cache: list, history: list[int]):
        """Put a run in the batch: its prompt's segments (the last one a single token)."""
        o = run.job.options
        sampler = sampler_for(o.temperature, o.top_p, o.top_k, o.min_p, o.seed)
        (run.uid,) = self._generator().insert_segments(
            [segments], max_tokens=[o.max_tokens], caches=[cache], all_tokens=[list(history)],
            samplers=[sampler], logits_processors=[make_logits_processors(o.repetition_penalty)],
        )  # fmt: skip
        self._runs[run.uid] = run
        if o.echo:
            run.job.emit(Piece("".join(r.text for r in run.echo), run.echo))

    # ---- prompts scored by the worker ---------------------------------------------------------
    @staticmethod
    def _scores_from(s: Scoring, scores: PromptScores, token: int) -> None:
        """Start from a snapshot's scores: its tokens', and the next token's from `last`."""
        d = s.depth
        top = np.argsort(-scores.last, kind="stable")[:d]
        s.chosen = [scores.chosen, np.array([scores.last[token]], dtype=np.float32)]
        s.top_ids = [scores.top_ids[:, :d], top[None].astype(np.int32)]
        s.top_logprobs = [scores.top_logprobs[:, :d], scores.last[top][None]]
        s.last = scores.last

    @staticmethod
    def _score_rows(s: Scoring, rows: mx.array, nxt: list[int]) -> None:
        chosen = mx.take_along_axis(rows, mx.array(nxt)[:, None], axis=-1)[:, 0]
        ids = mx.argpartition(-rows, s.depth - 1, axis=-1)[:, : s.depth]
        values = mx.take_along_axis(rows, ids, axis=-1)
        mx.eval(chosen, ids, values)
        order = np.argsort(-np.array(values), axis=-1, kind="stable")
        s.chosen.append(np.array(chosen))
        s.top_ids.append(np.take_along_axis(np.array(ids), order, -1).astype(np.int32))
        s.top_logprobs.append(np.take_along_axis(np.array(values), order, -1))

    def _score_step(self, run: Run) -> None:
        """Run one chunk of a scored prompt; when it is all read, finish or join the batch."""
        s, prompt, o = run.scoring, run.job.prompt, run.job.options
        if s.pos < s.end:
            step = self.prefill_step_size
            if s.depth is not None:  # every position's log-probabilities: bound their memory
                step = max(1, min(step, SCORE_BYTES // (4 * self.model.args.vocab_size)))
            stop = min(s.pos + step, s.cuts[0] if s.cuts else s.end, s.end)
            logits = self.model(mx.array([prompt[s.pos : stop]]), s.cache)
            nxt = prompt[s.pos + 1 : stop + 1]  # the tokens these positions predict
            if s.depth is None:
                mx.eval([c.state for c in s.cache])
            else:
                lp = logits[0].astype(mx.float32)
                lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
                mx.eval(lp, [c.state for c in s.cache])
                if nxt:
                    self._score_rows(s, lp[: len(nxt)], nxt)
                s.last = np.array(lp[-1])
            release_between_chunks()
            s.pos = stop
            if s.cuts and s.pos == s.cuts[0]:
                s.cuts.popleft()
                self._snapshot(run, prompt[: s.pos], s.cache, s.scores(s.pos))
        if s.pos < s.end:
            return
        self._scoring.remove(run)
        if s.depth is not None:  # the echoed prompt's log-probabilities
            chosen, ids, values = s.gathered()
            for i, r in enumerate(run.echo[1:]):
                r.logprob = float(chosen[i])
                r.top = list(zip(ids[i, : o.logprobs].tolist(), values[i, : o.logprobs].tolist()))
        self._snapshot(run, prompt[: s.pos], s.cache, s.scores(s.pos))
        if o.max_tokens == 0:
            if o.echo:
                run.job.emit(Piece("".join(r.text for r in run.echo), run.echo))
            run.job.emit(Piece("", [], "length", self._usage(run, s.cache)))
            return
        self._insert(run, [prompt[-1:]], s.cache, prompt[:-1])

    # ---- the batch ----------------------------------------------------------------------------
    def _step(self) -> None:
        gen = self._generator()
        try:
            prompt_responses, responses = gen.next()
        except Exception as e:  # the whole batch fails; the worker goes on with a new one
            log.exception("generation failed")
            self._fail_running(e, scoring=False)
            return
        for r in prompt_responses:
            run = self._runs.get(r.uid)
            if run is None or not r.end_of_segment or r.end_of_prompt or not run.cuts:
                continue
            length = run.cuts.popleft()  # the prompt's first `length` tokens are in the cache
            if run.snap_key is not None:
                cache, tokens = gen.extract_cache([r.uid])[r.uid]
                if len(tokens) == length:
                    self._snapshot(run, run.job.prompt[:length], cache)
        for r in responses:
            run = self._runs.get(r.uid)
            if run is not None:
                self._guarded(run, lambda run, r=r: self._on_token(run, r))

    def _on_token(self, run: Run, r: Any) -> None:
        o = run.job.options
        run.generated += 1
        eos = r.token == self.tokenizer.eos_id
        text = run.detok.finalize() if eos else run.detok.add_token(r.token)
        if r.finish_reason is not None and not eos:  # the last token: what is held back too
            text += run.detok.finalize()
        record = None
        if o.logprobs is not None:
            record = self._record(r.token, r.logprobs, o.logprobs, text)
        out, records, stopped = run.tail.add(text, record)
        finish = "stop" if stopped else r.finish_reason
        if finish is None:
            if out or records:
                run.job.emit(Piece(out, records))
            return
        if not stopped:
            rest, more = run.tail.finish()
            out, records = out + rest, records + more
        if r.finish_reason is not None:  # the generator has let the row go
            cache, tokens = r.prompt_cache, r.all_tokens
        else:
            cache, tokens = self._gen.remove([r.uid], return_prompt_caches=True)[r.uid]
        del self._runs[r.uid]
        run.job.emit(Piece(out, records, finish, self._usage(run, cache)))
        self._snapshot(run, tokens, cache)

    @staticmethod
    def _record(token: int, logprobs: mx.array, k: int, text: str) -> TokenLogprob:
        """The chosen token's log-probability and the k most likely tokens'."""
        chosen = logprobs[token]
        if not k:
            return TokenLogprob(token, chosen.item(), [], text)
        ids = mx.argpartition(-logprobs, k - 1)[:k]
        values = logprobs[ids]
        mx.eval(chosen, ids, values)
        ids, values = np.array(ids), np.array(values)
        order = np.argsort(-values, kind="stable")
        top = list(zip(ids[order].tolist(), values[order].tolist()))
        return TokenLogprob(token, chosen.item(), top, text)

    def _usage(self, run: Run, cache: list[Any]) -> dict[str, Any]:
        """OpenAI's token counts plus HAM's memory: admitted fraction per HAM layer, KV bytes."""
        stats = kv_stats(cache)
        n = len(run.job.prompt)
        return {
            "prompt_tokens": n,
            "completion_tokens": run.generated,
            "total_tokens": n + run.generated,
            "prompt_tokens_details": {"cached_tokens": run.cached},
            "kv_fraction": [
                sum(s["kv_fraction"]) / max(len(s["kv_fraction"]), 1)
                for s in stats
                if s["type"] == "ham"
            ],  # fmt: skip
            "kv_bytes": sum(s["kv_bytes"] for s in stats),
            "full_kv_bytes": sum(s["full_kv_bytes"] for s in stats),
        }
