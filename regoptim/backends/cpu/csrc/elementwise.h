// The fused CPU kernel's element level: storage types (load to float, store from float), the flags
// shared with regoptim/backends/cpu/kernel.py, and the per-element helpers of the update spans
// (spans.h). Included by fused_cpu.cpp (numerics there); every name is in its anonymous
// namespace.

#include <cmath>
#include <cstdint>
#include <cstring>

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

// float16 (IEEE binary16). The compiler's _Float16 when it has one, except on x86, else bit
// manipulation; both round to nearest even. On x86 GCC 12 does not vectorize _Float16
// conversions without AVX512-FP16 (every float16 span ran scalar: 21x / 15x torch's fused SGD /
// AdamW step at 16M), while the bit manipulation vectorizes (its branches become blends).
#if defined(__FLT16_MANT_DIG__) && !defined(REGOPTIM_SOFT_FP16) && !defined(__x86_64__)
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

// Tensor k's data pointer from a table of int64 addresses.
template <class T>
inline T* ptr(const int64_t* table, int64_t k) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[k]));
}

}  // namespace
