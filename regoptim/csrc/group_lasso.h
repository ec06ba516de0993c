// Group lasso in the fused CPU kernel: the step of a param group, then the prox of each group
// (regoptim/group_prox.py has the math, regoptim/reference.py its float64 transcription).
//
// Included by fused_cpu.cpp after the update spans: uses its storage types (S::ld / S::st),
// ptr<T>() and REGOPTIM_SIMD. Every name here is in that file's anonymous namespace.
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
// Adam's Newton iterations one read of its scratch each.
//
// Numerics. Sums of squares accumulate in double, each term a float32 square (one rounding): a
// sum of positive terms, so its relative error is that of one float32 product (6e-8) whatever
// the group size. SGD's factor
// max(0, 1 - c / ||x||) is computed in double and applied in float. Adam's Newton iteration
// (as _solve_rho in group_prox.py) evaluates its terms in float and sums them in double, with
// rho in double; it stops when a step moves rho by at most 4 float32 ulps, after at most
// kGroupMaxIters iterations.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

#if defined(_OPENMP) || defined(REGOPTIM_OPENMP_SIMD)
#define REGOPTIM_PRAGMA(x) _Pragma(#x)
#define REGOPTIM_SIMD_RED(clauses) REGOPTIM_PRAGMA(omp simd clauses)
#else
#define REGOPTIM_SIMD_RED(clauses)
#endif

