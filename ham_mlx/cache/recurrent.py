"""The cache of a Gated DeltaNet layer: the last Kc-1 conv inputs and the state S per row."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ham_mlx.cache import checks
from ham_mlx.cache.rows import RowState, concat_offsets


class NotTrimmable(ValueError):
    pass


class RecurrentState(RowState):
    """Conv inputs and recurrent state of B rows, with mlx-lm's batch protocol."""

    def __init__(self) -> None:
        self._init_rows()
        self.conv: mx.array | None = None  # [B, Kc-1, C] projected q|k|v inputs of real tokens
        self.ssm: mx.array | None = None  # [B, HV, Dv, Dk] float32

    def empty(self) -> bool:
        return self.ssm is None

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        raise NotTrimmable(
            f"{type(self).__name__} cannot be trimmed: a recurrent state cannot be rewound"
        )

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise ValueError(
            f"kv_bits: {type(self).__name__} cannot be quantized (ham_mlx caches keep their "
            "state in float; run without kv_bits)"
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.conv, self.ssm) if a is not None)

    # ---- rows ---------------------------------------------------------------------------------
    def _select_recurrent(self, out: RecurrentState, rows: Sequence[int]) -> None:
        idx = mx.array(list(rows))
        out.offsets = self._rows_like(rows)
        out.conv = None if self.conv is None else self.conv[idx]
        out.ssm = None if self.ssm is None else self.ssm[idx]

    def _concat_recurrent(self, parts: Sequence[RecurrentState]) -> None:
        self.offsets = concat_offsets(parts)
        for name in ("conv", "ssm"):
            like = next((getattr(p, name) for p in parts if getattr(p, name) is not None), None)
            if like is None:
                setattr(self, name, None)
                continue
            pieces = [
                getattr(p, name)
                if getattr(p, name) is not None
                else mx.zeros((p.batch_size,) + like.shape[1:], like.dtype)
                for p in parts
            ]
            setattr(self, name, mx.concatenate(pieces))

    def _check_recurrent(self, conv, ssm, offsets, where: str) -> tuple:
        conv = checks.array(conv, where, "conv", 3, optional=True)
        ssm = checks.array(ssm, where, "ssm", 4, (mx.float32,), optional=True)
        rows = None if ssm is None else ssm.shape[0]
        if offsets is None:
            if ssm is not None:
                checks.fail(where, "offsets", "is missing for a non-empty cache")
            return conv, ssm, None
        offsets = checks.ints(offsets, where, "offsets", rows)
        if conv is not None:
            checks.same(where, "conv", conv.shape[0], len(offsets), "rows")
        if ssm is None and conv is not None:
            checks.fail(where, "conv", "is set but the recurrent state is missing")
        return conv, ssm, offsets


class GDNCache(RecurrentState):
    """gdn layers. state = [conv, ssm, offsets]."""

    @property
    def state(self) -> list:
        offsets = None if self.offsets is None else mx.array(self.offsets.astype(np.int32))
        return [self.conv, self.ssm, offsets]

    @state.setter
    def state(self, v: list) -> None:
        where = type(self).__name__
        conv, ssm, offsets = checks.state_list(v, 3, where)
        self.conv, self.ssm, self.offsets = self._check_recurrent(conv, ssm, offsets, where)

    @classmethod
    def from_state(cls, state: list) -> GDNCache:
        c = cls()
        c.state = state
        return c

    def filter(self, batch_indices: Sequence[int]) -> None:
        self._select_recurrent(self, _as_list(batch_indices))

    def extract(self, idx: int) -> GDNCache:
        out = GDNCache()
        self._select_recurrent(out, [idx])
        return out

    def extend(self, other: GDNCache) -> None:
        self._concat_recurrent([self, other])

    @classmethod
    def merge(cls, caches: Sequence[GDNCache]) -> GDNCache:
        out = cls()
        out._concat_recurrent(caches)
        return out


def _as_list(indices) -> list[int]:
    if isinstance(indices, mx.array):
        return [int(i) for i in indices.tolist()]
    return [int(i) for i in indices]
