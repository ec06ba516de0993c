// Group lasso in the fused CPU kernel, ProxAdam(W): the polynomial path of the prox in Adam's
// metric, and groups_adam_prox, which runs it or the general path (group_lasso.h) on each group
// of a block. Included by group_blocks.h after group_lasso.h; every name is in fused_cpu.cpp's
// anonymous namespace.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

// ---------------------------------------------------------------------------------------------
// ProxAdam(W) on the update's inverse denominators t = 1 / d, the common case without a division.
//
// With e_i = c t_i / rho, x_i = z_i / (1 + e_i) and rho = ||x|| the root of
// rho^2 = sum_i z_i^2 / (1 + e_i)^2. When c * max t <= kPolyDelta * ||z|| the group is alive
// (||d z|| >= ||z|| / max t > c) and its root has rho >= ||z|| - c max t (group_prox's bracket),
// so every e_i <= eta = kPolyDelta / (1 - kPolyDelta) ~ 2^-8. Expanding in kappa = c / ||z||
// with mu_k = M_k / M_0, M_k = sum_i z_i^2 t_i^k (kappa^k mu_k <= eta^k):
//   rho = ||z|| (1 - kappa mu_1 + 1.5 kappa^2 (mu_2 - mu_1^2) + O(eta^3)),
// and x depends on rho only through e: a relative error r of rho moves x_i by at most e_i r
// (O(eta^4)), as much as the cubic 1 / (1 + e) = 1 - e + e^2 - e^3 + O(e^4) does. A float64
// check of this path at the bound (c max t = kPolyDelta ||z||; t spread over decades, constant,
// two-valued) found |x - x*| / |x*| <= 2^-31.7 against the exact root: below float32 rounding.
// So: one pass for M_0, M_1, M_2 and max t (float terms summed as sum_pos2), rho from the series,
// one pass x_i = z_i (1 - e_i + e_i^2 - e_i^3) (Horner in float, separate roundings: about an
// ulp). Any other group (a tiny or NaN/infinite d, a group near or at zero) takes the general
// path: d_i = 1 / t_i, then group_diag_prox.
constexpr double kPolyDelta = 1.0 / 256;
constexpr int64_t kMomentsChunk = 1024;  // elements summed in float lanes before double

// The moments of group g over its parts not marked moments_done: mo[k * stride] += M_k (k = 0..2),
// *tmax = max(*tmax, max t). As the update span sums them (spans.h, add_moments): chunks of up to
// kMomentsChunk elements in 16 float lanes (64 deep), folded pairwise, then in double over the
// chunks and parts; the last numel % 16 of a part in double. Their error (< 70 float32
// roundings, relative: positive terms) reaches x only through rho, scaled by e <= 2^-8: below
// 2^-26. A NaN t makes M_1, M_2 NaN (max t ignores it).
template <class S>
void group_moments(const GroupPart<typename S::T>* parts, int64_t nparts, int64_t g,
                   double* mo, int64_t stride, float* tmax) {
  double m0 = 0.0, m1 = 0.0, m2 = 0.0;
  float hi = *tmax;
  for (int64_t q = 0; q < nparts; ++q) {
    if (parts[q].moments_done) continue;
    const typename S::T* __restrict z = parts[q].z + g * parts[q].stride;
    const float* __restrict t = parts[q].d + g * parts[q].stride;
    const int64_t m = parts[q].len;
    int64_t i = 0;
    while (m - i >= 16) {
      const int64_t end = i + std::min<int64_t>(kMomentsChunk, (m - i) / 16 * 16);
      float a[4][16] = {};
      for (; i < end; i += 16) {
        REGOPTIM_SIMD
        for (int j = 0; j < 16; ++j) add_moments(a, j, S::ld(z[i + j]), t[i + j]);
      }
      fold_moments(a);
      m0 += a[0][0];
      m1 += a[1][0];
      m2 += a[2][0];
      hi = a[3][0] > hi ? a[3][0] : hi;
    }
    for (; i < m; ++i) {
      const float ti = t[i], zi = S::ld(z[i]);
      const float s0 = zi * zi, s1 = s0 * ti;
      m0 += static_cast<double>(s0);
      m1 += static_cast<double>(s1);
      m2 += static_cast<double>(s1 * ti);
      hi = ti > hi ? ti : hi;
    }
  }
  mo[0] += m0;
  mo[stride] += m1;
  mo[2 * stride] += m2;
  *tmax = hi;
}

