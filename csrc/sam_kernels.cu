// CUDA kernels of the fused SAM ops: one functor per op, all launched by
// multi_tensor_apply.cuh, with the per-element math of sam_math.h (shared
// with the CPU twin).  CUDA headers only: compiled by nvcc without torch.
//
// Each block handles one chunk of one tensor, walked by for_each_element
// (multi_tensor_apply.cuh: vector accesses where the pointers allow, a scalar
// ragged tail).  Math is done in float (double for fp64) and cast back
// explicitly, but for the reductions (double for every dtype) and the scale
// factors (double, applied as two acc_t factors: sam_math.h split_scale); copies move the storage bits untouched.  Every element access
// x[list] uses a compile-time list index (a run-time index would put the
// elements in local memory): tests/test_csrc_nvcc.py fails on any stack or
// spill that ptxas reports.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "sam_kernels.h"
#include "sam_math.h"

namespace fastsam {
namespace cuda {
namespace {

// ---------------------------------------------------------------- types
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using acc_type = typename OpMath<T>::type;

// Explicit conversions: torch's build defines __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Rounds an op-math value to the storage dtype and back (identity for fp32/fp64).
template <typename T>
struct RoundToStorage {
  __device__ __forceinline__ acc_type<T> operator()(acc_type<T> x) const { return to_acc(from_acc<T>(x)); }
};

template <typename T>
struct Tag {
  using type = T;
};

constexpr unsigned bit(int list) { return 1u << list; }

// f(source) with the list the step reads the restored parameter from as a compile-time
// constant (decltype(source)::value): kCopy when restoring, else kParam.
template <int kCopy, int kParam, typename F>
__device__ __forceinline__ void with_source(bool restore, const F& f) {
  if (restore) {
    f(std::integral_constant<int, kCopy>{});
  } else {
    f(std::integral_constant<int, kParam>{});
  }
}

// ---------------------------------------------------------------- grad norm
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kBlockSize / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

// Stage 1: one double partial sum per chunk, at its global block index.  Squares
// and sums in double for every dtype (sam_math.h: sq_norm_term): a finite float
// gradient's squares may overflow float.
template <typename T, bool kAdaptive>
struct SqNormFunctor {
  static constexpr int depth = kAdaptive ? 2 : 1;
  __device__ void operator()(const TensorListMeta<depth>& meta, double* partials) const {
    double sum = 0;
    const auto op = [&sum](T (&x)[depth]) {
      sum += sq_norm_term(double(to_acc(x[0])), kAdaptive ? double(to_acc(x[depth - 1])) : 0.0, kAdaptive);
    };
    for_each_element<T, depth>(meta, kAdaptive ? 3u : 1u, 0u, op);
    sum = block_sum(sum);
    if (threadIdx.x == 0) partials[meta.block_offset + blockIdx.x] = sum;
  }
};

// Stage 2: a single block sums the partials in a fixed order (deterministic).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockSize) sum_partials_kernel(const acc_t* partials, int64_t n, acc_t* out) {
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = sum;
}

// ---------------------------------------------------------------- perturb / copy
template <typename T>
struct PerturbFunctor {
  enum { kParam, kGrad, kCopy };
  __device__ void operator()(const TensorListMeta<3>& meta, const double* scale, const double* skip,
                             bool adaptive) const {
    using acc_t = acc_type<T>;
    const bool skipped = *skip != 0.0;
    const Scale<acc_t> s = split_scale<acc_t>(*scale);  // a double scale in acc_t math (sam_math.h)
    const auto op = [=](T (&x)[3]) {
      x[kCopy] = x[kParam];  // the exact copy: storage bits
      if (!skipped) x[kParam] = from_acc<T>(perturb_element<acc_t>(to_acc(x[kParam]), to_acc(x[kGrad]), s, adaptive));
    };
    const unsigned load = bit(kParam) | (skipped ? 0u : bit(kGrad));
    const unsigned store = bit(kCopy) | (skipped ? 0u : bit(kParam));
    for_each_element<T, 3>(meta, load, store, op);
  }
};

template <typename T>
struct CopyFunctor {
  __device__ void operator()(const TensorListMeta<2>& meta) const {
    for_each_element<T, 2>(meta, bit(1), bit(0), [](T (&x)[2]) { x[0] = x[1]; });
  }
};

// ---------------------------------------------------------------- restore + SGD
template <typename T>
struct SgdFunctor {
  enum { kParam, kGrad, kCopy, kBuf };
  __device__ void operator()(const TensorListMeta<4>& meta, SgdArgs<acc_type<T>> a, bool restore,
                             bool has_momentum, bool maximize, const double* grad_scale,
                             const double* skip) const {
    using acc_t = acc_type<T>;
    const bool skipped = *skip != 0.0;
    if (skipped) {  // restore only; buffers untouched
      if (restore) for_each_element<T, 4>(meta, bit(kCopy), bit(kParam), [](T (&x)[4]) { x[kParam] = x[kCopy]; });
      return;
    }
    const Scale<acc_t> gs = signed_grad_scale(split_scale<acc_t>(grad_scale == nullptr ? 1.0 : *grad_scale), maximize);
    with_source<kCopy, kParam>(restore, [&](auto source) {
      constexpr int src = decltype(source)::value;
      const unsigned load = bit(src) | bit(kGrad) | (has_momentum && !a.first ? bit(kBuf) : 0u);
      const unsigned store = bit(kParam) | (has_momentum ? bit(kBuf) : 0u);
      if (has_momentum) {
        for_each_element<T, 4>(meta, load, store, [=](T (&x)[4]) {
          acc_t w = to_acc(x[src]);
          acc_t b = a.first ? acc_t(0) : to_acc(x[kBuf]);
          sgd_element<acc_t, true>(w, sam_grad<acc_t>(to_acc(x[kGrad]), gs), b, a, RoundToStorage<T>());
          x[kParam] = from_acc<T>(w);
          x[kBuf] = from_acc<T>(b);
        });
      } else {
        for_each_element<T, 4>(meta, load, store, [=](T (&x)[4]) {
          acc_t w = to_acc(x[src]);
          acc_t unused = 0;
          sgd_element<acc_t, false>(w, sam_grad<acc_t>(to_acc(x[kGrad]), gs), unused, a, RoundToStorage<T>());
          x[kParam] = from_acc<T>(w);
        });
      }
    });
  }
};

// ---------------------------------------------------------------- restore + Adam
__device__ __forceinline__ double read_step(const void* p, bool is_double) {
  return is_double ? *static_cast<const double*>(p) : static_cast<double>(*static_cast<const float*>(p));
}

template <typename T>
struct AdamFunctor {
  enum { kParam, kGrad, kCopy, kExpAvg, kExpAvgSq, kStep };
  __device__ void operator()(const TensorListMeta<6>& meta, AdamArgs<acc_type<T>> a, double lr, double beta1,
                             double beta2, bool restore, bool maximize, bool steps_double,
                             const double* grad_scale, const double* skip) const {
    using acc_t = acc_type<T>;
    const bool skipped = *skip != 0.0;
    if (skipped) {
      if (restore) for_each_element<T, 6>(meta, bit(kCopy), bit(kParam), [](T (&x)[6]) { x[kParam] = x[kCopy]; });
      return;
    }
    // The counter is incremented by a later kernel, so every block of this
    // tensor reads the same old value and uses t = step + 1.
    const double t = read_step(meta.addresses[kStep][meta.block_to_tensor[blockIdx.x]], steps_double) + 1.0;
    double step_size, bc2_sqrt;
    adam_bias_terms(t, lr, beta1, beta2, &step_size, &bc2_sqrt);
    const acc_t ss = static_cast<acc_t>(step_size);
    const acc_t bc2 = static_cast<acc_t>(bc2_sqrt);
    const Scale<acc_t> gs = signed_grad_scale(split_scale<acc_t>(grad_scale == nullptr ? 1.0 : *grad_scale), maximize);
    const unsigned store = bit(kParam) | bit(kExpAvg) | bit(kExpAvgSq);
    // At most 4 elements per access: with 8 (16-bit types in 16-byte vectors) ptxas needs more
    // than the 128 registers a 512-thread block may use and spills (tests/test_csrc_nvcc.py).
    constexpr int kIlp = ilp<T>() < 4 ? ilp<T>() : 4;
    with_source<kCopy, kParam>(restore, [&](auto source) {
      constexpr int src = decltype(source)::value;
      const unsigned load = bit(src) | bit(kGrad) | bit(kExpAvg) | bit(kExpAvgSq);
      for_each_element<T, 6, kIlp>(meta, load, store, [=](T (&x)[6]) {
        acc_t w = to_acc(x[src]);
        acc_t m = to_acc(x[kExpAvg]);
        acc_t v = to_acc(x[kExpAvgSq]);
        adam_element<acc_t>(w, sam_grad<acc_t>(to_acc(x[kGrad]), gs), m, v, a, ss, bc2, RoundToStorage<T>());
        x[kParam] = from_acc<T>(w);
        x[kExpAvg] = from_acc<T>(m);
        x[kExpAvgSq] = from_acc<T>(v);
      });
    });
  }
};

// One block per counter (each "tensor" of this launch has one element).
template <typename S>
struct IncrementStepFunctor {
  __device__ void operator()(const TensorListMeta<1>& meta, const double* skip) const {
    if (threadIdx.x != 0 || *skip != 0.0) return;
    *static_cast<S*>(meta.addresses[0][meta.block_to_tensor[blockIdx.x]]) += S(1);
  }
};

// ---------------------------------------------------------------- the variants' ops
// Stage 1 of dot_sq_norms: three partial sums per chunk, rows of `n_total` in `partials`.
template <typename T>
struct DotSqNormsFunctor {
  __device__ void operator()(const TensorListMeta<2>& meta, double* partials, int64_t n_total) const {
    double xy = 0, xx = 0, yy = 0;  // double for every dtype, as the norm's
    const auto op = [&](T (&x)[2]) { dot_sq_norms_terms(double(to_acc(x[0])), double(to_acc(x[1])), xy, xx, yy); };
    for_each_element<T, 2>(meta, bit(0) | bit(1), 0u, op);
    xy = block_sum(xy);
    __syncthreads();  // block_sum's shared scratch is reused by the next call
    xx = block_sum(xx);
    __syncthreads();
    yy = block_sum(yy);
    if (threadIdx.x == 0) {
      const int64_t i = meta.block_offset + blockIdx.x;
      partials[i] = xy;
      partials[n_total + i] = xx;
      partials[2 * n_total + i] = yy;
    }
  }
};

// Stage 2: one block sums each row in a fixed order and adds the previous total.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockSize)
    dot_sq_norms_sum_kernel(const acc_t* partials, int64_t n, const acc_t* accumulate, acc_t* out) {
  for (int k = 0; k < 3; ++k) {
    acc_t sum = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += partials[k * n + i];
    sum = block_sum(sum);
    if (threadIdx.x == 0) out[k] = accumulate == nullptr ? sum : sum + accumulate[k];
    __syncthreads();
  }
}

// out <- a x + b y (lists x, y, out; out may be x or y), nothing written when skip.
template <typename T>
struct AxpbyFunctor {
  __device__ void operator()(const TensorListMeta<3>& meta, const double* coefs) const {
    using acc_t = acc_type<T>;
    if (coefs[2] != 0.0) return;
    const acc_t a = acc_t(coefs[0]), b = acc_t(coefs[1]);  // rounded once to the op-math type
    for_each_element<T, 3>(meta, bit(0) | bit(1), bit(2), [=](T (&x)[3]) {
      x[2] = from_acc<T>(axpby_element<acc_t>(to_acc(x[0]), to_acc(x[1]), a, b));
    });
  }
};

// ---------------------------------------------------------------- dispatch
template <typename F>
void dispatch(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat: return f(Tag<float>{});
    case DType::kHalf: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kDouble: return f(Tag<double>{});
  }
  throw std::runtime_error("fastsam: unsupported dtype");
}

HostLists sub_lists(const HostLists& lists, std::initializer_list<int> which) {
  HostLists out;
  out.n_tensors = lists.n_tensors;
  out.numels = lists.numels;
  for (int l : which) out.lists[out.n_lists++] = lists.lists[l];
  return out;
}

}  // namespace

