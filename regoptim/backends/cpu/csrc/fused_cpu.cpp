// regoptim fused CPU kernel: one pass over all tensors of a (dtype) group for ProxSGD and
// ProxAdam(W), every regularizer included.
//
// No torch headers: this file is compiled at first use by regoptim/backends/cpu/kernel.py (a few seconds)
// and cached on disk; the entry points take int64 tables of data pointers and numels for the
// whole group, and every hyperparameter as a runtime scalar (a new lr, weight decay or l1 never
// rebuilds anything).
//
// Numerics. Storage is float32, bfloat16 or float16; the math is float32. Scalars are rounded to
// float exactly where torch's fused CPU kernels round them (aten/src/ATen/native/cpu/
// FusedSGDKernel.cpp, FusedAdamKernel.cpp), and FMAs are written out explicitly (std::fma) where
// torch's compiled kernels have them -- in its vector loops, and, contracted differently, in its
// scalar tails (the last numel % vector-width elements of each tensor) -- so that with the
// regularizers torch also has (coupled L2, no L1) the float32 result is bitwise torch's. Which
// build of torch's kernel runs depends on the CPU capability torch dispatches to: the caller
// passes its vector width (tail_width) and, for a build without FMA (x86 DEFAULT), kNoFma, which
// turns every explicit FMA into a*b + c with two roundings (regoptim/backends/cpu/capability.py). The file must be compiled with -ffp-contract=off (no implicit FMA) and
// without -ffast-math; -fno-math-errno / -fno-trapping-math change no result.
//
// Work split: the elements of all tensors are laid end to end and cut into one contiguous range
// per thread (cache-line aligned), so 1024 small tensors cost the same as 4 big ones.
//
// Group lasso (regoptim_sgd_group / regoptim_adam_group): the same spans, driven over blocks of
// groups and followed by the group prox while the block is in cache (group_blocks.h,
// group_lasso.h).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define REGOPTIM_ABI_VERSION 4

// Adam's element function is called from two loops when it also sums moments (MOM): inlined in
// both, so that the vector one vectorizes (GCC keeps a call otherwise, for bfloat16 / float16).
#if defined(__GNUC__)
#define REGOPTIM_ALWAYS_INLINE __attribute__((always_inline))
#else
#define REGOPTIM_ALWAYS_INLINE
#endif
// Element loops are vectorized explicitly (the selects on runtime flags become blends).
#if defined(_OPENMP) || defined(REGOPTIM_OPENMP_SIMD)
#define REGOPTIM_SIMD _Pragma("omp simd")
#define REGOPTIM_SIMD_SUM _Pragma("omp simd reduction(+ : norm)")
#else
#define REGOPTIM_SIMD
#define REGOPTIM_SIMD_SUM
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Storage types: load to float, store from float.

struct F32 {
  using T = float;
  static inline float ld(T x) { return x; }
  static inline T st(float x) { return x; }
};

// bfloat16: the top half of a float32. Round to nearest even, NaN -> canonical quiet NaN, as
// c10::BFloat16's round_to_nearest_even.
struct BF16 {
  using T = uint16_t;
  static inline float ld(T x) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline T st(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? static_cast<T>(0x7FC0u) : static_cast<T>(r);
  }
};

// float16 (IEEE binary16). The compiler's _Float16 when it has one (hardware F16C conversions on
// x86), else bit manipulation; both round to nearest even.
#if defined(__FLT16_MANT_DIG__) && !defined(REGOPTIM_SOFT_FP16)
struct F16 {
  using T = uint16_t;
  static inline float ld(T x) {
    _Float16 h;
    std::memcpy(&h, &x, 2);
    return static_cast<float>(h);
  }
  static inline T st(float f) {
    _Float16 h = static_cast<_Float16>(f);
    T x;
    std::memcpy(&x, &h, 2);
    return x;
  }
};
#else
struct F16 {
  using T = uint16_t;
  static inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  }
  static inline float ld(T h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t o = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent + mantissa
    const uint32_t exp = o & (0x7C00u << 13);
    o += (127u - 15u) << 23;  // rebias
    float f;
    if (exp == (0x7C00u << 13)) {
      f = bits_to_float(o + ((128u - 16u) << 23));  // Inf / NaN
    } else if (exp == 0) {
      f = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);  // zero / subnormal
    } else {
      f = bits_to_float(o);
    }
    return bits_to_float(float_to_bits(f) | sign);
  }
  static inline T st(float ff) {
    uint32_t f = float_to_bits(ff);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint32_t o;
    if (f >= ((127u + 16u) << 23)) {  // overflow, Inf or NaN
      o = f > (255u << 23) ? 0x7E00u : 0x7C00u;
    } else if (f < (113u << 23)) {  // subnormal or zero: let the FPU round
      const float denorm_magic = bits_to_float(((127u - 15u) + (23u - 10u) + 1u) << 23);
      o = float_to_bits(bits_to_float(f) + denorm_magic) - float_to_bits(denorm_magic);
    } else {
      const uint32_t mant_odd = (f >> 13) & 1u;
      f += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu;
      f += mant_odd;
      o = f >> 13;
    }
    return static_cast<T>(o | (sign >> 16));
  }
};
#endif

