// The CPU twin of the CUDA kernels: the same ops over the same tensor lists,
// with the per-element math from sam_math.h.
//
// Work is cut like the CUDA launcher cuts it: every tensor into chunks of
// kChunk elements, and the flat (tensor, chunk) list is split between threads
// with at::parallel_for.  Each op makes one pass over memory: a chunk's
// elements are loaded once, updated in registers and stored once.  The inner
// loops are plain indexed loops over restrict pointers with the
// configuration hoisted into template parameters, so g++ -O3 vectorises the
// fp32/fp64 ones (fp16/bf16 convert through c10::Half/BFloat16 and mostly
// stay scalar).
//
// The skip flag, scale and grad_scale are read on the host: on the CPU that
// costs nothing (the contract allows it), and it lets a skipped step do only
// the copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "sam_checks.h"
#include "sam_math.h"

namespace fastsam {
namespace {

// 32768 elements (128 KiB of fp32 per list) keeps a chunk's 3-5 lists in L2
// and gives the 2 threads of a ResNet-18 step ~350 chunks to share.
constexpr int64_t kChunk = 32768;
// Independent partial sums per chunk in the norm: lets g++ vectorise the
// reduction without -ffast-math, and fixes the summation order (results do
// not depend on the thread count).
constexpr int kLanes = 16;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({int64_t(t), b, std::min(n, b + kChunk)});
  }
  return chunks;
}

template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i, chunks[i]);
  });
}

// Rounds an op-math value to the storage dtype and back (identity for fp32/fp64).
template <typename T>
struct RoundToStorage {
  template <typename acc_t>
  acc_t operator()(acc_t x) const {
    return acc_t(T(x));
  }
};

template <typename T>
T* ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<T*>(t.data_ptr()) + offset;
}

bool host_flag(const at::Tensor& skip) { return skip.item<double>() != 0; }

// ---------------------------------------------------------------- grad norm
template <typename T, typename acc_t, bool kAdaptive>
acc_t sq_norm_chunk(const T* __restrict__ g, const T* __restrict__ w, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t wv = kAdaptive ? acc_t(w[j + l]) : acc_t(0);
      lanes[l] += sq_norm_term<acc_t>(acc_t(g[j + l]), wv, kAdaptive);
    }
  }
  acc_t sum = 0;
  for (; j < n; ++j) sum += sq_norm_term<acc_t>(acc_t(g[j]), kAdaptive ? acc_t(w[j]) : acc_t(0), kAdaptive);
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

at::Tensor grad_sq_norm_cpu(at::TensorList grads, at::TensorList params) {
  check_grad_sq_norm(grads, params);
  if (grads.empty()) return at::zeros({}, at::kFloat);
  const bool adaptive = !params.empty();
  const auto chunks = make_chunks(grads);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fastsam_grad_sq_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Two stages as on the GPU: one partial per chunk, then a fixed-order sum.
    std::vector<acc_t> partial(chunks.size());
    for_each_chunk(chunks, [&](int64_t i, const Chunk& c) {
      const scalar_t* g = ptr<scalar_t>(grads[c.tensor], c.begin);
      const int64_t n = c.end - c.begin;
      partial[i] = adaptive ? sq_norm_chunk<scalar_t, acc_t, true>(g, ptr<scalar_t>(params[c.tensor], c.begin), n)
                            : sq_norm_chunk<scalar_t, acc_t, false>(g, nullptr, n);
    });
    acc_t total = 0;
    for (acc_t p : partial) total += p;
    out = at::scalar_tensor(total, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return out;
}

// ---------------------------------------------------------------- perturb / restore
void copy_lists(at::TensorList dst, at::TensorList src) {
  const auto chunks = make_chunks(dst);
  for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
    const int64_t item = dst[c.tensor].element_size();
    std::memcpy(ptr<char>(dst[c.tensor], c.begin * item), ptr<char>(src[c.tensor], c.begin * item),
                (c.end - c.begin) * item);
  });
}

template <typename T, typename acc_t, bool kAdaptive>
void perturb_chunk(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ c, int64_t n, acc_t scale) {
  for (int64_t j = 0; j < n; ++j) {
    const T w = p[j];
    c[j] = w;  // the exact copy: storage bits, never a round trip through acc_t
    p[j] = T(perturb_element<acc_t>(acc_t(w), acc_t(g[j]), scale, kAdaptive));
  }
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies, const at::Tensor& scale,
                 const at::Tensor& skip, bool adaptive) {
  check_perturb(params, grads, copies, scale, skip);
  if (params.empty()) return;
  if (host_flag(skip)) {
    copy_lists(copies, params);
    return;
  }
  const auto chunks = make_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fastsam_perturb", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale.item<acc_t>();
    for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
      scalar_t* p = ptr<scalar_t>(params[c.tensor], c.begin);
      const scalar_t* g = ptr<scalar_t>(grads[c.tensor], c.begin);
      scalar_t* cp = ptr<scalar_t>(copies[c.tensor], c.begin);
      const int64_t n = c.end - c.begin;
      if (adaptive) {
        perturb_chunk<scalar_t, acc_t, true>(p, g, cp, n, s);
      } else {
        perturb_chunk<scalar_t, acc_t, false>(p, g, cp, n, s);
      }
    });
  });
}

