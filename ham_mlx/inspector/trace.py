"""Run a prompt through a model with a real cache and record what each HAM layer stored, and how
well each GDN layer's state predicted every token.

The admission is generation's own: the prompt is prefilled in chunks into the caches made by
`model.make_cache(threshold)` (as `generate_step` does), and a token counts as stored when its
position is held by the layer's HAMCache. HAM scores come from the model's `scores` list.

A GDN layer has no router, no τ and no KV cache. Its score is the cosine surprise of its own
state's prediction (spec §4.1: `1 − cos(v̂_t, v_t)` with `v̂_t = α_t S_{t−1} k̂_t`, the min over
value heads), the quantity a cosine HAM layer thresholds; it is computed from the layer's input
in each chunk before the block runs. Nothing is stored: the view only marks the tokens whose
surprise reaches a reference level (`gdn_level`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ham_mlx.generate import prompt_ids
from ham_mlx.model import Block, Model
from ham_mlx.routers import head_surprise, token_score

MAX_TOKENS = 2048  # default limit on the tokens inspected
PARTIAL = "·"  # shown for a byte token whose character completes in a later token
GDN_LEVEL = 0.5  # default reference level of the GDN view: cos(v̂, v) <= 0.5 in every head
SCORED = ("ham", "gdn")  # the layer types with a score per token


@dataclass
class LayerTrace:
    """What one HAM layer stored from the prompt, or how a GDN layer predicted it (`kind`)."""

    index: int  # position in model.layers
    threshold: float  # ham: τ used for admission (trained, or the user's override); gdn: level
    scores: np.ndarray  # [L] float32 surprise score s_t (gdn: cosine surprise of the state)
    admitted: np.ndarray  # [L] bool: ham: held by the layer's KV cache; gdn: score >= level
    kind: str = "ham"  # "ham" or "gdn" (a GDN layer stores nothing)

    @property
    def n_admitted(self) -> int:
        return int(self.admitted.sum())

    @property
    def kv_fraction(self) -> float:
        """Admitted / seen (gdn: the marked fraction; its KV cache does not exist)."""
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


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded prompt (▁ becomes a space); specials by name."""
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    detok = tokenizer.detokenizer()
    return [names.get(i) or detok.add_token(i) or PARTIAL for i in ids]


def scored_layer_indices(model: Model, model_name: str, layers: Sequence[int] | None) -> list[int]:
    """The model-layer indices to inspect: `layers`, checked, or every HAM and GDN layer."""
    types = model.args.layer_types
    scored = [i for i, t in enumerate(types) if t in SCORED]
    if not scored:
        raise ValueError(
            f"model {model_name} has no HAM or GDN layers (layer types: {', '.join(types)}); "
            "inspect shows the surprise scores of HAM and GDN layers"
        )
    if layers is None:
        return scored
    for i in layers:
        if not 0 <= i < len(types):
            raise ValueError(f"--layers: layer {i} does not exist (the model has {len(types)})")
        if types[i] not in SCORED:
            raise ValueError(
                f"--layers: layer {i} ({types[i]!r}) has no surprise score; HAM and GDN "
                "layers: " + ", ".join(map(str, scored))
            )
    return sorted(set(layers))


def gdn_surprise(block: Block, h: mx.array, cache) -> mx.array:
    """The cosine surprise [B, l] of a GDN block's state predicting each token of h [B, l, D],
    from the cache's state before the call; the cache is left as it was, for the block's own
    call to advance."""
    conv, ssm = cache.conv, cache.ssm
    rec = block.attn.recurrence(block.attn_norm(h), cache)
    cache.conv, cache.ssm = conv, ssm
    return token_score(head_surprise(rec.v_hat, rec.v, "cosine"))


def trace(
    model: Model,
    tokenizer,
    prompt: str,
    threshold: float | list[float] | None = None,
    layers: Sequence[int] | None = None,
    max_tokens: int = MAX_TOKENS,
    prefill_step_size: int = 512,
    model_name: str = "model",
    gdn_level: float = GDN_LEVEL,
) -> Trace:
    """Prefill `prompt` (its first `max_tokens` tokens) and read back what each HAM layer stored
    and how surprised each GDN layer's state was.

    threshold: one τ for all HAM layers or one per HAM layer (None: the trained τ);
    layers: model-layer indices of the HAM and GDN layers to report (None: all);
    gdn_level: GDN layers mark the tokens whose surprise is at least this level.
    """
    chosen = scored_layer_indices(model, model_name, layers)
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
    types = model.args.layer_types
    gdn = [i for i in chosen if types[i] == "gdn"]
    chunks = []  # per chunk: one score array [1, l] per HAM layer, then per chosen GDN layer
    for i in range(0, L, prefill_step_size):
        # the model's forward, block by block (the head's logits are not needed)
        h = model.model.embeddings(tokens[:, i : i + prefill_step_size])
        scores: list[mx.array] = []
        peeks: list[mx.array] = []
        for j, (block, c) in enumerate(zip(model.layers, cache)):
            if j in gdn:
                peeks.append(gdn_surprise(block, h, c))
            h = block(h, c, scores)
        mx.eval(h, scores, peeks, [c.state for c in cache])
        chunks.append(scores + peeks)

    def scores_of(j: int) -> np.ndarray:
        return np.concatenate([np.array(ch[j][0], dtype=np.float32) for ch in chunks])

    ham = [i for i, t in enumerate(types) if t == "ham"]
    out = []
    for i in chosen:
        if types[i] == "gdn":
            s = scores_of(len(ham) + gdn.index(i))
            out.append(LayerTrace(i, float(gdn_level), s, s >= gdn_level, kind="gdn"))
            continue
        c = cache[i]
        count = c.admitted_counts()[0]
        held = np.array(c.positions[0, :count]) if count else np.zeros(0, dtype=np.int64)
        admitted = np.zeros(L, dtype=bool)
        admitted[held] = True
        tau = c.threshold if c.threshold is not None else float(model.layers[i].attn.threshold)
        out.append(LayerTrace(i, float(tau), scores_of(ham.index(i)), admitted))
    return Trace(
        model_name=model_name,
        layer_types=list(model.args.layer_types),
        ids=ids,
        tokens=token_texts(tokenizer, ids),
        layers=out,
        threshold_source="trained" if threshold is None else "override",
        dropped=dropped,
    )