// ---------------------------------------------------------------------------------------------
// Flags shared with regoptim/backends/cpu/kernel.py (keep in sync).

enum : int {
  kMaximize = 1,
  kHasScale = 2,    // divide grads by grad_scale and write the unscaled grads back (as torch)
  kCoupledWd = 4,   // g += wd * p
  kL1 = 8,          // soft-threshold after the step
  kMomentum = 16,   // SGD: momentum buffers given
  kFirstStep = 32,  // SGD: b <- g
  kNesterov = 64,   // SGD
  kAmsgrad = 128,   // Adam
  kNoFma = 256,     // torch's kernels were built without FMA (x86 DEFAULT): a*b+c, two roundings
};

enum : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Propagating max (NaN wins), as at::vec::maximum.
inline float max_nan(float a, float b) {
  float m = a > b ? a : b;
  return (a != a || b != b) ? a + b : m;
}

// mask ? a : b for an all-ones / all-zeros mask, as bit operations (vectorizes as a blend).
inline float select(uint32_t mask, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  const uint32_t r = (ua & mask) | (ub & ~mask);
  float f;
  std::memcpy(&f, &r, 4);
  return f;
}

// A flag is compiled in (kOn / kOff: the unused branch is dead code) or read at run time
// (kRuntime: both branches computed, then blended). The common flag combinations get a lean
// kernel; every other combination, and torch's scalar tails, run the all-runtime kernel.
enum : int { kOff = 0, kOn = 1, kRuntime = 2 };

template <int F>
inline float pick(uint32_t mask, float on, float off) {
  if constexpr (F == kOn) return on;
  else if constexpr (F == kOff) return off;
  else return select(mask, on, off);
}

// x - clamp(x, -t, t): exact zeros where |x| <= t, one rounding of x -/+ t elsewhere, NaN stays.
inline float soft_threshold(float x, float t) {
  float c = x < -t ? -t : (x > t ? t : x);
  return x - c;
}

// a*b + c as torch's kernel computes it: one rounding (an FMA) where its build has FMA, two
// roundings where it has none (x86 DEFAULT, no -mfma). FM is kOn (FMA), kOff (no FMA) or kRuntime
// (fma_mask: all-ones for FMA). -ffp-contract=off keeps a*b+c uncontracted.
template <int FM>
inline float madd(uint32_t fma_mask, float a, float b, float c) {
  if constexpr (FM == kOn) return std::fma(a, b, c);
  else if constexpr (FM == kOff) return a * b + c;
  else return select(fma_mask, std::fma(a, b, c), a * b + c);
}

// ---------------------------------------------------------------------------------------------
// SGD

struct SgdScalars {
  float sign;       // -1 if maximize
  float scale;      // grad_scale
  float wd;         // coupled L2
  float mu;         // momentum
  float damp1;      // 1 - dampening
  float decay;      // 1 - lr * wd (decoupled) or 1
  float neg_lr;     // -lr
  float l1_t;       // lr * l1
  uint32_t max_mask, wd_mask, first_mask, nesterov_mask, l1_mask, fma_mask;  // all-ones where set
};

// TAIL: on the last numel % (torch's vector width) elements of a tensor torch's kernel runs its
// scalar loop, where the compiler contracted the momentum update the other way round:
// fma(b, mu, g * (1 - dampening)) instead of fma(1 - dampening, g, b * mu).
// NORM: also add the sum of squares of the stored results to *norm_out (the group-lasso step's
// per-group norms, regoptim/backends/cpu/csrc/group_blocks.h; in double, free in this memory-bound loop); the
// update itself is the same.
template <class S, bool SCALE, bool MOM, int MAX, int WD, int FIRST, int NEST, int L1, int TAIL,
          int FM, bool NORM = false>
