// Enough of the Metal Shading Language to run MLX-generated `metal_kernel` sources on a CPU.
//
// harness.py compiles: this prelude + the kernel source (decorations stripped) + a main() that
// calls ham::dispatch. Execution model:
//  * threadgroups run one after another, x fastest; inside one, every GPU thread is an OS thread
//    (persistent workers, re-used from group to group), so barriers and SIMD ops really block.
//    Edge threadgroups are smaller (dispatchThreads); threads_per_threadgroup is their real size.
//  * `threadgroup` variables become `static` locals of the kernel function: one copy per process,
//    and since one threadgroup runs at a time it is shared by exactly the threads of that group
//    (contents are left over from the previous group, as undefined as on a GPU). The harness
//    drops `threadgroup` from pointer/reference types (`threadgroup T* p` -> `T* p`).
//  * threadgroup_barrier / simdgroup_barrier: a std::barrier over the group's / simdgroup's
//    threads. A thread that returns leaves both (arrive_and_drop), so an early `return` of some
//    threads never blocks the others (on Metal a barrier they skip is undefined behaviour).
//  * SIMD-groups are 32 lanes: lane = thread_index_in_threadgroup % 32, group = / 32. A SIMD op
//    publishes each lane's value in a per-simdgroup scratch slot, waits on the simdgroup's
//    barrier, and every lane computes its result from the same slots, so all lanes get
//    bit-identical values. Reductions use the ascending butterfly (xor 1, 2, 4, 8, 16);
//    prefix sums add left to right. Lanes that returned are skipped, as inactive lanes on Metal.
//    All running lanes must call the same SIMD ops in the same order, as on Metal.
// Not emulated: SIMD ops in divergent branches (lanes in different branches would be mixed, not
// kept apart), vector types beyond uint2/uint3 (no float4, no swizzles), quad-group functions,
// simd_ballot, textures, Metal's fast-math contraction and approximate transcendentals (results
// match Metal to rounding, not bit for bit), concurrency between threadgroups (a race between
// groups, or a kernel that waits on another group, is not detected).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Scalar and vector types
using uint = uint32_t;
using ushort = uint16_t;
using uchar = uint8_t;
using ulong = uint64_t;
using half = _Float16;
using float16_t = _Float16;

struct uint2 {
  uint x, y;
};
struct uint3 {
  uint x, y, z;
};

// bfloat16 as Metal/MLX treat it: the upper 16 bits of a float; float -> bfloat16 rounds to
// nearest even; bf16 op bf16 (or an integer) gives bf16, bf16 op float/half gives float.
struct bfloat16_t {
  uint16_t bits;

  static constexpr uint16_t round(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  static constexpr bfloat16_t from_bits(uint16_t b) {
    bfloat16_t r;
    r.bits = b;
    return r;
  }
  bfloat16_t() = default;
  template <class T>
    requires(std::is_convertible_v<T, float> && !std::is_same_v<std::remove_cvref_t<T>, bfloat16_t>)
  constexpr bfloat16_t(T x) : bits(round(static_cast<float>(x))) {}
  constexpr operator float() const { return std::bit_cast<float>(uint32_t(bits) << 16); }
  constexpr bfloat16_t operator-() const { return from_bits(bits ^ 0x8000u); }
  constexpr bfloat16_t operator+() const { return *this; }
#define HAM_BF16_ASSIGN(op)                      \
  template <class T>                             \
  bfloat16_t& operator op##=(T y) {              \
    *this = bfloat16_t(float(*this) op float(y)); \
    return *this;                                \
  }
  HAM_BF16_ASSIGN(+)
  HAM_BF16_ASSIGN(-)
  HAM_BF16_ASSIGN(*)
  HAM_BF16_ASSIGN(/)
#undef HAM_BF16_ASSIGN
};

namespace ham {
template <class A, class B>
concept bf16_mix = (std::is_same_v<A, bfloat16_t> || std::is_same_v<B, bfloat16_t>) &&
                   std::is_convertible_v<A, float> && std::is_convertible_v<B, float>;
template <class T>
constexpr bool bf16_like = std::is_same_v<T, bfloat16_t> || std::is_integral_v<T>;
template <class A, class B>
using bf16_result = std::conditional_t<bf16_like<A> && bf16_like<B>, bfloat16_t, float>;
}  // namespace ham

