/* The head routers' surprise e[b, t, h] on the CPU (cached prefill), in one pass over v and v_hat.
 *
 * The same result as ham_mlx.routers.head_surprise for float32 inputs (spec §4.1):
 *   cosine: 1 - (v_hat . v) / sqrt((|v_hat|^2 + eps) (|v|^2 + eps))
 *   l2:     |v - v_hat|^2 / (|v|^2 + eps)
 * ham_mlx/ops/cpu_surprise.py calls it through ctypes. MLX computes it as three reductions, each
 * a pass of its own over [T, HV, Dv].
 *
 * Shapes (float32): v_hat, v [B, T, HV, Dv] with strides (b, t, h) in floats and the last axis
 * contiguous; out [B, T, HV] contiguous. kind: 0 cosine, 1 l2.
 */
#include <math.h>
#include <stddef.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
static void head(const float *restrict vh, const float *restrict v, int Dv, int kind, float eps,
                 float *out) {
  float dot[8] = {0}, hh[8] = {0}, vv[8] = {0}, ee[8] = {0}; /* eight lanes, then summed */
  int j = 0;
  for (; j + 8 <= Dv; j += 8)
    for (int l = 0; l < 8; l++) {
      const float a = vh[j + l], b = v[j + l], e = b - a;
      dot[l] += a * b, hh[l] += a * a, vv[l] += b * b, ee[l] += e * e;
    }
  for (; j < Dv; j++) {
    const float a = vh[j], b = v[j], e = b - a;
    dot[0] += a * b, hh[0] += a * a, vv[0] += b * b, ee[0] += e * e;
  }
  for (int l = 1; l < 8; l++) dot[0] += dot[l], hh[0] += hh[l], vv[0] += vv[l], ee[0] += ee[l];
  *out = kind == 0 ? 1.0f - dot[0] / sqrtf((hh[0] + eps) * (vv[0] + eps)) : ee[0] / (vv[0] + eps);
}

/* 0 on success, 1 for an unknown kind. */
int ham_head_surprise(int kind, int B, int T, int HV, int Dv, const float *v_hat, const long *hs,
                      const float *v, const long *vs, float eps, float *out) {
  if (kind != 0 && kind != 1) return 1;
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int h = 0; h < HV; h++)
        head(v_hat + b * hs[0] + t * hs[1] + h * hs[2], v + b * vs[0] + t * vs[1] + h * vs[2], Dv,
             kind, eps, out + ((size_t)b * T + t) * HV + h);
  return 0;
}
