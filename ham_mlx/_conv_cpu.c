/* The short causal convolution and its SiLU, on the CPU (cached prefill).
 *
 * The same result as ham_mlx.layers.common.causal_short_conv for float32 inputs:
 *   y[b, t, c] = SiLU(Σ_i xp[b, t + i, c] w[i, c]),  xp = [prev; x] along the tokens,
 * one pass over x with the taps and the SiLU in registers, tokens shared among threads.
 * ham_mlx/ops/cpu_conv.py calls it through ctypes.
 *
 * Shapes (float32): x [B, L, C] with strides (xb, xt, 1) in floats; prev [B, Kc-1, C]
 * contiguous, or NULL (zeros); w [Kc, C] contiguous (tap Kc-1 multiplies the current token);
 * out [B, L, C] contiguous.
 */
#include <stddef.h>

#include "_exp2.h"
#include "_ftz.h"
#include "_parts.h"

#define MAX_TAPS 16
#define LOG2E 1.4426950408889634f

struct job {
  int B, L, C, Kc;
  const float *x, *prev, *w;
  long xb, xt;
  float *out;
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
static void conv_rows(const struct job *J, int b, int t_begin, int t_end) {
  const int C = J->C, Kc = J->Kc;
  for (int t = t_begin; t < t_end; t++) {
    const float *rows[MAX_TAPS];
    for (int i = 0; i < Kc; i++) { /* tap i reads xp[t + i] = x[t + i - (Kc - 1)] */
      const int s = t + i - (Kc - 1);
      if (s >= 0)
        rows[i] = J->x + b * J->xb + s * J->xt;
      else
        rows[i] = J->prev ? J->prev + ((size_t)b * (Kc - 1) + (Kc - 1 + s)) * C : NULL;
    }
    float *restrict y = J->out + ((size_t)b * J->L + t) * C;
    for (int c = 0; c < C; c++) y[c] = 0.0f;
    for (int i = 0; i < Kc; i++) {
      const float *restrict r = rows[i], *restrict wi = J->w + (size_t)i * C;
      if (!r) continue;
      for (int c = 0; c < C; c++) y[c] += r[c] * wi[c];
    }
    for (int c = 0; c < C; c++) y[c] = y[c] / (1.0f + ham_exp2(-y[c] * LOG2E));
  }
}

/* The rows [lo, hi) of the flattened [B, L]. */
static void run_rows(const void *job, long lo, long hi) {
  const struct job *J = job;
  const unsigned csr = ham_ftz_begin();
  for (long r = lo; r < hi;) {
    const int b = (int)(r / J->L), t = (int)(r % J->L);
    const long row_end = (long)(b + 1) * J->L < hi ? (long)(b + 1) * J->L : hi;
    conv_rows(J, b, t, (int)(row_end - (long)b * J->L));
    r = row_end;
  }
  ham_ftz_end(csr);
}

/* 0 on success, 1 when Kc is out of range. */
int ham_short_conv(int B, int L, int C, int Kc, const float *x, long xb, long xt,
                   const float *prev, const float *w, float *out, int workers) {
  if (Kc < 1 || Kc > MAX_TAPS) return 1;
  struct job J = {B, L, C, Kc, x, prev, w, xb, xt, out};
  ham_run_shares(run_rows, &J, (long)B * L, workers);
  return 0;
}