void sgd_span(typename S::T* __restrict p, typename S::T* __restrict g,
              typename S::T* __restrict b, int64_t n, const SgdScalars& sc,
              uint32_t tail_mask, double* __restrict norm_out = nullptr) {
  const float sign = sc.sign, scale = sc.scale, wd = sc.wd, mu = sc.mu, damp1 = sc.damp1,
              decay = sc.decay, neg_lr = sc.neg_lr, t = sc.l1_t;
  const uint32_t max_mask = sc.max_mask, wd_mask = sc.wd_mask, first_mask = sc.first_mask,
                 nesterov_mask = sc.nesterov_mask, l1_mask = sc.l1_mask, fm = sc.fma_mask;
  // one element; returns the stored parameter
  const auto elem = [&](int64_t i) {
    float gv = S::ld(g[i]);
    if (SCALE) {
      gv = gv / scale;
      g[i] = S::st(gv);
    }
    gv = pick<MAX>(max_mask, gv * sign, gv);
    float pv = S::ld(p[i]);
    gv = pick<WD>(wd_mask, madd<FM>(fm, pv, wd, gv), gv);
    if (MOM) {
      float bv = gv;
      if constexpr (FIRST != kOn) {
        const float bo = S::ld(b[i]);
        const float body = madd<FM>(fm, damp1, gv, bo * mu);
        const float tail = pick<TAIL>(tail_mask, madd<FM>(fm, bo, mu, gv * damp1), body);
        bv = pick<FIRST>(first_mask, gv, tail);
      }
      b[i] = S::st(bv);
      gv = pick<NEST>(nesterov_mask, madd<FM>(fm, bv, mu, gv), bv);
    }
    pv = pv * decay;
    pv = madd<FM>(fm, gv, neg_lr, pv);
    pv = pick<L1>(l1_mask, soft_threshold(pv, t), pv);
    const typename S::T stored = S::st(pv);
    p[i] = stored;
    return stored;
  };
  if constexpr (NORM) {
    double norm = 0.0;
    REGOPTIM_SIMD_SUM
    for (int64_t i = 0; i < n; ++i) {
      const float x = S::ld(elem(i));
      norm += static_cast<double>(x * x);
    }
    *norm_out += norm;
  } else {
    REGOPTIM_SIMD
    for (int64_t i = 0; i < n; ++i) elem(i);
  }
}

// ---------------------------------------------------------------------------------------------
// Adam / AdamW

struct AdamScalars {
  float sign, scale, wd, decay;
  float lerp_w;         // (1 - beta1), or (1 - beta1) - 1 when |1 - beta1| >= 0.5 (torch's lerp)
  uint32_t small_mask;  // all-ones when |1 - beta1| < 0.5
  uint32_t max_mask, wd_mask;
  float beta2, c2;      // beta2, 1 - beta2
  float eps;
  float lr_l1;          // lr * l1
  uint32_t fma_mask;    // all-ones unless kNoFma
};

// TAIL as for SGD: torch's scalar loop contracts v * beta2 + (1 - beta2) * g * g as
// fma(v, beta2, ...) where its vector loop has fma(..., g, v * beta2).
// DEN: the group-lasso step (regoptim/backends/cpu/csrc/group_lasso.h): also write each element's
// inverse denominator t = 1 / d, d = sqrt(v) * (1 / sqrt(bc2)) + eps (the prox's metric), to
// `den_out`, and take the step as (-step_size * m) * t: one division per element, as the L1
// step (torch has no group lasso to match; torch's form, used otherwise, has two).
// MOM (with DEN): also add the group prox's float moments of the results z (before their rounding
// to T: for bfloat16 / float16 their relative error 2^-8 / 2^-11 reaches x scaled by e <= 2^-8,
// far below T's own rounding) and their t,
// per segment (a group's run), to mom_out->out: [0] sum z^2, [1] sum z^2 t, [2] sum z^2 t^2, and
// [3] max t, 4 floats per segment (group_lasso.h's polynomial path; free in this memory-bound
// loop). The n elements start `phase` elements into a segment of `seg`. Summed in 16 float lanes
// (segments of at most kMomentsChunk elements: 64 deep), then pairwise; the path uses them only
// for rho, whose error reaches x scaled by e <= 2^-8.
struct MomentsOut {
  float* out;
  int64_t seg, phase;
};
// Lanes [0, W) of three sums += lanes [W, 2W), of a max <- the max: one pairwise step.
template <int W>
inline void fold_moments(float (&a)[4][16]) {
  REGOPTIM_SIMD
  for (int j = 0; j < W; ++j) {
    a[0][j] += a[0][j + W];
    a[1][j] += a[1][j + W];
    a[2][j] += a[2][j + W];
    a[3][j] = a[3][j + W] > a[3][j] ? a[3][j + W] : a[3][j];
  }
}

template <class S, bool SCALE, bool AMS, bool L1, int MAX, int WD, int SMALL, int TAIL, int FM,
          bool DEN = false, bool MOM = false>
