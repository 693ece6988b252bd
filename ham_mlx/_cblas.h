/* The BLAS of the C helpers that call it: cblas_sgemm and cblas_strsm of the OpenBLAS that
 * ham_mlx._blas loaded, found by dlopen, and OpenBLAS's own thread count, held to one while a
 * helper runs its own threads (each calling BLAS). */
#ifndef HAM_CBLAS_H
#define HAM_CBLAS_H
#include <dlfcn.h>
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, LOWER = 122, UNIT = 132, LEFT = 141 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*strsm_fn)(int, int, int, int, int, int, int, float, const float *, int, float *,
                         int);
static sgemm_fn sgemm;
static strsm_fn strsm;
static int (*get_threads)(void);
static void (*set_threads)(int);

/* Bind to the BLAS at path (already loaded). 0 when cblas_sgemm was found (strsm: NULL when
 * missing; a helper that needs it checks). */
static int bind_blas(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return 1;
  sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
  strsm = (strsm_fn)dlsym(h, "cblas_strsm");
  get_threads = (int (*)(void))dlsym(h, "openblas_get_num_threads");
  set_threads = (void (*)(int))dlsym(h, "openblas_set_num_threads");
  if (!get_threads || !set_threads) get_threads = NULL, set_threads = NULL;
  return sgemm == NULL;
}

/* Hold OpenBLAS to one thread; returns what blas_restore takes. */
static int blas_one_thread(void) {
  const int blas_threads = get_threads ? get_threads() : 0;
  if (blas_threads > 1) set_threads(1);
  return blas_threads;
}

/* Hold OpenBLAS to one thread while `workers` threads call it; returns what blas_restore takes. */
static int blas_single(int workers) { return workers > 1 ? blas_one_thread() : 0; }

static void blas_restore(int blas_threads) {
  if (blas_threads > 1) set_threads(blas_threads);
}

#endif