#define HAM_BF16_BINOP(op)                                                 \
  template <class A, class B>                                              \
    requires ham::bf16_mix<A, B>                                           \
  constexpr ham::bf16_result<A, B> operator op(A a, B b) {                 \
    return ham::bf16_result<A, B>(float(a) op float(b));                  \
  }
HAM_BF16_BINOP(+)
HAM_BF16_BINOP(-)
HAM_BF16_BINOP(*)
HAM_BF16_BINOP(/)
#undef HAM_BF16_BINOP
#define HAM_BF16_CMP(op)                                                   \
  template <class A, class B>                                              \
    requires ham::bf16_mix<A, B>                                           \
  constexpr bool operator op(A a, B b) {                                   \
    return float(a) op float(b);                                           \
  }
HAM_BF16_CMP(==)
HAM_BF16_CMP(!=)
HAM_BF16_CMP(<)
HAM_BF16_CMP(<=)
HAM_BF16_CMP(>)
HAM_BF16_CMP(>=)
#undef HAM_BF16_CMP

// ---------------------------------------------------------------------------------------------
// The execution engine: threadgroups, simdgroups, counters.
namespace ham {

struct ThreadIds {  // the values of Metal's kernel attributes for one thread
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, dispatch_threads_per_threadgroup, threadgroups_per_grid;
  uint3 threads_per_grid, grid_size, grid_origin;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint threads_per_simdgroup, thread_execution_width, simdgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup, quadgroup_index_in_threadgroup;
  uint thread_index_in_quadgroup, quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

constexpr int kSimdWidth = 32;
constexpr int kSlotBytes = 16;  // the largest type a SIMD op can move

struct SimdGroup {
  explicit SimdGroup(std::ptrdiff_t lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  // Double-buffered slots: op number n writes buffer n % 2; a slot counts only if its stamp is n,
  // so lanes that have returned are skipped. Buffer n % 2 is rewritten by op n + 2, which no lane
  // reaches before every lane has passed the barrier of op n + 1 (and so finished reading op n).
  alignas(16) unsigned char slot[2][kSimdWidth][kSlotBytes];
  uint64_t stamp[2][kSimdWidth] = {};
};

struct Group {
  explicit Group(uint3 size) : threads(size.x * size.y * size.z), barrier(threads) {
    for (int first = 0; first < threads; first += kSimdWidth)
      simd.push_back(std::make_unique<SimdGroup>(std::min(kSimdWidth, threads - first)));
  }
  int threads;
  std::barrier<> barrier;
  std::vector<std::unique_ptr<SimdGroup>> simd;
};

struct ThreadContext {
  Group* group = nullptr;
  SimdGroup* simd = nullptr;
  int lane = 0;
  uint64_t simd_ops = 0;
};
inline thread_local ThreadContext ctx;

inline uint ceil_div(uint a, uint b) { return (a + b - 1) / b; }

// Runs fn(ThreadIds) for every thread of the grid (dispatchThreads semantics: `grid` counts
// threads; edge threadgroups are smaller, and threads_per_threadgroup reports their real size).
template <class Fn>
void dispatch(uint3 grid, uint3 tg, Fn&& fn) {
  const uint3 groups{ceil_div(grid.x, tg.x), ceil_div(grid.y, tg.y), ceil_div(grid.z, tg.z)};
  const uint64_t n_groups = uint64_t(groups.x) * groups.y * groups.z;
  const int n_workers = int(tg.x * tg.y * tg.z);
  uint64_t next_group = 0;
  uint3 pos{}, size{};
  std::unique_ptr<Group> group;
  bool done = false;
  // Runs once all workers arrive, before any is released: set up the next threadgroup.
  auto advance = [&]() noexcept {
    group.reset();
    if (next_group == n_groups) {
      done = true;
      return;
    }
    const uint64_t g = next_group++;
    pos = {uint(g % groups.x), uint(g / groups.x % groups.y), uint(g / groups.x / groups.y)};
    size = {std::min(tg.x, grid.x - pos.x * tg.x), std::min(tg.y, grid.y - pos.y * tg.y),
            std::min(tg.z, grid.z - pos.z * tg.z)};
    group = std::make_unique<Group>(size);
  };
  std::barrier step(n_workers, advance);
  auto worker = [&](int w) {
    for (;;) {
      step.arrive_and_wait();
      if (done) return;
      if (w >= group->threads) continue;
      const uint3 local{w % size.x, w / size.x % size.y, w / size.x / size.y};
      const uint n = uint(group->threads), n_tg = uint(n_workers);
      ThreadIds t;
      t.thread_position_in_threadgroup = local;
      t.threadgroup_position_in_grid = pos;
      t.thread_position_in_grid = {pos.x * tg.x + local.x, pos.y * tg.y + local.y,
                                   pos.z * tg.z + local.z};
      t.threads_per_threadgroup = size;
      t.dispatch_threads_per_threadgroup = tg;
      t.threadgroups_per_grid = groups;
      t.threads_per_grid = t.grid_size = grid;
      t.grid_origin = {0, 0, 0};
      t.thread_index_in_threadgroup = uint(w);
      t.thread_index_in_simdgroup = uint(w % kSimdWidth);
      t.simdgroup_index_in_threadgroup = uint(w / kSimdWidth);
      t.threads_per_simdgroup = t.thread_execution_width = kSimdWidth;
      t.simdgroups_per_threadgroup = ceil_div(n, kSimdWidth);
      t.dispatch_simdgroups_per_threadgroup = ceil_div(n_tg, kSimdWidth);
      t.quadgroup_index_in_threadgroup = uint(w / 4);
      t.thread_index_in_quadgroup = uint(w % 4);
      t.quadgroups_per_threadgroup = ceil_div(n, 4);
      t.dispatch_quadgroups_per_threadgroup = ceil_div(n_tg, 4);
      SimdGroup* simd = group->simd[w / kSimdWidth].get();
      ctx = ThreadContext{group.get(), simd, w % kSimdWidth, 0};
      fn(t);
      simd->barrier.arrive_and_drop();  // a finished thread no longer holds anyone up
      group->barrier.arrive_and_drop();
    }
  };
  std::vector<std::thread> workers;
  for (int w = 0; w < n_workers; ++w) workers.emplace_back(worker, w);
  for (auto& th : workers) th.join();
}

// SIMD-group exchange: publish x, wait for the simdgroup; returns the buffer/op to read.
struct Published {
  SimdGroup* s;
  int buf;
  uint64_t op;
  template <class T>
  bool get(int lane, T& out) const {
    if (lane < 0 || lane >= kSimdWidth || s->stamp[buf][lane] != op) return false;
    std::memcpy(&out, s->slot[buf][lane], sizeof(T));
    return true;
  }
};

template <class T>
Published publish(const T& x) {
  static_assert(sizeof(T) <= kSlotBytes && std::is_trivially_copyable_v<T>);
  SimdGroup* s = ctx.simd;
  const uint64_t op = ++ctx.simd_ops;
  const int buf = int(op & 1);
  std::memcpy(s->slot[buf][ctx.lane], &x, sizeof(T));
  s->stamp[buf][ctx.lane] = op;
  s->barrier.arrive_and_wait();
  return Published{s, buf, op};
}

// The ascending butterfly (xor 1, 2, 4, 8, 16) that Metal's simd reductions lower to; every lane
// computes lane 0's tree, which by commutativity equals its own. Lanes that returned are skipped.
template <class T, class Op>
T simd_reduce(T x, Op op) {
  const Published p = publish(x);
  T v[kSimdWidth];
  bool has[kSimdWidth];
  for (int l = 0; l < kSimdWidth; ++l) has[l] = p.get(l, v[l]);
  for (int m = 1; m < kSimdWidth; m *= 2) {
    for (int i = 0; i < kSimdWidth; i += 2 * m) {
      if (has[i] && has[i + m]) {
        v[i] = op(v[i], v[i + m]);
      } else if (has[i + m]) {
        v[i] = v[i + m];
        has[i] = true;
      }
    }
  }
  return v[0];
}

template <class T>
T simd_read(T x, int src) {  // value of lane src, or x if src is outside / not running
  const Published p = publish(x);
  T r = x;
  p.get(src, r);
  return r;
}

// Counters for HAM_COUNT(name): one global atomic per name, written to counters.txt by main().
struct Counters {
  std::mutex mutex;
  std::map<std::string, std::unique_ptr<std::atomic<long long>>> by_name;
};
inline Counters& counters() {
  static Counters c;
  return c;
}
inline std::atomic<long long>& counter(const char* name) {
  Counters& c = counters();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto& slot = c.by_name[name];
  if (!slot) slot = std::make_unique<std::atomic<long long>>(0);
  return *slot;
}
inline void write_counters(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return;
  for (auto& [name, value] : counters().by_name)
    std::fprintf(f, "%s %lld\n", name.c_str(), value->load());
  std::fclose(f);
}

// Buffers: files <dir>/b<i>.bin, read at start; outputs written back.
struct Buffers {
  std::string dir;
  std::vector<void*> ptr;
  std::vector<size_t> bytes;
  Buffers(std::string d, int n) : dir(std::move(d)), ptr(n, nullptr), bytes(n, 0) {
    for (int i = 0; i < n; ++i) {
      std::string path = dir + "/b" + std::to_string(i) + ".bin";
      FILE* f = std::fopen(path.c_str(), "rb");
      if (!f) {
        std::fprintf(stderr, "cannot open %s\n", path.c_str());
        std::exit(2);
      }
      std::fseek(f, 0, SEEK_END);
      bytes[i] = size_t(std::ftell(f));
      std::fseek(f, 0, SEEK_SET);
      ptr[i] = std::malloc(std::max<size_t>(bytes[i], 1));  // exact size: ASan sees overruns
      if (std::fread(ptr[i], 1, bytes[i], f) != bytes[i]) std::exit(2);
      std::fclose(f);
    }
  }
  ~Buffers() {
    for (void* p : ptr) std::free(p);
  }
  void* operator[](int i) const { return ptr[i]; }
  void write(int i) const {
    std::string path = dir + "/b" + std::to_string(i) + ".bin";
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(ptr[i], 1, bytes[i], f) != bytes[i]) std::exit(3);
    std::fclose(f);
  }
};

}  // namespace ham

// ---------------------------------------------------------------------------------------------
// namespace metal: math, limits, barriers, SIMD-group functions, atomics.
namespace metal {

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(std::numeric_limits<float>::infinity()); }
  static constexpr half quiet_NaN() { return half(std::numeric_limits<float>::quiet_NaN()); }
};
template <>
struct numeric_limits<bfloat16_t> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat16_t max() { return bfloat16_t::from_bits(0x7f7f); }
  static constexpr bfloat16_t min() { return bfloat16_t::from_bits(0x0080); }
  static constexpr bfloat16_t lowest() { return bfloat16_t::from_bits(0xff7f); }
  static constexpr bfloat16_t epsilon() { return bfloat16_t::from_bits(0x3c00); }
  static constexpr bfloat16_t infinity() { return bfloat16_t::from_bits(0x7f80); }
  static constexpr bfloat16_t quiet_NaN() { return bfloat16_t::from_bits(0x7fc0); }
};