void adam_span(typename S::T* __restrict p, typename S::T* __restrict g,
               typename S::T* __restrict m, typename S::T* __restrict v,
               typename S::T* __restrict vmax, int64_t n, const AdamScalars& sc,
               float neg_step_size, float bc2_sqrt, float inv_bc2_sqrt, uint32_t tail_mask,
               float* __restrict den_out = nullptr, const MomentsOut* mom_out = nullptr) {
  const float sign = sc.sign, scale = sc.scale, wd = sc.wd, decay = sc.decay, lw = sc.lerp_w,
              beta2 = sc.beta2, c2 = sc.c2, eps = sc.eps, lr_l1 = sc.lr_l1;
  const uint32_t small_mask = sc.small_mask, max_mask = sc.max_mask, wd_mask = sc.wd_mask,
                 fm = sc.fma_mask;
  // one element; returns the new parameter before its rounding to T, its t in t_out (DEN)
  const auto elem = [&](int64_t i, float& t_out) REGOPTIM_ALWAYS_INLINE {
    float gv = S::ld(g[i]);
    if (SCALE) {
      gv = gv / scale;
      g[i] = S::st(gv);
    }
    gv = pick<MAX>(max_mask, gv * sign, gv);
    float pv = S::ld(p[i]);
    gv = pick<WD>(wd_mask, madd<FM>(fm, pv, wd, gv), gv);
    pv = pv * decay;
    float mv = S::ld(m[i]);
    mv = madd<FM>(fm, lw, gv - mv, pick<SMALL>(small_mask, mv, gv));
    const float vo = S::ld(v[i]);
    const float c2g = c2 * gv;
    const float body = madd<FM>(fm, c2g, gv, vo * beta2);
    float vv = pick<TAIL>(tail_mask, madd<FM>(fm, vo, beta2, c2g * gv), body);
    m[i] = S::st(mv);
    v[i] = S::st(vv);
    if (AMS) {
      vv = max_nan(S::ld(vmax[i]), vv);
      vmax[i] = S::st(vv);
    }
    if (L1 || DEN) {
      // One division for the step and the threshold, sqrt(v) * (1 / sqrt(bc2)) instead of a
      // second one: the divider is the bottleneck of this loop. The step may differ by an ulp
      // or two from torch's (-lr/bc1 * m) / (sqrt(v) / sqrt(bc2) + eps) (torch has no L1).
      const float den = std::fma(std::sqrt(vv), inv_bc2_sqrt, eps);
      const float inv = 1.0f / den;
      if (DEN) den_out[i] = inv;
      t_out = inv;
      pv = pv + (neg_step_size * mv) * inv;
      if (L1) pv = soft_threshold(pv, lr_l1 * inv);
    } else {
      const float den = std::sqrt(vv) / bc2_sqrt + eps;
      pv = pv + (neg_step_size * mv) / den;
    }
    p[i] = S::st(pv);
    return pv;
  };
  if constexpr (MOM) {
    float* o = mom_out->out;
    int64_t i = 0;
    for (int64_t end = std::min(n, mom_out->seg - mom_out->phase); i < n;
         end = std::min(n, end + mom_out->seg), o += 4) {
      // 16 float lanes (explicit: omp's max reduction does not vectorize), then folded
      float a[4][16] = {};
      for (; i + 16 <= end; i += 16) {
        REGOPTIM_SIMD
        for (int j = 0; j < 16; ++j) {
          float t;
          const float z = elem(i + j, t);
          const float q = z * z, qt = q * t;
          a[0][j] += q;
          a[1][j] += qt;
          a[2][j] += qt * t;
          a[3][j] = t > a[3][j] ? t : a[3][j];
        }
      }
      for (; i < end; ++i) {
        float t;
        const float z = elem(i, t);
        const float q = z * z, qt = q * t;
        a[0][0] += q;
        a[1][0] += qt;
        a[2][0] += qt * t;
        a[3][0] = t > a[3][0] ? t : a[3][0];
      }
      fold_moments<8>(a);
      fold_moments<4>(a);
      fold_moments<2>(a);
      fold_moments<1>(a);
      o[0] += a[0][0];
      o[1] += a[1][0];
      o[2] += a[2][0];
      o[3] = a[3][0] > o[3] ? a[3][0] : o[3];
    }
  } else {
    REGOPTIM_SIMD
    for (int64_t i = 0; i < n; ++i) {
      float t;
      elem(i, t);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Parallel driver: split sum(numels) into one contiguous range per thread.

constexpr int64_t kAlign = 16;           // elements; a cache line of float32
constexpr int64_t kMinPerThread = 1 << 15;

// Calls fn(k, offset, length, tail_mask) over this thread's share of the elements; a range is
// split where torch's scalar tail of tensor k starts (numel - numel % tail_width).
template <class F>
void for_each_range(int64_t ntensors, const int64_t* numels, int nthreads, int64_t tail_width,
                    F&& fn) {
  std::vector<int64_t> offs(static_cast<size_t>(ntensors) + 1, 0);
  for (int64_t k = 0; k < ntensors; ++k) offs[k + 1] = offs[k] + numels[k];
  const int64_t total = offs[ntensors];
  if (total == 0) return;
  int64_t nt = nthreads < 1 ? 1 : nthreads;
  if (nt > 1 && total / nt < kMinPerThread) nt = total / kMinPerThread > 1 ? total / kMinPerThread : 1;

  auto work = [&](int64_t tid, int64_t nthr) {
    int64_t begin = (total * tid / nthr) / kAlign * kAlign;
    int64_t end = tid == nthr - 1 ? total : (total * (tid + 1) / nthr) / kAlign * kAlign;
    if (begin >= end) return;
    // first tensor whose range ends after `begin`
    int64_t lo = 0, hi = ntensors;
    while (lo < hi) {
      int64_t mid = (lo + hi) / 2;
      if (offs[mid + 1] <= begin) lo = mid + 1; else hi = mid;
    }
    for (int64_t k = lo; k < ntensors && offs[k] < end; ++k) {
      const int64_t a = (begin > offs[k] ? begin : offs[k]) - offs[k];
      const int64_t z = (end < offs[k + 1] ? end : offs[k + 1]) - offs[k];
      if (z <= a) continue;
      const int64_t ts = tail_width > 0 ? numels[k] - numels[k] % tail_width : numels[k];
      if (a < ts) fn(k, a, (z < ts ? z : ts) - a, 0u);
      if (z > ts) fn(k, a > ts ? a : ts, z - (a > ts ? a : ts), 0xFFFFFFFFu);
    }
  };

#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(static_cast<int>(nt))
    work(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  work(0, 1);
}

template <class T>
inline T* ptr(const int64_t* table, int64_t k) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[k]));
}

// Runs `lean` on the body of each tensor and `generic` (all flags at run time) on torch's scalar
// tails; both are called as f(k, offset, length, tail_mask).
template <class Lean, class Generic>
void run_split(int64_t n, const int64_t* numels, int nthreads, int64_t tail_width,
               const Lean& lean, const Generic& generic) {
  for_each_range(n, numels, nthreads, tail_width,
                 [&](int64_t k, int64_t off, int64_t len, uint32_t tail) {
                   if (tail) generic(k, off, len, tail);
                   else lean(k, off, len, tail);
                 });
}

// A family's update with its flags picked, handed to a driver as two span functions: `lean`
// (flags compiled in) for the body of each tensor, `generic` (every flag at run time) for torch's
// scalar tails, called as f(k, offset, length, tail_mask) (Adam: plus a `float* den` output, the
// inverse denominators, used when DEN). `drive(lean, generic)` decides which elements they run on: all of them in one pass
// (run_split, the plain step), or blocks of groups followed by the group prox (group_lasso.h).
template <class S, bool SCALE, bool MOM, int MAX, int WD, int FIRST, int NEST, int L1, int FM,
          class Drive>
void sgd_run(const int64_t* ps, const int64_t* gs, const int64_t* bs, const SgdScalars& sc,
             const Drive& drive) {
  using T = typename S::T;
  auto kernel = [&](auto lean_tag) {
    constexpr bool lean = decltype(lean_tag)::value;
    return [&](int64_t k, int64_t off, int64_t len, uint32_t tail, double* norm) {
      T* b = MOM ? ptr<T>(bs, k) + off : nullptr;
      T* p = ptr<T>(ps, k) + off;
      T* g = ptr<T>(gs, k) + off;
      constexpr int R = kRuntime;
      if constexpr (lean) {
        if (norm) sgd_span<S, SCALE, MOM, MAX, WD, FIRST, NEST, L1, kOff, FM, true>(p, g, b, len, sc, tail, norm);
        else sgd_span<S, SCALE, MOM, MAX, WD, FIRST, NEST, L1, kOff, FM>(p, g, b, len, sc, tail);
      } else {
        if (norm) sgd_span<S, SCALE, MOM, R, R, R, R, R, R, R, true>(p, g, b, len, sc, tail, norm);
        else sgd_span<S, SCALE, MOM, R, R, R, R, R, R, R>(p, g, b, len, sc, tail);
      }
    };
  };
  drive(kernel(std::true_type{}), kernel(std::false_type{}));
}

template <class S, bool DEN, bool SCALE, bool AMS, bool L1, int MAX, int WD, int SMALL, int FM,
          class Drive>
void adam_run(int64_t n, const int64_t* ps, const int64_t* gs, const int64_t* ms,
              const int64_t* vs, const int64_t* vmaxs, const float* neg_ss, const float* bc2s,
              const AdamScalars& sc, const Drive& drive) {
  const float* ibc2s = bc2s + n;  // 1 / sqrt(bc2), stored after sqrt(bc2)
  using T = typename S::T;
  auto kernel = [&](auto lean_tag) {
    constexpr bool lean = decltype(lean_tag)::value;
    return [&](int64_t k, int64_t off, int64_t len, uint32_t tail, float* den,
               const MomentsOut* mom = nullptr) {
      T* vm = AMS ? ptr<T>(vmaxs, k) + off : nullptr;
      constexpr int R = kRuntime;
      T *p = ptr<T>(ps, k) + off, *g = ptr<T>(gs, k) + off;
      T *m = ptr<T>(ms, k) + off, *v = ptr<T>(vs, k) + off;
      const float a = neg_ss[k], b = bc2s[k], ib = ibc2s[k];
      if constexpr (lean) {
        if (DEN && mom) {
          adam_span<S, SCALE, AMS, L1, MAX, WD, SMALL, kOff, FM, DEN, DEN>(
              p, g, m, v, vm, len, sc, a, b, ib, tail, den, mom);
        } else {
          adam_span<S, SCALE, AMS, L1, MAX, WD, SMALL, kOff, FM, DEN>(p, g, m, v, vm, len, sc, a,
                                                                     b, ib, tail, den);
        }
      } else {
        if (DEN && mom) {
          adam_span<S, SCALE, AMS, L1, R, R, R, R, R, DEN, DEN>(p, g, m, v, vm, len, sc, a, b, ib,
                                                                tail, den, mom);
        } else {
          adam_span<S, SCALE, AMS, L1, R, R, R, R, R, DEN>(p, g, m, v, vm, len, sc, a, b, ib, tail,
                                                           den);
        }
      }
    };
  };
  drive(kernel(std::true_type{}), kernel(std::false_type{}));
}

// Flag dispatch. Template parameters for what changes the memory touched (grad write-back,
// momentum / max buffers) or adds real work (Adam's prox division). Lean kernels (flags
// compiled in) for the common cases: float32 / bfloat16, no maximize, no grad scale, and for
// SGD not the first step and no Nesterov; everything else runs with flags as run-time masks.
template <class S, class Drive>
void sgd_dispatch(int flags, const int64_t* ps, const int64_t* gs, const int64_t* bs,
                  const SgdScalars& sc, const Drive& drive) {
  constexpr int R = kRuntime;
  const bool scale = (flags & kHasScale) != 0, mom = (flags & kMomentum) != 0;
  const bool lean = !std::is_same<S, F16>::value &&
                    !(flags & (kHasScale | kMaximize | kFirstStep | kNesterov | kNoFma));
  if (lean) {
    const int key = (mom ? 4 : 0) | ((flags & kCoupledWd) ? 2 : 0) | ((flags & kL1) ? 1 : 0);
#define REGOPTIM_SGD_LEAN(K)                                                                   \
  case K:                                                                                      \
    sgd_run<S, false, (K & 4) != 0, kOff, (K & 2) ? kOn : kOff, kOff, kOff, (K & 1) ? kOn : kOff, kOn>( \
        ps, gs, bs, sc, drive);                                                                \
    return;
    switch (key) {
      REGOPTIM_SGD_LEAN(0) REGOPTIM_SGD_LEAN(1) REGOPTIM_SGD_LEAN(2) REGOPTIM_SGD_LEAN(3)
      REGOPTIM_SGD_LEAN(4) REGOPTIM_SGD_LEAN(5) REGOPTIM_SGD_LEAN(6) REGOPTIM_SGD_LEAN(7)
      default: break;
    }
#undef REGOPTIM_SGD_LEAN
  }
  if (scale && mom) sgd_run<S, true, true, R, R, R, R, R, R>(ps, gs, bs, sc, drive);
  else if (scale) sgd_run<S, true, false, R, R, R, R, R, R>(ps, gs, bs, sc, drive);
  else if (mom) sgd_run<S, false, true, R, R, R, R, R, R>(ps, gs, bs, sc, drive);
  else sgd_run<S, false, false, R, R, R, R, R, R>(ps, gs, bs, sc, drive);
}

template <class S, bool DEN, class Drive>
void adam_dispatch(int flags, int64_t n, const int64_t* ps, const int64_t* gs,
                   const int64_t* ms, const int64_t* vs, const int64_t* vmaxs, const float* nss,
                   const float* b2s, const AdamScalars& sc, const Drive& drive) {
  constexpr int R = kRuntime;
  const bool lean = !std::is_same<S, F16>::value && !(flags & (kHasScale | kMaximize | kAmsgrad | kNoFma)) &&
                    sc.small_mask != 0;
  if (lean) {
    const int key = ((flags & kCoupledWd) ? 2 : 0) | ((flags & kL1) ? 1 : 0);
#define REGOPTIM_ADAM_LEAN(K)                                                              \
  case K:                                                                                  \
    adam_run<S, DEN, false, false, (K & 1) != 0, kOff, (K & 2) ? kOn : kOff, kOn, kOn>(         \
        n, ps, gs, ms, vs, vmaxs, nss, b2s, sc, drive);                                    \
    return;
    switch (key) {
      REGOPTIM_ADAM_LEAN(0) REGOPTIM_ADAM_LEAN(1) REGOPTIM_ADAM_LEAN(2) REGOPTIM_ADAM_LEAN(3)
      default: break;
    }
#undef REGOPTIM_ADAM_LEAN
  }
  const int key = ((flags & kHasScale) ? 4 : 0) | ((flags & kAmsgrad) ? 2 : 0) |
                  ((flags & kL1) ? 1 : 0);
#define REGOPTIM_ADAM_CASE(K)                                                              \
  case K:                                                                                  \
    adam_run<S, DEN, (K & 4) != 0, (K & 2) != 0, (K & 1) != 0, R, R, R, R>(                   \
        n, ps, gs, ms, vs, vmaxs, nss, b2s, sc, drive);                                    \
    break;
  switch (key) {
    REGOPTIM_ADAM_CASE(0) REGOPTIM_ADAM_CASE(1) REGOPTIM_ADAM_CASE(2) REGOPTIM_ADAM_CASE(3)
    REGOPTIM_ADAM_CASE(4) REGOPTIM_ADAM_CASE(5) REGOPTIM_ADAM_CASE(6) REGOPTIM_ADAM_CASE(7)
    default: break;
  }
#undef REGOPTIM_ADAM_CASE
}

// ---------------------------------------------------------------------------------------------
// Scalars of one step, shared by the plain and the group-lasso entry points.

SgdScalars sgd_scalars(double lr, double weight_decay, double momentum, double dampening,
                       double decay, double l1_t, double grad_scale, int flags) {
  const auto mask = [flags](int f) { return (flags & f) ? 0xFFFFFFFFu : 0u; };
  SgdScalars sc;
  sc.sign = (flags & kMaximize) ? -1.0f : 1.0f;
  sc.scale = static_cast<float>(grad_scale);
  sc.wd = static_cast<float>(weight_decay);
  sc.mu = static_cast<float>(momentum);
  sc.damp1 = static_cast<float>(1.0 - dampening);
  sc.decay = static_cast<float>(decay);
  sc.neg_lr = static_cast<float>(-lr);
  sc.l1_t = static_cast<float>(l1_t);
  sc.max_mask = mask(kMaximize);
  sc.wd_mask = mask(kCoupledWd);
  sc.first_mask = mask(kFirstStep);
  sc.nesterov_mask = mask(kNesterov);
  sc.l1_mask = mask(kL1);
  sc.fma_mask = ~mask(kNoFma);
  return sc;
}

// Adam's scalars, and per tensor its step size and bias corrections (in double as torch: the
// step counters may differ per tensor), after incrementing the step counters.
struct AdamStep {
  AdamScalars sc;
  std::vector<float> neg_ss;  // -lr / bc1 per tensor
  std::vector<float> bc2s;    // sqrt(bc2) per tensor, then 1 / sqrt(bc2) per tensor
};

void adam_setup(AdamStep& a, int64_t n, const int64_t* steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, double decay, double lr_l1,
                double grad_scale, int flags) {
  AdamScalars& sc = a.sc;
  sc.sign = (flags & kMaximize) ? -1.0f : 1.0f;
  sc.scale = static_cast<float>(grad_scale);
  sc.wd = static_cast<float>(weight_decay);
  sc.decay = static_cast<float>(decay);
  const float c1 = static_cast<float>(1.0 - beta1);
  const bool small = std::fabs(c1) < 0.5f;
  sc.small_mask = small ? 0xFFFFFFFFu : 0u;
  sc.lerp_w = small ? c1 : c1 - 1.0f;
  sc.wd_mask = (flags & kCoupledWd) ? 0xFFFFFFFFu : 0u;
  sc.max_mask = (flags & kMaximize) ? 0xFFFFFFFFu : 0u;
  sc.beta2 = static_cast<float>(beta2);
  sc.c2 = static_cast<float>(1.0 - beta2);
  sc.eps = static_cast<float>(eps);
  sc.lr_l1 = static_cast<float>(lr_l1);
  sc.fma_mask = (flags & kNoFma) ? 0u : 0xFFFFFFFFu;

  a.neg_ss.assign(static_cast<size_t>(n), 0.0f);
  a.bc2s.assign(2 * static_cast<size_t>(n), 0.0f);
  float last_step = -1.0f;
  float last_neg_ss = 0.0f, last_bc2s = 0.0f, last_ibc2s = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    float* sp = ptr<float>(steps, k);
    const float step = *sp + 1.0f;
    *sp = step;
    if (step != last_step) {
      const double s = static_cast<double>(step);
      const double bc1 = 1.0 - std::pow(beta1, s);
      const double bc2 = 1.0 - std::pow(beta2, s);
      last_neg_ss = static_cast<float>(-(lr / bc1));
      last_bc2s = static_cast<float>(std::sqrt(bc2));
      last_ibc2s = static_cast<float>(1.0 / std::sqrt(bc2));
      last_step = step;
    }
    a.neg_ss[k] = last_neg_ss;
    a.bc2s[k] = last_bc2s;
    a.bc2s[n + k] = last_ibc2s;
  }
}

}  // namespace

