/* Flush-to-zero for a C helper's thread: denormal results and inputs count as zero meanwhile.
 *
 * The compiler vectorises a guarded 2^x by computing every lane's candidates and blending them;
 * a candidate for a lane the guard drops can be a denormal (y / (1 + 2^126) in SiLU), and each
 * denormal result costs x86 a microcode assist: the short convolution's SiLU ran 13x slower for
 * lanes whose results were discarded. Results that would be denormal (below 1.2e-38 in size)
 * become 0. */
#ifndef HAM_FTZ_H
#define HAM_FTZ_H

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
static inline unsigned ham_ftz_begin(void) {
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u); /* FTZ (bit 15) and DAZ (bit 6) */
  return saved;
}
static inline void ham_ftz_end(unsigned saved) { _mm_setcsr(saved); }
#else
static inline unsigned ham_ftz_begin(void) { return 0; }
static inline void ham_ftz_end(unsigned saved) { (void)saved; }
#endif

#endif
