/* cblas_sgemm for MLX on Linux that computes matrix-vector shapes itself.
 *
 * MLX's CPU backend calls cblas_sgemm for every float32 matmul, including the M = 1 products of
 * decoding (x @ W.T for one token). OpenBLAS before 0.3.27 runs those through its packed gemm
 * path at 5-18 GB/s, and its sgemv streams the decode step's matrices (rows of 768 floats) at
 * about 20 GB/s on a 2-core EPYC. ham_mlx._blas loads this library into the global symbol scope
 * before OpenBLAS, so MLX's cblas_sgemm binds here; everything else still binds to OpenBLAS.
 *
 * Row-major M = 1 or N = 1 calls are matrix-vector products; they run here in two forms:
 *   dot:  y[i] = sum_k A[i, k] x[k]   one row at a time, in order (the rows stream through the
 *         CPU's prefetchers as one sequential read, which reaches the bandwidth of one core);
 *   axpy: y[j] = sum_i x[i] A[i, j]   row by row into a sum that stays in the L1 cache.
 * Large products are split among a small pool of threads (dot: by rows; axpy: by rows into
 * separate sums, added at the end). All other calls go to OpenBLAS's sgemm, and
 * ham_gemv_shim_set_own(0) sends the matrix-vector ones to OpenBLAS's sgemv as before (the
 * twin the tests and the benchmark compare with).
 */
#define _GNU_SOURCE /* sched_getaffinity */
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed between inlined helpers */

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { MAX_THREADS = 8, SPIN = 20000 };
enum { PARALLEL_MIN = 32768 }; /* matrix elements below which one thread is faster */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static void after_fork_in_child(void);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static int own_kernels = 1;
static int threads_wanted = 1;

/* Bind to the BLAS at `path` (loaded RTLD_GLOBAL, after this library). 0 on success. */
int ham_gemv_shim_init(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return 1;
  real_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(h, "cblas_sgemv");
#if defined(__linux__)
  cpu_set_t set;
  int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
#else
  int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
#endif
  threads_wanted = cpus < 1 ? 1 : cpus > 4 ? 4 : cpus;
  pthread_atfork(NULL, NULL, after_fork_in_child);
  return !(real_sgemm && real_sgemv);
}

/* 1: matrix-vector products run here (the default); 0: they go to OpenBLAS's sgemv. */
void ham_gemv_shim_set_own(int on) { own_kernels = on; }

/* Threads for one product (1 to MAX_THREADS); returns the number now used. */
int ham_gemv_shim_set_threads(int n) {
  if (n >= 1) threads_wanted = n > MAX_THREADS ? MAX_THREADS : n;
  return threads_wanted;
}

/* Calls routed to a matrix-vector form since init (for tests). */
static long routed;
long ham_gemv_shim_routed(void) { return routed; }

/* ---- the two kernels ------------------------------------------------------------------------ */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
#define LOAD(p) ({ v8 r_; memcpy(&r_, (p), sizeof r_); r_; })

struct gemv {
  int rows, cols;     /* A is [rows, cols] with row stride lda */
  const float *A;
  int lda;
  const float *x;     /* contiguous: cols floats (dot) or rows floats (axpy) */
  float *y;           /* dot: rows outputs; axpy: cols outputs; stride incy */
  int incy;
  float alpha, beta;
  float *partial[MAX_THREADS]; /* axpy: one sum of cols floats per part */
};

static inline void store(const struct gemv *g, int i, float s) {
  float *p = g->y + (size_t)i * g->incy;
  *p = g->beta == 0.0f ? g->alpha * s : g->alpha * s + g->beta * *p;
}

#if defined(__x86_64__)
#define KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KERNEL
#endif

/* y[i] for rows [r0, r1). */
KERNEL static void dot_rows(const struct gemv *g, int r0, int r1) {
  const int K = g->cols;
  const float *x = g->x;
  for (int r = r0; r < r1; ++r) {
    const float *a = g->A + (size_t)r * g->lda;
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int k = 0;
    for (; k + 32 <= K; k += 32) {
      s0 += LOAD(a + k) * LOAD(x + k);
      s1 += LOAD(a + k + 8) * LOAD(x + k + 8);
      s2 += LOAD(a + k + 16) * LOAD(x + k + 16);
      s3 += LOAD(a + k + 24) * LOAD(x + k + 24);
    }
    for (; k + 8 <= K; k += 8) s0 += LOAD(a + k) * LOAD(x + k);
    v8 s = (s0 + s1) + (s2 + s3);
    float t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; k < K; ++k) t += a[k] * x[k];
    store(g, r, t);
  }
}