namespace {

template <class S>
void sgd_plain(int flags, int64_t n, const int64_t* numels, const int64_t* ps,
               const int64_t* gs, const int64_t* bs, const SgdScalars& sc, int nthreads,
               int64_t tw) {
  sgd_dispatch<S>(flags, ps, gs, bs, sc, [&](const auto& lean, const auto& generic) {
    run_split(
        n, numels, nthreads, tw,
        [&](int64_t k, int64_t off, int64_t len, uint32_t t) { lean(k, off, len, t, nullptr); },
        [&](int64_t k, int64_t off, int64_t len, uint32_t t) {
          generic(k, off, len, t, nullptr);
        });
  });
}

template <class S>
void adam_plain(int flags, int64_t n, const int64_t* numels, const int64_t* ps,
                const int64_t* gs, const int64_t* ms, const int64_t* vs, const int64_t* vmaxs,
                const AdamStep& a, int nthreads, int64_t tw) {
  adam_dispatch<S, false>(flags, n, ps, gs, ms, vs, vmaxs, a.neg_ss.data(), a.bc2s.data(), a.sc,
                          [&](const auto& lean, const auto& generic) {
                            run_split(n, numels, nthreads, tw,
                                      [&](int64_t k, int64_t off, int64_t len, uint32_t t) {
                                        lean(k, off, len, t, nullptr);
                                      },
                                      [&](int64_t k, int64_t off, int64_t len, uint32_t t) {
                                        generic(k, off, len, t, nullptr);
                                      });
                          });
}

}  // namespace

