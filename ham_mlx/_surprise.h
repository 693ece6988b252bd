/* A head router's surprise of one token and value head (spec §4.1), shared by the surprise
 * helper (_surprise_cpu.c) and the decode step's MLX extension (_mlx_ext.cpp).
 *
 * kind 0, cosine: 1 - <vh, v> / sqrt((|vh|^2 + eps)(|v|^2 + eps));
 * kind 1, l2:     |v - vh|^2 / (|v|^2 + eps).
 * vh and v hold Dv contiguous floats. */
#ifndef HAM_SURPRISE_H
#define HAM_SURPRISE_H
#include <math.h>

#ifdef __cplusplus
#define HAM_RESTRICT __restrict
#else
#define HAM_RESTRICT restrict
#endif

static inline float ham_surprise(const float *HAM_RESTRICT vh, const float *HAM_RESTRICT v,
                                 int Dv, int kind, float eps) {
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
  return kind == 0 ? 1.0f - dot[0] / sqrtf((hh[0] + eps) * (vv[0] + eps)) : ee[0] / (vv[0] + eps);
}

#endif
