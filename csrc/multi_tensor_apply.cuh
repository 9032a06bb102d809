// One chunked launcher for every fused op (the apex multi_tensor_apply design).
//
// The host walks the tensor lists and packs, into a struct passed to the
// kernel by value (no device-side metadata, so no H2D copy, nothing to
// synchronise and CUDA-graph capturable):
//   addresses[list][slot]  data pointer of each tensor in this launch
//   sizes[slot]            its element count (int64: tensors past 2^31 work)
//   block_to_tensor/chunk  which (tensor slot, chunk) each block works on
// and launches when the struct is full (kMaxBlocks blocks, or as many tensors
// as fit in the 4 KiB kernel-argument limit).  A tensor cut by a launch is
// carried over into slot 0 of the next one.  Each block runs the op functor on
// one chunk of kChunkSize elements of one tensor; the functor never sees the
// packing.  Adding an op means writing a functor, not touching this file.
//
// Each block walks its chunk with 16-byte vector loads and stores when every
// pointer it touches is 16-byte aligned (4 fp32, 8 fp16/bf16, 2 fp64 per
// access: the ILP), all but the chunk's last n % ILP elements (its ragged
// tail, scalar); with a misaligned pointer, with a scalar grid-stride loop that
// still keeps ILP elements in flight per thread.  The decision is per chunk:
// a tensor whose length is not a multiple of the ILP is vectorised all the same.
//
// Only CUDA headers here, and the host packing (pack_launches) and the chunk
// walk (walk_block) are plain C++: the kernels are compiled without torch's
// headers (the torch binding is sam_cuda.cpp), and tests/test_csrc_launcher.py
// runs both on the CPU, every thread of every block in turn.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sam_kernels.h"