namespace {

// Footprint of a block (measured on the 2-core AMD EPYC (Zen 4, 1 MiB L2 per core) of
// benchmarks/RESULTS.md; see its group-lasso section).
constexpr int64_t kGroupBlockBytes = 256 * 1024;
constexpr int64_t kGroupMaxIters = 100;  // as group_prox.MAX_ITERS
constexpr int64_t kLineFloats = 16;      // elements of a cache line of float32

// What a family's block holds per element (bytes of its tensors and floats of scratch) and per
// group (floats of scratch).
struct GroupFamily {
  int64_t bytes_per_element;
  int64_t scratch_per_element;
  int64_t scratch_per_group;
};
// SGD: param, grad, momentum (4 bytes each at most); per group a double sum and a float factor.
constexpr GroupFamily kSgdGroup{12, 0, 3};
// Adam: param, grad, two moments, max (4 bytes each at most); the update's denominators in
// the tensors' order, then z and d in the groups' order.
constexpr GroupFamily kAdamGroup{20 + 12, 3, 0};

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
  const int64_t floats = b * (fam.scratch_per_element * g + fam.scratch_per_group);
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
// (as for_each_range): `lean` before, `generic` after. Adam's spans also take `den`, the
// denominators' destination for the range (nullptr for SGD's, which take none).
template <class Lean, class Generic>
inline void update_range(const GroupLayout& lay, int64_t k, int64_t off, int64_t len,
                         const Lean& lean, const Generic& generic, float* den) {
  const int64_t nk = lay.numels[k];
  const int64_t ts = lay.tail_width > 0 ? nk - nk % lay.tail_width : nk;
  const int64_t end = off + len;
  if (off < ts) {
    if constexpr (std::is_invocable_v<Lean, int64_t, int64_t, int64_t, uint32_t, float*>)
      lean(k, off, std::min(end, ts) - off, 0u, den);
    else
      lean(k, off, std::min(end, ts) - off, 0u);
  }
  if (end > ts) {
    const int64_t a = std::max(off, ts);
    if constexpr (std::is_invocable_v<Generic, int64_t, int64_t, int64_t, uint32_t, float*>)
      generic(k, a, end - a, 0xFFFFFFFFu, den + (a - off));
    else
      generic(k, a, end - a, 0xFFFFFFFFu);
  }
}

// (sum_i a_i, sum_i b_i) over i < m of f(i, a_i, b_i), a_i, b_i >= 0 floats: 16 lanes, each
// summing 4 terms in float, then in double. A sum of positive terms, so its relative error is at
// most that of the float partial sums (3 roundings), whatever m; the order depends on m only (the
// same result on any thread). Measured 2.1x faster than one double accumulator per sum (whose
// additions form one dependency chain) on the Newton iteration below (Zen 4).
template <class F>
inline void sum_pos2(int64_t m, const F& f, double& out_a, double& out_b) {
  double acc_a[16] = {}, acc_b[16] = {};
  int64_t i = 0;
  for (; i + 64 <= m; i += 64) {
    float pa[16] = {}, pb[16] = {};
    for (int u = 0; u < 64; u += 16) {
      REGOPTIM_SIMD
      for (int j = 0; j < 16; ++j) {
        float a, b;
        f(i + u + j, a, b);
        pa[j] += a;
        pb[j] += b;
      }
    }
    REGOPTIM_SIMD
    for (int j = 0; j < 16; ++j) {
      acc_a[j] += pa[j];
      acc_b[j] += pb[j];
    }
  }
  double ta = 0.0, tb = 0.0;
  for (; i < m; ++i) {
    float a, b;
    f(i, a, b);
    ta += a;
    tb += b;
  }
  for (int j = 0; j < 16; ++j) {
    ta += acc_a[j];
    tb += acc_b[j];
  }
  out_a = ta;
  out_b = tb;
}

// ---------------------------------------------------------------------------------------------
// ProxSGD: block soft-thresholding, x_g <- x_g * max(0, 1 - c / ||x_g||)

// sums[g] += ||run of group g||^2 over the nb groups of one run (inner elements each).
template <class S>
inline void add_sumsq(const typename S::T* __restrict x, int64_t nb, int64_t inner,
                      double* __restrict sums) {
  if (inner == 1) {
    REGOPTIM_SIMD
    for (int64_t g = 0; g < nb; ++g) {
      const float v = S::ld(x[g]);
      sums[g] += static_cast<double>(v * v);
    }
    return;
  }
  for (int64_t g = 0; g < nb; ++g) {
    const typename S::T* xg = x + g * inner;
    double s = 0.0;
    REGOPTIM_SIMD_RED(reduction(+ : s))
    for (int64_t i = 0; i < inner; ++i) {
      const float v = S::ld(xg[i]);
      s += static_cast<double>(v * v);
    }
    sums[g] += s;
  }
}

template <class S>
inline void scale_run(typename S::T* __restrict x, int64_t nb, int64_t inner,
                      const float* __restrict scale) {
  if (inner == 1) {
    REGOPTIM_SIMD
    for (int64_t g = 0; g < nb; ++g) x[g] = S::st(S::ld(x[g]) * scale[g]);
    return;
  }
  for (int64_t g = 0; g < nb; ++g) {
    typename S::T* xg = x + g * inner;
    const float s = scale[g];
    REGOPTIM_SIMD
    for (int64_t i = 0; i < inner; ++i) xg[i] = S::st(S::ld(xg[i]) * s);
  }
}

// max(0, 1 - c / ||x||): 0 for a zero group (no 0/0), NaN for a NaN norm, 1 for an infinite one.
inline float block_soft_threshold_factor(double sumsq, double c) {
  const double norm = std::sqrt(sumsq);
  if (norm != norm) return std::numeric_limits<float>::quiet_NaN();
  return norm > c ? static_cast<float>(1.0 - c / norm) : 0.0f;
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
          update_range(lay, k, off, nb * in, lean, generic, nullptr);
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

// ---------------------------------------------------------------------------------------------
// ProxAdam(W): the prox in the metric diag(d), d the update's own denominator.
// x = argmin c ||x|| + sum_i d_i (x_i - z_i)^2 / 2: zero iff ||d z|| <= c, else
// x_i = z_i d_i rho / (d_i rho + c), rho the root of h(rho) = sum_i (d_i z_i / (d_i rho + c))^2 = 1.

// A group is read and written in parts: part j of group g holds `len` elements of z (stored as
// S::T) at z + g * stride and their d at d + g * stride. The parts of a block are either the runs
// of the tensors themselves (the row groups of a weight and its bias: a few long parts, read and
// written in place) or, when the parts would be short or many (column groups), one part per group
// gathered into scratch.
template <class T>
struct GroupPart {
  T* z;
  const float* d;
  int64_t len, stride;
};
constexpr int64_t kMaxInPlaceParts = 64;

// rho for group g: 0 for a group that is exactly zero, NaN when ||z|| or ||d z|| is not finite.
// Newton on psi = h^(-1/2) - 1 from the bracket's left end, a step that leaves the bracket
// replaced by bisection; the bracket as group_prox._solve_rho.
template <class S>
double group_rho(const GroupPart<typename S::T>* parts, int64_t nparts, int64_t g, double c) {
  double nz2 = 0.0, na2 = 0.0;
  float dmin = std::numeric_limits<float>::infinity(), dmax = 0.0f;
  for (int64_t q = 0; q < nparts; ++q) {
    const typename S::T* __restrict z = parts[q].z + g * parts[q].stride;
    const float* __restrict d = parts[q].d + g * parts[q].stride;
    const int64_t m = parts[q].len;
    // sum z^2, sum (d z)^2 (as sum_pos2) and min / max d, in one pass
    double acc_z[16] = {}, acc_a[16] = {};
    float lo[16], hi[16];
    for (int j = 0; j < 16; ++j) lo[j] = dmin, hi[j] = dmax;
    int64_t i = 0;
    for (; i + 64 <= m; i += 64) {
      float pz[16] = {}, pa[16] = {};
      for (int u = 0; u < 64; u += 16) {
        REGOPTIM_SIMD
        for (int j = 0; j < 16; ++j) {
          const float di = d[i + u + j], zi = S::ld(z[i + u + j]);
          const float a = di * zi;
          pz[j] += zi * zi;
          pa[j] += a * a;
          lo[j] = di < lo[j] ? di : lo[j];
          hi[j] = di > hi[j] ? di : hi[j];
        }
      }
      REGOPTIM_SIMD
      for (int j = 0; j < 16; ++j) {
        acc_z[j] += pz[j];
        acc_a[j] += pa[j];
      }
    }
    for (; i < m; ++i) {
      const float di = d[i], zi = S::ld(z[i]);
      const float a = di * zi;
      nz2 += static_cast<double>(zi * zi);
      na2 += static_cast<double>(a * a);
      dmin = di < dmin ? di : dmin;
      dmax = di > dmax ? di : dmax;
    }
    for (int j = 0; j < 16; ++j) {  // (a NaN d makes na2 NaN: handled below)
      nz2 += acc_z[j];
      na2 += acc_a[j];
      dmin = lo[j] < dmin ? lo[j] : dmin;
      dmax = hi[j] > dmax ? hi[j] : dmax;
    }
  }
  if (!std::isfinite(nz2) || !std::isfinite(na2)) return std::numeric_limits<double>::quiet_NaN();
  const double norm_a = std::sqrt(na2);
  if (norm_a <= c) return 0.0;
  double hi = std::sqrt(nz2);
  double lo = std::max(std::max(hi - c / dmin, 0.0), (norm_a - c) / dmax);
  hi = std::min(hi, (norm_a - c) / dmin);
  double rho = lo;
  const float cf = static_cast<float>(c);
  for (int64_t it = 0; it < kGroupMaxIters; ++it) {
    const float rf = static_cast<float>(rho);
    double h = 0.0, s3 = 0.0;  // sum a^2 r^2, sum a^2 d r^3 (= -h'/2), r = 1 / (d rho + c)
    for (int64_t j = 0; j < nparts; ++j) {
      const typename S::T* __restrict z = parts[j].z + g * parts[j].stride;
      const float* __restrict d = parts[j].d + g * parts[j].stride;
      const int64_t m = parts[j].len;
      double s1, s2;
      sum_pos2(
          m,
          [&](int64_t i, float& hq, float& sq) {
            const float r = 1.0f / (d[i] * rf + cf);
            const float ar = d[i] * S::ld(z[i]) * r;
            const float q = ar * ar;
            hq = q;
            sq = q * d[i] * r;
          },
          s1, s2);
      h += s1;
      s3 += s2;
    }
    if (h > 1.0) lo = rho;  // rho is left of the root
    else hi = rho;
    double next = rho + h * (std::sqrt(h) - 1.0) / s3;
    if (!(next >= lo && next <= hi)) next = 0.5 * (lo + hi);
    const bool done = std::fabs(next - rho) <= 4.0 * FLT_EPSILON * next;
    rho = next;
    if (done) break;
  }
  return rho;
}

// Group g <- its prox, given rho from group_rho: z d rho / (d rho + c), 0, or NaN.
template <class S>
void group_diag_shrink(const GroupPart<typename S::T>* parts, int64_t nparts, int64_t g,
                       double rho, double c) {
  const float rf = static_cast<float>(rho), cf = static_cast<float>(c);
  const bool nan = rho != rho, zero = rho == 0.0;
  for (int64_t j = 0; j < nparts; ++j) {
    typename S::T* __restrict z = parts[j].z + g * parts[j].stride;
    const float* __restrict d = parts[j].d + g * parts[j].stride;
    const int64_t m = parts[j].len;
    if (nan || zero) {
      const typename S::T fill = S::st(nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
      REGOPTIM_SIMD
      for (int64_t i = 0; i < m; ++i) z[i] = fill;
      continue;
    }
    REGOPTIM_SIMD
    for (int64_t i = 0; i < m; ++i) {
      const float dr = d[i] * rf;
      z[i] = S::st(S::ld(z[i]) * (dr / (dr + cf)));
    }
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
    float* run_den = scratch + tid * lay.scratch_per_thread;  // the tensors' order
    float* zs = run_den + lay.per_block * gn;  // gathered: z of each group, the groups' order
    float* ds = zs + lay.per_block * gn;  // gathered: d of each group
    GroupPart<T> parts[kMaxInPlaceParts];
    const GroupPart<float> gathered{zs, ds, gn, gn};
    const int64_t gend = n * (tid + 1) / nthr;
    for (int64_t g0 = n * tid / nthr; g0 < gend; g0 += lay.per_block) {
      const int64_t nb = std::min(lay.per_block, gend - g0);
      // 1. the step on the block, its denominators to run_den (then gathered, or in place)
      float* den = run_den;
      int64_t pos = 0, j = 0;  // pos: where the run's part of a group starts in the group
      for (int64_t k = 0; k < lay.ntensors; ++k) {
        const int64_t in = lay.inner[k];
        for (int64_t o = 0; o < lay.outer[k] && in > 0; ++o, den += nb * in, pos += in) {
          const int64_t off = (o * n + g0) * in;
          update_range(lay, k, off, nb * in, lean, generic, den);
          T* x = ptr<T>(ps, k) + off;
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
        for (int64_t g = 0; g < nb; ++g)
          group_diag_shrink<S>(parts, nparts, g, group_rho<S>(parts, nparts, g, c), c);
        continue;
      }
      for (int64_t g = 0; g < nb; ++g)
        group_diag_shrink<F32>(&gathered, 1, g, group_rho<F32>(&gathered, 1, g, c), c);
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
