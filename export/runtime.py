"""Run an exported HAM model on onnxruntime, with the API of `ham_mlx.generate`.

`OnnxModel(path)(input_ids, cache)` follows the MLX model's contract (ids `[B, L]` -> logits
`[B, L, V]`, the cache updated in place). Each layer's key/value buffers are bound as both the past
input and the present output of every call (IOBinding), so `TensorScatter` writes the new entries in
place; conv and recurrent states alternate between two buffers. `stream_generate` / `generate`
take the arguments of their MLX twins and reuse ham_mlx's samplers, so a seeded run draws the same
tokens as MLX when the logits agree.

Capacity: attention (`attn`) layers need one slot per token, so their capacity is the requested
length (prompt + max_tokens); a smaller `capacity` is refused before anything runs. HAM layers hold
`max_kv_tokens` admitted tokens (default: the export's `--max-kv`, else the requested length); once
full, further surprising tokens are not cached, exactly like the MLX model with
`max_kv_tokens=N, kv_policy="reject"`, and the statistics count them (`rejected`).

Padding (spec §7.1): rows of a batch may hold prompts of different lengths, padded on the right
(any row) or on the left (a row that has seen nothing yet). Give the call an `attention_mask`
(1 = real token, 0 = pad; onnxruntime-genai's convention), or announce the padding on the cache as
on an MLX cache (`cache.prepare(lengths=..., left_padding=...)`). Pads never reach a state or a
cache and never count as seen, so each row equals its prompt run alone (`batch_generate`).
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import onnxruntime as ort

from ham_mlx.config import ModelArgs
from ham_mlx.generate import (
    GenerationResponse,
    check_seed,
    collect,
    prompt_ids,
    stream_responses,
)
from ham_mlx.routers import get_router
from ham_mlx.sample import make_logits_processors, make_sampler
from ham_mlx.tokenizer import Tokenizer, load_tokenizer

from .cache_io import LayerIO

MODEL_FILE = "model.onnx"
MASK = "attention_mask"
TOKENIZER_FILE = "tokenizer.model"
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _layer_ios(session: ort.InferenceSession, kinds: list[str], args: ModelArgs) -> list[LayerIO]:
    """The cache layout, read back from the graph's input shapes."""
    shapes = {i.name: i.shape for i in session.get_inputs()}
    ios = []
    for index, kind in enumerate(kinds):
        names = LayerIO(index, kind)
        key, value = shapes.get(names.past("key")), shapes.get(names.past("value"))
        conv, rec = shapes.get(names.past("conv_state")), shapes.get(names.past("recurrent_state"))
        extra = {}
        if kind == "ham":
            HV, bias = rec[1], get_router(args.ham_router).key_bias_column
            extra = dict(key_dim=args.head_dim + (1 if bias else 0),
                         value_groups=HV // value[1] if value[1] != HV else 1)  # fmt: skip
        elif kind == "attn":
            extra = dict(key_dim=key[3], window=args.attn["window_size"])
        ios.append(LayerIO(
            index, kind,
            key=(key[1], key[3]) if key else None,
            value=(value[1], value[3]) if value else None,
            conv=tuple(conv[1:]) if conv else None,
            recurrent=tuple(rec[1:]) if rec else None,
            **extra,
        ))  # fmt: skip
    return ios


class OnnxModel:
    """An exported model: `model(input_ids [B, L], cache) -> logits [B, L, V]` (numpy)."""

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        session_config: dict[str, str] | None = None,
    ):
        path = Path(path)
        file = path / MODEL_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"exported model not found: {file}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():  # e.g. session.intra_op.allow_spinning
            so.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(
            str(file), so, providers=list(providers or ["CPUExecutionProvider"])
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        if "ham.config" not in meta:
            raise ValueError(f"{file}: not a ham_mlx export (no ham.config metadata)")
        self.args = ModelArgs.from_dict(json.loads(meta["ham.config"]))
        self.thresholds = json.loads(meta["ham.thresholds"])  # one τ per HAM layer
        self.max_kv_tokens = json.loads(meta.get("ham.max_kv_tokens", "null"))
        self.dtype = meta.get("ham.dtype", "fp32")
        self.path = file
        self.ios = _layer_ios(self.session, json.loads(meta["ham.layers"]), self.args)
        ham = [io.index for io in self.ios if io.kind == "ham"]
        self.threshold_of = dict(zip(ham, self.thresholds))  # layer index -> τ
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        key_types = [i.type for i in self.session.get_inputs() if i.name.endswith(".key")]
        self.cache_dtype = _NP[key_types[0]] if key_types else np.float32

    def make_cache(
        self, batch: int = 1, capacity: int = 4096, max_kv_tokens: int | None = None
    ) -> OnnxCache:
        """Buffers for `batch` rows: attention layers hold `capacity` tokens, HAM layers
        `max_kv_tokens` admitted tokens (default: the export's --max-kv, else `capacity`)."""
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        ham_cap = max_kv_tokens or self.max_kv_tokens or capacity
        if ham_cap < 1:
            raise ValueError(f"max_kv_tokens={ham_cap} must be >= 1")
        return OnnxCache(self, batch, capacity, ham_cap)

    def __call__(
        self, input_ids: np.ndarray, cache: OnnxCache, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Logits [B, L, V] of `input_ids` [B, L]; `attention_mask` [B, L] (or [B, past + L], of
        which the last L columns are read) marks real tokens with 1 and pads with 0 (default: the
        padding announced by `cache.prepare`, else none). A pad's logits mean nothing."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        B, L = ids.shape
        if L == 0:
            raise ValueError(
                "inputs are empty: at least one token is needed (ONNX Scan cannot run 0 steps)"
            )
        if B != cache.batch:
            raise ValueError(f"input batch {B} != cache batch {cache.batch}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.args.vocab_size:
            raise ValueError(
                f"token id {lo if lo < 0 else hi} is out of range [0, {self.args.vocab_size})"
            )
        mask = cache.call_mask(B, L, attention_mask)
        cache.check_room(L)
        return cache.run(ids.astype(np.int64), mask)


@dataclass
class LayerState:
    io: LayerIO
    capacity: int = 0
    kv: list[ort.OrtValue] = field(default_factory=list)  # key, value: past = present
    state: list[list[ort.OrtValue]] = field(default_factory=list)  # [conv, rec] x 2 (ping-pong)
    current: int = 0
    rejected: np.ndarray | None = None  # [B] surprising tokens refused by a full cache
    surprise: np.ndarray | None = None  # the last call's scores [B, L]
    admitted: np.ndarray | None = None


class OnnxCache:
    """The fixed-capacity buffers of one generation (all layers), and the tokens seen per row."""

    def __init__(self, model: OnnxModel, batch: int, capacity: int, ham_capacity: int):
        self.model, self.batch = model, batch
        self.capacity, self.ham_capacity = capacity, ham_capacity
        self.offsets = np.zeros(batch, dtype=np.int64)  # real tokens seen, per row
        self._lengths: np.ndarray | None = None  # prepared: real tokens left to come, per row
        self._left: np.ndarray | None = None  # prepared: left padding of the next call
        self.layers: list[LayerState] = []

        def zeros(shape, dtype):
            v = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype)
            v.update_inplace(np.zeros(shape, dtype))
            return v

        for io in model.ios:
            st = LayerState(io)
            if io.key is not None:
                st.capacity = ham_capacity if io.kind == "ham" else capacity
                for slot in ("key", "value"):
                    heads, width = io.key if slot == "key" else io.value
                    st.kv.append(zeros((batch, heads, st.capacity, width), model.cache_dtype))
            if io.conv is not None:
                for _ in range(2):
                    st.state.append(
                        [
                            zeros((batch, *io.conv), np.float32),
                            zeros((batch, *io.recurrent), np.float32),
                        ]
                    )
            if io.kind == "ham":
                st.rejected = np.zeros(batch, dtype=np.int64)
            self.layers.append(st)

    @property
    def offset(self) -> int:
        """Tokens seen (the longest row's count when rows differ)."""
        return int(self.offsets.max()) if self.batch else 0

    # ---- padding ------------------------------------------------------------------------------
    def prepare(
        self,
        *,
        lengths: Sequence[int] | None = None,
        right_padding: Sequence[int] | None = None,
        left_padding: Sequence[int] | None = None,
    ) -> None:
        """Announce padding as on an MLX cache (`ham_mlx.cache.rows`): row b has `lengths[b]`
        real tokens in the next call(s), right-padded after them (`right_padding` is implied by
        the lengths); `left_padding[b]` pads come before the row's tokens in the next call, which
        only a row that has seen nothing may have."""
        if lengths is not None:
            self._lengths = _row_ints(lengths, "lengths", self.batch)
        if left_padding is not None:
            left = _row_ints(left_padding, "left_padding", self.batch)
            if (self.offsets[left > 0] > 0).any():
                raise ValueError("left padding is only possible on an empty row")
            self._left = left if left.any() else None

    def finalize(self) -> None:
        """Forget the announced padding."""
        self._lengths = self._left = None

    def call_mask(self, B: int, L: int, attention_mask: np.ndarray | None) -> np.ndarray:
        """[B, L] int64: the real tokens of the next call (given, or from `prepare`), checked:
        each row's real tokens are one contiguous run, after pads only on an empty row."""
        if attention_mask is None and self._lengths is None and self._left is None:
            return np.ones((B, L), dtype=np.int64)  # no padding
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.ndim != 2 or mask.shape[0] != B or mask.shape[1] < L:
                raise ValueError(
                    f"attention_mask must be [batch, length] = [{B}, {L}] (or [{B}, past + {L}]),"
                    f" got shape {mask.shape}"
                )
            mask = mask[:, mask.shape[1] - L :]
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask holds 1 (a real token) or 0 (a pad), nothing else")
            mask = mask.astype(np.int64)
        else:
            t = np.arange(L)[None]
            start = np.zeros((B, 1), np.int64) if self._left is None else self._left[:, None]
            stop = np.full((B, 1), L, np.int64)
            if self._lengths is not None:
                stop = np.minimum(start + np.maximum(self._lengths, 0)[:, None], L)
            mask = ((t >= start) & (t < stop)).astype(np.int64)
        real = mask.astype(bool)
        counts = real.sum(axis=1)
        first = np.where(counts > 0, real.argmax(axis=1), 0)
        if (real.cumsum(axis=1)[np.arange(B), np.minimum(first + counts, L) - 1] != counts).any():
            raise ValueError("each row's real tokens must be one contiguous run (pads around it)")
        if ((first > 0) & (counts > 0) & (self.offsets > 0)).any():
            raise ValueError("left padding is only possible on an empty row")
        return mask

    def shortfall(self, new_tokens: int, step: int) -> tuple[LayerState, int] | None:
        """The first attention layer that cannot take `new_tokens` more tokens fed in calls of
        at most `step` tokens, with the capacity it would need (None: every layer can)."""
        for st in self.layers:
            if st.io.kind != "attn":
                continue
            need = self.offset + new_tokens
            if st.io.window is not None:  # a circular buffer: the window plus one call
                need = min(need, st.io.window - 1 + min(step, new_tokens))
            if need > st.capacity:
                return st, need
        return None

    def check_room(self, L: int) -> None:
        """Attention layers keep every token: refuse a call that would overwrite one."""
        short = self.shortfall(L, L)
        if short is not None:
            st, need = short
            raise ValueError(
                f"capacity {st.capacity} of attention layer {st.io.index} cannot hold "
                f"{self.offset + L} tokens (needs {need}): make the cache with a larger capacity"
            )

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        model = self.model
        binding = model.session.io_binding()
        mask = np.ascontiguousarray(mask, dtype=np.int64)
        keep = [ids, mask]
        binding.bind_cpu_input("input_ids", ids)
        if MASK in model.input_names:
            binding.bind_cpu_input(MASK, mask)
        elif not mask.all():
            raise ValueError(f"{model.path} was exported without padding support (no {MASK})")
        bound: list[str] = []  # output names in binding order
        if "position_ids" in model.input_names:  # a real token's position in its row
            pos = np.maximum(self.offsets[:, None] + np.cumsum(mask, axis=1) - 1, 0)
            keep.append(pos)
            binding.bind_cpu_input("position_ids", pos)
        for st in self.layers:
            io = st.io
            for slot, value in zip(("key", "value"), st.kv):
                binding.bind_ortvalue_input(io.past(slot), value)
                binding.bind_ortvalue_output(io.present(slot), value)
                bound.append(io.present(slot))
            if st.state:
                past, present = st.state[st.current], st.state[1 - st.current]
                for slot, a, b in zip(("conv_state", "recurrent_state"), past, present):
                    binding.bind_ortvalue_input(io.past(slot), a)
                    binding.bind_ortvalue_output(io.present(slot), b)
                    bound.append(io.present(slot))
        for name in ["logits"] + [n for n in model.output_names if n.startswith("debug.")]:
            binding.bind_output(name)
            bound.append(name)
        model.session.run_with_iobinding(binding)
        outputs = {
            name: value.numpy()
            for name, value in zip(bound, binding.get_outputs())
            if name == "logits" or name.startswith("debug.")
        }
        for st in self.layers:
            if st.state:
                st.current = 1 - st.current
            if st.io.kind == "ham" and f"debug.{st.io.index}.surprise" in outputs:
                i = st.io.index
                st.surprise = outputs[f"debug.{i}.surprise"]
                st.admitted = outputs[f"debug.{i}.admitted"]
                tau = model.threshold_of[i]
                st.rejected += ((st.surprise >= tau) & ~st.admitted & (mask > 0)).sum(axis=1)
        counts = mask.sum(axis=1)
        self.offsets = self.offsets + counts
        if self._lengths is not None:
            self._lengths = self._lengths - counts
        self._left = None
        del keep
        return outputs["logits"]

    # ---- reading the cache back (tests, statistics) -------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Every present tensor as numpy, by its graph output name."""
        out = {}
        for st in self.layers:
            io = st.io
            for slot, value in zip(("key", "value"), st.kv):
                out[io.present(slot)] = value.numpy()
            if st.state:
                for slot, value in zip(("conv_state", "recurrent_state"), st.state[st.current]):
                    out[io.present(slot)] = value.numpy()
        return out

    def admitted_counts(self, layer: int) -> list[int]:
        st = self.layers[layer]
        return [int(c) for c in st.state[st.current][0].numpy()[:, -1, 0]]

    def stats(self) -> list[dict[str, Any]]:
        """One dict per layer, like ham_mlx.kv_stats (plus capacity, buffer_bytes, rejected)."""
        stats = []
        itemsize = np.dtype(self.model.cache_dtype).itemsize
        seen_rows = [int(o) for o in self.offsets]
        for st in self.layers:
            io = st.io
            seen = self.offset
            buffer = sum(int(np.prod(v.shape())) for v in st.kv) * itemsize
            state = sum(int(np.prod(v.shape())) * 4 for v in st.state[0]) if st.state else 0
            if io.kind == "ham":
                HV, Dv, Dk = io.recurrent
                per_token = (io.key[0] * Dk + HV * Dv) * itemsize
                admitted = self.admitted_counts(io.index)
                kind = "ham"
            elif io.kind == "attn":
                per_token = 2 * io.key[0] * io.key[1] * itemsize
                admitted = [min(s, io.window - 1) if io.window else s for s in seen_rows]
                kind = "attn"
            else:
                stats.append(
                    {
                        "type": "gdn",
                        "admitted": [],
                        "seen": seen,
                        "kv_fraction": [],
                        "kv_bytes": 0,
                        "full_kv_bytes": 0,
                        "state_bytes": state,
                        "capacity": 0,
                        "buffer_bytes": 0,
                    }
                )
                continue
            entry = {
                "type": kind,
                "admitted": admitted,
                "seen": seen,
                "kv_fraction": [a / n if n else 0.0 for a, n in zip(admitted, seen_rows)],
                "kv_bytes": sum(admitted) * per_token,
                "full_kv_bytes": sum(seen_rows) * per_token,
                "state_bytes": state,
                "capacity": st.capacity,
                "buffer_bytes": buffer,
            }
            if io.kind == "ham":
                entry["rejected"] = [int(r) for r in st.rejected]
            stats.append(entry)
        return stats


def _row_ints(values: Sequence[int], name: str, batch: int) -> np.ndarray:
    a = np.asarray(values)
    if a.shape != (batch,) or not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
        raise ValueError(f"{name} must be {batch} non-negative integers, one per row")
    return a.astype(np.int64)


def load(path: str | Path, **kwargs: Any) -> tuple[OnnxModel, Tokenizer]:
    """An exported folder: (OnnxModel, tokenizer) from model.onnx and tokenizer.model (or
    tokenizer.json)."""
    model = OnnxModel(path, **kwargs)
    try:
        tokenizer = load_tokenizer(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; the exported folder needs its tokenizer") from None
    return model, tokenizer


def stream_generate(
    model: OnnxModel,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
    seed: int | None = None,
    max_kv_tokens: int | None = None,
    capacity: int | None = None,
    prefill_step_size: int = 512,
    prompt_cache: OnnxCache | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from a prompt on onnxruntime, yielding pieces of text with statistics.

    The arguments are those of `ham_mlx.stream_generate`, less the controls that need the MLX
    cache (`threshold`, `kv_budget`: re-export with `--threshold`; `kv_policy`: the exported
    cache rejects once full). `max_kv_tokens` sizes the HAM layers' buffers; `capacity` (default:
    prompt + max_tokens) the attention layers'; a capacity that cannot hold the requested
    generation is an error, never a silent truncation.
    """
    ids = prompt_ids(tokenizer, prompt, model.args.vocab_size)
    if max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens} must be >= 0")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size={prefill_step_size} must be >= 1")
    need = len(ids) + max_tokens
    cache = prompt_cache
    if cache is None:
        cache = model.make_cache(1, capacity or need, max_kv_tokens)
    short = cache.shortfall(need, prefill_step_size)  # fail before running, not halfway
    if short is not None:
        st, room = short
        raise ValueError(
            f"capacity {st.capacity} cannot hold the requested generation ({cache.offset} cached "
            f"+ {len(ids)} prompt + {max_tokens} new tokens) in attention layer {st.io.index}: "
            f"pass capacity >= {room}"
        )
    check_seed(seed)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    processors = make_logits_processors(repetition_penalty, repetition_context_size)

    def steps() -> Iterator[tuple[int, float, float]]:
        start = time.perf_counter()
        tokens = np.array([ids], dtype=np.int64)
        for i in range(0, len(ids), prefill_step_size):
            logits = model(tokens[:, i : i + prefill_step_size], cache)
        t0 = time.perf_counter()
        history = mx.array(tokens)
        logits = mx.array(logits[:, -1, :])
        while True:
            for proc in processors:
                logits = proc(history, logits)
            token = int(sampler(logits).item())
            yield token, start, t0
            if processors:
                history = mx.concatenate([history, mx.array([[token]])], axis=1)
            logits = mx.array(model(np.array([[token]], dtype=np.int64), cache)[:, -1, :])

    yield from stream_responses(
        steps(), tokenizer, len(ids), max_tokens, kv=cache.stats,
        peak_memory_gb=lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )  # fmt: skip


def generate(
    model: OnnxModel,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate text for a prompt; `kwargs` are those of `stream_generate`."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)


def batch_generate(
    model: OnnxModel,
    tokenizer: Tokenizer | None,
    prompts: Sequence[str | Sequence[int]],
    max_tokens: int = 256,
    padding: str = "right",
    prefill_step_size: int = 512,
    max_kv_tokens: int | None = None,
    capacity: int | None = None,
    pad_id: int | None = None,
) -> list[list[int]]:
    """Greedy tokens for several prompts at once, one padded batch (`padding` "right" or
    "left"): each row's tokens are those of its prompt generated alone. A row stops after EOS
    (included) or `max_tokens`; a finished row is fed pads, which leave its caches unchanged.
    tokenizer: encodes text prompts and gives EOS (None: prompts are token ids, no EOS)."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding={padding!r}: expected 'left' or 'right'")
    if max_tokens < 0 or prefill_step_size < 1:
        raise ValueError("max_tokens must be >= 0 and prefill_step_size >= 1")
    if not prompts:
        return []
    rows = [
        prompt_ids(tokenizer, p, model.args.vocab_size) if isinstance(p, str) else list(p)
        for p in prompts
    ]
    if any(not r for r in rows):
        raise ValueError("a prompt is empty: each row needs at least one token")
    bad = [t for r in rows for t in r if not 0 <= t < model.args.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is out of range [0, {model.args.vocab_size})")
    B, T = len(rows), max(len(r) for r in rows)
    pad = model.args.pad_token_id if pad_id is None else pad_id
    pad = 0 if pad is None else pad
    ids = np.full((B, T), pad, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, r in enumerate(rows):
        span = slice(0, len(r)) if padding == "right" else slice(T - len(r), T)
        ids[b, span], mask[b, span] = r, 1
    cache = model.make_cache(B, capacity or T + max_tokens, max_kv_tokens)
    short = cache.shortfall(T + max_tokens, prefill_step_size)
    if short is not None:
        st, room = short
        raise ValueError(
            f"capacity {st.capacity} of attention layer {st.io.index} cannot hold the requested "
            f"generation ({T} padded prompt + {max_tokens} new tokens): pass capacity >= {room}"
        )
    last = np.zeros((B, model.args.vocab_size), dtype=np.float32)  # logits at the last real token
    for a in range(0, T, prefill_step_size):
        m = mask[:, a : a + prefill_step_size]
        logits = model(ids[:, a : a + prefill_step_size], cache, attention_mask=m)
        for b in np.flatnonzero(m.any(axis=1)):
            last[b] = logits[b, np.flatnonzero(m[b])[-1]]
    eos = None if tokenizer is None else tokenizer.eos_id
    out: list[list[int]] = [[] for _ in rows]
    live = np.ones(B, dtype=bool)
    for i in range(max_tokens):
        nxt = last.argmax(axis=-1)
        for b in np.flatnonzero(live):
            out[b].append(int(nxt[b]))
            if nxt[b] == eos:
                live[b] = False
        if i == max_tokens - 1 or not live.any():
            break
        step_ids = np.where(live, nxt, pad).astype(np.int64)[:, None]
        logits = model(step_ids, cache, attention_mask=live.astype(np.int64)[:, None])
        last = np.where(live[:, None], logits[:, -1], last)
    return out
