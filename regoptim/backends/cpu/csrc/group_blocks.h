// Group lasso in the fused CPU kernel: the step of a param group, then the prox of each group
// (group_lasso.h, group_poly.h), in one pass over memory.
//
// Included at the end of fused_cpu.cpp: uses ptr<T>(), kMinPerThread, sgd_dispatch /
// adam_dispatch, their scalars and the plain entry points; defines the extern "C" entry points
// regoptim_sgd_group and regoptim_adam_group. Every other name here is in that file's anonymous
// namespace.
//
// Layout. Tensor k of the param group is contiguous with outer[k] x n x inner[k] elements, and
// slice i of its middle axis belongs to group i (so group i's part of tensor k is outer[k] runs
// of inner[k] elements). A group's elements over all tensors number G = sum_k outer[k] inner[k].
//
// One pass over memory. The groups are cut into one contiguous range per thread and each range
// into blocks of consecutive groups whose footprint (the update's tensors, plus Adam's scratch)
// is about kGroupBlockBytes, so that it stays in L2: for each block the family's own update span
// runs on the block's runs of every tensor (the plain step's code: torch's scalar tails
// included), then the group prox reads and rewrites the block while it is still in cache. A
// block's run of tensor k is nb * inner[k] elements; for tensors with outer[k] > 1 and a small
// inner[k] (column groups) the block grows to make that run a cache line at least, and when a
// single group is larger than the cache (one group of the whole model) the passes over it
// stream from memory: the prox then costs one more read (SGD: and write) of the parameters, and
// Adam's passes one read of its scratch each. Adam reads and writes the parameters in
// place when a group has few long parts (a weight's row and its bias entry), else it gathers each
// group's z and t = 1 / d into scratch first (column groups, conv in-channels) and scatters x
// back.
//
// Norms. SGD: parts of kNormInSpan elements or more get their sum of squares from the update
// span itself (sgd_span's NORM: 16 double lanes per part, free in that memory-bound loop),
// shorter ones (biases, column groups) from a pass over the block's runs (add_sumsq). Adam
// likewise takes the moments of the polynomial path (group_poly.h) from the update span for
// in-place parts of kMomentsInSpan elements or more, from a pass for the rest; then every
// group's rho at once (vectorized over the groups), then a pass that writes each group
// (groups_adam_prox).
//
// Every group is computed by one thread in an order that depends on the layout only: 1 or N
// threads give bitwise the same result.

#include <algorithm>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

#include "group_lasso.h"
#include "group_poly.h"

