// Argument checks shared by the CPU, CUDA and Meta implementations of the
// fastsam:: operators (torch-facing; the kernels themselves see raw pointers).
//
// The fused kernels walk each tensor as one flat array and use the same flat
// index in every list, so besides "one device, one dtype per call" (the
// backend contract) they need matching shapes and strides and dense storage.
// All checks run before anything is written: a rejected call leaves every
// tensor untouched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastsam {

// The lists of one call: `ref` fixes length, device and dtype; an optional
// list may be empty (copies that are the params themselves, momentum buffers
// when momentum == 0, ASAM weights when not adaptive).
inline void check_list(const char* op, const char* name, at::TensorList list, at::TensorList ref,
                       bool may_be_empty) {
  if (list.empty() && may_be_empty) return;
  TORCH_CHECK_VALUE(list.size() == ref.size(), "fastsam::", op, ": '", name, "' has ", list.size(),
                    " tensors but the parameter list has ", ref.size(),
                    " (tensor lists of one fused call must have equal lengths)");
  if (ref.empty()) return;
  const at::Tensor& r0 = ref[0];
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& r = ref[i];
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fastsam::", op, ": '", name, "'[", i,
                      "] is not a dense (strided) tensor; the fused SAM kernels do not support sparse tensors");
    TORCH_CHECK_VALUE(t.device() == r0.device(), "fastsam::", op, ": parameters on different devices in one "
                      "fused call ('", name, "'[", i, "] is on ", t.device(), ", the first parameter on ",
                      r0.device(), "); FusedSAM groups tensors by device, so this is a bug in the caller");
    TORCH_CHECK_VALUE(t.scalar_type() == r0.scalar_type(), "fastsam::", op,
                      ": tensors of different dtypes in one fused call ('", name, "'[", i, "] is ",
                      t.scalar_type(), ", the first parameter ", r0.scalar_type(), ")");
    TORCH_CHECK_VALUE(t.sizes() == r.sizes(), "fastsam::", op, ": '", name, "'[", i, "] has shape ",
                      t.sizes(), " but its parameter has shape ", r.sizes());
    TORCH_CHECK_VALUE(t.numel() <= 1 || (t.strides() == r.strides() && t.is_non_overlapping_and_dense()),
                      "fastsam::", op, ": '", name, "'[", i, "] has strides ", t.strides(),
                      " and its parameter ", r.strides(), "; the fused kernels need dense tensors laid out "
                      "like their parameter (use backend='foreach' for such tensors)");
  }
}

// The restore contract: `copies` is empty (nothing to restore) or holds a distinct
// copy for every parameter.  A copy that is its parameter means restored and
// unrestored tensors were mixed in one call; FusedSAM splits such lists, and no
// kernel infers per call whether it restores.  Called by the real (CPU, CUDA)
// kernels only: the meta kernels see fake tensors, which have no data pointer.
inline void check_copies_distinct(const char* op, at::TensorList copies, at::TensorList params) {
  for (size_t i = 0; i < copies.size(); ++i) {
    TORCH_CHECK_VALUE(copies[i].numel() == 0 || copies[i].data_ptr() != params[i].data_ptr(), "fastsam::", op,
                      ": copies[", i, "] is the parameter itself; pass no copies (nothing to restore) or a "
                      "distinct copy for every parameter (split mixed lists into two calls)");
  }
}

// A 0-d device-side scalar (scale, skip, grad_scale).
inline void check_scalar(const char* op, const char* name, const at::Tensor& s, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(s.numel() == 1 && s.is_floating_point(), "fastsam::", op, ": '", name,
                    "' must be a one-element floating-point tensor, got shape ", s.sizes(), " and dtype ",
                    s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == ref.device(), "fastsam::", op, ": '", name, "' is on ", s.device(),
                    " but the parameters are on ", ref.device(), " (device-side scalars live on the "
                    "parameters' device)");
}

