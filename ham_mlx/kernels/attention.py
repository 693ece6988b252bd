"""GPU kernel for HAM's attention over the compact cache of admitted tokens (spec §4.3-4.4).

One kernel serves decode (L = 1) and prefill (L > 1). A simdgroup takes a tile of up to QT
consecutive queries of one (row, value head) and walks the compacted list of admitted tokens of
its row — slots in increasing position order — once for the whole tile, stopping at the first key
past the tile's largest query position; a key past one query's own position is skipped for that
query only. So the keys are read once per tile rather than once per query, and the cost grows
with the number of admitted tokens, never with T² or with the tokens that were not admitted.
Each query keeps its own online softmax starting from the sink (max = sink, sum = 1, value 0), so
an empty set gives exactly 0. The epilogue fuses the output gate per query:
`sigmoid(gate) * RMSNorm(o) * w`.

Grid `(32, ceil(L / QT), B*HV)`, threadgroup `(32, 1, 1)`: one 32-lane simdgroup per (query tile,
row, value head); each lane holds Dk/32 entries of each query of its tile and Dv/32 accumulator
entries per query, reads Dk/32 + Dv/32 entries of each visited key once, and makes one `simd_sum`
per (visited key, query that sees it). QT (`query_tile`) is the largest tile, at most
MAX_QUERY_TILE, whose QT * (Dk/32 + Dv/32) query and accumulator floats per lane fit in
TILE_FLOATS; the body derives the same compile-time constant from Dk and Dv (it is not a template
argument). A tile past L's end keeps its missing queries idle: decode (L = 1) runs one simdgroup
per (row, value head) with one live query.
The reference is `ham_mlx.ops.attention.cached_admitted_attention`.
"""

from __future__ import annotations

import mlx.core as mx

from ham_mlx.kernels.backend import BACKEND, build

INPUTS = [
    "q", "keys", "values", "counts", "key_pos", "query_pos", "log_scale", "sink", "key_bias",
    "gate", "norm_weight", "sizes", "eps",
]  # fmt: skip
OUTPUTS = ["out"]
MAX_QUERY_TILE = 8  # queries per simdgroup at most
TILE_FLOATS = 64  # per lane: QT * (Dk/32 query entries + Dv/32 accumulators) at most