template <class T, class S>
T as_type(S x) {
  static_assert(sizeof(T) == sizeof(S));
  return std::bit_cast<T>(x);
}

namespace math {  // also reachable as metal::fast:: and metal::precise::
#define HAM_MATH1(name, expr)                                                          \
  inline float name(float x) { return expr; }                                          \
  inline half name(half x) { return half(name(float(x))); }                            \
  inline bfloat16_t name(bfloat16_t x) { return bfloat16_t(name(float(x))); }
HAM_MATH1(exp, std::exp(x))
HAM_MATH1(exp2, std::exp2(x))
HAM_MATH1(exp10, std::pow(10.0f, x))
HAM_MATH1(log, std::log(x))
HAM_MATH1(log2, std::log2(x))
HAM_MATH1(log10, std::log10(x))
HAM_MATH1(sqrt, std::sqrt(x))
HAM_MATH1(rsqrt, 1.0f / std::sqrt(x))
HAM_MATH1(sin, std::sin(x))
HAM_MATH1(cos, std::cos(x))
HAM_MATH1(tan, std::tan(x))
HAM_MATH1(tanh, std::tanh(x))
HAM_MATH1(atan, std::atan(x))
HAM_MATH1(floor, std::floor(x))
HAM_MATH1(ceil, std::ceil(x))
HAM_MATH1(round, std::round(x))
HAM_MATH1(rint, std::rint(x))
HAM_MATH1(trunc, std::trunc(x))
HAM_MATH1(fabs, std::fabs(x))
HAM_MATH1(abs, std::fabs(x))
HAM_MATH1(fract, x - std::floor(x))
HAM_MATH1(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x)))
#undef HAM_MATH1
#define HAM_MATH2(name, expr)                                                            \
  inline float name(float x, float y) { return expr; }                                   \
  inline half name(half x, half y) { return half(name(float(x), float(y))); }           \
  inline bfloat16_t name(bfloat16_t x, bfloat16_t y) {                                   \
    return bfloat16_t(name(float(x), float(y)));                                         \
  }
