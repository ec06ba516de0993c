// Group lasso's math in the fused CPU kernel: the prox of one group (regoptim/regularizers/
// group_lasso.py has the math, regoptim/reference.py its float64 transcription). The block driver that runs the
// step and these functions over a param group is in group_blocks.h.
//
// Included by fused_cpu.cpp (through group_blocks.h) after the update spans: uses its storage
// types (S::ld / S::st) and REGOPTIM_SIMD. Every name here is in that file's anonymous namespace.
//
// * ProxSGD: block soft-thresholding x_g <- x_g * max(0, 1 - c / ||x_g||), c = lr * group_l1;
//   0 for a zero group (no 0/0), NaN for a NaN norm.
// * ProxAdam(W): the exact prox in the metric diag(d), d the update's own denominator: zero iff
//   ||d z|| <= c, else x_i = z_i d_i rho / (d_i rho + c), rho the root of
//   h(rho) = sum_i (d_i z_i / (d_i rho + c))^2 = 1. The update hands over t = 1 / d. Two paths
//   (groups_adam_prox): when c * max t <= ||z|| / 256 (an alive group far from zero, no tiny d:
//   the common case) rho from three moments of the group by a series and x by a cubic, no
//   division (group_poly.h); any other group the general path, d = 1 / t and Newton
//   (group_diag_prox, as regularizers.group_lasso._solve_rho). A group
//   whose ||z|| or ||d z|| is not finite becomes NaN (as the reference).
//
// Numerics of the general path. Sums of squares accumulate in double, each term a float32 square (one rounding),
// here summed 4 deep in float32 lanes first (sum_pos1/2; the update span's own sums for SGD skip
// that step): a sum of positive terms, so its relative error is that of a few float32 roundings
// (< 3e-7) whatever the group size. SGD's factor is computed
// in double and applied in float. Adam's Newton iteration evaluates its terms in float and sums
// them so, with rho in double; it stops when the step from rho_k would move rho by at most 4
// float32 ulps, and the result is then x(rho_k), computed in that same evaluation as
// (d_i z_i r_i) rho_k in float (three roundings; r_i = 1 / (d_i rho_k + c) one division), so
// rho_k is within 4 ulps of the next iterate, as the previous version's shrink at that iterate
// was; after kGroupMaxIters evaluations, the shrink z d rho / (d rho + c) at the last iterate.
// Started at ||z|| (1 - c / ||d z||) it takes 1 evaluation on 93-100% of the groups of uniform
// data at c = 1e-5, 2 on the rest (a float64 emulation of this loop, 200 rows of 257, Adam steps
// 3 and 10), where the bracket's left end took 2-3 plus one to confirm.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

constexpr int64_t kGroupMaxIters = 100;  // as group_prox.MAX_ITERS

// (sum_i a_i, sum_i b_i) over i < m of f(i, a_i, b_i), a_i, b_i >= 0 floats: 16 lanes, each
// summing 4 terms in float, then in double. A sum of positive terms, so its relative error is at
// most that of the float partial sums (3 roundings), whatever m; the order depends on m only (the
// same result on any thread). One double accumulator per sum (one dependency chain of additions)
// made the whole Adam group step 14% slower (16M in rows of 1024, 1 thread, Zen 4).
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

// sum_i f(i) over i < m, f(i) >= 0 floats: as sum_pos2, one sum.
template <class F>
inline double sum_pos1(int64_t m, const F& f) {
  double acc[16] = {};
  int64_t i = 0;
  for (; i + 64 <= m; i += 64) {
    float part[16] = {};
    for (int u = 0; u < 64; u += 16) {
      REGOPTIM_SIMD
      for (int j = 0; j < 16; ++j) part[j] += f(i + u + j);
    }
    REGOPTIM_SIMD
    for (int j = 0; j < 16; ++j) acc[j] += part[j];
  }
  double t = 0.0;
  for (; i < m; ++i) t += f(i);
  for (int j = 0; j < 16; ++j) t += acc[j];
  return t;
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
    sums[g] += sum_pos1(inner, [&](int64_t i) {
      const float v = S::ld(xg[i]);
      return v * v;
    });
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
  float* d;  // the update's inverse denominators t = 1 / d (groups_adam_prox), or d
  int64_t len, stride;
  bool moments_done = false;  // its moments come from the update span (group_moments skips it)
};
constexpr int64_t kMaxInPlaceParts = 64;

