// MLX operations for the scan step and the HAM part of a one-token decode step on the CPU (see
// ham_mlx/ops/mlx_ext.py, which builds this file on first use against the installed MLX).
//
// `GdnStep` reads the GDN state once and writes the new one (MLX: a product, then a strided
// update kernel, about ten nodes; its twin is gated_delta_step). MLX runs the decode step's head
// score, admission, four scatters, the attention over the stored entries and the gated norm as
// about sixty graph nodes, each with a fixed cost of several microseconds on the CPU. Here they
// are seven MLX primitives: `HeadScore`, `HamAdmit`, four `WriteSlot` (in place where MLX may
// donate the buffer; single-output, because MLX gives every output of a multi-output primitive
// its own reference to the inputs, so none would be donatable) and `HamAttend` (each row's stored
// entries read once, on up to `threads` threads, then the gated RMSNorm). Their twins are
// ham_mlx's MLX functions in `mlx_part` (tests compare them). `SwiGLU` serves prefill: the MLP's
// SiLU(gate) * up on several threads (twin: fast_math.silu(gate) * up).

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "_exp2.h"
#include "_ftz.h"
#include "_surprise.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// Element i (in row-major order) of an input of any strides. It copies the layout, not the array:
// the work runs later on MLX's CPU thread, when only the data buffers are sure to be alive.
template <typename T>
struct Flat {
  const T* data = nullptr;
  int64_t size = 0;
  bool contiguous = true;
  std::vector<int64_t> shape, strides;
  Flat() = default;
  explicit Flat(const mx::array& x)
      : data(x.data<T>()),
        size(static_cast<int64_t>(x.size())),
        contiguous(x.flags().row_contiguous),
        shape(x.shape().begin(), x.shape().end()),
        strides(x.strides().begin(), x.strides().end()) {}
  int64_t offset(int64_t i) const {
    if (contiguous) return i;
    int64_t off = 0;
    for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
      off += (i % shape[d]) * strides[d];
      i /= shape[d];
    }
    return off;
  }
  T operator[](int64_t i) const {
    return size == 1 ? data[0] : data[offset(i)];
  }
  // The n elements from index i on, within one run of the last axis, as contiguous memory: in
  // place where that axis is contiguous (as in the decode step's strided q and v), else in tmp.
  const T* row(int64_t i, int n, T* tmp) const {
    if (contiguous || (!strides.empty() && strides.back() == 1)) return data + offset(i);
    for (int k = 0; k < n; ++k) tmp[k] = (*this)[i + k];
    return tmp;
  }
};