// For each of nb groups (moments as group_moments wrote them, stride nb): ce = c / rho when the
// group takes the polynomial path (rho from the series above), else NaN. Vectorized over groups.
inline void moments_scale(int64_t nb, const double* __restrict mo, const float* __restrict tmax,
                          double c, float* __restrict ce) {
  const double* m0 = mo;
  const double* m1 = mo + nb;
  const double* m2 = mo + 2 * nb;
  REGOPTIM_SIMD
  for (int64_t g = 0; g < nb; ++g) {
    const double t = tmax[g];
    const double all = m0[g] + m1[g] + m2[g] + t;  // finite: x - x == 0
    const double r0 = std::sqrt(m0[g]);
    const bool fast = all - all == 0.0 && c * t <= kPolyDelta * r0;
    const double k = c / r0, inv0 = 1.0 / m0[g];
    const double u1 = m1[g] * inv0, u2 = m2[g] * inv0;
    const double rho = r0 * (1.0 + k * (k * 1.5 * (u2 - u1 * u1) - u1));
    ce[g] = fast ? static_cast<float>(c / rho) : std::numeric_limits<float>::quiet_NaN();
  }
}

// Group g <- z_i (1 - e_i + e_i^2 - e_i^3), e_i = ce t_i: the polynomial path's prox.
template <class S>
void group_poly_shrink(const GroupPart<typename S::T>* parts, int64_t nparts, int64_t g,
                       float ce) {
  for (int64_t q = 0; q < nparts; ++q) {
    typename S::T* __restrict z = parts[q].z + g * parts[q].stride;
    const float* __restrict t = parts[q].d + g * parts[q].stride;
    const int64_t m = parts[q].len;
    REGOPTIM_SIMD
    for (int64_t i = 0; i < m; ++i) {
      const float e = ce * t[i];
      const float r = 1.0f + e * (e * (1.0f - e) - 1.0f);  // 1 / (1 + e) to e^4
      z[i] = S::st(S::ld(z[i]) * r);
    }
  }
}

// Group g <- its prox by the general path: d_i = 1 / t_i (over parts[q].d), then group_diag_prox.
template <class S>
void group_general_prox(const GroupPart<typename S::T>* parts, int64_t nparts, int64_t g,
                        double c, float* __restrict xbuf) {
  for (int64_t q = 0; q < nparts; ++q) {
    float* __restrict t = parts[q].d + g * parts[q].stride;
    const int64_t m = parts[q].len;
    REGOPTIM_SIMD
    for (int64_t i = 0; i < m; ++i) t[i] = 1.0f / t[i];
  }
  group_diag_prox<S>(parts, nparts, g, c, xbuf);
}

// Groups [0, nb) of `parts` <- their prox in the metric diag(1 / t) (parts[q].d holds t; the
// general path overwrites a group's with d). `mo` (3 nb doubles), `tmax` and `ce` (nb floats):
// scratch; `xbuf` as group_diag_prox.
// `mo` and `tmax` hold the moments of the parts marked moments_done (else 0) on entry.
template <class S>
void groups_adam_prox(const GroupPart<typename S::T>* parts, int64_t nparts, int64_t nb,
                      double c, double* mo, float* tmax, float* ce, float* xbuf) {
  for (int64_t g = 0; g < nb; ++g) group_moments<S>(parts, nparts, g, mo + g, nb, tmax + g);
  moments_scale(nb, mo, tmax, c, ce);
  for (int64_t g = 0; g < nb; ++g) {
    if (ce[g] == ce[g]) group_poly_shrink<S>(parts, nparts, g, ce[g]);
    else group_general_prox<S>(parts, nparts, g, c, xbuf);
  }
}

}  // namespace