namespace {

// Footprint of a block (measured on the 2-core AMD EPYC (Zen 4, 1 MiB L2 per core) of
// benchmarks/RESULTS.md; see its group-lasso section).
constexpr int64_t kGroupBlockBytes = 256 * 1024;
constexpr int64_t kLineFloats = 16;      // elements of a cache line of float32
// SGD: parts of at least this many elements get their sums of squares from the update span
constexpr int64_t kNormInSpan = 64;
// Adam: parts of at least this many elements updated in place get their moments from the update
// span (adam_span's MOM): one call on the block's run, one segment per group, for parts of up to
// kMomentsChunk (group_poly.h) elements; longer ones per group in chunks of that many
constexpr int64_t kMomentsInSpan = 16;

// What a family's block holds per element (bytes of its tensors and floats of scratch) and per
// group (floats of scratch).
struct GroupFamily {
  int64_t bytes_per_element;
  int64_t scratch_per_element;
  int64_t scratch_per_group;
  int64_t scratch_groups;  // floats per thread of this many whole groups besides the block's
};
// SGD: param, grad, momentum (4 bytes each at most); per group a double sum and a float factor.
constexpr GroupFamily kSgdGroup{12, 0, 3, 0};
// Adam: param, grad, two moments, max (4 bytes each at most); the update's inverse denominators
// in the tensors' order, then z and t in the groups' order; per group three double moments, max t
// and c / rho; and one group's x at a Newton iterate.
constexpr GroupFamily kAdamGroup{20 + 12, 3, 12, 1};

struct GroupLayout {
  int64_t ntensors = 0;
  int64_t ngroups = 0;  // n: the size of every tensor along its group axis
  const int64_t* numels = nullptr;
  const int64_t* outer = nullptr;
  const int64_t* inner = nullptr;
  int64_t tail_width = 0;  // torch's vector width: the scalar tail of each tensor
  int64_t group_numel = 0;  // G
  int64_t per_block = 1;  // groups per block
  int nthreads = 1;  // threads that take part
  int64_t scratch_per_thread = 0;  // floats, a multiple of a cache line
};

GroupLayout group_layout(int64_t n, const int64_t* numels, const int64_t* outer,
                         const int64_t* inner, int64_t ngroups, int64_t tail_width,
                         int nthreads, const GroupFamily& fam) {
  GroupLayout lay;
  lay.ntensors = n;
  lay.ngroups = ngroups;
  lay.numels = numels;
  lay.outer = outer;
  lay.inner = inner;
  lay.tail_width = tail_width;
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) {
    lay.group_numel += outer[k] * inner[k];
    total += numels[k];
  }
  if (ngroups <= 0 || total == 0) return lay;
  const int64_t g = std::max<int64_t>(lay.group_numel, 1);
  int64_t nt = nthreads < 1 ? 1 : nthreads;  // as for_each_range: a share of 32K elements
  if (nt > 1 && total / nt < kMinPerThread) nt = std::max<int64_t>(total / kMinPerThread, 1);
  nt = std::min(nt, ngroups);
  lay.nthreads = static_cast<int>(nt);
  int64_t b = std::max<int64_t>(kGroupBlockBytes / (fam.bytes_per_element * g), 1);
  for (int64_t k = 0; k < n; ++k) {  // strided runs: a cache line at least
    if (outer[k] > 1 && inner[k] > 0 && inner[k] < kLineFloats)
      b = std::max(b, (kLineFloats + inner[k] - 1) / inner[k]);
  }
  b = std::min(b, (ngroups + nt - 1) / nt);
  lay.per_block = b;
  const int64_t floats =
      b * (fam.scratch_per_element * g + fam.scratch_per_group) + fam.scratch_groups * g;
  lay.scratch_per_thread = (floats + kLineFloats - 1) / kLineFloats * kLineFloats;
  return lay;
}