HAM_MATH2(max, std::fmax(x, y))  // Metal: a NaN argument yields the other one
HAM_MATH2(min, std::fmin(x, y))
HAM_MATH2(fmax, std::fmax(x, y))
HAM_MATH2(fmin, std::fmin(x, y))
HAM_MATH2(pow, std::pow(x, y))
HAM_MATH2(powr, std::pow(x, y))
HAM_MATH2(atan2, std::atan2(x, y))
HAM_MATH2(fmod, std::fmod(x, y))
HAM_MATH2(copysign, std::copysign(x, y))
HAM_MATH2(divide, x / y)
#undef HAM_MATH2
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline half fma(half a, half b, half c) { return half(std::fma(float(a), float(b), float(c))); }
template <class T>
  requires std::is_integral_v<T>
T abs(T x) {
  if constexpr (std::is_unsigned_v<T>) return x;
  else return x < 0 ? T(-x) : x;
}
template <class T>
  requires std::is_integral_v<T>
T max(T a, T b) { return a < b ? b : a; }
template <class T>
  requires std::is_integral_v<T>
T min(T a, T b) { return b < a ? b : a; }
template <class T>
T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
template <class T>
T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T>
T select(T a, T b, bool c) { return c ? b : a; }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
inline bool isfinite(float x) { return std::isfinite(x); }
inline bool signbit(float x) { return std::signbit(x); }
#define HAM_CLASSIFY(name) \
  inline bool name(half x) { return name(float(x)); } \
  inline bool name(bfloat16_t x) { return name(float(x)); }
