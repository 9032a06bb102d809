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
#elif defined(__GNUC__)
// Forced: the CPU twin calls these from loops compiled for AVX2 and AVX-512
// (`#pragma GCC target`), on registers of values too; a copy left out of line
// is compiled for the default target, and g++ then passes those registers
// through memory on every element.
#define FASTSAM_HD inline __attribute__((always_inline))
#else
#define FASTSAM_HD inline
#endif

namespace fastsam {

// ||g||^2 term.  ASAM weights the gradient by |w| (the contract's
// sum((|w|*g)**2)).  The CUDA kernels sum it in double for every storage dtype
// (callers widen g and w): a finite float32 gradient's squares, and ASAM's
// |w| * g, may exceed float32's range, never double's; for float32 inputs
// w * g is exact in double.  The CPU twin sums in float and rescales where
// that overflows (sam_cpu_loops.h: sq_norm).
template <typename A>
FASTSAM_HD A sq_norm_term(A g, A w, bool adaptive) {
  const A v = adaptive ? (w < A(0) ? -w : w) * g : g;
  return v * v;
}

// A scale factor (the perturbation's rho / (||g|| + eps), the clip
// coefficient) comes as a double: for a gradient whose norm exceeds float32's
// range it lies below float32's normal range, where a float scale would be
// subnormal or 0.  The element math stays in acc_t and applies it as
// (g * hi) * lo: lo = 1 within float32's normal range (the product is then
// the one a float scale gives, bit for bit), else an exact power of two
// (2^-100 or 2^100) with hi a normal float, so that the product is still the
// correctly rounded g * s wherever that is a normal float.  For double
// storage hi = s, lo = 1.  fastsam/backends/_common.py: split_scale.
template <typename acc_t>
struct Scale {
  acc_t hi;
  acc_t lo;
};

template <typename acc_t>
FASTSAM_HD Scale<acc_t> split_scale(double s) {
  if (sizeof(acc_t) == sizeof(double)) return {acc_t(s), acc_t(1)};
  const double a = s < 0 ? -s : s;
  if (a > 0 && a < 0x1p-126) return {acc_t(s * 0x1p100), acc_t(0x1p-100)};
  if (a > 0x1.fffffep127 && a <= 1.7976931348623157e308) return {acc_t(s * 0x1p-100), acc_t(0x1p100)};
  return {acc_t(s), acc_t(1)};
}

// V is acc_t, or on the CPU a vector of acc_t (g++'s vector extensions: the
// same operations lane by lane, so the same bits).
template <typename acc_t, typename V = acc_t>
FASTSAM_HD V scaled(V g, Scale<acc_t> s) {
  return (g * s.hi) * s.lo;
}

// w + e with e = scale * g (SAM) or scale * w^2 * g (ASAM).
template <typename acc_t, typename V = acc_t>
FASTSAM_HD V perturb_element(V w, V g, Scale<acc_t> scale, bool adaptive) {
  V e = scaled<acc_t, V>(g, scale);
  if (adaptive) e = e * w * w;
  return w + e;
}

// The gradient the base step sees: g * grad_scale (1 when not clipping),
// negated under `maximize`.  The sign is folded into the scale once per call
// (signed_grad_scale): -(g * s) == g * (-s) bit for bit, and a branch-free
// element loop is one that g++ vectorises.
template <typename acc_t>
FASTSAM_HD Scale<acc_t> signed_grad_scale(Scale<acc_t> grad_scale, bool maximize) {
  return {maximize ? -grad_scale.hi : grad_scale.hi, grad_scale.lo};
}

template <typename acc_t, typename V = acc_t>
FASTSAM_HD V sam_grad(V g, Scale<acc_t> signed_scale) {
  return scaled<acc_t, V>(g, signed_scale);
}

// Built by make_sgd_args: an aggregate initialiser that left out `decay` would drop the weight decay.
template <typename acc_t>
struct SgdArgs {
  acc_t lr;
  acc_t momentum;
  acc_t one_minus_dampening;
  acc_t weight_decay;
  bool nesterov;
  bool first;  // fresh momentum buffer: torch sets it to the gradient
  bool decay;  // weight_decay != 0 (as torch tests it, in double): a switch a loop can fix as a constant
};

template <typename acc_t>
FASTSAM_HD SgdArgs<acc_t> make_sgd_args(double lr, double momentum, double dampening, double weight_decay,
                                        bool nesterov, bool first) {
  return {acc_t(lr), acc_t(momentum), acc_t(1 - dampening), acc_t(weight_decay), nesterov, first,
          weight_decay != 0};
}

// torch.optim.SGD on one element.  `d` is sam_grad(); `buf` is only touched
// when `has_momentum` (callers pass a dummy otherwise).  `round` maps a value
// to the nearest value of the storage dtype (identity for fp32/fp64): the
// buffer is used as stored, as torch's 16-bit SGD uses it.
template <typename acc_t, bool has_momentum, typename Round, typename V = acc_t>
FASTSAM_HD void sgd_element(V& w, V d, V& buf, const SgdArgs<acc_t>& a, const Round& round) {
  if (a.decay) d = d + a.weight_decay * w;
  if (has_momentum) {
    buf = round(a.first ? d : buf * a.momentum + a.one_minus_dampening * d);
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
  acc_t decay_factor;  // 1 - lr * weight_decay for AdamW, exactly 1 otherwise (w * 1 == w)
  bool l2;             // Adam's weight decay: added to the gradient
  bool lerp_low;       // torch.lerp's formula choice: weight (1 - beta1) < 0.5
};

template <typename acc_t>
FASTSAM_HD AdamArgs<acc_t> make_adam_args(double lr, double beta1, double beta2, double eps, double weight_decay,
                                          bool decoupled) {
  AdamArgs<acc_t> a;
  a.one_minus_beta1 = acc_t(1 - beta1);
  a.beta2 = acc_t(beta2);
  a.one_minus_beta2 = acc_t(1 - beta2);
  a.eps = acc_t(eps);
  a.weight_decay = acc_t(weight_decay);
  a.decay_factor = decoupled && weight_decay != 0 ? acc_t(1 - lr * weight_decay) : acc_t(1);
  a.l2 = !decoupled && weight_decay != 0;
  a.lerp_low = a.one_minus_beta1 < acc_t(0.5);
  return a;
}

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
// The moments are used as stored (`round`: see sgd_element), as torch does:
// in 16 bits a tiny v rounds to 0 and the step is then m / eps.
template <typename acc_t, typename Round>
FASTSAM_HD void adam_element(acc_t& w, acc_t g, acc_t& m, acc_t& v, const AdamArgs<acc_t>& a, acc_t step_size,
                             acc_t bc2_sqrt, const Round& round) {
  // Selects on per-call flags, no branches: g++ if-converts them and
  // vectorises the CPU loop.
  w = w * a.decay_factor;
  g = a.l2 ? g + a.weight_decay * w : g;
  // torch.lerp's two-sided formula (exact at weight 0 and 1).
  const acc_t diff = g - m;
  m = round(a.lerp_low ? m + a.one_minus_beta1 * diff : g - diff * (acc_t(1) - a.one_minus_beta1));
  v = round(v * a.beta2 + a.one_minus_beta2 * g * g);
  using std::sqrt;
  const acc_t denom = sqrt(v) / bc2_sqrt + a.eps;
  w = w + step_size * (m / denom);
}

// The variants' update (fastsam/backends/__init__.py: axpby): a * x + b * y, two products
// and one sum in acc_t, each rounded: never an FMA, so that every backend gives torch's
// separately rounded result bit for bit.  nvcc contracts a * x + b * y unless told, so the
// device code rounds each operation explicitly (an __fmul_rn is never fused); the CPU build
// targets no FMA instruction (fastsam/_build.py: no -march), so g++ keeps them apart; the
// bitwise axpby test of tests/test_backend_ops.py fails for any backend that fuses.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
template <typename acc_t>
inline acc_t mul_rn(acc_t a, acc_t b) { return a * b; }
template <typename acc_t>
inline acc_t add_rn(acc_t a, acc_t b) { return a + b; }
#endif

template <typename acc_t>
FASTSAM_HD acc_t axpby_element(acc_t x, acc_t y, acc_t a, acc_t b) {
  return add_rn(mul_rn(a, x), mul_rn(b, y));
}

// The variants' reduction (dot_sq_norms): the three running sums of one element,
// in double for every storage dtype, on the CPU too: no finite input overflows.
FASTSAM_HD void dot_sq_norms_terms(double x, double y, double& xy, double& xx, double& yy) {
  xy += x * y;
  xx += x * x;
  yy += y * y;
}

}  // namespace fastsam