/* sum[j] = sum over rows [r0, r1) of x[i] A[i, j]. */
KERNEL static void axpy_rows(const struct gemv *g, int r0, int r1, float *sum) {
  const int N = g->cols;
  memset(sum, 0, sizeof(float) * (size_t)N);
  for (int r = r0; r < r1; ++r) {
    const float *a = g->A + (size_t)r * g->lda;
    const float xr = g->x[r];
    v8 xv = {xr, xr, xr, xr, xr, xr, xr, xr};
    int j = 0;
    for (; j + 8 <= N; j += 8) {
      v8 acc = LOAD(sum + j) + xv * LOAD(a + j);
      memcpy(sum + j, &acc, sizeof acc);
    }
    for (; j < N; ++j) sum[j] += xr * a[j];
  }
}

/* Part `part` of `parts` of a product. */
static void run_part(const struct gemv *g, int dot, int part, int parts) {
  long r0 = (long)g->rows * part / parts, r1 = (long)g->rows * (part + 1) / parts;
  if (dot) dot_rows(g, (int)r0, (int)r1);
  else axpy_rows(g, (int)r0, (int)r1, g->partial[part]);
}

/* ---- the thread pool ------------------------------------------------------------------------ */
static struct {
  pthread_mutex_t mu;
  pthread_cond_t wake;
  atomic_long generation;
  atomic_int remaining;
  atomic_flag busy;
  int workers; /* threads started, excluding the caller */
  pid_t pid;   /* the process that started them (a forked child has none) */
  void (*fn)(void *, int, int); /* the job: fn(ctx, part, parts) */
  void *ctx;
  int parts;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, ATOMIC_FLAG_INIT, 0, 0, 0, 0, 0};

static inline void relax(void) {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

struct start {
  int part;
  long seen; /* the generation when it was started: it waits for the next one */
};

static void *worker(void *arg) {
  const int part = ((struct start *)arg)->part;
  long seen = ((struct start *)arg)->seen;
  free(arg);
  for (;;) {
    long g;
    int spins = 0;
    while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
      if (++spins < SPIN) { relax(); continue; }
      pthread_mutex_lock(&pool.mu);
      while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
      pthread_mutex_unlock(&pool.mu);
    }
    seen = g;
    if (part < pool.parts) {
      pool.fn(pool.ctx, part, pool.parts);
      atomic_fetch_sub_explicit(&pool.remaining, 1, memory_order_release);
    }
  }
  return NULL;
}

/* Start workers so that `threads` parts can run; returns the parts available. */
static int ensure_workers(int threads) {
  if (pool.pid != getpid()) pool.workers = 0, pool.pid = getpid(); /* forked: none survive */
  while (pool.workers + 1 < threads) {
    struct start *arg = malloc(sizeof *arg);
    if (!arg) break;
    arg->part = pool.workers + 1;
    arg->seen = atomic_load(&pool.generation);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&t, &attr, worker, arg);
    pthread_attr_destroy(&attr);
    if (failed) {
      free(arg);
      break;
    }
    ++pool.workers;
  }
  return pool.workers + 1 < threads ? pool.workers + 1 : threads;
}

static void after_fork_in_child(void) {
  pthread_mutex_init(&pool.mu, NULL);
  pthread_cond_init(&pool.wake, NULL);
  atomic_flag_clear(&pool.busy);
  pool.workers = 0;
  pool.pid = getpid();
}

/* Runs fn(ctx, part, parts) for every part, the caller taking part 0; the pool is held (busy)
 * when parts > 1. */
