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
 * Shapes (float32): q, k [B, T, H, Dk]; v [B, T, HV, Dv]; g, beta [B, T, HV], each with the
 * strides given (in floats; the last axis, and g's and beta's head axis, contiguous); s0
 * [B, HV, Dv, Dk] or NULL (zeros), contiguous; out [B, T, 2, HV, Dv] (o, then v_hat), or
 * [B, T, HV, Dv] (o alone), and s [B, HV, Dv, Dk], contiguous. Value head h reads q/k head
 * h / (HV / H).
 *
 * With an output norm (norm_w not NULL), each o row leaves as the layer's RNN output
 *   r = o / sqrt(mean(o^2) + eps) * norm_w * act(gate)
 * (act: 0 none (no gate), 1 SiLU, 2 sigmoid; gate [B, T, HV, Dv] with its strides, the last
 * axis contiguous), computed while the chunk's rows are in the cache.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "_cblas.h"
#include "_ftz.h"

#define MAX_WORKERS 64

/* Bind to cblas_sgemm and cblas_strsm of the BLAS at path (already loaded). 0 on success. */
int ham_scan_init(const char *path) { return bind_blas(path) || strsm == NULL; }

struct job {
  int B, T, H, HV, Dk, Dv, C;
  const float *q, *k, *v, *g, *beta, *s0;
  const long *st; /* strides in floats: q, k, v (row, token, head), g, beta (row, token) */
  float *out, *s;
  int with_v_hat; /* 0: o only, and out holds no v_hat slots */
  const float *gate, *norm_w; /* the output norm (norm_w NULL: none) */
  const long *gst;            /* gate's strides in floats (row, token, head) */
  float eps;
  int act;
  int next;       /* the next (row, head) to take */
  pthread_mutex_t lock;
};

struct work { /* one thread's buffers */
  float *qk, *S2, *AA, *L, *rhs, *St, *D, *gam, *bet;
};

static int alloc_work(struct work *w, int C, int Dk, int Dv) {
  size_t cc = (size_t)C * C;
  size_t n = 2 * (size_t)C * Dk + 5 * cc + (size_t)C * (Dk + Dv) + (size_t)Dk * Dv + 3 * C;
  float *p = malloc(n * sizeof(float));
  if (!p) return 1;
  w->qk = p, w->S2 = p + 2 * (size_t)C * Dk, w->AA = w->S2 + 2 * cc, w->L = w->AA + 2 * cc;
  w->rhs = w->L + cc;
  w->St = w->rhs + (size_t)C * (Dk + Dv);
  w->D = w->St + (size_t)Dk * Dv, w->gam = w->D + C, w->bet = w->gam + C;
  return 0;
}

/* o [Dv] <- o / sqrt(mean(o^2) + eps) * w * act(gate), as the layer's gated RMSNorm. */
static void output_norm(float *o, const float *gate, const float *w, int Dv, float eps, int act) {
  float ss = 0.0f;
  for (int j = 0; j < Dv; j++) ss += o[j] * o[j];
  const float inv = 1.0f / sqrtf(ss / (float)Dv + eps);
  if (act == 0) {
    for (int j = 0; j < Dv; j++) o[j] = o[j] * inv * w[j];
    return;
  }
  for (int j = 0; j < Dv; j++) {
    const float sig = 1.0f / (1.0f + expf(-gate[j]));
    o[j] = o[j] * inv * w[j] * (act == 1 ? gate[j] * sig : sig);
  }
}

/* The scan of row b, value head h. Rows 2t and 2t + 1 of the chunk's buffers belong to q_t and
 * k_t, so that o_t and v_hat_t come out of one product, interleaved as out [B, T, 2, HV, Dv]
 * holds them. */
