"""GPU kernel for HAM's attention over the compact cache of admitted tokens (spec §4.3-4.4).

One kernel serves decode (L = 1) and prefill (L > 1): each query walks the compacted list of
admitted tokens of its row — slots in increasing position order — and stops at the first key
whose position is past its own, so its cost grows with the number of admitted tokens, never with
T² or with the tokens that were not admitted. Online softmax starting from the sink (max = sink,
sum = 1, value 0), so an empty set gives exactly 0. The epilogue fuses the output gate:
`sigmoid(gate) * RMSNorm(o) * w`.

Grid `(32, L, B*HV)`, threadgroup `(32, 1, 1)`: one 32-lane simdgroup per (query, row, value head);
each lane holds Dk/32 query entries and Dv/32 output entries; one `simd_sum` per visited key.
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

BODY = """
  // q [B, H, L, Dk] InT; keys [B, H, N, Dk] InT; values [B, HV, N, Dv] InT; counts [B] int;
  // key_pos [B, N] int; query_pos [L] int; log_scale, sink [HV] float; key_bias [B, N] float
  // (read only if HAS_BIAS); gate [B, L, HV] float; norm_weight [Dv] float;
  // sizes [2] int = (L, N); eps [1] float. out [B, L, HV, Dv] float.
  constexpr int QPT = Dk / 32;
  constexpr int VPT = Dv / 32;
  const int L = sizes[0];
  const int N = sizes[1];
  const int n = thread_position_in_grid.z;  // b * HV + hv
  const int b = n / HV;
  const int hv = n % HV;
  const int hk = hv / (HV / H);
  const int i = thread_position_in_grid.y;  // query
  const int lane = thread_position_in_threadgroup.x;
  if (i >= L) {
    return;  // the whole simdgroup shares the query
  }
  const float scale = exp(log_scale[hv]);
  auto q_ = q + ((b * H + hk) * L + i) * Dk + lane * QPT;
  float qr[QPT];
  for (int d = 0; d < QPT; ++d) {
    qr[d] = scale * static_cast<float>(q_[d]);
  }
  float acc[VPT];
  for (int d = 0; d < VPT; ++d) {
    acc[d] = 0.0f;
  }
  float m = sink[hv];  // the sink: logit sink[hv], value 0
  float l = 1.0f;
  const int qp = query_pos[i];
  const int count = counts[b];
  auto kp = key_pos + b * N;
  auto k_ = keys + (b * H + hk) * N * Dk + lane * QPT;
  auto v_ = values + (b * HV + hv) * N * Dv + lane * VPT;
  for (int j = 0; j < count && kp[j] <= qp; ++j) {
    if (lane == 0) {
      HAM_COUNT(keys_visited);
    }
    float z = 0.0f;
    for (int d = 0; d < QPT; ++d) {
      z += qr[d] * static_cast<float>(k_[j * Dk + d]);
    }
    z = simd_sum(z);
    if (HAS_BIAS) {
      z += key_bias[b * N + j];
    }
    const float m_new = max(m, z);
    const float rescale = exp(m - m_new);
    const float p = exp(z - m_new);
    l = l * rescale + p;
    for (int d = 0; d < VPT; ++d) {
      acc[d] = acc[d] * rescale + p * static_cast<float>(v_[j * Dv + d]);
    }
    m = m_new;
  }
  float sumsq = 0.0f;
  for (int d = 0; d < VPT; ++d) {
    acc[d] /= l;
    sumsq += acc[d] * acc[d];
  }
  sumsq = simd_sum(sumsq);
  const float norm = rsqrt(sumsq / Dv + eps[0]);
  const float g = 1.0f / (1.0f + exp(-gate[(b * L + i) * HV + hv]));
  auto out_ = out + ((b * L + i) * HV + hv) * Dv + lane * VPT;
  for (int d = 0; d < VPT; ++d) {
    out_[d] = acc[d] * norm * norm_weight[lane * VPT + d] * g;
  }
"""

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
        grid=(32, L, B * HV),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, L, HV, Dv)],
        output_dtypes=[mx.float32],
        stream=stream,
        verbose=verbose,
    )  # fmt: skip
    return out
