/* The chunked gated delta rule, forward only, on the CPU (cached prefill).
 *
 * The same result as ham_mlx.ops.gated_delta.gated_delta_chunked, computed one (row, value head)
 * at a time so that a chunk's terms stay in the CPU's cache: per chunk of C steps with start
 * state S0 (St = S0 transposed, [Dk, Dv]), alpha = exp(g), D[t, s] = alpha_{s+1} ... alpha_t
 * and gamma_t = alpha_1 ... alpha_t inside the chunk:
 *   A[t, s]  = D[t, s] (k_t . k_s) for s < t;   Aq[t, s] = D[t, s] (q_t . k_s) for s <= t
 *   [W | U]  = (I + beta A)^-1 [beta gamma k | beta v]   (one triangular solve)
 *   u        = U - W St
 *   o        = gamma q St + Aq u;   v_hat = gamma k St + A u
 *   St       = gamma_last St + (D[last, s] k_s)^T u
 * Heads are shared among `workers` threads, each calling OpenBLAS's sgemm and strsm on one
 * thread. ham_mlx/ops/cpu_scan.py calls it through ctypes and binds it to the loaded OpenBLAS.
 *
 * Shapes (contiguous float32): q, k [B, T, H, Dk]; v [B, T, HV, Dv]; g, beta [B, T, HV];
 * s0 [B, HV, Dv, Dk] or NULL (zeros); out o, v_hat [B, T, HV, Dv], s [B, HV, Dv, Dk].
 * Value head h reads q/k head h / (HV / H).
 */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, LOWER = 122, UNIT = 132, LEFT = 141 };
#define MAX_WORKERS 64

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*strsm_fn)(int, int, int, int, int, int, int, float, const float *, int, float *,
                         int);
static sgemm_fn sgemm;
static strsm_fn strsm;
static int (*get_threads)(void);
static void (*set_threads)(int);

/* Bind to cblas_sgemm and cblas_strsm of the BLAS at path (already loaded). 0 on success. */
int ham_scan_init(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return 1;
  sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
  strsm = (strsm_fn)dlsym(h, "cblas_strsm");
  get_threads = (int (*)(void))dlsym(h, "openblas_get_num_threads");
  set_threads = (void (*)(int))dlsym(h, "openblas_set_num_threads");
  if (!get_threads || !set_threads) get_threads = NULL, set_threads = NULL;
  return sgemm == NULL || strsm == NULL;
}

struct job {
  int B, T, H, HV, Dk, Dv, C;
  const float *q, *k, *v, *g, *beta, *s0;
  float *o, *v_hat, *s;
  int next; /* the next (row, head) to take */
  pthread_mutex_t lock;
};

struct work { /* one thread's buffers */
  float *KK, *QK, *A, *Aq, *L, *rhs, *St, *D, *gam, *bet;
};

static int alloc_work(struct work *w, int C, int Dk, int Dv) {
  size_t cc = (size_t)C * C, n = 5 * cc + (size_t)C * (Dk + Dv) + (size_t)Dk * Dv + 3 * C;
  float *p = malloc(n * sizeof(float));
  if (!p) return 1;
  w->KK = p, w->QK = p + cc, w->A = p + 2 * cc, w->Aq = p + 3 * cc, w->L = p + 4 * cc;
  w->rhs = p + 5 * cc;
  w->St = w->rhs + (size_t)C * (Dk + Dv);
  w->D = w->St + (size_t)Dk * Dv, w->gam = w->D + C, w->bet = w->gam + C;
  return 0;
}

