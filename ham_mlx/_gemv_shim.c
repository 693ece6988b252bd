/* cblas_sgemm for MLX on Linux that sends matrix-vector shapes to cblas_sgemv.
 *
 * MLX's CPU backend calls cblas_sgemm for every float32 matmul, including the M = 1 products of
 * decoding (x @ W.T for one token). OpenBLAS before 0.3.27 runs those through its packed gemm
 * path at 5-18 GB/s where its sgemv streams the same matrix at 25-80 GB/s (measured on a 2-core
 * EPYC, OpenBLAS 0.3.21). ham_mlx._blas loads this library into the global symbol scope before
 * OpenBLAS, so MLX's cblas_sgemm binds here; everything else still binds to OpenBLAS.
 * Row-major M = 1 or N = 1 calls become one sgemv; all other calls go to OpenBLAS's sgemm.
 */
#include <dlfcn.h>
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

/* Bind to the BLAS at `path` (loaded RTLD_GLOBAL, after this library). 0 on success. */
int ham_gemv_shim_init(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return 1;
  real_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(h, "cblas_sgemv");
  return !(real_sgemm && real_sgemv);
}

/* Calls routed to sgemv since init (for tests). */
static long routed;
long ham_gemv_shim_routed(void) { return routed; }

static void zero(float *y, int n, int inc) {
  for (int i = 0; i < n; ++i) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  if (order != ROW_MAJOR || K < 1 || (M != 1 && N != 1)) {
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  __atomic_fetch_add(&routed, 1, __ATOMIC_RELAXED);
  if (beta == 0.0f) { /* C may be uninitialised: never let sgemv scale it */
    if (M == 1) zero(C, N, 1);
    else zero(C, M, ldc);
    beta = 1.0f;
  }
  if (M == 1) { /* C[1, N] = op(A)[1, K] op(B)[K, N]: x = row of op(A) */
    int incx = ta == NO_TRANS ? 1 : lda;
    if (tb == NO_TRANS) /* B stored [K, N]: C = Bᵀ x */
      real_sgemv(ROW_MAJOR, 112, K, N, alpha, B, ldb, A, incx, beta, C, 1);
    else /* B stored [N, K]: C = B x */
      real_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, A, incx, beta, C, 1);
  } else { /* C[M, 1] = op(A)[M, K] op(B)[K, 1]: x = column of op(B) */
    int incx = tb == NO_TRANS ? ldb : 1;
    if (ta == NO_TRANS) /* A stored [M, K] */
      real_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, incx, beta, C, ldc);
    else /* A stored [K, M] */
      real_sgemv(ROW_MAJOR, 112, K, M, alpha, A, lda, B, incx, beta, C, ldc);
  }
}
