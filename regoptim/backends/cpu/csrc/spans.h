// The fused CPU kernel's update spans: one family's step (ProxSGD, ProxAdam(W)) on a contiguous
// run of one tensor, flags compiled in or read at run time. Included by fused_cpu.cpp after
// elementwise.h (numerics in fused_cpu.cpp); the plain step runs them over all tensors, the
// group-lasso step over blocks of groups (group_blocks.h). Every name is in the anonymous
// namespace.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

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

// Lanes [0, W) += lanes [W, 2W): one step of a pairwise sum, W a constant so that it vectorizes.
template <int W>
inline void fold_sum(double (&a)[16]) {
  REGOPTIM_SIMD
  for (int j = 0; j < W; ++j) a[j] += a[j + W];
}

// TAIL: on the last numel % (torch's vector width) elements of a tensor torch's kernel runs its
// scalar loop, where the compiler contracted the momentum update the other way round:
// fma(b, mu, g * (1 - dampening)) instead of fma(1 - dampening, g, b * mu).
// NORM: also add the sum of squares of the stored results to *norm_out (the group-lasso step's
// per-group norms, group_blocks.h; in 16 double lanes, then pairwise, free in this memory-bound
// loop); the update itself is the same.
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
  const auto elem = [&](int64_t i) REGOPTIM_ALWAYS_INLINE {
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
    // 16 double lanes, explicit (GCC does not vectorize this loop as an omp simd reduction)
    double acc[16] = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      REGOPTIM_SIMD
      for (int j = 0; j < 16; ++j) {
        const float x = S::ld(elem(i + j));
        acc[j] += static_cast<double>(x * x);
      }
    }
    for (; i < n; ++i) {
      const float x = S::ld(elem(i));
      acc[0] += static_cast<double>(x * x);
    }
    fold_sum<8>(acc);
    fold_sum<4>(acc);
    fold_sum<2>(acc);
    fold_sum<1>(acc);
    *norm_out += acc[0];
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
// far below T's own rounding) and their t, per segment (a group's run), to mom_out->out:
// [0] sum z^2, [1] sum z^2 t, [2] sum z^2 t^2, and [3] max t, 4 floats per segment (group_poly.h's
// polynomial path; free in this memory-bound loop). The n elements start `phase` elements into a segment of `seg`. Summed in 16 float lanes
// (segments of at most kMomentsChunk elements: 64 deep), then pairwise; the path uses them only
// for rho, whose error reaches x scaled by e <= 2^-8.
struct MomentsOut {
  float* out;
  int64_t seg, phase;
};
// The polynomial path's moments in 16 float lanes (explicit: omp's max reduction does not
// vectorize), shared by this span and the moments pass (group_poly.h): lane j of a[0..2] +=
// z^2, z^2 t, z^2 t^2, a[3] <- max(a[3], t).
inline void add_moments(float (&a)[4][16], int j, float z, float t) {
  const float q = z * z, qt = q * t;
  a[0][j] += q;
  a[1][j] += qt;
  a[2][j] += qt * t;
  a[3][j] = t > a[3][j] ? t : a[3][j];
}

// Lanes [0, W) of three sums += lanes [W, 2W), of a max <- the max: one pairwise step, W a
// constant so that it vectorizes.
template <int W>
inline void fold_step(float (&a)[4][16]) {
  REGOPTIM_SIMD
  for (int j = 0; j < W; ++j) {
    a[0][j] += a[0][j + W];
    a[1][j] += a[1][j + W];
    a[2][j] += a[2][j + W];
    a[3][j] = a[3][j + W] > a[3][j] ? a[3][j + W] : a[3][j];
  }
}

// The 16 lanes of add_moments into lane 0, pairwise.
inline void fold_moments(float (&a)[4][16]) {
  fold_step<8>(a);
  fold_step<4>(a);
  fold_step<2>(a);
  fold_step<1>(a);
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
      // or two from torch's (-lr/bc1 * m) / (sqrt(v) / sqrt(bc2) + eps) (torch has no L1). An
      // FMA where torch's build has them (madd), as everywhere in this loop.
      const float den = madd<FM>(fm, std::sqrt(vv), inv_bc2_sqrt, eps);
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
      float a[4][16] = {};
      for (; i + 16 <= end; i += 16) {
        REGOPTIM_SIMD
        for (int j = 0; j < 16; ++j) {
          float t;
          const float z = elem(i + j, t);
          add_moments(a, j, z, t);
        }
      }
      for (; i < end; ++i) {
        float t;
        const float z = elem(i, t);
        add_moments(a, 0, z, t);
      }
      fold_moments(a);
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