/* The scan of row b, value head h. */
static void scan_head(const struct job *J, struct work *w, int b, int h) {
  const int T = J->T, Dk = J->Dk, Dv = J->Dv, C = J->C, R = Dk + Dv;
  const int hk = h / (J->HV / J->H);
  const int ldqk = J->H * Dk, ldv = J->HV * Dv, ldg = J->HV;
  const float *qb = J->q + ((size_t)b * T * J->H + hk) * Dk;
  const float *kb = J->k + ((size_t)b * T * J->H + hk) * Dk;
  const float *vb = J->v + ((size_t)b * T * J->HV + h) * Dv;
  const float *gb = J->g + (size_t)b * T * J->HV + h, *bb = J->beta + (size_t)b * T * J->HV + h;
  float *ob = J->o + ((size_t)b * T * J->HV + h) * Dv;
  float *hb = J->v_hat + ((size_t)b * T * J->HV + h) * Dv;
  float *St = w->St, *D = w->D, *gam = w->gam, *bet = w->bet;
  const float *s0 = J->s0 ? J->s0 + ((size_t)b * J->HV + h) * Dv * Dk : NULL;
  for (int i = 0; i < Dk; i++)
    for (int j = 0; j < Dv; j++) St[(size_t)i * Dv + j] = s0 ? s0[(size_t)j * Dk + i] : 0.0f;

  for (int t0 = 0; t0 < T; t0 += C) {
    const int n = T - t0 < C ? T - t0 : C;
    const float *qc = qb + (size_t)t0 * ldqk, *kc = kb + (size_t)t0 * ldqk;
    const float *vc = vb + (size_t)t0 * ldv;
    float *oc = ob + (size_t)t0 * ldv, *hc = hb + (size_t)t0 * ldv;
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, n, Dk, 1.0f, kc, ldqk, kc, ldqk, 0.0f, w->KK, C);
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, n, Dk, 1.0f, qc, ldqk, kc, ldqk, 0.0f, w->QK, C);
    /* D row by row as products of alpha = exp(g), as the MLX form takes them (no overflow,
     * no cancellation): D[t, s] = D[t - 1, s] alpha_t for s < t, D[t, t] = 1. */
    float cum = 1.0f;
    for (int t = 0; t < n; t++) {
      const float alpha = expf(gb[(size_t)(t0 + t) * ldg]);
      cum *= alpha;
      gam[t] = cum, bet[t] = bb[(size_t)(t0 + t) * ldg];
      for (int s = 0; s < t; s++) D[s] *= alpha;
      D[t] = 1.0f;
      float *A = w->A + (size_t)t * C, *Aq = w->Aq + (size_t)t * C, *L = w->L + (size_t)t * C;
      const float *KK = w->KK + (size_t)t * C, *QK = w->QK + (size_t)t * C;
      for (int s = 0; s < t; s++) {
        A[s] = D[s] * KK[s], Aq[s] = D[s] * QK[s], L[s] = bet[t] * A[s];
      }
      A[t] = 0.0f, Aq[t] = QK[t], L[t] = 1.0f;
      for (int s = t + 1; s < n; s++) A[s] = Aq[s] = L[s] = 0.0f;
      float *r = w->rhs + (size_t)t * R;
      const float *kt = kc + (size_t)t * ldqk, *vt = vc + (size_t)t * ldv;
      const float bk = bet[t] * gam[t], bv = bet[t];
      for (int i = 0; i < Dk; i++) r[i] = bk * kt[i];
      for (int j = 0; j < Dv; j++) r[Dk + j] = bv * vt[j];
    }
    float *W = w->rhs, *u = w->rhs + Dk; /* [n, Dk] and [n, Dv], row stride R */
    strsm(ROW_MAJOR, LEFT, LOWER, NO_TRANS, UNIT, n, R, 1.0f, w->L, C, w->rhs, R);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, Dk, -1.0f, W, R, St, Dv, 1.0f, u, R);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, Dk, 1.0f, qc, ldqk, St, Dv, 0.0f, oc, ldv);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, Dk, 1.0f, kc, ldqk, St, Dv, 0.0f, hc, ldv);
    for (int t = 0; t < n; t++) {
      float *orow = oc + (size_t)t * ldv, *hrow = hc + (size_t)t * ldv;
      for (int j = 0; j < Dv; j++) orow[j] *= gam[t], hrow[j] *= gam[t];
    }
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, n, 1.0f, w->Aq, C, u, R, 1.0f, oc, ldv);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, n, 1.0f, w->A, C, u, R, 1.0f, hc, ldv);
    for (int s = 0; s < n; s++) { /* D[last, s] */
      float *us = u + (size_t)s * R;
      for (int j = 0; j < Dv; j++) us[j] *= D[s];
    }
    sgemm(ROW_MAJOR, TRANS, NO_TRANS, Dk, Dv, n, 1.0f, kc, ldqk, u, R, gam[n - 1], St, Dv);
  }
  float *sb = J->s + ((size_t)b * J->HV + h) * Dv * Dk;
  for (int j = 0; j < Dv; j++)
    for (int i = 0; i < Dk; i++) sb[(size_t)j * Dk + i] = St[(size_t)i * Dv + j];
}

struct worker {
  struct job *J;
  struct work w;
};

static void *run_worker(void *arg) {
  struct worker *W = arg;
  struct job *J = W->J;
  for (;;) {
    pthread_mutex_lock(&J->lock);
    const int item = J->next++;
    pthread_mutex_unlock(&J->lock);
    if (item >= J->B * J->HV) break;
    scan_head(J, &W->w, item / J->HV, item % J->HV);
  }
  return NULL;
}

/* The scan of every (row, value head); 0 on success, 1 when buffers cannot be allocated. */
int ham_gated_delta(int B, int T, int H, int HV, int Dk, int Dv, int C, const float *q,
                    const float *k, const float *v, const float *g, const float *beta,
                    const float *s0, float *o, float *v_hat, float *s, int workers) {
  struct job J = {B, T, H, HV, Dk, Dv, C, q, k, v, g, beta, s0, o, v_hat, s, 0};
  if (workers > B * HV) workers = B * HV;
  if (workers > MAX_WORKERS) workers = MAX_WORKERS;
  if (workers < 1) workers = 1;
  struct worker W[MAX_WORKERS];
  for (int i = 0; i < workers; i++) {
    W[i].J = &J;
    if (alloc_work(&W[i].w, C, Dk, Dv)) {
      for (int j = 0; j < i; j++) free(W[j].w.KK);
      return 1;
    }
  }
  pthread_mutex_init(&J.lock, NULL);
  pthread_t threads[MAX_WORKERS];
  int started[MAX_WORKERS] = {0};
  const int blas_threads = get_threads && workers > 1 ? get_threads() : 0;
  if (blas_threads > 1) set_threads(1);
  for (int i = 1; i < workers; i++)
    started[i] = pthread_create(&threads[i], NULL, run_worker, &W[i]) == 0;
  run_worker(&W[0]); /* a thread that could not start leaves its items to the others */
  for (int i = 1; i < workers; i++)
    if (started[i]) pthread_join(threads[i], NULL);
  if (blas_threads > 1) set_threads(blas_threads);
  pthread_mutex_destroy(&J.lock);
  for (int i = 0; i < workers; i++) free(W[i].w.KK);
  return 0;
}
