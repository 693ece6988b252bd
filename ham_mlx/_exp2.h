/* 2^x on the CPU for the C helpers, written so that the compiler vectorises the loops that call
 * it (Cephes exp2f: round to nearest, degree-6 polynomial on [-0.5, 0.5]). x is clamped to
 * [-126, 126]: 2^-126 is the smallest normal float. */
#ifndef HAM_EXP2_H
#define HAM_EXP2_H
#include <stdint.h>

static inline float ham_exp2(float x) {
  const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  x = x > -126.0f ? x : -126.0f;
  x = x < 126.0f ? x : 126.0f;
  union { float f; int32_t i; } shifted = {x + magic}, scale;
  float f = x - (shifted.f - magic);
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  scale.i = (shifted.i - 0x4B400000 + 127) << 23;
  return p * scale.f;
}

#endif
