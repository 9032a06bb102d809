// The CUDA kernels bound to torch: checks, the current stream and device,
// device-side scalars in the op-math dtype, and the raw pointer lists the
// kernels take (sam_kernels.h).  Built only in CUDA builds (it needs torch's
// c10/cuda headers, absent from the CPU wheel).
//
// Nothing here synchronises with the host: scale/skip/grad_scale stay on the
// device (double, as the pass's scalars are; cast there when a caller's differ)
// and the grad norm's scratch buffer comes from the caching allocator, so the
// ops can be captured in a CUDA graph.  The reductions (grad_sq_norm,
// dot_sq_norms) accumulate and return double for every dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "sam_checks.h"
#include "sam_kernels.h"

namespace fastsam {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kDouble;
    default: TORCH_CHECK_VALUE(false, "fastsam: dtype ", t, " is not supported by the CUDA kernels");
  }
  return cuda::DType::kFloat;
}

// Owns the pointer arrays that a HostLists points into.
struct PointerLists {
  std::vector<std::vector<void*>> ptrs;
  std::vector<int64_t> numels;

  PointerLists(std::initializer_list<at::TensorList> lists) {
    numels.reserve(lists.begin()->size());
    for (const at::Tensor& t : *lists.begin()) numels.push_back(t.numel());
    for (at::TensorList l : lists) {
      std::vector<void*> p;
      p.reserve(l.size());
      for (const at::Tensor& t : l) p.push_back(t.data_ptr());
      ptrs.push_back(std::move(p));
    }
  }

  cuda::HostLists view() const {
    cuda::HostLists v;
    v.n_lists = static_cast<int>(ptrs.size());
    v.n_tensors = static_cast<int64_t>(numels.size());
    for (size_t l = 0; l < ptrs.size(); ++l) v.lists[l] = ptrs[l].data();
    v.numels = numels.data();
    return v;
  }
};

// A device scalar as one double (a no-op when it already is: the pass's scalars are).
at::Tensor device_scalar(const at::Tensor& s) {
  return s.to(at::kDouble).contiguous();
}

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

at::Tensor grad_sq_norm_cuda(at::TensorList grads, at::TensorList params) {
  check_grad_sq_norm(grads, params);
  if (grads.empty()) return at::zeros({}, at::kDouble);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  PointerLists lists = params.empty() ? PointerLists{grads} : PointerLists{grads, params};
  at::Tensor scratch = at::empty({cuda::grad_sq_norm_scratch(lists.view())}, grads[0].options().dtype(at::kDouble));
  at::Tensor out = at::empty({}, grads[0].options().dtype(at::kDouble));
  cuda::grad_sq_norm(lists.view(), kernel_dtype(grads[0].scalar_type()), scratch.data_ptr(), out.data_ptr(),
                     stream_of(out));
  return out;
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList copies, const at::Tensor& scale,
                  const at::Tensor& skip, bool adaptive) {
  check_perturb(params, grads, copies, scale, skip);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::Tensor sc = device_scalar(scale), sk = device_scalar(skip);
  PointerLists lists{params, grads, copies};
  cuda::perturb(lists.view(), kernel_dtype(params[0].scalar_type()), sc.data_ptr(), sk.data_ptr(), adaptive,
                stream_of(params[0]));
}

void restore_cuda(at::TensorList params, at::TensorList copies) {
  check_restore(params, copies);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  PointerLists lists{params, copies};
  cuda::copy(lists.view(), static_cast<int>(params[0].element_size()), stream_of(params[0]));
}

