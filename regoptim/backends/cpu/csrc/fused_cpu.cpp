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
// Files: elementwise.h (storage types, flags, per-element helpers), spans.h (each family's update
// on a contiguous run, its scalars), this file (the parallel split, flag dispatch, the plain
// entry points). Group lasso (regoptim_sgd_group / regoptim_adam_group): the same spans, driven
// over blocks of groups and followed by the group prox while the block is in cache
// (group_blocks.h; the prox in group_lasso.h and, for Adam's common case, group_poly.h).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define REGOPTIM_ABI_VERSION 4

// A span's element function is called from two loops when it also sums (SGD's NORM, Adam's
// MOM): inlined in both, so that the vector one vectorizes (GCC keeps a call otherwise).
#if defined(__GNUC__)
#define REGOPTIM_ALWAYS_INLINE __attribute__((always_inline))
#else
#define REGOPTIM_ALWAYS_INLINE
#endif
// Element loops are vectorized explicitly (the selects on runtime flags become blends).
#if defined(_OPENMP) || defined(REGOPTIM_OPENMP_SIMD)
#define REGOPTIM_SIMD _Pragma("omp simd")
#else
#define REGOPTIM_SIMD
#endif

#include "elementwise.h"
#include "spans.h"

namespace {

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
// A build without FMA instructions (x86 baseline: the variant loaded when torch reports
// DEFAULT, whose kernels have no FMA either, kNoFma) compiles FMA out of the kernels it runs
// then: there std::fma is a library call, and the run-time blend computes it for every element
// (18x torch's SGD step at 16M before this).
#if defined(__x86_64__) && !defined(__FMA__)
#define REGOPTIM_SOFT_FMA 1
#else
#define REGOPTIM_SOFT_FMA 0
#endif
// The all-runtime kernels of a family, FMA at run time (kRuntime) or compiled out (kOff).
template <class S, int FM, class Drive>
void sgd_generic(bool scale, bool mom, const int64_t* ps, const int64_t* gs, const int64_t* bs,
                 const SgdScalars& sc, const Drive& drive) {
  constexpr int R = kRuntime;
  if (scale && mom) sgd_run<S, true, true, R, R, R, R, R, FM>(ps, gs, bs, sc, drive);
  else if (scale) sgd_run<S, true, false, R, R, R, R, R, FM>(ps, gs, bs, sc, drive);
  else if (mom) sgd_run<S, false, true, R, R, R, R, R, FM>(ps, gs, bs, sc, drive);
  else sgd_run<S, false, false, R, R, R, R, R, FM>(ps, gs, bs, sc, drive);
}

template <class S, bool DEN, int FM, class Drive>
void adam_generic(int key, int64_t n, const int64_t* ps, const int64_t* gs, const int64_t* ms,
                  const int64_t* vs, const int64_t* vmaxs, const float* nss, const float* b2s,
                  const AdamScalars& sc, const Drive& drive) {
  constexpr int R = kRuntime;
#define REGOPTIM_ADAM_CASE(K)                                                              \
  case K:                                                                                  \
    adam_run<S, DEN, (K & 4) != 0, (K & 2) != 0, (K & 1) != 0, R, R, R, FM>(                  \
        n, ps, gs, ms, vs, vmaxs, nss, b2s, sc, drive);                                    \
    break;
  switch (key) {
    REGOPTIM_ADAM_CASE(0) REGOPTIM_ADAM_CASE(1) REGOPTIM_ADAM_CASE(2) REGOPTIM_ADAM_CASE(3)
    REGOPTIM_ADAM_CASE(4) REGOPTIM_ADAM_CASE(5) REGOPTIM_ADAM_CASE(6) REGOPTIM_ADAM_CASE(7)
    default: break;
  }
#undef REGOPTIM_ADAM_CASE
}

template <class S, class Drive>
void sgd_dispatch(int flags, const int64_t* ps, const int64_t* gs, const int64_t* bs,
                  const SgdScalars& sc, const Drive& drive) {
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
#if REGOPTIM_SOFT_FMA
  if (flags & kNoFma) {  // no FMA compiled in at all (torch's tails aside)
    sgd_generic<S, kOff>(scale, mom, ps, gs, bs, sc, drive);
    return;
  }
#endif
  sgd_generic<S, kRuntime>(scale, mom, ps, gs, bs, sc, drive);
}

template <class S, bool DEN, class Drive>
void adam_dispatch(int flags, int64_t n, const int64_t* ps, const int64_t* gs,
                   const int64_t* ms, const int64_t* vs, const int64_t* vmaxs, const float* nss,
                   const float* b2s, const AdamScalars& sc, const Drive& drive) {
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
#if REGOPTIM_SOFT_FMA
  if (flags & kNoFma) {  // no FMA compiled in at all (torch's tails aside)
    adam_generic<S, DEN, kOff>(key, n, ps, gs, ms, vs, vmaxs, nss, b2s, sc, drive);
    return;
  }
#endif
  adam_generic<S, DEN, kRuntime>(key, n, ps, gs, ms, vs, vmaxs, nss, b2s, sc, drive);
}

// ---------------------------------------------------------------------------------------------
// The plain step (no group lasso) over all tensors

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
