"""The exported graph's cache tensors: names, shapes, and conversion to and from MLX caches.

Names follow onnxruntime-genai (`past_key_values.{i}.key` -> `present.{i}.key`, likewise `value`,
`conv_state`, `recurrent_state`), so genai binds them without help. Per layer type:

| layer | key `[B, Hk, N, P]` | value `[B, Hv, N, Pv]` | conv_state `[B, Kc, C]` | recurrent_state |
|---|---|---|---|---|
| ham  | admitted k̂ (+ router bias) | admitted v | conv history + count | S `[B,HV,Dv,Dk]` |
| gdn  | - | - | conv history (last row unused) | S |
| attn | keys after RoPE, slot = position mod N | values | - | - |

N (the capacity) is never a constant in the graph: it is read from the past buffer's shape, so
onnxruntime-genai (which sizes every buffer to `max_length`) and our runner (which sizes HAM
layers to `max_kv_tokens`) can both choose it. `conv_state` rows `0..Kc-2` hold the last Kc-1
projected q|k|v inputs (MLX's `GDNCache.conv`); row Kc-1 holds the HAM layer's admitted count in
its first entry (float32, exact to 2^24), because genai has no other slot for a per-layer integer.
conv_state and recurrent_state are float32 in every variant.

Key layout: `compact` stores keys `[B, H, N, Dk]` and values `[B, HV, N, Dv]` like MLX's
`HAMCache`. genai allocates key and value of one layer with the same shape, so the `genai` layout
zero-pads keys to the value width (and stores GVA values grouped by q/k head): the padding adds
`(Dv - Dk) / (Dk + Dv)` to a HAM layer's KV bytes. A learned router stores each entry's key bias
`log(max(r_s, eps))` as one extra key column (queries carry a 1 there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ham_mlx.model import Model
from ham_mlx.routers import get_router

LAYOUTS = ("compact", "genai")


@dataclass(frozen=True)
class LayerIO:
    """Shapes (without batch and capacity) of one layer's cache tensors."""

    index: int
    kind: str  # "ham" | "gdn" | "attn"
    key: tuple[int, int] | None = None  # (heads, width)
    value: tuple[int, int] | None = None
    conv: tuple[int, int] | None = None  # (rows = Kc, channels)
    recurrent: tuple[int, int, int] | None = None  # (HV, Dv, Dk)
    key_dim: int = 0  # used width of a key row (Dk, + 1 for the router bias column)
    value_groups: int = 1  # ham + genai layout with GVA: values stored [B, H, N, G * Dv]
    window: int | None = None  # attn layers

    def past(self, slot: str) -> str:
        return f"past_key_values.{self.index}.{slot}"

    def present(self, slot: str) -> str:
        return f"present.{self.index}.{slot}"

    @property
    def slots(self) -> list[str]:
        names = []
        if self.key is not None:
            names += ["key", "value"]
        if self.conv is not None:
            names += ["conv_state", "recurrent_state"]
        return names

    def shape(self, slot: str, batch, capacity) -> list:
        if slot == "key":
            return [batch, self.key[0], capacity, self.key[1]]
        if slot == "value":
            return [batch, self.value[0], capacity, self.value[1]]
        if slot == "conv_state":
            return [batch, *self.conv]
        return [batch, *self.recurrent]


def layer_ios(model: Model, layout: str = "compact") -> list[LayerIO]:
    """One LayerIO per layer of `model`, read from its modules."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    ios = []
    for i, block in enumerate(model.layers):
        m = block.attn
        if block.layer_type == "attn":
            hd = m.head_dim
            ios.append(
                LayerIO(
                    i,
                    "attn",
                    (m.num_kv_heads, hd),
                    (m.num_kv_heads, hd),
                    key_dim=hd,
                    window=m.window,
                )
            )
            continue
        H, HV, Dk, Dv = m.num_heads, m.num_v_heads, m.head_dim, m.head_v_dim
        Kc = m.q_conv1d.weight.shape[1]
        C = 2 * H * Dk + HV * Dv
        rec = dict(conv=(Kc, C), recurrent=(HV, Dv, Dk))
        if block.layer_type == "gdn":
            ios.append(LayerIO(i, "gdn", **rec))
            continue
        key_dim = Dk + (1 if get_router(m.router_kind).key_bias_column else 0)
        if layout == "compact":
            key, value, groups = (H, key_dim), (HV, Dv), 1
        else:
            G = HV // H
            width = max(key_dim, G * Dv)
            key, value, groups = (H, width), (H, width), G
        ios.append(LayerIO(i, "ham", key, value, key_dim=key_dim, value_groups=groups, **rec))
    return ios


# ---- MLX caches <-> exported cache tensors (tests, the runner's statistics) --------------------
def ham_entries(io: LayerIO, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The admitted entries of a HAM layer per row, in MLX's `HAMCache` layout:
    keys [H, n, Dk], values [HV, n, Dv], count n."""
    count = admitted_count(io, feeds)
    keys, values = feeds[io.present("key")], feeds[io.present("value")]
    HV, Dv, Dk = io.recurrent
    out: dict[str, list[np.ndarray]] = {"keys": [], "values": [], "bias": [], "count": []}
    for b, n in enumerate(count):
        k = keys[b, :, :n, :Dk]
        v = values[b, :, :n, :]
        if io.value_groups > 1 or v.shape[0] != HV:  # grouped: [H, n, G*Dv] -> [HV, n, Dv]
            H = v.shape[0]
            v = v[..., : io.value_groups * Dv].reshape(H, n, io.value_groups, Dv)
            v = v.transpose(0, 2, 1, 3).reshape(HV, n, Dv)
        else:
            v = v[..., :Dv]
        out["keys"].append(k)
        out["values"].append(v)
        out["bias"].append(keys[b, 0, :n, Dk] if io.key_dim > Dk else None)
        out["count"].append(int(n))
    return out


def admitted_count(io: LayerIO, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """[B] admitted entries of a HAM layer (stored in conv_state's last row)."""
    return feeds[io.present("conv_state")][:, -1, 0].astype(np.int64)


def conv_history(io: LayerIO, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """[B, Kc-1, C] (MLX's GDNCache.conv) or None when Kc = 1."""
    conv = feeds[io.present("conv_state")]
    return conv[:, :-1] if conv.shape[1] > 1 else None