HAM_CLASSIFY(isnan)
HAM_CLASSIFY(isinf)
HAM_CLASSIFY(isfinite)
HAM_CLASSIFY(signbit)
#undef HAM_CLASSIFY
}  // namespace math
using namespace math;
namespace fast {
using namespace math;
}
namespace precise {
using namespace math;
}

// Barriers. mem_flags only order memory on a GPU; std::barrier orders everything here.
enum mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void threadgroup_barrier(mem_flags = mem_none) { ham::ctx.group->barrier.arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags = mem_none) { ham::ctx.simd->barrier.arrive_and_wait(); }

// SIMD-group functions over 32-lane simdgroups.
template <class T>
T simd_sum(T x) { return ham::simd_reduce(x, [](T a, T b) { return T(a + b); }); }
template <class T>
T simd_product(T x) { return ham::simd_reduce(x, [](T a, T b) { return T(a * b); }); }
template <class T>
T simd_max(T x) { return ham::simd_reduce(x, [](T a, T b) { return T(max(a, b)); }); }
template <class T>
T simd_min(T x) { return ham::simd_reduce(x, [](T a, T b) { return T(min(a, b)); }); }
template <class T>
T simd_and(T x) { return ham::simd_reduce(x, [](T a, T b) { return T(a & b); }); }
template <class T>
T simd_or(T x) { return ham::simd_reduce(x, [](T a, T b) { return T(a | b); }); }
template <class T>
T simd_xor(T x) { return ham::simd_reduce(x, [](T a, T b) { return T(a ^ b); }); }
inline bool simd_all(bool x) { return ham::simd_reduce(x, [](bool a, bool b) { return a && b; }); }
inline bool simd_any(bool x) { return ham::simd_reduce(x, [](bool a, bool b) { return a || b; }); }

template <class T>
T simd_prefix_sum(T x, bool inclusive) {  // left to right over the running lanes below
  const ham::Published p = ham::publish(x);
  T acc = T(0), v;
  for (int l = 0; l < ham::ctx.lane + int(inclusive); ++l)
    if (p.get(l, v)) acc = T(acc + v);
  return acc;
}
template <class T>
T simd_prefix_exclusive_sum(T x) { return simd_prefix_sum(x, false); }
template <class T>
T simd_prefix_inclusive_sum(T x) { return simd_prefix_sum(x, true); }

