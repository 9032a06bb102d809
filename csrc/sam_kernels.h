// The CUDA kernels' host interface: raw pointers, element counts and a
// stream; no torch and no CUDA headers, so the torch binding (sam_cuda.cpp)
// and the kernels (sam_kernels.cu, built by nvcc alone) meet only here.
//
// Every function enqueues work on `stream` (a cudaStream_t) and returns
// without synchronising; all pointers are device pointers.  Device-side
// scalars (scale, skip, grad_scale) are one double each, whatever the
// tensors' dtype (the pass's scalars are float64: a scale may lie below
// float's normal range, sam_math.h: split_scale); the reductions' scratch,
// accumulate and out are double too.
#pragma once

#include <cstdint>

namespace fastsam {
namespace cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

// lists[l][t]: data pointer of tensor t in list l; numels[t]: its element
// count, the same in every list.
struct HostLists {
  static constexpr int kMaxLists = 6;
  int n_lists = 0;
  int64_t n_tensors = 0;
  void* const* lists[kMaxLists] = {};
  const int64_t* numels = nullptr;
};

// Size of the scratch buffer grad_sq_norm needs (doubles).
int64_t grad_sq_norm_scratch(const HostLists& grads);

// out[0] = sum of g^2 (lists: g) or of (|w| g)^2 (lists: g, w), in double; two
// stages, one partial per chunk in `scratch` then a single-block sum: deterministic.
void grad_sq_norm(const HostLists& lists, DType dtype, void* scratch, void* out, void* stream);

// lists: params, grads, copies.
void perturb(const HostLists& lists, DType dtype, const void* scale, const void* skip, bool adaptive,
             void* stream);

// lists: dst, src (byte copy of element_size-byte elements).
void copy(const HostLists& lists, int element_size, void* stream);

struct SgdHostArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first;
  bool restore;  // copies hold distinct restore copies (else nothing to restore): told, never inferred
};

// lists: params, grads, copies, momentum buffers.  With restore false the
// copies column is not read (pass params); with momentum == 0 the buffers are
// never touched (pass any list, e.g. params).  grad_scale may be nullptr.
void restore_sgd_step(const HostLists& lists, DType dtype, const SgdHostArgs& args, const void* grad_scale,
                      const void* skip, void* stream);

struct AdamHostArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, maximize;
  bool steps_double;  // step counters are float64 (else float32)
  bool restore;       // as in SgdHostArgs
};

// lists: params, grads, copies (not read unless args.restore), exp_avgs,
// exp_avg_sqs, steps (one 0-d counter per tensor, incremented unless skip).
void restore_adam_step(const HostLists& lists, DType dtype, const AdamHostArgs& args, const void* grad_scale,
                       const void* skip, void* stream);

// The variants' ops.  dot_sq_norms: lists x, y; `scratch` holds
// dot_sq_norms_scratch(lists) doubles (three partials per chunk);
// out[0..2] = [sum x*y, sum x^2, sum y^2] in double (+ accumulate[0..2] when
// not nullptr, double).  Two stages, deterministic.
int64_t dot_sq_norms_scratch(const HostLists& lists);
void dot_sq_norms(const HostLists& lists, DType dtype, void* scratch, const void* accumulate, void* out,
                  void* stream);

// lists: x, y, out (out may be x or y).  coefs: [a, b, skip], doubles (a and b
// rounded to the op-math type once); out <- a x + b y unless skip != 0 (then
// nothing is written).
void axpby(const HostLists& lists, DType dtype, const void* coefs, void* stream);

}  // namespace cuda
}  // namespace fastsam
