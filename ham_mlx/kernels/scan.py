"""GPU kernel for the gated delta rule that also writes the RNN prediction v̂ (spec §3, §4.1).

The reference is `ham_mlx.ops.gated_delta.gated_delta_sequential`; `gated_delta_kernel` takes the
same arguments and returns the same (o, v̂, state). Layout as mlx-lm's gated-delta kernel: grid
`(32, Dv, B*HV)`, threadgroup `(32, 4, 1)`; each 32-lane simdgroup owns one row dv of a state
`S [Dv, Dk]`, each lane Dk/32 entries in registers; the time loop runs inside the kernel; per step
one `simd_sum` gives v̂[dv] = (αS)[dv] · k and one gives o[dv] = S[dv] · q.
"""

from __future__ import annotations

import mlx.core as mx

from ham_mlx.kernels.backend import BACKEND, build

INPUTS = ["q", "k", "v", "g", "beta", "state_in", "steps"]
OUTPUTS = ["o", "v_hat", "state_out"]

BODY = """
  // q, k [B, T, H, Dk] InT; v [B, T, HV, Dv] InT; g, beta [B, T, HV] float;
  // state_in [B, HV, Dv, Dk] float; steps [1] int = T.
  constexpr int NPT = Dk / 32;
  const int T = steps[0];
  const int n = thread_position_in_grid.z;  // b * HV + hv
  const int b = n / HV;
  const int hv = n % HV;
  const int hk = hv / (HV / H);
  const int dv = thread_position_in_grid.y;
  const int lane = thread_position_in_threadgroup.x;
  if (dv >= Dv) {
    return;  // the whole simdgroup shares dv
  }
  auto q_ = q + (b * T * H + hk) * Dk + lane * NPT;
  auto k_ = k + (b * T * H + hk) * Dk + lane * NPT;
  auto v_ = v + (b * T * HV + hv) * Dv + dv;
  auto g_ = g + b * T * HV + hv;
  auto beta_ = beta + b * T * HV + hv;
  auto o_ = o + (b * T * HV + hv) * Dv + dv;
  auto v_hat_ = v_hat + (b * T * HV + hv) * Dv + dv;
  const int row = (n * Dv + dv) * Dk + lane * NPT;

  float s[NPT];
  for (int i = 0; i < NPT; ++i) {
    s[i] = state_in[row + i];
  }
  for (int t = 0; t < T; ++t) {
    const float alpha = exp(g_[t * HV]);
    float pred = 0.0f;
    for (int i = 0; i < NPT; ++i) {
      s[i] *= alpha;
      pred += s[i] * static_cast<float>(k_[t * H * Dk + i]);
    }
    pred = simd_sum(pred);  // v_hat[t, dv]: prediction after decay, before the write
    const float delta = (static_cast<float>(v_[t * HV * Dv]) - pred) * beta_[t * HV];
    float out = 0.0f;
    for (int i = 0; i < NPT; ++i) {
      s[i] += static_cast<float>(k_[t * H * Dk + i]) * delta;
      out += s[i] * static_cast<float>(q_[t * H * Dk + i]);
    }
    out = simd_sum(out);  // o[t, dv]: read after the write
    if (lane == 0) {
      v_hat_[t * HV * Dv] = pred;
      o_[t * HV * Dv] = out;
    }
  }
  for (int i = 0; i < NPT; ++i) {
    state_out[row + i] = s[i];
  }
"""

METAL_KERNEL = build("ham_gated_delta", INPUTS, OUTPUTS, BODY, "metal")
CUDA_KERNEL = build("ham_gated_delta", INPUTS, OUTPUTS, BODY, "cuda") if BACKEND == "cuda" else None


def supported(q: mx.array, v: mx.array) -> bool:
    """The kernel needs Dk a multiple of 32 (one lane owns Dk/32 state entries)."""
    return q.shape[-1] % 32 == 0 and q.dtype in (mx.float32, mx.float16, mx.bfloat16)


def call(kernel, q, k, v, g, beta, state, *, stream=None, verbose: bool = False):
    """Run `kernel` (Metal or CUDA) on the shapes of `gated_delta_sequential`."""
    B, T, H, Dk = q.shape
    HV, Dv = v.shape[2], v.shape[3]
    if state is None:
        state = mx.zeros((B, HV, Dv, Dk), dtype=mx.float32)
    dtype = q.dtype
    return kernel(
        inputs=[
            q, k.astype(dtype), v.astype(dtype), g.astype(mx.float32),
            beta.astype(mx.float32), state.astype(mx.float32), mx.array([T], dtype=mx.int32),
        ],
        template=[("InT", dtype), ("Dk", Dk), ("Dv", Dv), ("H", H), ("HV", HV)],
        grid=(32, Dv, B * HV),
        threadgroup=(32, 4, 1),
        output_shapes=[(B, T, HV, Dv), (B, T, HV, Dv), (B, HV, Dv, Dk)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
        stream=stream,
        verbose=verbose,
    )  # fmt: skip