static void run_parts(void (*fn)(void *, int, int), void *ctx, int parts) {
  if (parts > 1) {
    pool.fn = fn, pool.ctx = ctx, pool.parts = parts;
    atomic_store(&pool.remaining, parts - 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
  }
  fn(ctx, 0, parts);
  if (parts > 1)
    while (atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0) relax();
}

/* For the other helpers in the process (found with dlsym): runs fn(ctx, part, parts) for part in
 * [0, parts) on this pool's threads, whose workers spin for a while after each product and so
 * start at once during a decode step. parts <= `wanted`: 1 (the caller alone) when the pool is busy
 * or has no threads. Returns parts. */
int ham_pool_run(void (*fn)(void *, int, int), void *ctx, int wanted) {
  int limit = wanted < threads_wanted ? wanted : threads_wanted;
  int pooled = limit > 1 && !atomic_flag_test_and_set(&pool.busy);
  int parts = pooled ? ensure_workers(limit) : 1;
  run_parts(fn, ctx, parts);
  if (pooled) atomic_flag_clear(&pool.busy);
  return parts;
}

/* ---- one product ---------------------------------------------------------------------------- */
struct gemv_job {
  const struct gemv *g;
  int dot;
};

static void gemv_part(void *ctx, int part, int parts) {
  const struct gemv_job *j = ctx;
  run_part(j->g, j->dot, part, parts);
}

static _Thread_local float *scratch;
static _Thread_local size_t scratch_len;

static float *scratch_floats(size_t n) {
  if (n > scratch_len) {
    float *p = realloc(scratch, n * sizeof(float));
    if (!p) return NULL;
    scratch = p, scratch_len = n;
  }
  return scratch;
}

/* dot = 1: y[i] = alpha sum_k A[i, k] x[k] + beta y[i], A [rows, cols];
 * dot = 0: y[j] = alpha sum_i x[i] A[i, j] + beta y[j]. 0 on success, 1: no memory. */
static int gemv(int dot, int rows, int cols, float alpha, const float *A, int lda,
                const float *x, int incx, float beta, float *y, int incy) {
  struct gemv g = {rows, cols, A, lda, x, y, incy, alpha, beta, {0}};
  int nx = dot ? cols : rows, nout = dot ? rows : cols;
  int parts = (long)rows * cols >= PARALLEL_MIN && rows >= 16 ? threads_wanted : 1;
  int pooled = parts > 1 && !atomic_flag_test_and_set(&pool.busy);
  parts = pooled ? ensure_workers(parts) : 1;
  size_t need = (incx != 1 ? (size_t)nx : 0) + (dot ? 0 : (size_t)parts * nout);
  float *buf = need ? scratch_floats(need) : NULL;
  if (need && !buf) {
    if (pooled) atomic_flag_clear(&pool.busy);
    return 1;
  }
  if (incx != 1) { /* gather x */
    for (int i = 0; i < nx; ++i) buf[i] = x[(size_t)i * incx];
    g.x = buf, buf += nx;
  }
  if (!dot)
    for (int p = 0; p < parts; ++p) g.partial[p] = buf + (size_t)p * nout;
  struct gemv_job job = {&g, dot};
  run_parts(gemv_part, &job, parts);
  if (pooled) atomic_flag_clear(&pool.busy);
  if (!dot)
    for (int j = 0; j < nout; ++j) {
      float s = g.partial[0][j];
      for (int p = 1; p < parts; ++p) s += g.partial[p][j];
      store(&g, j, s);
    }
  return 0;
}

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
  /* The product as y = W x (dot) or y = Wᵀ x (axpy), W stored [rows, cols] with stride ld. */
  int dot, rows, cols, ld, incx, incy;
  const float *W, *x;
  if (M == 1) { /* C[1, N] = op(A)[1, K] op(B)[K, N]: x = the row of op(A) */
    W = B, ld = ldb, x = A, incx = ta == NO_TRANS ? 1 : lda, incy = 1;
    dot = tb != NO_TRANS; /* B stored [N, K]: C = B x; stored [K, N]: C = Bᵀ x */
    rows = dot ? N : K, cols = dot ? K : N;
  } else { /* C[M, 1] = op(A)[M, K] op(B)[K, 1]: x = the column of op(B) */
    W = A, ld = lda, x = B, incx = tb == NO_TRANS ? ldb : 1, incy = ldc;
    dot = ta == NO_TRANS; /* A stored [M, K]: C = A x; stored [K, M]: C = Aᵀ x */
    rows = dot ? M : K, cols = dot ? K : M;
  }
  if (own_kernels && gemv(dot, rows, cols, alpha, W, ld, x, incx, beta, C, incy) == 0) return;
  if (beta == 0.0f) { /* OpenBLAS's sgemv, the twin. C may be uninitialised: never scale it */
    zero(C, dot ? rows : cols, incy);
    beta = 1.0f;
  }
  real_sgemv(ROW_MAJOR, dot ? NO_TRANS : TRANS, rows, cols, alpha, W, ld, x, incx, beta, C, incy);
}
