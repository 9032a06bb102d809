// Per-element math of every fused SAM op, written once.
//
// Compiled by g++ for the CPU twin (sam_cpu.cpp) and by nvcc for the CUDA
// kernels (sam_kernels.cu), so the two backends cannot drift apart.  Every
// function works on the op-math type `acc_t` (float for fp32/fp16/bf16
// storage, double for fp64); loading and storing the storage type is the
// caller's job.  No torch and no CUDA headers here.
//
// The operation order follows torch.optim's foreach paths (and
// fastsam/backends/foreach.py) so that fp32 results agree closely with them:
// e.g. `w + (-lr) * d` is how `_foreach_add_(params, d_p, alpha=-lr)` rounds.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FASTSAM_HD __host__ __device__ __forceinline__
#else
#define FASTSAM_HD inline
#endif

namespace fastsam {

// ||g||^2 term; ASAM weights the gradient by |w| (the contract's
// sum((|w|*g)**2)).
template <typename acc_t>
FASTSAM_HD acc_t sq_norm_term(acc_t g, acc_t w, bool adaptive) {
  const acc_t v = adaptive ? (w < acc_t(0) ? -w : w) * g : g;
  return v * v;
}

// w + e with e = scale * g (SAM) or scale * w^2 * g (ASAM).
template <typename acc_t>
FASTSAM_HD acc_t perturb_element(acc_t w, acc_t g, acc_t scale, bool adaptive) {
  acc_t e = g * scale;
  if (adaptive) e = e * w * w;
  return w + e;
}

// The gradient the base step sees: g * grad_scale (1 when not clipping),
// negated under `maximize`.
template <typename acc_t>
FASTSAM_HD acc_t sam_grad(acc_t g, acc_t grad_scale, bool maximize) {
  const acc_t s = g * grad_scale;
  return maximize ? -s : s;
}

template <typename acc_t>
struct SgdArgs {
  acc_t lr;
  acc_t momentum;
  acc_t one_minus_dampening;
  acc_t weight_decay;
  bool nesterov;
  bool first;  // fresh momentum buffer: torch sets it to the gradient
};

// torch.optim.SGD on one element.  `d` is sam_grad(); `buf` is only touched
// when `has_momentum` (callers pass a dummy otherwise).
template <typename acc_t, bool has_momentum>
FASTSAM_HD void sgd_element(acc_t& w, acc_t d, acc_t& buf, const SgdArgs<acc_t>& a) {
  if (a.weight_decay != acc_t(0)) d = d + a.weight_decay * w;
  if (has_momentum) {
    buf = a.first ? d : buf * a.momentum + a.one_minus_dampening * d;
    d = a.nesterov ? d + a.momentum * buf : buf;
  }
  w = w + (-a.lr) * d;
}

template <typename acc_t>
struct AdamArgs {
  acc_t one_minus_beta1;
  acc_t beta2;
  acc_t one_minus_beta2;
  acc_t eps;
  acc_t weight_decay;
  acc_t decay_factor;  // 1 - lr * weight_decay (decoupled, AdamW)
  bool decoupled;
};

// The per-tensor bias corrections for the step about to be taken (t = the
// incremented step counter), in double as torch computes them from Python
// floats: step_size = -lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
FASTSAM_HD void adam_bias_terms(double t, double lr, double beta1, double beta2,
                                double* step_size, double* bc2_sqrt) {
  using std::pow;
  using std::sqrt;
  *step_size = -lr / (1.0 - pow(beta1, t));
  *bc2_sqrt = sqrt(1.0 - pow(beta2, t));
}

// torch.optim.Adam / AdamW (amsgrad off) on one element; `g` is sam_grad().
template <typename acc_t>
FASTSAM_HD void adam_element(acc_t& w, acc_t g, acc_t& m, acc_t& v, const AdamArgs<acc_t>& a,
                             acc_t step_size, acc_t bc2_sqrt) {
  if (a.weight_decay != acc_t(0)) {
    if (a.decoupled) {
      w = w * a.decay_factor;
    } else {
      g = g + a.weight_decay * w;
    }
  }
  // torch.lerp's two-sided formula (exact at weight 0 and 1).
  const acc_t diff = g - m;
  m = a.one_minus_beta1 < acc_t(0.5) ? m + a.one_minus_beta1 * diff
                                     : g - diff * (acc_t(1) - a.one_minus_beta1);
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
  using std::sqrt;
  const acc_t denom = sqrt(v) / bc2_sqrt + a.eps;
  w = w + step_size * (m / denom);
}

}  // namespace fastsam
