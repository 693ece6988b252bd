/* Attention over admitted keys for many queries at once, on the CPU (cached prefill).
 *
 * The same result as ham_mlx.ops.attention.chunk_attention, computed tile by tile: for a tile of
 * queries and a tile of keys, one sgemm gives the logits (in base 2, already shifted by the bound
 * of the head's logits), a loop takes 2^x with the mask and the row sums, and a second sgemm adds
 * p @ v into the output. The logits never leave the cache: a tile is at most 256 x 256 floats.
 * ham_mlx/ops/cpu_attention.py calls it through ctypes and binds it to OpenBLAS's cblas_sgemm.
 *
 * Shapes (strides in floats, the innermost stride is 1):
 *   q      [B, H, L, Dk]    query head h // (HV / H) serves value head h
 *   keys   [B, H, n, Dk]
 *   values [B, HV, n, Dv]
 *   out    [B, L, HV, Dv]   contiguous
 * With gate [B, L, HV] (strides (b, i) in floats, heads contiguous) each output row o of head h
 * leaves as the HAM layer's gated output, sigmoid(gate) * RMSNorm(o) * norm_weight, with
 * RMSNorm(o) = o / sqrt(mean(o^2) + eps) (spec §4.4); without it (NULL) as the attention alone.
 * scale[HV] = log2(e) exp(log_scale), shift[HV] = -log2(e) max(exp(log_scale), sink),
 * sink_weight[HV] = exp(sink - max(...)), bias2[B, n] = log2(e) key_bias or NULL,
 * counts[B], key_pos[B, n], query_pos[B, L] (int32). Slot j of row b is seen by query i iff
 * j < settled, or j < counts[b] and key_pos[b, j] <= query_pos[b, i].
 */
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cblas.h"
#include "_exp2.h"
#include "_parts.h"

#define MAX_WORKERS HAM_MAX_PARTS
#ifndef QUERY_TILE
#define QUERY_TILE 256
#endif
#ifndef KEY_TILE
#define KEY_TILE 256
#endif

/* Bind to cblas_sgemm of the BLAS at path (already loaded). 0 on success. */
int ham_attention_init(const char *path) { return bind_blas(path); }

/* p[i, j] = 2^(s[i, j] + add[j]) where limit[j] <= qpos[i], else 0; rowsum[i] += Σ_j p[i, j]. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
static void exp2_tile(float *restrict s, int rows, int cols, int ld, const float *restrict add,
                      const int32_t *restrict limit, const int32_t *restrict qpos,
                      float *restrict rowsum) {
  for (int i = 0; i < rows; ++i) {
    float *restrict row = s + (size_t)i * ld;
    const int32_t at = qpos[i];
    for (int j = 0; j < cols; ++j)
      row[j] = limit[j] <= at ? ham_exp2(row[j] + add[j]) : 0.0f;
    float part[8] = {0};  /* eight partial sums: a reduction the compiler may vectorise */
    int j = 0;
    for (; j + 8 <= cols; j += 8)
      for (int k = 0; k < 8; ++k) part[k] += row[j + k];
    float sum = 0.0f;
    for (; j < cols; ++j) sum += row[j];
    for (int k = 0; k < 8; ++k) sum += part[k];
    rowsum[i] += sum;
  }
}

/* Everything one call needs; workers read it and write disjoint parts of out. */
struct job {
  int B, H, HV, L, n, Dk, Dv, settled, workers;
  const float *q, *keys, *values, *scale, *shift, *sink_weight, *bias2;
  long q_sb, q_sh, q_sl, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;
  const int32_t *counts, *key_pos, *query_pos;
  float *out;
  const float *gate, *norm_weight;
  long g_sb, g_sl;
  float eps;
};

/* o <- sigmoid(gate) * o / sqrt(mean(o^2) + eps) * norm_weight, over Dv floats. */
static void gated_norm(const struct job *J, float *o, float gate) {
  float part[8] = {0};
  int d = 0;
  for (; d + 8 <= J->Dv; d += 8)
    for (int k = 0; k < 8; ++k) part[k] += o[d + k] * o[d + k];
  float sum = 0.0f;
  for (; d < J->Dv; ++d) sum += o[d] * o[d];
  for (int k = 0; k < 8; ++k) sum += part[k];
  const float factor = 1.0f / ((1.0f + expf(-gate)) * sqrtf(sum / (float)J->Dv + J->eps));
  for (d = 0; d < J->Dv; ++d) o[d] *= factor * J->norm_weight[d];
}

struct worker {
  const struct job *job;
  int index, failed;
};