void allocate(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// Runs `work` on MLX's CPU stream after the primitive's inputs are ready.
template <typename F>
void dispatch(mx::Primitive& prim, const std::vector<mx::array>& in, std::vector<mx::array>& out,
              F&& work) {
  auto& encoder = mx::cpu::get_command_encoder(prim.stream());
  for (auto& a : in) encoder.set_input_array(a);
  for (auto& a : out) encoder.set_output_array(a);
  encoder.dispatch(std::forward<F>(work));
}

// Runs fn(self, part, parts) for part = 0 .. parts - 1: on ham_mlx's gemv helper's pool where it
// is loaded (its threads are already awake during a decode step: they spin between the step's
// products, and a thread of our own would share a core with one of them); else on threads of
// our own (own_threads) or one after another on this thread.
void run_parts(void (*fn)(void*, int, int), void* self, int parts, bool own_threads) {
  using PoolRun = int (*)(void (*)(void*, int, int), void*, int);
  static PoolRun pool_run = reinterpret_cast<PoolRun>(dlsym(RTLD_DEFAULT, "ham_pool_run"));
  if (parts > 1 && pool_run) {
    pool_run(fn, self, parts);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 1; t < parts && own_threads; ++t) pool.emplace_back([=] { fn(self, t, parts); });
  for (int t = 0; t < (own_threads ? 1 : parts); ++t) fn(self, t, parts);
  for (auto& th : pool) th.join();
}

float dot(const float* a, const float* b, int n) {
  constexpr int W = 16;  // independent partial sums the compiler keeps in vector registers
  float acc[W] = {0};
  int i = 0;
  for (; i + W <= n; i += W) {
    for (int w = 0; w < W; ++w) acc[w] += a[i + w] * b[i + w];
  }
  float s = 0.0f;
  for (int w = 0; w < W; ++w) s += acc[w];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- admission: which slot the token goes to ---------------------------------------------------
// inputs score [B] or [B, 1] f32, tau (1 or B) f32, count [B] i32, scratch (1) i32[, cap (1) i32]
// outputs count' [B] i32, admitted (the score's shape) bool, slot [B] i32: a token is stored iff
// score >= tau, and with a cap only while the row keeps within it; a token not stored goes to the
// scratch slot.
class HamAdmit : public mx::Primitive {
 public:
  HamAdmit(mx::Stream s, bool has_cap) : mx::Primitive(s), has_cap_(has_cap) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& o : out) allocate(o);
    Flat<float> score(in[0]), tau(in[1]);
    Flat<int32_t> count(in[2]), scratch(in[3]), cap;
    if (has_cap_) cap = Flat<int32_t>(in[4]);
    int B = static_cast<int>(out[0].size());
    int32_t* new_count = out[0].data<int32_t>();
    bool* admitted = out[1].data<bool>();
    int32_t* slot = out[2].data<int32_t>();
    dispatch(*this, in, out, [=, has_cap = has_cap_]() {
      for (int b = 0; b < B; ++b) {
        int32_t c = count[b];
        bool take = score[b] >= tau[b] && (!has_cap || c + 1 <= cap[0]);
        admitted[b] = take;
        slot[b] = take ? c : scratch[0];
        new_count[b] = c + (take ? 1 : 0);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("HamAdmit runs on the CPU only");
  }
  const char* name() const override {
    return "HamAdmit";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return has_cap_ == static_cast<const HamAdmit&>(other).has_cap_;
  }

 private:
  bool has_cap_;
};

// ---- one row written at each batch row's slot, in place where MLX lets the buffer go ----------
// inputs buffer [B, N, n, D] or [B, n], slot [B] i32, row [B, N, D] or [B] (the buffer's dtype);
// output the buffer with buffer[b, :, slot[b]] = row[b]. A slot outside [0, n) writes nothing.
class WriteSlot : public mx::UnaryPrimitive {
 public:
  explicit WriteSlot(mx::Stream s) : mx::UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array& buffer = in[0];
    size_t item = buffer.itemsize();
    bool shared = buffer.is_donatable() && buffer.flags().row_contiguous;
    if (shared) {
      out.copy_shared_buffer(buffer);
    } else {
      allocate(out);
    }
    const uint8_t* from = shared ? nullptr : buffer.data<uint8_t>();
    bool from_contiguous = buffer.flags().row_contiguous;
    std::vector<int64_t> shape(buffer.shape().begin(), buffer.shape().end());
    std::vector<int64_t> strides(buffer.strides().begin(), buffer.strides().end());
    Flat<int32_t> slot(in[1]);
    const uint8_t* row = in[2].data<uint8_t>();
    // the row's strides without its one-token axis ([B, 1, N, D] or [B, 1] as the step holds it)
    std::vector<int64_t> row_strides(in[2].strides().begin(), in[2].strides().end());
    if (static_cast<size_t>(in[2].ndim()) == shape.size()) {
      row_strides.erase(row_strides.begin() + 1);
    }
    uint8_t* dst = out.data<uint8_t>();
    std::vector<mx::array> outs = {out};
    dispatch(*this, in, outs, [=]() {
      int64_t total = 1;
      for (auto d : shape) total *= d;
      if (!shared) {  // copy the old entries first (any strides)
        if (from_contiguous) {
          std::memcpy(dst, from, total * item);
        } else {
          for (int64_t i = 0; i < total; ++i) {
            int64_t off = 0, rest = i;
            for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
              off += (rest % shape[d]) * strides[d];
              rest /= shape[d];
            }
            std::memcpy(dst + i * item, from + off * item, item);
          }
        }
      }
      int64_t B = shape[0], n = shape.size() == 4 ? shape[2] : shape[1];
      int64_t N = shape.size() == 4 ? shape[1] : 1, D = shape.size() == 4 ? shape[3] : 1;
      for (int64_t b = 0; b < B; ++b) {
        int64_t s = slot[b];
        if (s < 0 || s >= n) continue;
        for (int64_t h = 0; h < N; ++h) {
          uint8_t* to = dst + ((b * N + h) * n + s) * D * item;
          if (shape.size() == 2) {
            std::memcpy(to, row + b * row_strides[0] * item, item);
          } else if (row_strides[2] == 1) {  // one copy of the head's D elements
            std::memcpy(to, row + (b * row_strides[0] + h * row_strides[1]) * item, D * item);
          } else {
            for (int64_t d = 0; d < D; ++d) {
              int64_t r = b * row_strides[0] + h * row_strides[1] + d * row_strides[2];
              std::memcpy(to + d * item, row + r * item, item);
            }
          }
        }
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("WriteSlot runs on the CPU only");
  }
  const char* name() const override {
    return "WriteSlot";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

// ---- the token's score from its value heads' surprise ------------------------------------------
// inputs v_hat [B, HV, Dv], v [B, HV, Dv] (or [B, 1, HV, Dv]; f32, any strides); output [B] (or
// [B, 1]) f32: the min over the heads of the cosine or l2 surprise (_surprise.h)
class HeadScore : public mx::UnaryPrimitive {
 public:
  HeadScore(mx::Stream s, bool cosine, float eps)
      : mx::UnaryPrimitive(s), cosine_(cosine), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    allocate(out);
    Flat<float> v_hat(in[0]), v(in[1]);
    int B = in[1].shape(0), HV = in[1].shape(-2), Dv = in[1].shape(-1);
    float* score = out.data<float>();
    std::vector<mx::array> outs = {out};
    dispatch(*this, in, outs, [=, kind = cosine_ ? 0 : 1, eps = eps_]() {
      std::vector<float> tmp(2 * Dv);
      for (int b = 0; b < B; ++b) {
        float best = INFINITY;
        for (int h = 0; h < HV; ++h) {
          int64_t at = (int64_t(b) * HV + h) * Dv;
          float e = ham_surprise(v_hat.row(at, Dv, tmp.data()), v.row(at, Dv, tmp.data() + Dv),
                                 Dv, kind, eps);
          // the min, where a NaN wins as in MLX's min
          best = (e < best || std::isnan(e)) && !std::isnan(best) ? e : best;
        }
        score[b] = best;
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("HeadScore runs on the CPU only");
  }
  const char* name() const override {
    return "HeadScore";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const HeadScore&>(other);
    return cosine_ == o.cosine_ && eps_ == o.eps_;
  }

 private:
  bool cosine_;
  float eps_;
};

// ---- attention of one query per row over its stored entries, then the gated norm --------------
// inputs q [B, H, Dk], keys [B, H, n, Dk], values [B, HV, n, Dv], count [B] i32, log_scale [HV],
// sink [HV], gate [B, HV], norm_weight [Dv][, scores [B, n] for the learned router's key bias]
// (q [B, 1, H, Dk] and gate [B, 1, HV] as the step holds them give out [B, 1, HV, Dv])
// output [B, HV, Dv] f32: sigmoid(gate) * RMSNorm(softmax-with-sink(K q * scale + bias) V) * w
struct Attend {
  Flat<float> q, log_scale, sink, gate, weight;
  Flat<int32_t> count;
  const float *K = nullptr, *V = nullptr, *S = nullptr;  // row-contiguous
  Flat<float> keys_from, values_from, scores_from;  // set where an input is not row-contiguous
  std::shared_ptr<std::vector<float>> copies;
  float* O = nullptr;
  int B = 0, H = 0, n_alloc = 0, Dk = 0, HV = 0, Dv = 0;
  float norm_eps = 0, bias_eps = 0;
  int threads = 1;

  // One (row, key head): blocks of entries, each read once for the logits and then for the values
  // of every value head of the group (an online softmax: both streams are in flight together).
  void item(int it) const {
    constexpr int BLOCK = 64;
    int b = it / H, h = it % H, group = HV / H;
    int n = std::min<int>(std::max<int>(count[b], 0), n_alloc);
    std::vector<float> tmp(Dk), logits(BLOCK), o(size_t(group) * Dv, 0.0f), m(group), denom(group);
    const float* qv = q.row((int64_t(b) * H + h) * Dk, Dk, tmp.data());
    for (int g = 0; g < group; ++g) {
      m[g] = sink[h * group + g];  // the sink's logit, whose value is 0
      denom[g] = 1.0f;
    }
    const float* Kh = K + (int64_t(b) * H + h) * n_alloc * Dk;
    for (int j0 = 0; j0 < n; j0 += BLOCK) {
      int jn = std::min(BLOCK, n - j0);
      for (int j = 0; j < jn; ++j) logits[j] = dot(Kh + int64_t(j0 + j) * Dk, qv, Dk);
      for (int g = 0; g < group; ++g) {
        int hv = h * group + g;
        float scale = std::exp(log_scale[hv]), top = m[g];
        float l[BLOCK];
        for (int j = 0; j < jn; ++j) {
          l[j] = logits[j] * scale;
          if (S) l[j] += std::log(std::max(S[int64_t(b) * n_alloc + j0 + j], bias_eps));
          top = std::max(top, l[j]);
        }
        float* og = o.data() + size_t(g) * Dv;
        if (top > m[g]) {
          float r = std::exp(m[g] - top);
          denom[g] *= r;
          for (int d = 0; d < Dv; ++d) og[d] *= r;
          m[g] = top;
        }
        const float* Vb = V + ((int64_t(b) * HV + hv) * n_alloc + j0) * Dv;
        for (int j = 0; j < jn; ++j) {
          float w = std::exp(l[j] - m[g]);
          denom[g] += w;
          const float* row = Vb + int64_t(j) * Dv;
          for (int d = 0; d < Dv; ++d) og[d] += w * row[d];
        }
      }
    }
    for (int g = 0; g < group; ++g) {
      int hv = h * group + g;
      float* og = o.data() + size_t(g) * Dv;
      float ss = 0.0f;
      for (int d = 0; d < Dv; ++d) {
        og[d] /= denom[g];
        ss += og[d] * og[d];
      }
      float r = 1.0f / std::sqrt(ss / Dv + norm_eps);
      float sg = 1.0f / (1.0f + std::exp(-gate[int64_t(b) * HV + hv]));
      float* dst = O + (int64_t(b) * HV + hv) * Dv;
      for (int d = 0; d < Dv; ++d) dst[d] = sg * (og[d] * r * weight[d]);
    }
  }

  // row-contiguous copies of the inputs that are not (never the cache's own buffers)
  void gather() {
    copies = std::make_shared<std::vector<float>>(keys_from.size + values_from.size +
                                                  scores_from.size);
    float* at = copies->data();
    for (auto [from, to] : {std::pair{&keys_from, &K}, {&values_from, &V}, {&scores_from, &S}}) {
      if (!from->data) continue;
      for (int64_t i = 0; i < from->size; ++i) at[i] = (*from)[i];
      *to = at;
      at += from->size;
    }
  }

  static void part(void* self, int part, int parts) {
    auto* job = static_cast<const Attend*>(self);
    for (int it = part; it < job->B * job->H; it += parts) job->item(it);
  }

  void run() const {
    int items = B * H;
    int64_t bytes = 0;
    for (int b = 0; b < B; ++b) bytes += int64_t(std::max(count[b], 0)) * (H * Dk + HV * Dv) * 4;
    // below about 2 MB of entries a second thread costs more to start than it saves
    int parts = static_cast<int>(std::min<int64_t>({threads, items, 1 + bytes / (2 << 20)}));
    run_parts(&Attend::part, const_cast<Attend*>(this), std::max(parts, 1), true);
  }
};

class HamAttend : public mx::UnaryPrimitive {
 public:
  HamAttend(mx::Stream s, float norm_eps, std::optional<float> bias_eps, int threads)
      : mx::UnaryPrimitive(s), norm_eps_(norm_eps), bias_eps_(bias_eps), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    allocate(out);
    Attend job;
    job.q = Flat<float>(in[0]);
    job.K = in[1].data<float>();
    job.V = in[2].data<float>();
    if (!in[1].flags().row_contiguous) job.keys_from = Flat<float>(in[1]);
    if (!in[2].flags().row_contiguous) job.values_from = Flat<float>(in[2]);
    job.count = Flat<int32_t>(in[3]);
    job.log_scale = Flat<float>(in[4]);
    job.sink = Flat<float>(in[5]);
    job.gate = Flat<float>(in[6]);
    job.weight = Flat<float>(in[7]);
    if (bias_eps_) {
      job.S = in[8].data<float>();
      if (!in[8].flags().row_contiguous) job.scores_from = Flat<float>(in[8]);
    }
    job.O = out.data<float>();
    job.B = in[1].shape(0);
    job.H = in[1].shape(1);
    job.n_alloc = in[1].shape(2);
    job.Dk = in[1].shape(3);
    job.HV = in[2].shape(1);
    job.Dv = in[2].shape(3);
    job.norm_eps = norm_eps_;
    job.bias_eps = bias_eps_.value_or(0.0f);
    job.threads = threads_;
    std::vector<mx::array> outs = {out};
    dispatch(*this, in, outs, [job = std::move(job)]() mutable {
      if (job.keys_from.data || job.values_from.data || job.scores_from.data) job.gather();
      job.run();
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("HamAttend runs on the CPU only");
  }
  const char* name() const override {
    return "HamAttend";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const HamAttend&>(other);
    return norm_eps_ == o.norm_eps_ && bias_eps_ == o.bias_eps_ && threads_ == o.threads_;
  }

 private:
  float norm_eps_;
  std::optional<float> bias_eps_;
  int threads_;
};

// ---- one step of the gated delta rule: the GDN state read once and written once ----------------
// inputs state [B, HV, Dv, Dk], q, k [B, 1, H, Dk] (l2-normalised, q not yet scaled by Dk^-0.5),
// v [B, 1, HV, Dv], g (log decay) and beta [B, 1, HV]; f32, any strides. Outputs o, v_hat
// [B, 1, HV, Dv] and the new state [B, HV, Dv, Dk]. With a = exp(g), q~ = q Dk^-0.5 and value
// head h reading q/k head h / (HV / H), per row i of the head's state:
//   v_hat_i = a (S_i . k),  u_i = beta (v_i - v_hat_i),  S'_i = a S_i + u_i k,
//   o_i = a (S_i . q~) + u_i (k . q~)
// (the twin: ham_mlx.ops.gated_delta.gated_delta_step). MLX's form reads the state twice (a
// product, then the update's strided kernel) in about ten graph nodes.
struct GdnStep {
  Flat<float> S, q, k, v, g, beta;
  float *O = nullptr, *VH = nullptr, *SO = nullptr;
  int B = 0, H = 0, HV = 0, Dv = 0, Dk = 0, threads = 1;

  void item(int it) const {
    int b = it / HV, h = it % HV, hk = h / (HV / H);
    std::vector<float> tmp(2 * Dk + Dv);
    float *qs = tmp.data(), *srow_tmp = tmp.data() + Dk, *v_tmp = tmp.data() + 2 * Dk;
    const float* qr = q.row((int64_t(b) * H + hk) * Dk, Dk, qs);
    float scale = 1.0f / std::sqrt(static_cast<float>(Dk));
    for (int j = 0; j < Dk; ++j) qs[j] = qr[j] * scale;
    std::vector<float> k_tmp(Dk);
    const float* kr = k.row((int64_t(b) * H + hk) * Dk, Dk, k_tmp.data());
    const float* vr = v.row((int64_t(b) * HV + h) * Dv, Dv, v_tmp);
    float kq = dot(kr, qs, Dk);
    float a = std::exp(g[int64_t(b) * HV + h]), bt = beta[int64_t(b) * HV + h];
    int64_t head = int64_t(b) * HV + h;
    for (int i = 0; i < Dv; ++i) {
      const float* si = S.row((head * Dv + i) * Dk, Dk, srow_tmp);
      float pk = dot(si, kr, Dk), pq = dot(si, qs, Dk);
      float vh = a * pk, u = bt * (vr[i] - vh);
      float* so = SO + (head * Dv + i) * Dk;
      for (int j = 0; j < Dk; ++j) so[j] = a * si[j] + u * kr[j];
      O[head * Dv + i] = a * pq + u * kq;
      VH[head * Dv + i] = vh;
    }
  }

  static void part(void* self, int part, int parts) {
    auto* job = static_cast<const GdnStep*>(self);
    for (int it = part; it < job->B * job->HV; it += parts) job->item(it);
  }

  void run() const {
    int items = B * HV;
    int64_t bytes = int64_t(items) * Dv * Dk * 4;
    // a state under about half a MB is done sooner on one thread
    int parts = static_cast<int>(std::min<int64_t>({threads, items, 1 + bytes / (512 << 10)}));
    // no pool: all on this thread (a state this small is not worth a thread of our own)
    run_parts(&GdnStep::part, const_cast<GdnStep*>(this), std::max(parts, 1), false);
  }
};

class GdnStepPrimitive : public mx::Primitive {
 public:
  GdnStepPrimitive(mx::Stream s, int threads) : mx::Primitive(s), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& o : out) allocate(o);
    GdnStep job;
    job.S = Flat<float>(in[0]);
    job.q = Flat<float>(in[1]);
    job.k = Flat<float>(in[2]);
    job.v = Flat<float>(in[3]);
    job.g = Flat<float>(in[4]);
    job.beta = Flat<float>(in[5]);
    job.B = in[0].shape(0);
    job.HV = in[0].shape(1);
    job.Dv = in[0].shape(2);
    job.Dk = in[0].shape(3);
    job.H = in[1].shape(2);
    job.O = out[0].data<float>();
    job.VH = out[1].data<float>();
    job.SO = out[2].data<float>();
    job.threads = threads_;
    dispatch(*this, in, out, [job = std::move(job)]() { job.run(); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("GdnStep runs on the CPU only");
  }
  const char* name() const override {
    return "GdnStep";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const GdnStepPrimitive&>(other).threads_;
  }

 private:
  int threads_;
};

// ---- the MLP's SiLU(gate) * up, on the pool's threads (prefill) --------------------------------
// inputs gate, up [..., n] f32 (the last axis contiguous, e.g. the two halves of one product);
// output [..., n] f32: gate / (1 + 2^(-gate log2 e)) * up. MLX's compiled form runs on one thread.
struct SwiGLU {
  Flat<float> gate, up;
  float* out = nullptr;
  int64_t rows = 0;
  int n = 0, threads = 1;

  void span(int64_t r0, int64_t r1) const {
    const unsigned csr = ham_ftz_begin();  // a blended lane's candidate may be a denormal
    std::vector<float> tmp(2 * n);
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gate.row(r * n, n, tmp.data());
      const float* u = up.row(r * n, n, tmp.data() + n);
      float* o = out + r * n;
      for (int j = 0; j < n; ++j) {
        o[j] = g[j] / (1.0f + ham_exp2(-g[j] * 1.4426950408889634f)) * u[j];
      }
    }
    ham_ftz_end(csr);
  }

  static void part(void* self, int part, int parts) {
    auto* job = static_cast<const SwiGLU*>(self);
    job->span(job->rows * part / parts, job->rows * (part + 1) / parts);
  }

  void run() const {
    int parts = static_cast<int>(std::min<int64_t>({threads, rows, 1 + rows * n / (1 << 16)}));
    run_parts(&SwiGLU::part, const_cast<SwiGLU*>(this), std::max(parts, 1), true);
  }
};

class SwiGLUPrimitive : public mx::UnaryPrimitive {
 public:
  SwiGLUPrimitive(mx::Stream s, int threads) : mx::UnaryPrimitive(s), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    allocate(out);
    SwiGLU job;
    job.gate = Flat<float>(in[0]);
    job.up = Flat<float>(in[1]);
    job.out = out.data<float>();
    job.n = in[0].shape(-1);
    job.rows = job.n ? static_cast<int64_t>(in[0].size()) / job.n : 0;
    job.threads = threads_;
    std::vector<mx::array> outs = {out};
    dispatch(*this, in, outs, [job = std::move(job)]() { job.run(); });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("SwiGLU runs on the CPU only");
  }
  const char* name() const override {
    return "SwiGLU";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const SwiGLUPrimitive&>(other).threads_;
  }

 private:
  int threads_;
};

// ---- the Python-facing operations: shapes and dtypes are checked here, when the graph is built --
mx::Stream cpu_stream() {
  return mx::default_stream(mx::Device::cpu);
}

void expect(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("ham_mlx extension: " + what);
}

std::vector<mx::array> ham_admit(const mx::array& score, const mx::array& tau,
                                 const mx::array& count, const mx::array& scratch,
                                 std::optional<mx::array> cap) {
  int B = static_cast<int>(count.size());
  expect(score.size() == size_t(B) && (tau.size() == 1 || tau.size() == size_t(B)) &&
             scratch.size() == 1 && (!cap || cap->size() == 1),
         "ham_admit: score [B], tau (1 or B), scratch (1) and cap (1) for count [B]");
  expect(score.dtype() == mx::float32 && tau.dtype() == mx::float32, "ham_admit: float32 scores");
  expect(count.dtype() == mx::int32 && scratch.dtype() == mx::int32 &&
             (!cap || cap->dtype() == mx::int32),
         "ham_admit: int32 count, scratch and cap");
  std::vector<mx::array> inputs = {score, tau, count, scratch};
  if (cap) inputs.push_back(*cap);
  // admitted has the score's shape ([B] or [B, 1])
  return mx::array::make_arrays({{B}, score.shape(), {B}}, {mx::int32, mx::bool_, mx::int32},
                                std::make_shared<HamAdmit>(cpu_stream(), cap.has_value()), inputs);
}

// A one-token input's shape without its token axis: [B, 1, ...] as [B, ...] (the decode step's
// arrays keep that axis; reading them flat, the primitives need no reshape node).
mx::Shape per_row(const mx::array& a, bool token_axis) {
  mx::Shape s = a.shape();
  if (token_axis && s.size() >= 2 && s[1] == 1) s.erase(s.begin() + 1);
  return s;
}

mx::array write_slot(const mx::array& buffer, const mx::array& slot, const mx::array& row) {
  expect(buffer.ndim() == 4 || buffer.ndim() == 2, "write_slot: buffer [B, N, n, D] or [B, n]");
  int B = buffer.shape(0);
  mx::Shape want = buffer.ndim() == 4 ? mx::Shape{B, buffer.shape(1), buffer.shape(3)}
                                      : mx::Shape{B};
  expect(per_row(row, row.ndim() == buffer.ndim()) == want,
         "write_slot: row must be [B, N, D] or [B] (or [B, 1, N, D], [B, 1])");
  expect(row.dtype() == buffer.dtype(), "write_slot: row and buffer dtypes differ");
  expect(slot.size() == size_t(B) && slot.dtype() == mx::int32, "write_slot: slot [B] int32");
  return mx::array(buffer.shape(), buffer.dtype(), std::make_shared<WriteSlot>(cpu_stream()),
                   {buffer, slot, row});
}

mx::array head_score(const mx::array& v_hat, const mx::array& v, const std::string& kind,
                     float eps) {
  expect(kind == "cosine" || kind == "l2", "head_score: kind must be 'cosine' or 'l2'");
  expect(per_row(v, v.ndim() == 4).size() == 3 && v_hat.shape() == v.shape(),
         "head_score: v_hat and v [B, HV, Dv] or [B, 1, HV, Dv]");
  expect(v.dtype() == mx::float32 && v_hat.dtype() == mx::float32, "head_score: float32 only");
  mx::Shape out = v.ndim() == 4 ? mx::Shape{v.shape(0), 1} : mx::Shape{v.shape(0)};
  return mx::array(out, mx::float32,
                   std::make_shared<HeadScore>(cpu_stream(), kind == "cosine", eps), {v_hat, v});
}

mx::array ham_attend(const mx::array& q, const mx::array& keys, const mx::array& values,
                     const mx::array& count, const mx::array& log_scale, const mx::array& sink,
                     const mx::array& gate, const mx::array& norm_weight,
                     std::optional<mx::array> scores, float norm_eps,
                     std::optional<float> bias_eps, int threads) {
  expect(keys.ndim() == 4 && values.ndim() == 4, "ham_attend: keys and values must be 4-D");
  int B = keys.shape(0), H = keys.shape(1), n = keys.shape(2), Dk = keys.shape(3);
  int HV = values.shape(1), Dv = values.shape(3);
  expect(H > 0 && HV % H == 0 && values.shape(0) == B && values.shape(2) == n,
         "ham_attend: values [B, HV, n, Dv] with HV a multiple of H");
  bool token_axis = q.ndim() == 4;  // q [B, 1, H, Dk], gate [B, 1, HV]: out [B, 1, HV, Dv]
  expect(per_row(q, token_axis) == mx::Shape{B, H, Dk}, "ham_attend: q must be [B, H, Dk]");
  expect(per_row(gate, token_axis) == mx::Shape{B, HV}, "ham_attend: gate must be [B, HV]");
  expect(log_scale.shape() == mx::Shape{HV} && sink.shape() == mx::Shape{HV},
         "ham_attend: log_scale and sink must be [HV]");
  expect(norm_weight.shape() == mx::Shape{Dv}, "ham_attend: norm_weight must be [Dv]");
  expect(count.size() == size_t(B) && count.dtype() == mx::int32, "ham_attend: count [B] int32");
  expect(scores.has_value() == bias_eps.has_value(), "ham_attend: scores and bias_eps together");
  expect(!scores || scores->shape() == mx::Shape{B, n}, "ham_attend: scores must be [B, n]");
  for (const mx::array* a : {&q, &keys, &values, &log_scale, &sink, &gate, &norm_weight}) {
    expect(a->dtype() == mx::float32, "ham_attend: float32 inputs only");
  }
  expect(!scores || scores->dtype() == mx::float32, "ham_attend: float32 scores");
  std::vector<mx::array> inputs = {q, keys, values, count, log_scale, sink, gate, norm_weight};
  if (scores) inputs.push_back(*scores);
  mx::Shape out = token_axis ? mx::Shape{B, 1, HV, Dv} : mx::Shape{B, HV, Dv};
  return mx::array(out, mx::float32,
                   std::make_shared<HamAttend>(cpu_stream(), norm_eps, bias_eps,
                                               std::max(1, threads)),
                   inputs);
}

std::vector<mx::array> gdn_step(const mx::array& state, const mx::array& q, const mx::array& k,
                                const mx::array& v, const mx::array& g, const mx::array& beta,
                                int threads) {
  expect(state.ndim() == 4, "gdn_step: state must be [B, HV, Dv, Dk]");
  int B = state.shape(0), HV = state.shape(1), Dv = state.shape(2), Dk = state.shape(3);
  expect(q.ndim() == 4 && q.shape(0) == B && q.shape(1) == 1 && q.shape(3) == Dk &&
             k.shape() == q.shape(),
         "gdn_step: q and k must be [B, 1, H, Dk]");
  int H = q.shape(2);
  expect(H > 0 && HV % H == 0, "gdn_step: value heads must be a multiple of q/k heads");
  expect(v.shape() == mx::Shape{B, 1, HV, Dv}, "gdn_step: v must be [B, 1, HV, Dv]");
  expect(g.shape() == mx::Shape{B, 1, HV} && beta.shape() == g.shape(),
         "gdn_step: g and beta must be [B, 1, HV]");
  for (const mx::array* a : {&state, &q, &k, &v, &g, &beta}) {
    expect(a->dtype() == mx::float32, "gdn_step: float32 inputs only");
  }
  return mx::array::make_arrays({v.shape(), v.shape(), state.shape()},
                                {mx::float32, mx::float32, mx::float32},
                                std::make_shared<GdnStepPrimitive>(cpu_stream(), std::max(1, threads)),
                                {state, q, k, v, g, beta});
}

mx::array swiglu(const mx::array& gate, const mx::array& up, int threads) {
  expect(gate.shape() == up.shape() && gate.ndim() >= 1, "swiglu: gate and up of one shape");
  expect(gate.dtype() == mx::float32 && up.dtype() == mx::float32, "swiglu: float32 only");
  return mx::array(gate.shape(), mx::float32,
                   std::make_shared<SwiGLUPrimitive>(cpu_stream(), std::max(1, threads)),
                   {gate, up});
}

}  // namespace

NB_MODULE(_mlx_ext, m) {
  nb::module_::import_("mlx.core");
  m.def("ham_admit", &ham_admit, nb::arg("score"), nb::arg("tau"), nb::arg("count"),
        nb::arg("scratch"), nb::arg("cap").none());
  m.def("head_score", &head_score, nb::arg("v_hat"), nb::arg("v"), nb::arg("kind"),
        nb::arg("eps"));
  m.def("write_slot", &write_slot, nb::arg("buffer"), nb::arg("slot"), nb::arg("row"));
  m.def("ham_attend", &ham_attend, nb::arg("q"), nb::arg("keys"), nb::arg("values"),
        nb::arg("count"), nb::arg("log_scale"), nb::arg("sink"), nb::arg("gate"),
        nb::arg("norm_weight"), nb::arg("scores").none(), nb::arg("norm_eps"),
        nb::arg("bias_eps").none(), nb::arg("threads"));
  m.def("swiglu", &swiglu, nb::arg("gate"), nb::arg("up"), nb::arg("threads"));
  m.def("gdn_step", &gdn_step, nb::arg("state"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("g"), nb::arg("beta"), nb::arg("threads"));
}