// ---------------------------------------------------------------- host entry points
int64_t grad_sq_norm_scratch(const HostLists& grads) { return total_chunks(grads); }

void grad_sq_norm(const HostLists& lists, DType dtype, void* scratch, void* out, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* partials = static_cast<double*>(scratch);
    if (lists.n_lists == 2) {
      multi_tensor_apply<2>("grad_sq_norm", lists, s, SqNormFunctor<T, true>(), partials);
    } else {
      multi_tensor_apply<1>("grad_sq_norm", lists, s, SqNormFunctor<T, false>(), partials);
    }
    sum_partials_kernel<double><<<1, kBlockSize, 0, s>>>(partials, total_chunks(lists), static_cast<double*>(out));
    check_launch("grad_sq_norm");
  });
}

void perturb(const HostLists& lists, DType dtype, const void* scale, const void* skip, bool adaptive,
             void* stream) {
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    multi_tensor_apply<3>("perturb", lists, static_cast<cudaStream_t>(stream), PerturbFunctor<T>(),
                          static_cast<const double*>(scale), static_cast<const double*>(skip), adaptive);
  });
}

void copy(const HostLists& lists, int element_size, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (element_size) {
    case 1: return multi_tensor_apply<2>("restore", lists, s, CopyFunctor<uint8_t>());
    case 2: return multi_tensor_apply<2>("restore", lists, s, CopyFunctor<uint16_t>());
    case 4: return multi_tensor_apply<2>("restore", lists, s, CopyFunctor<uint32_t>());
    case 8: return multi_tensor_apply<2>("restore", lists, s, CopyFunctor<uint64_t>());
  }
  throw std::runtime_error("fastsam::restore: unsupported element size");
}