static void scan_head(const struct job *J, struct work *w, int b, int h) {
  const int T = J->T, Dk = J->Dk, Dv = J->Dv, C = J->C, R = Dk + Dv;
  const int hk = h / (J->HV / J->H);
  const long *st = J->st;
  const float *qb = J->q + b * st[0] + hk * st[2], *kb = J->k + b * st[3] + hk * st[5];
  const float *vb = J->v + b * st[6] + h * st[8];
  const float *gb = J->g + b * st[9] + h, *bb = J->beta + b * st[11] + h;
  const int ldr = J->HV * Dv;                  /* out's rows: o_t, then v_hat_t when kept */
  const int ldo = (J->with_v_hat ? 2 : 1) * ldr; /* out's token stride */
  float *ob = J->out + (size_t)b * T * ldo + (size_t)h * Dv;
  const float *gateb = J->gate ? J->gate + b * J->gst[0] + h * J->gst[2] : NULL;
  float *St = w->St, *D = w->D, *gam = w->gam, *bet = w->bet, *qk = w->qk;
  const float *s0 = J->s0 ? J->s0 + ((size_t)b * J->HV + h) * Dv * Dk : NULL;
  for (int i = 0; i < Dk; i++)
    for (int j = 0; j < Dv; j++) St[(size_t)i * Dv + j] = s0 ? s0[(size_t)j * Dk + i] : 0.0f;

  for (int t0 = 0; t0 < T; t0 += C) {
    const int n = T - t0 < C ? T - t0 : C;
    const float *kc = kb + t0 * st[4];
    for (int t = 0; t < n; t++) {
      memcpy(qk + (size_t)2 * t * Dk, qb + (t0 + t) * st[1], Dk * sizeof(float));
      memcpy(qk + (size_t)(2 * t + 1) * Dk, kc + t * st[4], Dk * sizeof(float));
    }
    /* S2[2t, s] = q_t . k_s, S2[2t + 1, s] = k_t . k_s */
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, 2 * n, n, Dk, 1.0f, qk, Dk, kc, (int)st[4], 0.0f, w->S2, C);
    /* D row by row as products of alpha = exp(g), as the MLX form takes them (no overflow,
     * no cancellation): D[t, s] = D[t - 1, s] alpha_t for s < t, D[t, t] = 1. */
    float cum = 1.0f;
    for (int t = 0; t < n; t++) {
      const float alpha = expf(gb[(t0 + t) * st[10]]);
      cum *= alpha;
      gam[t] = cum, bet[t] = bb[(t0 + t) * st[12]];
      for (int s = 0; s < t; s++) D[s] *= alpha;
      D[t] = 1.0f;
      float *Aq = w->AA + (size_t)2 * t * C, *A = Aq + C, *L = w->L + (size_t)t * C;
      const float *QK = w->S2 + (size_t)2 * t * C, *KK = QK + C;
      for (int s = 0; s < t; s++) {
        A[s] = D[s] * KK[s], Aq[s] = D[s] * QK[s], L[s] = bet[t] * A[s];
      }
      A[t] = 0.0f, Aq[t] = QK[t], L[t] = 1.0f;
      for (int s = t + 1; s < n; s++) A[s] = Aq[s] = L[s] = 0.0f;
      float *r = w->rhs + (size_t)t * R;
      const float *kt = qk + (size_t)(2 * t + 1) * Dk, *vt = vb + (t0 + t) * st[7];
      const float bk = bet[t] * gam[t], bv = bet[t];
      for (int i = 0; i < Dk; i++) r[i] = bk * kt[i];
      for (int j = 0; j < Dv; j++) r[Dk + j] = bv * vt[j];
    }
    float *W = w->rhs, *u = w->rhs + Dk; /* [n, Dk] and [n, Dv], row stride R */
    strsm(ROW_MAJOR, LEFT, LOWER, NO_TRANS, UNIT, n, R, 1.0f, w->L, C, w->rhs, R);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, Dk, -1.0f, W, R, St, Dv, 1.0f, u, R);
    for (int t = 0; t < 2 * n; t++) { /* [gamma q; gamma k] */
      float *row = qk + (size_t)t * Dk;
      const float gt = gam[t / 2];
      for (int i = 0; i < Dk; i++) row[i] *= gt;
    }
    /* [o; v_hat] = [gamma q; gamma k] St + [Aq; A] u, or o alone from the even rows */
    float *oc = ob + (size_t)t0 * ldo;
    const int m = J->with_v_hat ? 2 * n : n, step = J->with_v_hat ? 1 : 2;
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, Dv, Dk, 1.0f, qk, step * Dk, St, Dv, 0.0f, oc, ldr);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, Dv, n, 1.0f, w->AA, step * C, u, R, 1.0f, oc, ldr);
    if (J->norm_w)
      for (int t = 0; t < n; t++)
        output_norm(oc + (size_t)t * ldo, gateb ? gateb + (t0 + t) * J->gst[1] : NULL, J->norm_w,
                    Dv, J->eps, J->act);
    for (int s = 0; s < n; s++) { /* D[last, s] */
      float *us = u + (size_t)s * R;
      for (int j = 0; j < Dv; j++) us[j] *= D[s];
    }
    sgemm(ROW_MAJOR, TRANS, NO_TRANS, Dk, Dv, n, 1.0f, kc, (int)st[4], u, R, gam[n - 1], St, Dv);
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
  /* D's products of decays reach denormals within a chunk wherever alpha is small (a layer's
   * fast-decaying heads); each such term cost a microcode assist, in the loops here and in
   * sgemm, and a scan ran up to 9x slower. They count as zero instead. */
  const unsigned csr = ham_ftz_begin();
  for (;;) {
    pthread_mutex_lock(&J->lock);
    const int item = J->next++;
    pthread_mutex_unlock(&J->lock);
    if (item >= J->B * J->HV) break;
    scan_head(J, &W->w, item / J->HV, item % J->HV);
  }
  ham_ftz_end(csr);
  return NULL;
}