inline void check_optional_scalar(const char* op, const char* name, const std::optional<at::Tensor>& s,
                                  const at::Tensor& ref) {
  if (s.has_value()) check_scalar(op, name, *s, ref);
}

// Adam's per-tensor 0-d step counters.
inline void check_steps(const char* op, at::TensorList steps, at::TensorList params) {
  TORCH_CHECK_VALUE(steps.size() == params.size(), "fastsam::", op, ": ", steps.size(),
                    " step counters for ", params.size(), " parameters");
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK_VALUE(s.numel() == 1 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                      "fastsam::", op, ": steps[", i, "] must be a one-element float32/float64 tensor, got ",
                      s.scalar_type(), " of shape ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == params[0].device(), "fastsam::", op, ": steps[", i, "] is on ",
                      s.device(), " but the parameters are on ", params[0].device());
  }
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_dtype(const char* op, at::TensorList params) {
  if (params.empty()) return;
  TORCH_CHECK_VALUE(supported_dtype(params[0].scalar_type()), "fastsam::", op, ": dtype ",
                    params[0].scalar_type(), " is not supported (float32, float16, bfloat16, float64 are)");
}

// Per-op validation, the same for every dispatch key (CPU, CUDA, Meta).
inline void check_grad_sq_norm(at::TensorList grads, at::TensorList params) {
  check_dtype("grad_sq_norm", grads);
  check_list("grad_sq_norm", "grads", grads, grads, false);
  check_list("grad_sq_norm", "params", params, grads, true);
}

inline void check_perturb(at::TensorList params, at::TensorList grads, at::TensorList copies,
                          const at::Tensor& scale, const at::Tensor& skip) {
  check_dtype("perturb", params);
  check_list("perturb", "params", params, params, false);
  check_list("perturb", "grads", grads, params, false);
  check_list("perturb", "copies", copies, params, false);
  if (params.empty()) return;
  check_scalar("perturb", "scale", scale, params[0]);
  check_scalar("perturb", "skip", skip, params[0]);
}

inline void check_restore(at::TensorList params, at::TensorList copies) {
  check_list("restore", "params", params, params, false);
  check_list("restore", "copies", copies, params, false);
}

inline void check_sgd_lists(const char* op, at::TensorList params, at::TensorList grads, at::TensorList copies,
                            at::TensorList momentum_buffers, double momentum) {
  check_dtype(op, params);
  check_list(op, "params", params, params, false);
  check_list(op, "grads", grads, params, false);
  check_list(op, "copies", copies, params, true);
  check_list(op, "momentum_buffers", momentum_buffers, params, momentum == 0);
}

inline void check_restore_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList copies,
                                   at::TensorList momentum_buffers, double momentum,
                                   const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  const char* op = "restore_sgd_step";
  check_sgd_lists(op, params, grads, copies, momentum_buffers, momentum);
  if (params.empty()) return;
  check_optional_scalar(op, "grad_scale", grad_scale, params[0]);
  check_scalar(op, "skip", skip, params[0]);
}

// A pass's scalars [skip, factor, ...] (fastsam/backends/_common.py): 1-D, on the lists' device
// (`ref`, when the lists are not empty); float64 where the op writes them (`written`), float32
// or float64 where it only reads them.
inline void check_pass_scalars(const char* op, const char* name, const at::Tensor& s, at::TensorList ref,
                               bool written) {
  const bool dtype_ok = s.scalar_type() == at::kDouble || (!written && s.scalar_type() == at::kFloat);
  TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() >= 2 && dtype_ok, "fastsam::", op, ": '", name,
                    "' must be a pass's scalars, a 1-D ", written ? "float64" : "float32/float64",
                    " tensor of at least 2 elements, got shape ", s.sizes(), " and dtype ", s.scalar_type());
  if (!ref.empty()) {
    TORCH_CHECK_VALUE(s.device() == ref[0].device(), "fastsam::", op, ": '", name, "' is on ", s.device(),
                      " but the parameters are on ", ref[0].device(),
                      " (device-side scalars live on the parameters' device)");
  }
}