void restore_cpu(at::TensorList params, at::TensorList copies) {
  check_restore(params, copies);
  copy_lists(params, copies);
}

// ---------------------------------------------------------------- restore + SGD
// `src` is the copy to restore from, or `p` itself (nothing to restore).
template <typename T, typename acc_t, bool kMomentum>
void sgd_chunk(T* p, const T* src, const T* __restrict__ g, T* __restrict__ buf, int64_t n,
               const SgdArgs<acc_t> a, acc_t signed_scale) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t w = acc_t(src[j]);
    acc_t b = kMomentum ? acc_t(buf[j]) : acc_t(0);
    sgd_element<acc_t, kMomentum>(w, sam_grad<acc_t>(acc_t(g[j]), signed_scale), b, a, RoundToStorage<T>());
    p[j] = T(w);
    if (kMomentum) buf[j] = T(b);
  }
}

void restore_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies,
                          at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                          bool nesterov, double weight_decay, bool maximize, bool first,
                          const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_sgd_step(params, grads, copies, momentum_buffers, momentum, grad_scale, skip);
  check_copies_distinct("restore_sgd_step", copies, params);
  if (params.empty()) return;
  const bool restore = !copies.empty();
  if (host_flag(skip)) {
    if (restore) copy_lists(params, copies);
    return;
  }
  const bool has_momentum = momentum != 0;
  const auto chunks = make_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fastsam_sgd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SgdArgs<acc_t> a{acc_t(lr), acc_t(momentum), acc_t(1 - dampening), acc_t(weight_decay), nesterov, first};
    const acc_t gs = signed_grad_scale(grad_scale.has_value() ? grad_scale->item<acc_t>() : acc_t(1), maximize);
    for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
      scalar_t* p = ptr<scalar_t>(params[c.tensor], c.begin);
      const scalar_t* src = restore ? ptr<scalar_t>(copies[c.tensor], c.begin) : p;
      const scalar_t* g = ptr<scalar_t>(grads[c.tensor], c.begin);
      const int64_t n = c.end - c.begin;
      if (has_momentum) {
        sgd_chunk<scalar_t, acc_t, true>(p, src, g, ptr<scalar_t>(momentum_buffers[c.tensor], c.begin), n, a,
                                         gs);
      } else {
        sgd_chunk<scalar_t, acc_t, false>(p, src, g, nullptr, n, a, gs);
      }
    });
  });
}

// ---------------------------------------------------------------- restore + Adam
template <typename T, typename acc_t>
void adam_chunk(T* p, const T* src, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, int64_t n,
                const AdamArgs<acc_t> a, acc_t step_size, acc_t bc2_sqrt, acc_t signed_scale) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t w = acc_t(src[j]);
    acc_t mj = acc_t(m[j]);
    acc_t vj = acc_t(v[j]);
    adam_element<acc_t>(w, sam_grad<acc_t>(acc_t(g[j]), signed_scale), mj, vj, a, step_size, bc2_sqrt,
                        RoundToStorage<T>());
    p[j] = T(w);
    m[j] = T(mj);
    v[j] = T(vj);
  }
}

double read_step(const at::Tensor& s) {
  return s.scalar_type() == at::kDouble ? *static_cast<const double*>(s.data_ptr())
                                        : double(*static_cast<const float*>(s.data_ptr()));
}

void write_step(const at::Tensor& s, double value) {
  if (s.scalar_type() == at::kDouble) {
    *static_cast<double*>(s.data_ptr()) = value;
  } else {
    *static_cast<float*>(s.data_ptr()) = float(value);
  }
}

void restore_adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                           double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                           bool maximize, const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_adam_step(params, grads, copies, exp_avgs, exp_avg_sqs, steps, grad_scale, skip);
  check_copies_distinct("restore_adam_step", copies, params);
  if (params.empty()) return;
  const bool restore = !copies.empty();
  if (host_flag(skip)) {
    if (restore) copy_lists(params, copies);
    return;
  }
  // Per-tensor bias corrections from the incremented step counters, in double
  // on the host as torch's non-capturable Adam computes them.
  const size_t n_tensors = params.size();
  std::vector<double> new_step(n_tensors), step_size(n_tensors), bc2_sqrt(n_tensors);
  for (size_t i = 0; i < n_tensors; ++i) {
    new_step[i] = read_step(steps[i]) + 1;
    adam_bias_terms(new_step[i], lr, beta1, beta2, &step_size[i], &bc2_sqrt[i]);
  }
  const auto chunks = make_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fastsam_adam", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = make_adam_args<acc_t>(lr, beta1, beta2, eps, weight_decay, decoupled);
    const acc_t gs = signed_grad_scale(grad_scale.has_value() ? grad_scale->item<acc_t>() : acc_t(1), maximize);
    for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
      const int64_t t = c.tensor;
      scalar_t* p = ptr<scalar_t>(params[t], c.begin);
      adam_chunk<scalar_t, acc_t>(p, restore ? ptr<scalar_t>(copies[t], c.begin) : p,
                                  ptr<scalar_t>(grads[t], c.begin), ptr<scalar_t>(exp_avgs[t], c.begin),
                                  ptr<scalar_t>(exp_avg_sqs[t], c.begin), c.end - c.begin, a,
                                  acc_t(step_size[t]), acc_t(bc2_sqrt[t]), gs);
    });
  });
  for (size_t i = 0; i < n_tensors; ++i) write_step(steps[i], new_step[i]);
}