namespace fastsam {
namespace cuda {

// 64 Ki elements per block: 512 threads x 16-byte vectors x 32 iterations for
// fp32, enough work per block to hide the per-block set-up (apex's choice).
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;
constexpr int kMaxBlocks = 320;
// Bytes left for the metadata in the classic 4 KiB kernel-argument space
// after the op's own arguments (scalars and pointers, < 256 bytes).
constexpr int kMetaBytes = 4096 - 256;

template <int depth>
constexpr int max_tensors() {
  // addresses + sizes per tensor; the two block maps; block_offset and padding.
  return (kMetaBytes - kMaxBlocks * (1 + 4) - 16) / (8 * (depth + 1));
}

template <int depth>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors<depth>();
  static_assert(kMaxTensors >= 1 && kMaxTensors <= 255, "block_to_tensor is one byte");
  void* addresses[depth][kMaxTensors];
  int64_t sizes[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
  int64_t block_offset;  // blocks launched before this launch (index into per-block outputs)
};

static_assert(sizeof(TensorListMeta<1>) <= kMetaBytes, "kernel arguments exceed 4 KiB");
static_assert(sizeof(TensorListMeta<6>) <= kMetaBytes, "kernel arguments exceed 4 KiB");

// Number of chunks (= blocks over all launches) for the tensors of `lists`.
inline int64_t total_chunks(const HostLists& lists) {
  int64_t n = 0;
  for (int64_t t = 0; t < lists.n_tensors; ++t) n += (lists.numels[t] + kChunkSize - 1) / kChunkSize;
  return n;
}

// The host half of the launcher: walks the lists, fills `meta` and calls
// launch(meta, n_blocks) whenever it is full and once at the end.  Plain C++
// (tests/test_csrc_launcher.py runs it under g++ and checks that every chunk
// of every tensor gets exactly one block).
template <int depth, typename Launch>
void pack_launches(const HostLists& lists, const Launch& launch) {
  if (lists.n_lists != depth) throw std::runtime_error("fastsam: list count does not match the op's depth");
  int64_t last = -1;  // the last non-empty tensor: the final launch happens there
  for (int64_t t = 0; t < lists.n_tensors; ++t)
    if (lists.numels[t] > 0) last = t;
  if (last < 0) return;

  TensorListMeta<depth> meta;
  meta.block_offset = 0;
  int slot = 0;
  int block = 0;
  for (int64_t t = 0; t <= last; ++t) {
    const int64_t n = lists.numels[t];
    if (n == 0) continue;
    meta.sizes[slot] = n;
    for (int d = 0; d < depth; ++d) meta.addresses[d][slot] = lists.lists[d][t];
    ++slot;
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[block] = static_cast<unsigned char>(slot - 1);
      meta.block_to_chunk[block] = static_cast<int>(c);
      ++block;
      const bool tensor_done = c == chunks - 1;
      const bool full = block == kMaxBlocks || (slot == TensorListMeta<depth>::kMaxTensors && tensor_done);
      if (!(full || (t == last && tensor_done))) continue;
      launch(meta, block);
      meta.block_offset += block;
      block = 0;
      if (tensor_done) {
        slot = 0;
      } else {  // the rest of this tensor goes on in slot 0 of the next launch
        meta.sizes[0] = meta.sizes[slot - 1];
        for (int d = 0; d < depth; ++d) meta.addresses[d][0] = meta.addresses[d][slot - 1];
        slot = 1;
      }
    }
  }
}

// ---------------------------------------------------------------- the chunk walk
#if defined(__CUDACC__)
#define FASTSAM_WALK __host__ __device__ __forceinline__
#define FASTSAM_UNROLL _Pragma("unroll")
#else
#define FASTSAM_WALK inline
#define FASTSAM_UNROLL
#endif

constexpr int kVecBytes = 16;
template <typename T>
constexpr int ilp() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Thread `tid` of `nthreads` runs `op` on its share of block `block`'s chunk,
// ILP elements per access (a vector of ILP * sizeof(T) bytes, which the
// pointers must be aligned to for the vector path).
// `op` gets the element of every list as raw storage, x[list], and updates it
// in place; lists in `load` are read first, lists in `store` written back (bit
// masks by list).  The list index of every access is a compile-time constant
// once the loops over lists are unrolled, so x stays in registers.  Returns how
// many elements this thread took on the vector path (what the CPU test checks).
template <typename T, int depth, int ILP = ilp<T>(), typename Op>
FASTSAM_WALK int64_t walk_block(const TensorListMeta<depth>& meta, int block, int64_t tid, int64_t nthreads,
                                unsigned load, unsigned store, const Op& op) {
  const int slot = meta.block_to_tensor[block];
  const int64_t offset = static_cast<int64_t>(meta.block_to_chunk[block]) * kChunkSize;
  const int64_t size = meta.sizes[slot];
  const int64_t n = size - offset < kChunkSize ? size - offset : kChunkSize;
  T* ptrs[depth];
  bool aligned = true;
  FASTSAM_UNROLL
  for (int d = 0; d < depth; ++d) {
    ptrs[d] = static_cast<T*>(meta.addresses[d][slot]) + offset;
    if ((load | store) >> d & 1u) aligned &= reinterpret_cast<uintptr_t>(ptrs[d]) % (ILP * sizeof(T)) == 0;
  }
  T x[ILP][depth];
  if (aligned) {
    using V = Vec<T, ILP>;
    const int64_t n_vec = n - n % ILP;
    int64_t vectorised = 0;
    for (int64_t i = tid; (i + 1) * ILP <= n_vec; i += nthreads, vectorised += ILP) {
      FASTSAM_UNROLL
      for (int d = 0; d < depth; ++d) {
        if (load >> d & 1u) {
          const V v = reinterpret_cast<const V*>(ptrs[d])[i];
          FASTSAM_UNROLL
          for (int k = 0; k < ILP; ++k) x[k][d] = v.v[k];
        }
      }
      FASTSAM_UNROLL
      for (int k = 0; k < ILP; ++k) op(x[k]);
      FASTSAM_UNROLL
      for (int d = 0; d < depth; ++d) {
        if (store >> d & 1u) {
          V v;
          FASTSAM_UNROLL
          for (int k = 0; k < ILP; ++k) v.v[k] = x[k][d];
          reinterpret_cast<V*>(ptrs[d])[i] = v;
        }
      }
    }
    // the ragged tail, fewer than ILP <= nthreads elements: one per thread (an ILP-wide loop
    // here, live next to the vector loop, cost registers: ptxas gave the 16-bit perturb 80)
    const int64_t j = n_vec + tid;
    if (j < n) {
      FASTSAM_UNROLL
      for (int d = 0; d < depth; ++d)
        if (load >> d & 1u) x[0][d] = ptrs[d][j];
      op(x[0]);
      FASTSAM_UNROLL
      for (int d = 0; d < depth; ++d)
        if (store >> d & 1u) ptrs[d][j] = x[0][d];
    }
    return vectorised;
  }
  // a misaligned pointer: scalar accesses, ILP elements in flight per thread
  for (int64_t base = 0; base < n; base += nthreads * ILP) {
    FASTSAM_UNROLL
    for (int k = 0; k < ILP; ++k) {
      const int64_t j = base + tid + k * nthreads;
      if (j < n) {
        FASTSAM_UNROLL
        for (int d = 0; d < depth; ++d)
          if (load >> d & 1u) x[k][d] = ptrs[d][j];
      }
    }
    FASTSAM_UNROLL
    for (int k = 0; k < ILP; ++k) {
      const int64_t j = base + tid + k * nthreads;
      if (j < n) {
        op(x[k]);
        FASTSAM_UNROLL
        for (int d = 0; d < depth; ++d)
          if (store >> d & 1u) ptrs[d][j] = x[k][d];
      }
    }
  }
  return 0;
}

#if defined(__CUDACC__)
// The walk of this block's chunk by this thread (16-byte vectors unless told).
template <typename T, int depth, int ILP = ilp<T>(), typename Op>
__device__ __forceinline__ void for_each_element(const TensorListMeta<depth>& meta, unsigned load, unsigned store,
                                                 const Op& op) {
  walk_block<T, depth, ILP>(meta, blockIdx.x, threadIdx.x, blockDim.x, load, store, op);
}

template <typename Functor, int depth, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(TensorListMeta<depth> meta, Functor functor, Args... args) {
  functor(meta, args...);
}

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastsam::") + op + ": CUDA kernel launch failed: " +
                             cudaGetErrorString(err));
  }
}

// Launch `functor` over every chunk of every tensor of the `depth` lists.
template <int depth, typename Functor, typename... Args>
void multi_tensor_apply(const char* op, const HostLists& lists, cudaStream_t stream, Functor functor,
                        Args... args) {
  pack_launches<depth>(lists, [&](const TensorListMeta<depth>& meta, int blocks) {
    multi_tensor_kernel<<<blocks, kBlockSize, 0, stream>>>(meta, functor, args...);
    check_launch(op);
  });
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace fastsam