void restore_sgd_step(const HostLists& lists, DType dtype, const SgdHostArgs& h, const void* grad_scale,
                      const void* skip, void* stream) {
  const bool restore = h.restore;  // the caller says; a per-call guess from one tensor was wrong for mixed lists
  const bool has_momentum = h.momentum != 0;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const auto a = make_sgd_args<acc_t>(h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, h.first);
    multi_tensor_apply<4>("restore_sgd_step", lists, static_cast<cudaStream_t>(stream), SgdFunctor<T>(), a,
                          restore, has_momentum, h.maximize, static_cast<const double*>(grad_scale),
                          static_cast<const double*>(skip));
  });
}

void restore_adam_step(const HostLists& lists, DType dtype, const AdamHostArgs& h, const void* grad_scale,
                       const void* skip, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const bool restore = h.restore;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const auto a = make_adam_args<acc_t>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled);
    multi_tensor_apply<6>("restore_adam_step", lists, s, AdamFunctor<T>(), a, h.lr, h.beta1, h.beta2, restore,
                          h.maximize, h.steps_double, static_cast<const double*>(grad_scale),
                          static_cast<const double*>(skip));
    // After every chunk has read the old counters: step += 1 unless skipped.
    HostLists steps = sub_lists(lists, {5});
    std::vector<int64_t> ones(lists.n_tensors, 1);
    steps.numels = ones.data();
    if (h.steps_double) {
      multi_tensor_apply<1>("restore_adam_step", steps, s, IncrementStepFunctor<double>(),
                            static_cast<const double*>(skip));
    } else {
      multi_tensor_apply<1>("restore_adam_step", steps, s, IncrementStepFunctor<float>(),
                            static_cast<const double*>(skip));
    }
  });
}

int64_t dot_sq_norms_scratch(const HostLists& lists) { return 3 * total_chunks(lists); }

void dot_sq_norms(const HostLists& lists, DType dtype, void* scratch, const void* accumulate, void* out,
                  void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* partials = static_cast<double*>(scratch);
    const int64_t n = total_chunks(lists);
    multi_tensor_apply<2>("dot_sq_norms", lists, s, DotSqNormsFunctor<T>(), partials, n);
    dot_sq_norms_sum_kernel<double><<<1, kBlockSize, 0, s>>>(partials, n, static_cast<const double*>(accumulate),
                                                             static_cast<double*>(out));
    check_launch("dot_sq_norms");
  });
}

void axpby(const HostLists& lists, DType dtype, const void* coefs, void* stream) {
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    multi_tensor_apply<3>("axpby", lists, static_cast<cudaStream_t>(stream), AxpbyFunctor<T>(),
                          static_cast<const double*>(coefs));
  });
}

}  // namespace cuda
}  // namespace fastsam