/* One query tile of one head of one row: the output rows [i0, i0 + rows) of head h. */
static void tile(const struct job *J, int b, int h, int i0, float *s, float *add, int32_t *limit,
                 float *rowsum) {
  const int group = J->HV / J->H, ldo = J->HV * J->Dv, n = J->n;
  const int count = J->counts[b] < n ? J->counts[b] : n;
  const int rows = J->L - i0 < QUERY_TILE ? J->L - i0 : QUERY_TILE;
  const float *qh = J->q + b * J->q_sb + (h / group) * J->q_sh + i0 * J->q_sl;
  const float *kh = J->keys + b * J->k_sb + (h / group) * J->k_sh;
  const float *vh = J->values + b * J->v_sb + h * J->v_sh;
  float *oh = J->out + ((size_t)b * J->L + i0) * ldo + (size_t)h * J->Dv;
  for (int i = 0; i < rows; ++i) memset(oh + (size_t)i * ldo, 0, sizeof(float) * J->Dv);
  memset(rowsum, 0, sizeof(float) * rows);
  for (int j0 = 0; j0 < count; j0 += KEY_TILE) {
    const int cols = count - j0 < KEY_TILE ? count - j0 : KEY_TILE;
    for (int j = 0; j < cols; ++j) {
      const size_t slot = (size_t)b * n + j0 + j;
      add[j] = J->shift[h] + (J->bias2 ? J->bias2[slot] : 0.0f);
      limit[j] = j0 + j < J->settled ? INT32_MIN : J->key_pos[slot];
    }
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, rows, cols, J->Dk, J->scale[h], qh, (int)J->q_sl,
          kh + j0 * J->k_sn, (int)J->k_sn, 0.0f, s, cols);
    exp2_tile(s, rows, cols, cols, add, limit, J->query_pos + (size_t)b * J->L + i0, rowsum);
    sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, rows, J->Dv, cols, 1.0f, s, cols, vh + j0 * J->v_sn,
          (int)J->v_sn, 1.0f, oh, ldo);
  }
  for (int i = 0; i < rows; ++i) {
    const float inv = 1.0f / (rowsum[i] + J->sink_weight[h]);
    float *o = oh + (size_t)i * ldo;
    for (int d = 0; d < J->Dv; ++d) o[d] *= inv;
    if (J->gate) gated_norm(J, o, J->gate[b * J->g_sb + (i0 + i) * J->g_sl + h]);
  }
}

/* Worker w takes tiles w, w + workers, w + 2 workers, ... */
static void *run_worker(void *arg) {
  struct worker *W = arg;
  const struct job *J = W->job;
  float *s = malloc(sizeof(float) * QUERY_TILE * KEY_TILE);
  float *add = malloc(sizeof(float) * KEY_TILE);
  int32_t *limit = malloc(sizeof(int32_t) * KEY_TILE);
  float *rowsum = malloc(sizeof(float) * QUERY_TILE);
  if (s && add && limit && rowsum) {
    const int tiles = (J->L + QUERY_TILE - 1) / QUERY_TILE;
    for (long t = W->index; t < (long)J->B * J->HV * tiles; t += J->workers) {
      const int b = (int)(t / ((long)J->HV * tiles)), h = (int)(t / tiles % J->HV);
      tile(J, b, h, (int)(t % tiles) * QUERY_TILE, s, add, limit, rowsum);
    }
  } else {
    W->failed = 1;
  }
  free(s), free(add), free(limit), free(rowsum);
  return NULL;
}

/* 0 on success, 1 when memory or threads ran out, 2 when not initialised. The products run on
 * `workers` threads with OpenBLAS held to one thread each meanwhile. */
int ham_chunk_attention(int B, int H, int HV, int L, int n, int Dk, int Dv, const float *q,
                        long q_sb, long q_sh, long q_sl, const float *keys, long k_sb, long k_sh,
                        long k_sn, const float *values, long v_sb, long v_sh, long v_sn,
                        const float *scale, const float *shift, const float *sink_weight,
                        const float *bias2, const int32_t *counts, const int32_t *key_pos,
                        const int32_t *query_pos, int settled, float *out, int workers,
                        const float *gate, long g_sb, long g_sl, const float *norm_weight,
                        float eps) {
  if (!sgemm) return 2;
  if (workers < 1) workers = 1;
  if (workers > MAX_WORKERS) workers = MAX_WORKERS;
  struct job J = {B, H, HV, L, n, Dk, Dv, settled, workers, q, keys, values, scale, shift,
                  sink_weight, bias2, q_sb, q_sh, q_sl, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn,
                  counts, key_pos, query_pos, out, gate, norm_weight, g_sb, g_sl, eps};
  struct worker W[MAX_WORKERS];
  for (int w = 0; w < workers; ++w) W[w] = (struct worker){&J, w, 0};
  const int blas_threads = blas_single(workers);
  ham_run_parts(run_worker, W, sizeof W[0], workers);
  blas_restore(blas_threads);
  int failed = 0;
  for (int w = 0; w < workers; ++w) failed |= W[w].failed;
  return failed;
}