// The two passes of a step, each with its norm (fastsam/backends/__init__.py: norm_perturb and
// norm_restore_sgd_step).
inline void check_norm_perturb(at::TensorList params, at::TensorList grads, at::TensorList copies,
                               const at::Tensor& scalars) {
  const char* op = "norm_perturb";
  check_dtype(op, params);
  check_list(op, "params", params, params, false);
  check_list(op, "grads", grads, params, false);
  check_list(op, "copies", copies, params, false);
  check_pass_scalars(op, "scalars", scalars, params, true);
}

inline void check_norm_restore_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList copies,
                                        at::TensorList momentum_buffers, const at::Tensor& scalars,
                                        const std::optional<at::Tensor>& prev, double momentum) {
  const char* op = "norm_restore_sgd_step";
  check_sgd_lists(op, params, grads, copies, momentum_buffers, momentum);
  check_pass_scalars(op, "scalars", scalars, params, true);
  if (prev.has_value()) check_pass_scalars(op, "prev", *prev, params, false);
}

inline void check_restore_adam_step(at::TensorList params, at::TensorList grads, at::TensorList copies,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                                    const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  const char* op = "restore_adam_step";
  check_dtype(op, params);
  check_list(op, "params", params, params, false);
  check_list(op, "grads", grads, params, false);
  check_list(op, "copies", copies, params, true);
  check_list(op, "exp_avgs", exp_avgs, params, false);
  check_list(op, "exp_avg_sqs", exp_avg_sqs, params, false);
  if (params.empty()) return;
  check_steps(op, steps, params);
  check_optional_scalar(op, "grad_scale", grad_scale, params[0]);
  check_scalar(op, "skip", skip, params[0]);
}

// The variants' ops: two lists (x, y) of one dtype, shape and layout; axpby's
// coefficients [a, b, skip, ...] a 1-D floating tensor on their device; `out`
// empty (in place into xs) or a third such list.
inline void check_dot_sq_norms(at::TensorList xs, at::TensorList ys, const std::optional<at::Tensor>& accumulate) {
  const char* op = "dot_sq_norms";
  check_dtype(op, xs);
  check_list(op, "xs", xs, xs, false);
  check_list(op, "ys", ys, xs, false);
  if (accumulate.has_value()) {
    TORCH_CHECK_VALUE(accumulate->dim() == 1 && accumulate->numel() == 3 && accumulate->is_floating_point(),
                      "fastsam::", op, ": 'accumulate' must be a (3,) floating-point tensor, got shape ",
                      accumulate->sizes(), " and dtype ", accumulate->scalar_type());
    if (!xs.empty()) {
      TORCH_CHECK_VALUE(accumulate->device() == xs[0].device(), "fastsam::", op, ": 'accumulate' is on ",
                        accumulate->device(), " but the tensors are on ", xs[0].device());
    }
  }
}

inline void check_axpby(at::TensorList xs, at::TensorList ys, const at::Tensor& coefs, at::TensorList out) {
  const char* op = "axpby";
  check_dtype(op, xs);
  check_list(op, "xs", xs, xs, false);
  check_list(op, "ys", ys, xs, false);
  check_list(op, "out", out, xs, true);
  if (xs.empty()) return;
  TORCH_CHECK_VALUE(coefs.dim() == 1 && coefs.numel() >= 3 && coefs.is_floating_point(), "fastsam::", op,
                    ": 'coefs' must be a 1-D floating-point tensor [a, b, skip, ...], got shape ", coefs.sizes(),
                    " and dtype ", coefs.scalar_type());
  TORCH_CHECK_VALUE(coefs.device() == xs[0].device(), "fastsam::", op, ": 'coefs' is on ", coefs.device(),
                    " but the tensors are on ", xs[0].device(), " (device-side scalars live on the tensors' device)");
}

}  // namespace fastsam