def query_tile(Dk: int, Dv: int) -> int:
    """QT: the largest tile of at most MAX_QUERY_TILE queries whose query and accumulator
    registers fit in TILE_FLOATS floats per lane (the kernel computes the same constant)."""
    return max(1, min(MAX_QUERY_TILE, TILE_FLOATS // (Dk // 32 + Dv // 32)))


# The tile constants, then the body; the body derives QT from them and Dk, Dv as query_tile does.
TILE_CONSTANTS = f"""
  constexpr int MAX_QUERY_TILE = {MAX_QUERY_TILE};
  constexpr int TILE_FLOATS = {TILE_FLOATS};
"""

BODY = (
    TILE_CONSTANTS
    + """
  // q [B, H, L, Dk] InT; keys [B, H, N, Dk] InT; values [B, HV, N, Dv] InT; counts [B] int;
  // key_pos [B, N] int; query_pos [L] int; log_scale, sink [HV] float; key_bias [B, N] float
  // (read only if HAS_BIAS); gate [B, L, HV] float; norm_weight [Dv] float;
  // sizes [2] int = (L, N); eps [1] float. out [B, L, HV, Dv] float.
  constexpr int QPT = Dk / 32;
  constexpr int VPT = Dv / 32;
  constexpr int QT_FIT = TILE_FLOATS / (QPT + VPT);
  constexpr int QT = QT_FIT > MAX_QUERY_TILE ? MAX_QUERY_TILE : (QT_FIT < 1 ? 1 : QT_FIT);
  const int L = sizes[0];
  const int N = sizes[1];
  const int n = thread_position_in_grid.z;  // b * HV + hv
  const int b = n / HV;
  const int hv = n % HV;
  const int hk = hv / (HV / H);
  const int i0 = thread_position_in_grid.y * QT;  // first query of the tile
  const int lane = thread_position_in_threadgroup.x;
  if (i0 >= L) {
    return;  // the whole simdgroup shares the tile
  }
  const int nq = L - i0 < QT ? L - i0 : QT;  // live queries of the tile
  // Per query t of the tile: scaled query share, position, online-softmax state.
  const float scale = exp(log_scale[hv]);
  float qr[QT][QPT];
  int qp[QT];
  float m[QT];
  float l[QT];
  float acc[QT][VPT];
  int tile_max_pos = query_pos[i0];  // the walk stops past it
  for (int t = 0; t < QT; ++t) {
    const bool live = t < nq;
    auto q_ = q + ((b * H + hk) * L + i0 + (live ? t : 0)) * Dk + lane * QPT;
    for (int d = 0; d < QPT; ++d) {
      qr[t][d] = live ? scale * static_cast<float>(q_[d]) : 0.0f;
    }
    qp[t] = live ? query_pos[i0 + t] : query_pos[i0];
    tile_max_pos = max(tile_max_pos, qp[t]);
    m[t] = sink[hv];  // the sink: logit sink[hv], value 0
    l[t] = 1.0f;
    for (int d = 0; d < VPT; ++d) {
      acc[t][d] = 0.0f;
    }
  }
  // One walk over the row's admitted keys for the whole tile; each key's share is read once.
  const int count = counts[b];
  auto kp = key_pos + b * N;
  auto k_ = keys + (b * H + hk) * N * Dk + lane * QPT;
  auto v_ = values + (b * HV + hv) * N * Dv + lane * VPT;
  for (int j = 0; j < count && kp[j] <= tile_max_pos; ++j) {
    if (lane == 0) {
      HAM_COUNT(keys_visited);
    }
    float kr[QPT];
    for (int d = 0; d < QPT; ++d) {
      kr[d] = static_cast<float>(k_[j * Dk + d]);
    }
    float vr[VPT];
    for (int d = 0; d < VPT; ++d) {
      vr[d] = static_cast<float>(v_[j * Dv + d]);
    }
    const float bias = HAS_BIAS ? key_bias[b * N + j] : 0.0f;
    const int pos = kp[j];
    for (int t = 0; t < QT; ++t) {
      if (t >= nq || pos > qp[t]) {
        continue;  // the same for every lane: simd_sum stays uniform
      }
      float z = 0.0f;
      for (int d = 0; d < QPT; ++d) {
        z += qr[t][d] * kr[d];
      }
      z = simd_sum(z) + bias;
      const float m_new = max(m[t], z);
      const float rescale = exp(m[t] - m_new);
      const float p = exp(z - m_new);
      l[t] = l[t] * rescale + p;
      for (int d = 0; d < VPT; ++d) {
        acc[t][d] = acc[t][d] * rescale + p * vr[d];
      }
      m[t] = m_new;
    }
  }
  // Epilogue per live query: sigmoid(gate) * RMSNorm(o) * w.
  for (int t = 0; t < QT; ++t) {
    if (t >= nq) {
      break;
    }
    const int i = i0 + t;
    float sumsq = 0.0f;
    for (int d = 0; d < VPT; ++d) {
      acc[t][d] /= l[t];
      sumsq += acc[t][d] * acc[t][d];
    }
    sumsq = simd_sum(sumsq);
    const float norm = rsqrt(sumsq / Dv + eps[0]);
    const float g = 1.0f / (1.0f + exp(-gate[(b * L + i) * HV + hv]));
    auto out_ = out + ((b * L + i) * HV + hv) * Dv + lane * VPT;
    for (int d = 0; d < VPT; ++d) {
      out_[d] = acc[t][d] * norm * norm_weight[lane * VPT + d] * g;
    }
  }
"""
)

METAL_KERNEL = build("ham_admitted_attention", INPUTS, OUTPUTS, BODY, "metal")
CUDA_KERNEL = (
    build("ham_admitted_attention", INPUTS, OUTPUTS, BODY, "cuda") if BACKEND == "cuda" else None
)


def supported(q: mx.array, values: mx.array) -> bool:
    """Dk and Dv multiples of 32 (lanes split them evenly)."""
    return q.shape[-1] % 32 == 0 and values.shape[-1] % 32 == 0


def call(
    kernel, q, keys, values, counts, key_positions, query_positions, log_scale, sink, key_bias,
    gate, norm_weight, eps, *, stream=None, verbose: bool = False,
):  # fmt: skip
    """Run `kernel` on the arguments of `cached_admitted_attention`; returns `[B, L, HV, Dv]`."""
    B, H, L, Dk = q.shape
    HV, N, Dv = values.shape[1], values.shape[2], values.shape[3]
    dtype = q.dtype
    has_bias = key_bias is not None
    if key_bias is None:
        key_bias = mx.zeros((1,), dtype=mx.float32)
    (out,) = kernel(
        inputs=[
            q, keys.astype(dtype), values.astype(dtype), counts.astype(mx.int32),
            key_positions.astype(mx.int32), query_positions.astype(mx.int32),
            log_scale.astype(mx.float32), sink.astype(mx.float32), key_bias.astype(mx.float32),
            gate.astype(mx.float32), norm_weight.astype(mx.float32),
            mx.array([L, N], dtype=mx.int32), mx.array([eps], dtype=mx.float32),
        ],
        template=[
            ("InT", dtype), ("Dk", Dk), ("Dv", Dv), ("H", H), ("HV", HV), ("HAS_BIAS", has_bias),
        ],
        grid=(32, -(-L // query_tile(Dk, Dv)), B * HV),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, L, HV, Dv)],
        output_dtypes=[mx.float32],
        stream=stream,
        verbose=verbose,
    )  # fmt: skip
    return out