extern "C" {

int regoptim_abi_version() { return REGOPTIM_ABI_VERSION; }

int regoptim_has_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// One ProxSGD step over `n` tensors of one dtype. Tables hold data pointers (as int64) of
// contiguous tensors; `bufs` may be null without kMomentum. `l1_t` is lr * l1, `decay` is
// 1 - lr * wd for decoupled decay (else 1), `weight_decay` the coupled L2 coefficient.
int regoptim_sgd(int dtype, int64_t n, const int64_t* numels, const int64_t* params,
                 const int64_t* grads, const int64_t* bufs, double lr, double weight_decay,
                 double momentum, double dampening, double decay, double l1_t,
                 double grad_scale, int flags, int nthreads, int64_t tail_width) {
  const SgdScalars sc =
      sgd_scalars(lr, weight_decay, momentum, dampening, decay, l1_t, grad_scale, flags);
  const int64_t tw = tail_width;
  switch (dtype) {
    case kFloat32: sgd_plain<F32>(flags, n, numels, params, grads, bufs, sc, nthreads, tw); break;
    case kBFloat16: sgd_plain<BF16>(flags, n, numels, params, grads, bufs, sc, nthreads, tw); break;
    case kFloat16: sgd_plain<F16>(flags, n, numels, params, grads, bufs, sc, nthreads, tw); break;
    default: return -1;
  }
  return 0;
}

// One ProxAdam(W) step over `n` tensors of one dtype. `steps` holds pointers to the float32
// step counters, incremented here. `decay` is 1 - lr * wd for AdamW (else 1), `weight_decay`
// the coupled L2 coefficient, `lr_l1` is lr * l1.
int regoptim_adam(int dtype, int64_t n, const int64_t* numels, const int64_t* params,
                  const int64_t* grads, const int64_t* exp_avgs, const int64_t* exp_avg_sqs,
                  const int64_t* max_exp_avg_sqs, const int64_t* steps, double lr, double beta1,
                  double beta2, double eps, double weight_decay, double decay, double lr_l1,
                  double grad_scale, int flags, int nthreads, int64_t tail_width) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) return -1;
  AdamStep a;
  adam_setup(a, n, steps, lr, beta1, beta2, eps, weight_decay, decay, lr_l1, grad_scale, flags);
  const int64_t* vm = max_exp_avg_sqs;
  switch (dtype) {
    case kFloat32:
      adam_plain<F32>(flags, n, numels, params, grads, exp_avgs, exp_avg_sqs, vm, a, nthreads,
                      tail_width);
      break;
    case kBFloat16:
      adam_plain<BF16>(flags, n, numels, params, grads, exp_avgs, exp_avg_sqs, vm, a, nthreads,
                       tail_width);
      break;
    default:
      adam_plain<F16>(flags, n, numels, params, grads, exp_avgs, exp_avg_sqs, vm, a, nthreads,
                      tail_width);
      break;
  }
  return 0;
}

}  // extern "C"

// Group lasso: the block driver and the entry points regoptim_sgd_group / regoptim_adam_group
// (group_blocks.h), the group prox (group_lasso.h).
#include "group_blocks.h"