// ---------------------------------------------------------------- the variants' ops
template <typename T, typename acc_t>
void dot_chunk(const T* __restrict__ x, const T* __restrict__ y, int64_t n, acc_t* out3) {
  acc_t xy[kLanes] = {}, xx[kLanes] = {}, yy[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) dot_sq_norms_terms<acc_t>(acc_t(x[j + l]), acc_t(y[j + l]), xy[l], xx[l], yy[l]);
  }
  acc_t a = 0, b = 0, c = 0;
  for (; j < n; ++j) dot_sq_norms_terms<acc_t>(acc_t(x[j]), acc_t(y[j]), a, b, c);
  for (int l = 0; l < kLanes; ++l) {
    a += xy[l];
    b += xx[l];
    c += yy[l];
  }
  out3[0] = a;
  out3[1] = b;
  out3[2] = c;
}

at::Tensor dot_sq_norms_cpu(at::TensorList xs, at::TensorList ys, const std::optional<at::Tensor>& accumulate) {
  check_dot_sq_norms(xs, ys, accumulate);
  if (xs.empty()) return accumulate.has_value() ? accumulate->clone() : at::zeros({3}, at::kFloat);
  const auto chunks = make_chunks(xs);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "fastsam_dot_sq_norms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Two stages as the norm: three partials per chunk, then fixed-order sums.
    std::vector<acc_t> partial(3 * chunks.size());
    for_each_chunk(chunks, [&](int64_t i, const Chunk& c) {
      dot_chunk<scalar_t, acc_t>(ptr<scalar_t>(xs[c.tensor], c.begin), ptr<scalar_t>(ys[c.tensor], c.begin),
                                 c.end - c.begin, &partial[3 * i]);
    });
    acc_t total[3] = {0, 0, 0};
    for (size_t i = 0; i < chunks.size(); ++i)
      for (int k = 0; k < 3; ++k) total[k] += partial[3 * i + k];
    out = at::empty({3}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* o = out.data_ptr<acc_t>();
    if (accumulate.has_value()) {
      const at::Tensor prev = accumulate->to(at::kDouble).contiguous();  // the previous total, read on the host
      const double* pv = prev.data_ptr<double>();
      for (int k = 0; k < 3; ++k) total[k] = total[k] + acc_t(pv[k]);
    }
    for (int k = 0; k < 3; ++k) o[k] = total[k];
  });
  return out;
}

// `out` may be `x` or `y` (no restrict on it): each element is read before it is written.
template <typename T, typename acc_t>
void axpby_chunk(const T* x, const T* y, T* out, int64_t n, acc_t a, acc_t b) {
  for (int64_t j = 0; j < n; ++j) out[j] = T(axpby_element<acc_t>(acc_t(x[j]), acc_t(y[j]), a, b));
}

void axpby_cpu(at::TensorList xs, at::TensorList ys, const at::Tensor& coefs, at::TensorList out) {
  check_axpby(xs, ys, coefs, out);
  if (xs.empty()) return;
  const at::Tensor c = coefs.to(at::kDouble).contiguous();  // a, b, skip read on the host
  const double* cv = c.data_ptr<double>();
  if (cv[2] != 0) return;
  at::TensorList dst = out.empty() ? xs : out;
  const auto chunks = make_chunks(xs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "fastsam_axpby", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = acc_t(cv[0]), b = acc_t(cv[1]);
    for_each_chunk(chunks, [&](int64_t, const Chunk& ch) {
      axpby_chunk<scalar_t, acc_t>(ptr<scalar_t>(xs[ch.tensor], ch.begin), ptr<scalar_t>(ys[ch.tensor], ch.begin),
                                   ptr<scalar_t>(dst[ch.tensor], ch.begin), ch.end - ch.begin, a, b);
    });
  });
}

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("dot_sq_norms", &fastsam::dot_sq_norms_cpu);
  m.impl("axpby", &fastsam::axpby_cpu);
  m.impl("grad_sq_norm", &fastsam::grad_sq_norm_cpu);
  m.impl("perturb", &fastsam::perturb_cpu);
  m.impl("restore", &fastsam::restore_cpu);
  m.impl("restore_sgd_step", &fastsam::restore_sgd_step_cpu);
  m.impl("restore_adam_step", &fastsam::restore_adam_step_cpu);
}