template <class T>
T simd_broadcast(T x, ushort lane) { return ham::simd_read(x, lane); }
template <class T>
T simd_shuffle(T x, ushort lane) { return ham::simd_read(x, lane); }
template <class T>
T simd_shuffle_down(T x, ushort delta) { return ham::simd_read(x, ham::ctx.lane + delta); }
template <class T>
T simd_shuffle_up(T x, ushort delta) { return ham::simd_read(x, ham::ctx.lane - int(delta)); }
template <class T>
T simd_shuffle_xor(T x, ushort mask) { return ham::simd_read(x, ham::ctx.lane ^ mask); }
template <class T>
T simd_shuffle_rotate_down(T x, ushort delta) {
  return ham::simd_read(x, (ham::ctx.lane + delta) % ham::kSimdWidth);
}
template <class T>
T simd_broadcast_first(T x) {
  const ham::Published p = ham::publish(x);
  T v = x;
  for (int l = 0; l < ham::kSimdWidth; ++l)
    if (p.get(l, v)) break;
  return v;
}

// Atomics (MLX's atomic_outputs=True gives `device atomic<T>*`). Only relaxed order on Metal.
// A struct of its own (same layout as T), so that argument-dependent lookup stays out of std.
template <class T>
struct atomic {
  std::atomic<T> value;
};
static_assert(sizeof(atomic<float>) == sizeof(float) && sizeof(atomic<int>) == sizeof(int));
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_float = atomic<float>;
using std::memory_order;
using std::memory_order_relaxed;
template <class T>
T atomic_load_explicit(const atomic<T>* a, memory_order o) { return a->value.load(o); }
template <class T, class U>
void atomic_store_explicit(atomic<T>* a, U v, memory_order o) { a->value.store(T(v), o); }
template <class T, class U>
T atomic_exchange_explicit(atomic<T>* a, U v, memory_order o) { return a->value.exchange(T(v), o); }
template <class T, class U>
bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U v, memory_order o,
                                           memory_order) {
  return a->value.compare_exchange_weak(*expected, T(v), o);
}
#define HAM_ATOMIC_FETCH(name, expr)                                           \
  template <class T, class U>                                                  \
  T atomic_fetch_##name##_explicit(atomic<T>* a, U v, memory_order) {          \
    T old = a->value.load(std::memory_order_relaxed);                          \
    const T y = T(v);                                                          \
    while (!a->value.compare_exchange_weak(old, T(expr), std::memory_order_relaxed)) { \
    }                                                                          \
    return old;                                                                \
  }
HAM_ATOMIC_FETCH(add, old + y)
HAM_ATOMIC_FETCH(sub, old - y)
HAM_ATOMIC_FETCH(and, old & y)
HAM_ATOMIC_FETCH(or, old | y)
HAM_ATOMIC_FETCH(xor, old ^ y)
HAM_ATOMIC_FETCH(max, (old < y ? y : old))
HAM_ATOMIC_FETCH(min, (y < old ? y : old))
#undef HAM_ATOMIC_FETCH

// MLX's utils.h (prepended to every custom kernel on Metal) also offers this.
template <class IdxT = int64_t>
IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

}  // namespace metal

using namespace metal;

// MLX's Limits<T> (utils.h): floats reach +-inf, integers their numeric limits.
template <class T>
struct Limits {
  static constexpr T max = metal::numeric_limits<T>::max();
  static constexpr T min = metal::numeric_limits<T>::min();
  static constexpr T finite_max = max;
  static constexpr T finite_min = min;
};
#define HAM_FLOAT_LIMITS(T)                                                \
  template <>                                                              \
  struct Limits<T> {                                                       \
    static constexpr T max = metal::numeric_limits<T>::infinity();         \
    static constexpr T min = -metal::numeric_limits<T>::infinity();        \
    static constexpr T finite_max = metal::numeric_limits<T>::max();       \
    static constexpr T finite_min = -metal::numeric_limits<T>::max();      \
  };
HAM_FLOAT_LIMITS(float)
HAM_FLOAT_LIMITS(half)
HAM_FLOAT_LIMITS(bfloat16_t)
#undef HAM_FLOAT_LIMITS

// ---------------------------------------------------------------------------------------------
// The counter hook (our Metal/CUDA headers define it to nothing when it is not defined here).
#define HAM_COUNT(name)                                                      \
  ((void)[]()->std::atomic<long long>& {                                     \
    static std::atomic<long long>& c = ::ham::counter(#name);                \
    return c;                                                                \
  }()                                                                        \
               .fetch_add(1, std::memory_order_relaxed))

// Address spaces: `threadgroup` declarations become statics (see the top of this file); the
// harness removes `threadgroup` from pointer and reference types before compiling.
#define METAL_FUNC inline
#define device
#define constant
#define thread
#define threadgroup static