// Group g <- its prox in the metric diag(d): z d rho / (d rho + c), 0 (||d z|| <= c), or NaN
// (||z|| or ||d z|| not finite). rho by Newton on psi = h^(-1/2) - 1, safeguarded by the bracket
// of regularizers.group_lasso._solve_rho (a step that leaves it is replaced by bisection), started at
// rho0 = ||z|| (1 - c / ||d z||): the root when d is constant over the group, inside the bracket
// always (||d z|| / ||z|| is between min d and max d). Each evaluation at rho_k also writes
// x_i(rho_k) = (d_i z_i r_i) rho_k (r_i = 1 / (d_i rho_k + c), already computed there) to `xbuf`
// (one group's worth of scratch); when the Newton step from rho_k moves rho by at most 4 float32
// ulps, x(rho_k) is the result (copied to the group), so no evaluation is spent only to confirm
// convergence and no shrink pass is needed. After kGroupMaxIters evaluations without that, the
// group is shrunk at the last iterate (one more pass).
template <class S>
void group_diag_prox(const GroupPart<typename S::T>* parts, int64_t nparts, int64_t g, double c,
                     float* __restrict xbuf) {
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
  const bool nan = !std::isfinite(nz2) || !std::isfinite(na2);
  const double norm_a = std::sqrt(na2);
  if (nan || norm_a <= c) {
    const typename S::T fill = S::st(nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
    for (int64_t j = 0; j < nparts; ++j) {
      typename S::T* __restrict z = parts[j].z + g * parts[j].stride;
      const int64_t m = parts[j].len;
      REGOPTIM_SIMD
      for (int64_t i = 0; i < m; ++i) z[i] = fill;
    }
    return;
  }
  const double norm_z = std::sqrt(nz2);
  double hi = norm_z;
  double lo = std::max(std::max(hi - c / dmin, 0.0), (norm_a - c) / dmax);
  hi = std::min(hi, (norm_a - c) / dmin);
  double rho = std::min(std::max(norm_z * ((norm_a - c) / norm_a), lo), hi);
  const float cf = static_cast<float>(c);
  for (int64_t it = 0; it < kGroupMaxIters; ++it) {
    const float rf = static_cast<float>(rho);
    double h = 0.0, s3 = 0.0;  // sum a^2 r^2, sum a^2 d r^3 (= -h'/2), r = 1 / (d rho + c)
    float* xo = xbuf;
    for (int64_t j = 0; j < nparts; ++j) {
      const typename S::T* __restrict z = parts[j].z + g * parts[j].stride;
      const float* __restrict d = parts[j].d + g * parts[j].stride;
      const int64_t m = parts[j].len;
      float* __restrict x = xo;
      double s1, s2;
      sum_pos2(
          m,
          [&](int64_t i, float& hq, float& sq) {
            const float r = 1.0f / (d[i] * rf + cf);
            const float ar = d[i] * S::ld(z[i]) * r;
            x[i] = ar * rf;
            const float q = ar * ar;
            hq = q;
            sq = q * d[i] * r;
          },
          s1, s2);
      h += s1;
      s3 += s2;
      xo += m;
    }
    if (h > 1.0) lo = rho;  // rho is left of the root
    else hi = rho;
    double next = rho + h * (std::sqrt(h) - 1.0) / s3;
    if (!(next >= lo && next <= hi)) next = 0.5 * (lo + hi);
    if (std::fabs(next - rho) <= 4.0 * FLT_EPSILON * next) {  // x(rho) is the prox
      const float* xi = xbuf;
      for (int64_t j = 0; j < nparts; ++j) {
        typename S::T* __restrict z = parts[j].z + g * parts[j].stride;
        const int64_t m = parts[j].len;
        REGOPTIM_SIMD
        for (int64_t i = 0; i < m; ++i) z[i] = S::st(xi[i]);
        xi += m;
      }
      return;
    }
    rho = next;
  }
  // no convergence (not seen): shrink at the last iterate
  const float rf = static_cast<float>(rho);
  for (int64_t j = 0; j < nparts; ++j) {
    typename S::T* __restrict z = parts[j].z + g * parts[j].stride;
    const float* __restrict d = parts[j].d + g * parts[j].stride;
    const int64_t m = parts[j].len;
    REGOPTIM_SIMD
    for (int64_t i = 0; i < m; ++i) {
      const float dr = d[i] * rf;
      z[i] = S::st(S::ld(z[i]) * (dr / (dr + cf)));
    }
  }
}

}  // namespace
