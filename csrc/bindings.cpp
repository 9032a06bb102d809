// The fastsam:: torch operators: schemas and their Meta (fake) kernels.
//
// The real kernels register themselves next to their code: CPU in
// sam_cpu.cpp, CUDA in sam_cuda.cpp (built only with FASTSAM_BUILD_CUDA or
// the CUDA JIT path).  Registering the ops with the dispatcher, rather than
// as pybind functions, lets torch.compile trace FusedSAM: the Meta kernels
// below give fake tensors their output, and the alias annotations (a!) tell
// functionalization which lists are mutated.
//
// The ops mirror the backend contract in fastsam/backends/__init__.py; an
// empty `copies` list means "nothing to restore" (the contract's copies-is-
// params case) and an empty `params` list in grad_sq_norm means plain SAM.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "sam_checks.h"

namespace fastsam {
namespace {

at::Tensor grad_sq_norm_meta(at::TensorList grads, at::TensorList params) {
  check_grad_sq_norm(grads, params);
  // float64 for every dtype: the norms accumulate in double (fastsam/backends/_common.py)
  if (grads.empty()) return at::empty({}, at::TensorOptions().dtype(at::kDouble).device(at::kMeta));
  return at::empty({}, grads[0].options().dtype(at::kDouble));
}

void perturb_meta(at::TensorList params, at::TensorList grads, at::TensorList copies, const at::Tensor& scale,
                  const at::Tensor& skip, bool /*adaptive*/) {
  check_perturb(params, grads, copies, scale, skip);
}

void restore_meta(at::TensorList params, at::TensorList copies) { check_restore(params, copies); }

void restore_sgd_step_meta(at::TensorList params, at::TensorList grads, at::TensorList copies,
                           at::TensorList momentum_buffers, double /*lr*/, double momentum, double /*dampening*/,
                           bool /*nesterov*/, double /*weight_decay*/, bool /*maximize*/, bool /*first*/,
                           const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_sgd_step(params, grads, copies, momentum_buffers, momentum, grad_scale, skip);
}

void restore_adam_step_meta(at::TensorList params, at::TensorList grads, at::TensorList copies,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                            double /*lr*/, double /*beta1*/, double /*beta2*/, double /*eps*/,
                            double /*weight_decay*/, bool /*decoupled*/, bool /*maximize*/,
                            const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_adam_step(params, grads, copies, exp_avgs, exp_avg_sqs, steps, grad_scale, skip);
}

void norm_perturb_meta(at::TensorList params, at::TensorList grads, at::TensorList copies, const at::Tensor& scalars,
                       double /*rho*/, double /*eps*/, bool /*adaptive*/) {
  check_norm_perturb(params, grads, copies, scalars);
}

void norm_restore_sgd_step_meta(at::TensorList params, at::TensorList grads, at::TensorList copies,
                                at::TensorList momentum_buffers, const at::Tensor& scalars,
                                const std::optional<at::Tensor>& prev, double /*lr*/, double momentum,
                                double /*dampening*/, bool /*nesterov*/, double /*weight_decay*/, bool /*maximize*/,
                                bool /*first*/) {
  check_norm_restore_sgd_step(params, grads, copies, momentum_buffers, scalars, prev, momentum);
}

at::Tensor dot_sq_norms_meta(at::TensorList xs, at::TensorList ys, const std::optional<at::Tensor>& accumulate) {
  check_dot_sq_norms(xs, ys, accumulate);
  if (xs.empty()) return at::empty({3}, at::TensorOptions().dtype(at::kDouble).device(at::kMeta));
  return at::empty({3}, xs[0].options().dtype(at::kDouble));
}

void axpby_meta(at::TensorList xs, at::TensorList ys, const at::Tensor& coefs, at::TensorList out) {
  check_axpby(xs, ys, coefs, out);
}

}  // namespace
}  // namespace fastsam

// A fragment, not TORCH_LIBRARY: the namespace is shared with the triton
// backend's torch.library custom ops (fastsam::triton_*).
TORCH_LIBRARY_FRAGMENT(fastsam, m) {
  m.def("grad_sq_norm(Tensor[] grads, Tensor[] params) -> Tensor");
  m.def("perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] copies, Tensor scale, Tensor skip, "
        "bool adaptive) -> ()");
  m.def("restore(Tensor(a!)[] params, Tensor[] copies) -> ()");
  m.def("restore_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] copies, "
        "Tensor(b!)[] momentum_buffers, float lr, float momentum, float dampening, bool nesterov, "
        "float weight_decay, bool maximize, bool first, Tensor? grad_scale, Tensor skip) -> ()");
  m.def("restore_adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] copies, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale, Tensor skip) -> ()");
  // A pass with its norm (CPU kernels only: the cuda backend composes them from the ops above).
  m.def("norm_perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] copies, Tensor(c!) scalars, float rho, "
        "float eps, bool adaptive) -> ()");
  m.def("norm_restore_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] copies, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!) scalars, Tensor? prev, float lr, float momentum, float dampening, bool nesterov, "
        "float weight_decay, bool maximize, bool first) -> ()");
  // The variants' ops.  axpby writes `out`, or `xs` in place when `out` is empty.
  m.def("dot_sq_norms(Tensor[] xs, Tensor[] ys, Tensor? accumulate) -> Tensor");
  m.def("axpby(Tensor(a!)[] xs, Tensor[] ys, Tensor coefs, Tensor(b!)[] out) -> ()");
}

TORCH_LIBRARY_IMPL(fastsam, Meta, m) {
  m.impl("dot_sq_norms", &fastsam::dot_sq_norms_meta);
  m.impl("axpby", &fastsam::axpby_meta);
  m.impl("grad_sq_norm", &fastsam::grad_sq_norm_meta);
  m.impl("perturb", &fastsam::perturb_meta);
  m.impl("restore", &fastsam::restore_meta);
  m.impl("restore_sgd_step", &fastsam::restore_sgd_step_meta);
  m.impl("norm_perturb", &fastsam::norm_perturb_meta);
  m.impl("norm_restore_sgd_step", &fastsam::norm_restore_sgd_step_meta);
  m.impl("restore_adam_step", &fastsam::restore_adam_step_meta);
}
