"""The router registry: the only home of the HAM router kinds (spec §4.1), and their MLX math.

A HAM layer scores every token's surprise s_t with its router and admits the token to its KV cache
when s_t >= τ (spec §4.2). `ROUTERS` names the kinds; everything else (config validation, the
MLX layer, the ONNX lowering, the PyTorch reference) looks a kind up here with `get_router` and
branches on its fields (`kind.learned`, `kind.key_bias_column`), never on its name. A backend
that needs per-kind code keeps a table keyed by `ROUTERS`' names and checks it with
`check_table` at import.

- `cosine`: per value head e^j = 1 - (v̂·v) / sqrt((‖v̂‖²+ε)(‖v‖²+ε)), s_t = min_j e^j; in [0, 2].
- `l2`: per value head e^j = ‖v - v̂‖² / (‖v‖²+ε), s_t = min_j e^j; in [0, ∞).
- `learned`: r_t = sigmoid(w2ᵀ SiLU(W1 h_t) + b2) from the layer input h; in (0, 1). Attention
  adds log(max(r_s, ε)) to the logits of key s (the key bias, one extra key column in the ONNX
  cache).

ε = `EPS` = 1e-6 everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ham_mlx.ops import c_helpers, cpu_surprise

EPS = 1e-6  # the ε of the head surprises and of the learned router's key bias


@dataclass(frozen=True)
class RouterKind:
    """One router kind.

    name: its `ham_router` value in config.json.
    learned: the score comes from the layer input h through the router's own parameters
      (`router.fc1`, `router.fc2`; one score per token, with a gradient) and attention adds the
      key bias log(max(r_s, EPS)); otherwise the score is the min over value heads of a surprise
      of the GDN prediction v̂ against v (`head_surprise`, `token_score`; no gradient).
    score_range: (low, high), the closed hull of the scores' mathematical range.
    admit_all / admit_none: a τ with which `score >= τ` holds for every finite score / for none,
      as computed in float32 (not only in exact arithmetic: the float32 cosine surprise of
      nearly (anti)parallel v̂, v lands up to ~1e-6 outside [0, 2], so its admit_all is -inf).
    description: one line for help texts.
    """

    name: str
    learned: bool
    score_range: tuple[float, float]
    admit_all: float
    admit_none: float
    description: str

    @property
    def key_bias_column(self) -> bool:
        """Whether attention adds a per-key bias (stored as one extra key column in the ONNX
        cache): exactly the learned routers."""
        return self.learned

    @property
    def per_head(self) -> bool:
        """Whether the score is the min over value heads of `head_surprise`."""
        return not self.learned


ROUTERS: dict[str, RouterKind] = {
    k.name: k
    for k in (
        RouterKind(
            name="cosine", learned=False, score_range=(0.0, 2.0), admit_all=-math.inf,
            admit_none=math.inf,
            description="1 - cosine(v̂, v) per value head, min over heads; scores in [0, 2]",
        ),
        RouterKind(
            name="l2", learned=False, score_range=(0.0, math.inf), admit_all=0.0,
            admit_none=math.inf,
            description="‖v - v̂‖² / ‖v‖² per value head, min over heads; scores in [0, inf)",
        ),
        RouterKind(
            name="learned", learned=True, score_range=(0.0, 1.0), admit_all=0.0,
            admit_none=math.inf,
            description="sigmoid(MLP(h)) from the layer input, plus a log r key bias; in (0, 1)",
        ),
    )
}  # fmt: skip
DEFAULT_ROUTER = "cosine"  # ModelArgs.ham_router's default


def get_router(name: str | RouterKind) -> RouterKind:
    """The kind named `name` (a `RouterKind` is returned as is). Raises ValueError naming the bad
    value and the valid ones."""
    if isinstance(name, RouterKind):
        return name
    kind = ROUTERS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown router {name!r}: expected one of {sorted(ROUTERS)}")
    return kind


def check_table(table: Mapping[str, object], where: str, kinds: Mapping[str, RouterKind] = ROUTERS):
    """Raise RuntimeError unless `table` (a backend's per-kind code) has exactly the names of
    `kinds` (default: every router kind) as keys."""
    missing, extra = sorted(set(kinds) - set(table)), sorted(set(table) - set(kinds))
    if missing or extra:
        raise RuntimeError(
            f"{where}: its router table must cover exactly {sorted(kinds)} "
            f"(missing {missing}, unknown {extra})"
        )


# ---- MLX math of the head routers ---------------------------------------------------------------
def _cosine_surprise(v_hat: mx.array, v: mx.array) -> mx.array:
    dot = mx.sum(v_hat * v, axis=-1)
    norms = (mx.sum(v_hat * v_hat, axis=-1) + EPS) * (mx.sum(v * v, axis=-1) + EPS)
    return 1.0 - dot * mx.rsqrt(norms)


def _l2_surprise(v_hat: mx.array, v: mx.array) -> mx.array:
    err = v - v_hat
    return mx.sum(err * err, axis=-1) / (mx.sum(v * v, axis=-1) + EPS)


HEAD_SURPRISE = {"cosine": _cosine_surprise, "l2": _l2_surprise}
check_table(HEAD_SURPRISE, "ham_mlx.routers.HEAD_SURPRISE",
            {n: k for n, k in ROUTERS.items() if k.per_head})  # fmt: skip


def head_surprise(
    v_hat: mx.array, v: mx.array, kind: str | RouterKind, cached: bool = False
) -> mx.array:
    """e^j per token and value head `[..., HV]` float32 from v_hat (float32) and v
    `[..., HV, Dv]` (spec §4.1), for a head router `kind` (ValueError for a learned one).
    cached: a prefill call that fills a cache; on the CPU one of `[B, L, HV, Dv]` with at least
    `c_helpers.MIN_TOKENS` tokens may run as one C call (`cpu_surprise.head_surprise_c`)."""
    kind = get_router(kind)
    if not kind.per_head:
        raise ValueError(f"router {kind.name!r} has no head surprise (its score is learned)")
    long_enough = v.ndim == 4 and v.shape[1] >= c_helpers.MIN_TOKENS
    c_form = cached and long_enough and v.dtype == mx.float32
    if c_form and cpu_surprise.available():
        return cpu_surprise.head_surprise_c(v_hat, v, kind.name, EPS)
    return HEAD_SURPRISE[kind.name](v_hat, v.astype(mx.float32))


def token_score(e: mx.array) -> mx.array:
    """s_t `[...]` from the head surprises e `[..., HV]`: the min over the value heads."""
    return mx.min(e, axis=-1)


# ---- the learned router -------------------------------------------------------------------------
class Router(nn.Module):
    """Learned router: r_t = sigmoid(w2ᵀ SiLU(W1 h_t) + b2). Parameters `fc1.weight [R, D]`,
    `fc2.weight [1, R]`, `fc2.bias [1]` (R = `ham_router_hidden`)."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1, bias=True)

    def __call__(self, h: mx.array) -> mx.array:
        """r_t `[B, L]` float32 from h `[B, L, D]`."""
        return mx.sigmoid(self.fc2(nn.silu(self.fc1(h)))[..., 0].astype(mx.float32))


def learned_score(params: dict, h: mx.array) -> mx.array:
    """`Router.__call__` from its (unquantized) parameters (`Router.parameters()`: fc1.weight,
    fc2.weight, fc2.bias), for the decode step: r_t `[B, L]` float32 from h `[B, L, D]`."""
    hidden = nn.silu(h @ params["fc1"]["weight"].T)
    logit = mx.addmm(params["fc2"]["bias"], hidden, params["fc2"]["weight"].T)
    return mx.sigmoid(logit[..., 0].astype(mx.float32))


def key_bias(scores: mx.array) -> mx.array:
    """The learned router's attention key bias log(max(r_s, EPS)), same shape as `scores`."""
    return mx.log(mx.maximum(scores, EPS))