// Scratch of all threads, kept per calling thread between steps (no page faults per step);
// nullptr when it cannot be allocated. A buffer over 64 MiB (a group larger than the cache) is
// released at the next call that needs less.
float* group_scratch(const GroupLayout& lay) {
  thread_local std::vector<float> buf;
  const size_t need = static_cast<size_t>(lay.scratch_per_thread) * lay.nthreads + kLineFloats;
  if (buf.capacity() > (size_t{16} << 20) && need < buf.capacity() / 2) {
    std::vector<float>().swap(buf);
  }
  try {
    if (buf.size() < need) buf.resize(need);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
  const uintptr_t addr = reinterpret_cast<uintptr_t>(buf.data());
  const uintptr_t aligned = (addr + 63) & ~static_cast<uintptr_t>(63);
  return reinterpret_cast<float*>(aligned);
}

template <class F>
void for_each_thread(int nt, const F& work) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    work(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  work(0, 1);
}

// The update of elements [off, off + len) of tensor k, split where torch's scalar tail starts
// (as for_each_range): `lean` before, `generic` after. `out`: Adam's denominators for the range
// (float*, offset with it), or where SGD adds the range's sum of squares (double*), or nullptr.
template <class Lean, class Generic, class Out, class... Extra>
inline void update_range(const GroupLayout& lay, int64_t k, int64_t off, int64_t len,
                         const Lean& lean, const Generic& generic, Out* out, Extra... extra) {
  const int64_t nk = lay.numels[k];
  const int64_t ts = lay.tail_width > 0 ? nk - nk % lay.tail_width : nk;
  const int64_t end = off + len;
  if (off < ts) lean(k, off, std::min(end, ts) - off, 0u, out, extra...);
  if (end > ts) {
    const int64_t a = std::max(off, ts);
    Out* tail_out = out;
    if constexpr (std::is_same_v<Out, float>) tail_out = out + (a - off);
    generic(k, a, end - a, 0xFFFFFFFFu, tail_out, extra...);
  }
}

template <class S, class Lean, class Generic>
void sgd_group_drive(const GroupLayout& lay, const int64_t* ps, double c, float* scratch,
                     const Lean& lean, const Generic& generic) {
  using T = typename S::T;
  const int64_t n = lay.ngroups;
  for_each_thread(lay.nthreads, [&](int tid, int nthr) {
    double* sums = reinterpret_cast<double*>(scratch + tid * lay.scratch_per_thread);
    float* factor = reinterpret_cast<float*>(sums + lay.per_block);
    const int64_t gend = n * (tid + 1) / nthr;
    for (int64_t g0 = n * tid / nthr; g0 < gend; g0 += lay.per_block) {
      const int64_t nb = std::min(lay.per_block, gend - g0);
      std::fill(sums, sums + nb, 0.0);
      for (int64_t k = 0; k < lay.ntensors; ++k) {
        const int64_t in = lay.inner[k];
        for (int64_t o = 0; o < lay.outer[k] && in > 0; ++o) {
          const int64_t off = (o * n + g0) * in;
          if (in >= kNormInSpan) {  // long parts: the span sums their squares as it stores them
            for (int64_t g = 0; g < nb; ++g)
              update_range(lay, k, off + g * in, in, lean, generic, sums + g);
            continue;
          }
          update_range(lay, k, off, nb * in, lean, generic, static_cast<double*>(nullptr));
          add_sumsq<S>(ptr<T>(ps, k) + off, nb, in, sums);  // the run is still in L1
        }
      }
      for (int64_t g = 0; g < nb; ++g) factor[g] = block_soft_threshold_factor(sums[g], c);
      for (int64_t k = 0; k < lay.ntensors; ++k) {
        const int64_t in = lay.inner[k];
        for (int64_t o = 0; o < lay.outer[k] && in > 0; ++o)
          scale_run<S>(ptr<T>(ps, k) + (o * n + g0) * in, nb, in, factor);
      }
    }
  });
}

// Adam's update of elements [off, off + len) of tensor k, a whole number of segments of `seg`
// elements, with their inverse denominators to `den` and each segment's moments added to its 4
// floats of `rec` (adam_span's MOM); split where torch's scalar tail starts, as update_range.
template <class Lean, class Generic>
inline void adam_update_moments(const GroupLayout& lay, int64_t k, int64_t off, int64_t len,
                                const Lean& lean, const Generic& generic, float* den,
                                float* rec, int64_t seg) {
  const int64_t nk = lay.numels[k];
  const int64_t ts = lay.tail_width > 0 ? nk - nk % lay.tail_width : nk;
  const int64_t end = off + len;
  if (off < ts) {
    const MomentsOut mom{rec, seg, 0};
    lean(k, off, std::min(end, ts) - off, 0u, den, &mom);
  }
  if (end > ts) {
    const int64_t a = std::max(off, ts), rel = a - off;
    const MomentsOut mom{rec + 4 * (rel / seg), seg, rel % seg};
    generic(k, a, end - a, 0xFFFFFFFFu, den + rel, &mom);
  }
}

template <class S, class Lean, class Generic>
void adam_group_drive(const GroupLayout& lay, const int64_t* ps, double c, float* scratch,
                      const Lean& lean, const Generic& generic) {
  using T = typename S::T;
  const int64_t n = lay.ngroups, gn = lay.group_numel;
  int64_t nparts = 0;
  for (int64_t k = 0; k < lay.ntensors; ++k) nparts += lay.inner[k] > 0 ? lay.outer[k] : 0;
  const bool in_place = nparts <= kMaxInPlaceParts && nparts * kLineFloats <= gn;
  for_each_thread(lay.nthreads, [&](int tid, int nthr) {
    double* mo = reinterpret_cast<double*>(scratch + tid * lay.scratch_per_thread);
    float* tmax = reinterpret_cast<float*>(mo + 3 * lay.per_block);  // per group: 3 moments,
    float* ce = tmax + lay.per_block;                                // max t, c / rho
    float* rec = ce + lay.per_block;  // per group: 4 float moments from the span
    float* run_den = rec + 4 * lay.per_block;  // the tensors' order
    float* zs = run_den + lay.per_block * gn;  // gathered: z of each group, the groups' order
    float* ds = zs + lay.per_block * gn;  // gathered: t of each group
    float* xbuf = ds + lay.per_block * gn;  // one group's x at the current Newton iterate
    GroupPart<T> parts[kMaxInPlaceParts];
    const GroupPart<float> gathered{zs, ds, gn, gn};
    const int64_t gend = n * (tid + 1) / nthr;
    for (int64_t g0 = n * tid / nthr; g0 < gend; g0 += lay.per_block) {
      const int64_t nb = std::min(lay.per_block, gend - g0);
      std::fill(mo, mo + 3 * nb, 0.0);
      std::fill(tmax, tmax + nb, 0.0f);
      // 1. the step on the block, its inverse denominators to run_den (then gathered, or in place)
      float* den = run_den;
      int64_t pos = 0, j = 0;  // pos: where the run's part of a group starts in the group
      for (int64_t k = 0; k < lay.ntensors; ++k) {
        const int64_t in = lay.inner[k];
        for (int64_t o = 0; o < lay.outer[k] && in > 0; ++o, den += nb * in, pos += in) {
          const int64_t off = (o * n + g0) * in;
          T* x = ptr<T>(ps, k) + off;
          if (in_place && in >= kMomentsInSpan) {  // long parts: moments from the span
            std::fill(rec, rec + 4 * nb, 0.0f);
            if (in <= kMomentsChunk) {  // the block's run, one segment per group
              adam_update_moments(lay, k, off, nb * in, lean, generic, den, rec, in);
            } else {  // each group's run in chunks
              for (int64_t g = 0; g < nb; ++g) {
                for (int64_t c0 = 0; c0 < in; c0 += kMomentsChunk) {
                  const int64_t len = std::min(kMomentsChunk, in - c0);
                  adam_update_moments(lay, k, off + g * in + c0, len, lean, generic,
                                      den + g * in + c0, rec + 4 * g, len);
                }
              }
            }
            for (int64_t g = 0; g < nb; ++g) {
              mo[g] += rec[4 * g];
              mo[nb + g] += rec[4 * g + 1];
              mo[2 * nb + g] += rec[4 * g + 2];
              tmax[g] = rec[4 * g + 3] > tmax[g] ? rec[4 * g + 3] : tmax[g];
            }
            parts[j++] = GroupPart<T>{x, den, in, in, true};
            continue;
          }
          update_range(lay, k, off, nb * in, lean, generic, den);
          if (in_place) {
            parts[j++] = GroupPart<T>{x, den, in, in};
            continue;
          }
          for (int64_t g = 0; g < nb; ++g) {
            float* zg = zs + g * gn + pos;
            float* dg = ds + g * gn + pos;
            REGOPTIM_SIMD
            for (int64_t i = 0; i < in; ++i) {
              zg[i] = S::ld(x[g * in + i]);
              dg[i] = den[g * in + i];
            }
          }
        }
      }
      // 2. the prox of each group
      if (in_place) {
        groups_adam_prox<S>(parts, nparts, nb, c, mo, tmax, ce, xbuf);
        continue;
      }
      groups_adam_prox<F32>(&gathered, 1, nb, c, mo, tmax, ce, xbuf);
      // 3. gathered: back to the parameters
      pos = 0;
      for (int64_t k = 0; k < lay.ntensors; ++k) {
        const int64_t in = lay.inner[k];
        for (int64_t o = 0; o < lay.outer[k] && in > 0; ++o, pos += in) {
          T* x = ptr<T>(ps, k) + (o * n + g0) * in;
          for (int64_t g = 0; g < nb; ++g) {
            const float* zg = zs + g * gn + pos;
            REGOPTIM_SIMD
            for (int64_t i = 0; i < in; ++i) x[g * in + i] = S::st(zg[i]);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// A family's step on a param group, then its group prox (threshold c = lr * group_l1).

template <class S>
void sgd_group_step(int flags, const GroupLayout& lay, const int64_t* ps, const int64_t* gs,
                    const int64_t* bs, const SgdScalars& sc, double c, float* scratch) {
  sgd_dispatch<S>(flags, ps, gs, bs, sc, [&](const auto& lean, const auto& generic) {
    sgd_group_drive<S>(lay, ps, c, scratch, lean, generic);
  });
}

template <class S>
void adam_group_step(int flags, const GroupLayout& lay, const int64_t* ps, const int64_t* gs,
                     const int64_t* ms, const int64_t* vs, const int64_t* vmaxs,
                     const AdamStep& a, double c, float* scratch) {
  adam_dispatch<S, true>(flags, lay.ntensors, ps, gs, ms, vs, vmaxs, a.neg_ss.data(),
                         a.bc2s.data(), a.sc, [&](const auto& lean, const auto& generic) {
                           adam_group_drive<S>(lay, ps, c, scratch, lean, generic);
                         });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (declared in regoptim/backends/cpu/build.py)

extern "C" {

// One ProxSGD step followed by the group-lasso prox with threshold `group_t` = lr * group_l1,
// over the `n` tensors of one param group. Tensor k has `outer[k]` x `ngroups` x `inner[k]`
// elements (contiguous); slice i of its middle axis belongs to group i. Other arguments as
// regoptim_sgd. Returns -1 for an unknown dtype, -2 when the scratch could not be allocated
// (nothing was changed then).
int regoptim_sgd_group(int dtype, int64_t n, const int64_t* numels, const int64_t* params,
                       const int64_t* grads, const int64_t* bufs, const int64_t* outer,
                       const int64_t* inner, int64_t ngroups, double lr, double weight_decay,
                       double momentum, double dampening, double decay, double l1_t,
                       double grad_scale, double group_t, int flags, int nthreads,
                       int64_t tail_width) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) return -1;
  if (!(group_t > 0.0)) {  // lr = 0: the prox is the identity
    return regoptim_sgd(dtype, n, numels, params, grads, bufs, lr, weight_decay, momentum,
                        dampening, decay, l1_t, grad_scale, flags, nthreads, tail_width);
  }
  const GroupLayout lay = group_layout(n, numels, outer, inner, ngroups, tail_width, nthreads,
                                       kSgdGroup);
  float* scratch = group_scratch(lay);
  if (scratch == nullptr) return -2;
  const SgdScalars sc =
      sgd_scalars(lr, weight_decay, momentum, dampening, decay, l1_t, grad_scale, flags);
  switch (dtype) {
    case kFloat32: sgd_group_step<F32>(flags, lay, params, grads, bufs, sc, group_t, scratch); break;
    case kBFloat16: sgd_group_step<BF16>(flags, lay, params, grads, bufs, sc, group_t, scratch); break;
    default: sgd_group_step<F16>(flags, lay, params, grads, bufs, sc, group_t, scratch); break;
  }
  return 0;
}

// One ProxAdam(W) step followed by the group-lasso prox in Adam's metric (threshold `group_t` =
// lr * group_l1; the metric is each element's own denominator of this step). Layout as
// regoptim_sgd_group, other arguments as regoptim_adam; the same return codes (the step counters
// are not incremented on -1 / -2).
int regoptim_adam_group(int dtype, int64_t n, const int64_t* numels, const int64_t* params,
                        const int64_t* grads, const int64_t* exp_avgs,
                        const int64_t* exp_avg_sqs, const int64_t* max_exp_avg_sqs,
                        const int64_t* steps, const int64_t* outer, const int64_t* inner,
                        int64_t ngroups, double lr, double beta1, double beta2, double eps,
                        double weight_decay, double decay, double lr_l1, double grad_scale,
                        double group_t, int flags, int nthreads, int64_t tail_width) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) return -1;
  if (!(group_t > 0.0)) {
    return regoptim_adam(dtype, n, numels, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                         steps, lr, beta1, beta2, eps, weight_decay, decay, lr_l1, grad_scale,
                         flags, nthreads, tail_width);
  }
  const GroupLayout lay = group_layout(n, numels, outer, inner, ngroups, tail_width, nthreads,
                                       kAdamGroup);
  float* scratch = group_scratch(lay);
  if (scratch == nullptr) return -2;
  AdamStep a;
  adam_setup(a, n, steps, lr, beta1, beta2, eps, weight_decay, decay, lr_l1, grad_scale, flags);
  const int64_t* vm = max_exp_avg_sqs;
  switch (dtype) {
    case kFloat32:
      adam_group_step<F32>(flags, lay, params, grads, exp_avgs, exp_avg_sqs, vm, a, group_t,
                        scratch);
      break;
    case kBFloat16:
      adam_group_step<BF16>(flags, lay, params, grads, exp_avgs, exp_avg_sqs, vm, a, group_t,
                         scratch);
      break;
    default:
      adam_group_step<F16>(flags, lay, params, grads, exp_avgs, exp_avg_sqs, vm, a, group_t,
                        scratch);
      break;
  }
  return 0;
}

}  // extern "C"