void restore_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList copies,
                           at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                           bool nesterov, double weight_decay, bool maximize, bool first,
                           const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_sgd_step(params, grads, copies, momentum_buffers, momentum, grad_scale, skip);
  check_copies_distinct("restore_sgd_step", copies, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::Tensor sk = device_scalar(skip);
  const at::Tensor gs = grad_scale.has_value() ? device_scalar(*grad_scale) : at::Tensor();
  // No copies: restore from the params themselves; no momentum: the params
  // stand in for the (unread) buffers.
  PointerLists lists{params, grads, copies.empty() ? params : copies,
                     momentum == 0 ? params : momentum_buffers};
  const cuda::SgdHostArgs args{lr, momentum, dampening, weight_decay, nesterov, maximize, first, !copies.empty()};
  cuda::restore_sgd_step(lists.view(), kernel_dtype(params[0].scalar_type()), args,
                         gs.defined() ? gs.data_ptr() : nullptr, sk.data_ptr(), stream_of(params[0]));
}

void restore_adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList copies,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                            double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                            bool maximize, const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_adam_step(params, grads, copies, exp_avgs, exp_avg_sqs, steps, grad_scale, skip);
  check_copies_distinct("restore_adam_step", copies, params);
  if (params.empty()) return;
  const bool steps_double = steps[0].scalar_type() == at::kDouble;
  for (const at::Tensor& s : steps) {
    TORCH_CHECK_VALUE((s.scalar_type() == at::kDouble) == steps_double,
                      "fastsam::restore_adam_step: the step counters of one call must share a dtype");
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::Tensor sk = device_scalar(skip);
  const at::Tensor gs = grad_scale.has_value() ? device_scalar(*grad_scale) : at::Tensor();
  PointerLists lists{params, grads, copies.empty() ? params : copies, exp_avgs, exp_avg_sqs, steps};
  const cuda::AdamHostArgs args{lr, beta1, beta2, eps, weight_decay, decoupled, maximize, steps_double,
                                !copies.empty()};
  cuda::restore_adam_step(lists.view(), kernel_dtype(params[0].scalar_type()), args,
                          gs.defined() ? gs.data_ptr() : nullptr, sk.data_ptr(), stream_of(params[0]));
}

at::Tensor dot_sq_norms_cuda(at::TensorList xs, at::TensorList ys, const std::optional<at::Tensor>& accumulate) {
  check_dot_sq_norms(xs, ys, accumulate);
  if (xs.empty()) return accumulate.has_value() ? accumulate->clone() : at::zeros({3}, at::kDouble);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  PointerLists lists{xs, ys};
  at::Tensor scratch = at::empty({cuda::dot_sq_norms_scratch(lists.view())}, xs[0].options().dtype(at::kDouble));
  at::Tensor out = at::empty({3}, xs[0].options().dtype(at::kDouble));
  const at::Tensor prev = accumulate.has_value() ? accumulate->to(at::kDouble).contiguous() : at::Tensor();
  cuda::dot_sq_norms(lists.view(), kernel_dtype(xs[0].scalar_type()), scratch.data_ptr(),
                     prev.defined() ? prev.data_ptr() : nullptr, out.data_ptr(), stream_of(out));
  return out;
}

void axpby_cuda(at::TensorList xs, at::TensorList ys, const at::Tensor& coefs, at::TensorList out) {
  check_axpby(xs, ys, coefs, out);
  if (xs.empty()) return;
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const at::Tensor c = coefs.to(at::kDouble).contiguous();  // on the device: no sync; a no-op for float64 coefs
  PointerLists lists{xs, ys, out.empty() ? xs : out};
  cuda::axpby(lists.view(), kernel_dtype(xs[0].scalar_type()), c.data_ptr(), stream_of(xs[0]));
}

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("dot_sq_norms", &fastsam::dot_sq_norms_cuda);
  m.impl("axpby", &fastsam::axpby_cuda);
  m.impl("grad_sq_norm", &fastsam::grad_sq_norm_cuda);
  m.impl("perturb", &fastsam::perturb_cuda);
  m.impl("restore", &fastsam::restore_cuda);
  m.impl("restore_sgd_step", &fastsam::restore_sgd_step_cuda);
  m.impl("restore_adam_step", &fastsam::restore_adam_step_cuda);
}
