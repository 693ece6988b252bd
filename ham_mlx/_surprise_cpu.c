/* The head routers' surprise e[b, t, h] on the CPU (cached prefill), in one pass over v and v_hat.
 *
 * The same result as ham_mlx.routers.head_surprise for float32 inputs (spec §4.1; the formulas
 * are in _surprise.h). ham_mlx/ops/cpu_surprise.py calls it through ctypes. MLX computes it as
 * three reductions, each a pass of its own over [T, HV, Dv].
 *
 * Shapes (float32): v_hat, v [B, T, HV, Dv] with strides (b, t, h) in floats and the last axis
 * contiguous; out [B, T, HV] contiguous. kind: 0 cosine, 1 l2. Tokens are shared among threads.
 */
#include <stddef.h>

#include "_parts.h"
#include "_surprise.h"

#define PARALLEL_MIN 65536 /* floats of v below which one thread is faster */

struct job {
  int kind, B, T, HV, Dv;
  const float *v_hat, *v;
  const long *hs, *vs;
  float eps, *out;
};

/* The tokens [lo, hi) of the flattened [B, T]. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
static void run_tokens(const void *job, long lo, long hi) {
  const struct job *J = job;
  for (long r = lo; r < hi; r++) {
    const long b = r / J->T, t = r % J->T;
    for (int h = 0; h < J->HV; h++)
      J->out[r * J->HV + h] = ham_surprise(J->v_hat + b * J->hs[0] + t * J->hs[1] + h * J->hs[2],
                                           J->v + b * J->vs[0] + t * J->vs[1] + h * J->vs[2],
                                           J->Dv, J->kind, J->eps);
  }
}

/* 0 on success, 1 for an unknown kind. Tokens are shared among `workers` threads. */
int ham_head_surprise(int kind, int B, int T, int HV, int Dv, const float *v_hat, const long *hs,
                      const float *v, const long *vs, float eps, float *out, int workers) {
  if (kind != 0 && kind != 1) return 1;
  if ((long)B * T * HV * Dv < PARALLEL_MIN) workers = 1;
  struct job J = {kind, B, T, HV, Dv, v_hat, v, hs, vs, eps, out};
  ham_run_shares(run_tokens, &J, (long)B * T, workers);
  return 0;
}