/* The scan of every (row, value head); 0 on success, 1 when buffers cannot be allocated. */
int ham_gated_delta(int B, int T, int H, int HV, int Dk, int Dv, int C, const float *q,
                    const float *k, const float *v, const float *g, const float *beta,
                    const long *strides, const float *s0, float *out, float *s,
                    int with_v_hat, const float *gate, const long *gate_strides,
                    const float *norm_w, float eps, int act, int workers) {
  struct job J = {.B = B, .T = T, .H = H, .HV = HV, .Dk = Dk, .Dv = Dv, .C = C,
                  .q = q, .k = k, .v = v, .g = g, .beta = beta, .s0 = s0, .st = strides,
                  .out = out, .s = s, .with_v_hat = with_v_hat,
                  .gate = gate, .norm_w = norm_w, .gst = gate_strides, .eps = eps, .act = act};
  if (workers > B * HV) workers = B * HV;
  if (workers > MAX_WORKERS) workers = MAX_WORKERS;
  if (workers < 1) workers = 1;
  struct worker W[MAX_WORKERS];
  for (int i = 0; i < workers; i++) {
    W[i].J = &J;
    if (alloc_work(&W[i].w, C, Dk, Dv)) {
      for (int j = 0; j < i; j++) free(W[j].w.qk);
      return 1;
    }
  }
  pthread_mutex_init(&J.lock, NULL);
  pthread_t threads[MAX_WORKERS];
  int started[MAX_WORKERS] = {0};
  /* one BLAS thread even for one worker: the products are small (<= 2C rows), and OpenBLAS's
   * own threads would not flush denormals */
  const int blas_threads = blas_one_thread();
  for (int i = 1; i < workers; i++)
    started[i] = pthread_create(&threads[i], NULL, run_worker, &W[i]) == 0;
  run_worker(&W[0]); /* a thread that could not start leaves its items to the others */
  for (int i = 1; i < workers; i++)
    if (started[i]) pthread_join(threads[i], NULL);
  blas_restore(blas_threads);
  pthread_mutex_destroy(&J.lock);
  for (int i = 0; i < workers; i++) free(W[i].w.qk);
  return 0;
}
