"""Run a prompt through a model with a real cache and record what each HAM layer stored.

The admission is generation's own: the prompt is prefilled in chunks into the caches made by
`model.make_cache(threshold)` (as `generate_step` does), and a token counts as stored when its
position is held by the layer's HAMCache. Scores come from the model's `scores` list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ham_mlx.generate import prompt_ids
from ham_mlx.model import Model
from ham_mlx.tokenizer import Tokenizer

MAX_TOKENS = 2048  # default limit on the tokens inspected
PARTIAL = "·"  # shown for a byte token whose character completes in a later token


@dataclass
class LayerTrace:
    """What one HAM layer stored from the prompt."""

    index: int  # position in model.layers
    threshold: float  # τ used for admission (trained, or the user's override)
    scores: np.ndarray  # [L] float32 surprise score s_t
    admitted: np.ndarray  # [L] bool: the token's position is held by the layer's KV cache

    @property
    def n_admitted(self) -> int:
        return int(self.admitted.sum())

    @property
    def kv_fraction(self) -> float:
        """Admitted / seen."""
        return self.n_admitted / len(self.admitted)


@dataclass
class Trace:
    """Per-token text and, per inspected HAM layer, scores, τ and admitted flags."""

    model_name: str
    layer_types: list[str]
    ids: list[int]  # [L] token ids inspected
    tokens: list[str]  # [L] display text of each token
    layers: list[LayerTrace]
    threshold_source: str  # "trained" or "override"
    dropped: int = 0  # prompt tokens past max_tokens, not inspected


def token_texts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded prompt (▁ becomes a space); specials by name."""
    names = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>", tokenizer.pad_id: "<pad>"}
    detok = tokenizer.detokenizer()
    return [names.get(i) or detok.add_token(i) or PARTIAL for i in ids]


def ham_layer_indices(model: Model, model_name: str, layers: Sequence[int] | None) -> list[int]:
    """The model-layer indices to inspect: `layers`, checked, or every HAM layer."""
    types = model.args.layer_types
    ham = [i for i, t in enumerate(types) if t == "ham"]
    if not ham:
        raise ValueError(
            f"model {model_name} has no HAM layers (layer types: {', '.join(types)}); "
            "inspect shows what HAM layers store in their KV caches"
        )
    if layers is None:
        return ham
    for i in layers:
        if not 0 <= i < len(types):
            raise ValueError(f"--layers: layer {i} does not exist (the model has {len(types)})")
        if types[i] != "ham":
            raise ValueError(
                f"--layers: layer {i} is a {types[i]} layer; HAM layers: "
                + ", ".join(map(str, ham))
            )
    return sorted(set(layers))


def trace(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str,
    threshold: float | list[float] | None = None,
    layers: Sequence[int] | None = None,
    max_tokens: int = MAX_TOKENS,
    prefill_step_size: int = 512,
    model_name: str = "model",
) -> Trace:
    """Prefill `prompt` (its first `max_tokens` tokens) and read back what each HAM layer stored.

    threshold: one τ for all HAM layers or one per HAM layer (None: the trained τ);
    layers: model-layer indices of the HAM layers to report (None: all).
    """
    chosen = ham_layer_indices(model, model_name, layers)
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size={prefill_step_size} must be >= 1")
    ids = prompt_ids(tokenizer, prompt, model.args.vocab_size)
    dropped = max(len(ids) - max_tokens, 0)
    ids = ids[:max_tokens]
    L = len(ids)
    cache = model.make_cache(threshold)
    tokens = mx.array(ids, dtype=mx.int32)[None]  # [1, L]
    chunks = []  # per chunk: one score array [1, l] per HAM layer
    for i in range(0, L, prefill_step_size):
        scores: list[mx.array] = []
        logits = model(tokens[:, i : i + prefill_step_size], cache, scores)
        mx.eval(logits, scores, [c.state for c in cache])
        chunks.append(scores)

    ham = [i for i, t in enumerate(model.args.layer_types) if t == "ham"]
    out = []
    for j, i in enumerate(ham):
        if i not in chosen:
            continue
        c = cache[i]
        count = c.admitted_counts()[0]
        held = np.array(c.positions[0, :count]) if count else np.zeros(0, dtype=np.int64)
        admitted = np.zeros(L, dtype=bool)
        admitted[held] = True
        tau = c.threshold if c.threshold is not None else float(model.layers[i].attn.threshold)

        scores_l = np.concatenate([np.array(ch[j][0], dtype=np.float32) for ch in chunks])
        out.append(LayerTrace(i, float(tau), scores_l, admitted))
    return Trace(
        model_name=model_name,
        layer_types=list(model.args.layer_types),
        ids=ids,
        tokens=token_texts(tokenizer, ids),
        layers=out,
        threshold_source="trained" if threshold is None else "override",
        dropped=dropped,
    )
