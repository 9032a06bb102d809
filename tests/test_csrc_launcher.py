"""The host half of the CUDA launcher (csrc/multi_tensor_apply.cuh: pack_launches), run on the CPU.

pack_launches is plain C++, so g++ compiles it here with a stand-in "kernel"
that records what each launch would do; the check: every chunk of every
non-empty tensor gets exactly one block, every list of a block points at the
same tensor, launches respect the block and tensor limits of the 4 KiB
argument struct, and block_offset indexes the blocks of all launches in
order (the grad norm's partial sums).  Tensor sizes are only numbers here, so
tensors of 2^31+ and 2^34 elements cost nothing.  What only a GPU can test:
the device half (tests/test_csrc_cuda.py).

The chunk walk of a block (walk_block, the body of every CUDA kernel) is plain
C++ too: WALK_PROGRAM runs it for every thread of every block that
pack_launches makes, over host memory, and checks that each element is
processed once, nothing outside a tensor is written, and that every element
but each chunk's ragged tail (its last n % ILP) takes the vector path when the
pointers are aligned, whatever the tensor's length; none when one is not.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fastsam import _build

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "multi_tensor_apply.cuh"

using namespace fastsam::cuda;

// Fake data pointers: list d, tensor t -> (d + 1) << 40 | (t + 1) << 4.
static void* fake(int d, int64_t t) {
  return reinterpret_cast<void*>(((uintptr_t)(d + 1) << 40) | ((uintptr_t)(t + 1) << 4));
}
static int64_t tensor_of(void* p) { return (int64_t)(((uintptr_t)p & ((1ull << 40) - 1)) >> 4) - 1; }
static int list_of(void* p) { return (int)((uintptr_t)p >> 40) - 1; }

#define CHECK(cond) do { if (!(cond)) { std::printf("FAIL line %d: %s\n", __LINE__, #cond); std::exit(1); } } while (0)

template <int depth>
void check(const std::vector<int64_t>& numels) {
  const int64_t n = (int64_t)numels.size();
  std::vector<std::vector<void*>> ptrs(depth, std::vector<void*>(n));
  for (int d = 0; d < depth; ++d)
    for (int64_t t = 0; t < n; ++t) ptrs[d][t] = fake(d, t);
  HostLists lists;
  lists.n_lists = depth;
  lists.n_tensors = n;
  lists.numels = numels.data();
  for (int d = 0; d < depth; ++d) lists.lists[d] = ptrs[d].data();

  std::vector<std::vector<int>> seen(n);
  for (int64_t t = 0; t < n; ++t) seen[t].assign((numels[t] + kChunkSize - 1) / kChunkSize, 0);
  int64_t blocks_so_far = 0, launches = 0;
  pack_launches<depth>(lists, [&](const TensorListMeta<depth>& meta, int blocks) {
    ++launches;
    CHECK(blocks > 0 && blocks <= kMaxBlocks);
    CHECK(meta.block_offset == blocks_so_far);
    blocks_so_far += blocks;
    for (int b = 0; b < blocks; ++b) {
      const int slot = meta.block_to_tensor[b];
      CHECK(slot < TensorListMeta<depth>::kMaxTensors);
      const int64_t t = tensor_of(meta.addresses[0][slot]);
      CHECK(t >= 0 && t < n);
      for (int d = 0; d < depth; ++d) {
        CHECK(list_of(meta.addresses[d][slot]) == d);
        CHECK(tensor_of(meta.addresses[d][slot]) == t);
      }
      CHECK(meta.sizes[slot] == numels[t]);
      const int64_t c = meta.block_to_chunk[b];
      CHECK(c >= 0 && c < (int64_t)seen[t].size());
      seen[t][c] += 1;
    }
  });
  for (int64_t t = 0; t < n; ++t)
    for (int v : seen[t]) CHECK(v == 1);
  CHECK(blocks_so_far == total_chunks(lists));
  std::printf("depth %d: %lld tensors, %lld blocks, %lld launches ok\n", depth, (long long)n,
              (long long)blocks_so_far, (long long)launches);
}

template <int depth>
void check_all() {
  const int64_t C = kChunkSize;
  check<depth>({});                                   // empty list: no launch
  check<depth>({0, 0, 0});                            // only empty tensors
  check<depth>({1, 0, 7, C, C + 1, 0});               // small, chunk boundary, trailing empty tensor
  check<depth>({(int64_t)kMaxBlocks * C + 3, 5});     // a launch boundary inside one tensor
  std::vector<int64_t> many;
  for (int i = 0; i < 700; ++i) many.push_back(i % 3 == 0 ? 0 : 1 + (i * 7919) % (3 * C));
  check<depth>(many);                                 // more tensors than one launch holds
  std::vector<int64_t> exact(TensorListMeta<depth>::kMaxTensors * 2 + 1, C);
  check<depth>(exact);                                // fills by tensors exactly at a chunk end
  check<depth>({(1ll << 31) + 5, 3, (1ll << 34) + 1}); // past int32 elements, chunk index past 2^16
}

int main() {
  check_all<1>();
  check_all<2>();
  check_all<3>();
  check_all<4>();
  check_all<6>();
  std::printf("ok\n");
  return 0;
}
"""


def _compile_and_run(tmp_path, name, program):
    """Build ``program`` against csrc/ with g++ and run it: it must print "ok" last."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / f"{name}.cpp"
    src.write_text(program)
    exe = tmp_path / name
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{_build.CSRC}", str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    print(run.stdout)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_pack_launches_covers_every_chunk_once(tmp_path):
    _compile_and_run(tmp_path, "launcher_check", PROGRAM)


WALK_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "multi_tensor_apply.cuh"

using namespace fastsam::cuda;

#define CHECK(cond) do { if (!(cond)) { std::printf("FAIL line %d: %s\n", __LINE__, #cond); std::exit(1); } } while (0)

// Lists x, y (read) and out (written): out = x + 3 y + 1, in T's own arithmetic.
template <typename T, int ILP>
void check(const std::vector<int64_t>& sizes, bool misaligned, int nthreads) {
  const int64_t n_t = (int64_t)sizes.size();
  const int64_t pad = 64;  // slack after each tensor (the guard) and room for a misaligning shift
  std::vector<std::vector<T>> buf(3);
  std::vector<std::vector<void*>> ptrs(3, std::vector<void*>(n_t));
  int64_t total = 0;
  for (int64_t n : sizes) total += n + 2 * pad;
  for (int d = 0; d < 3; ++d) buf[d].assign(total + 64, T(7));
  std::vector<int64_t> starts(n_t);
  int64_t at = 0;
  for (int64_t t = 0; t < n_t; ++t) {
    // 16-byte aligned start, shifted by one element in list 1 when asked
    T* base = buf[0].data();
    int64_t a = at;
    while ((reinterpret_cast<uintptr_t>(base + a) % 16) != 0) ++a;
    starts[t] = a;
    for (int d = 0; d < 3; ++d) ptrs[d][t] = buf[d].data() + a + (misaligned && d == 1 ? 1 : 0);
    for (int64_t i = 0; i < sizes[t]; ++i) {
      static_cast<T*>(ptrs[0][t])[i] = T(i % 97);
      static_cast<T*>(ptrs[1][t])[i] = T(i % 89);
    }
    at = a + sizes[t] + pad;
  }
  HostLists lists;
  lists.n_lists = 3;
  lists.n_tensors = n_t;
  lists.numels = sizes.data();
  for (int d = 0; d < 3; ++d) lists.lists[d] = ptrs[d].data();
  int64_t vectorised = 0;
  const auto op = [](T (&x)[3]) { x[2] = T(x[0] + T(3) * x[1] + T(1)); };
  pack_launches<3>(lists, [&](const TensorListMeta<3>& meta, int blocks) {
    for (int b = 0; b < blocks; ++b)
      for (int tid = 0; tid < nthreads; ++tid) vectorised += walk_block<T, 3, ILP>(meta, b, tid, nthreads, 3u, 4u, op);
  });
  int64_t expected = 0;
  for (int64_t t = 0; t < n_t; ++t) {
    const T* out = static_cast<const T*>(ptrs[2][t]);
    for (int64_t i = 0; i < sizes[t]; ++i) CHECK(out[i] == T(T(i % 97) + T(3) * T(i % 89) + T(1)));
    for (int64_t i = sizes[t]; i < sizes[t] + pad; ++i) CHECK(out[i] == T(7));  // nothing written past the end
    for (int64_t c = 0; c * kChunkSize < sizes[t]; ++c) {
      const int64_t n = sizes[t] - c * kChunkSize < kChunkSize ? sizes[t] - c * kChunkSize : kChunkSize;
      expected += misaligned ? 0 : n - n % ILP;
    }
  }
  std::printf("sizeof %d ILP %d misaligned %d: %lld elements vectorised (expected %lld)\n", (int)sizeof(T), ILP,
              (int)misaligned, (long long)vectorised, (long long)expected);
  CHECK(vectorised == expected);
}

template <typename T, int ILP>
void check_both() {
  const int64_t C = kChunkSize;
  // lengths that are not multiples of any ILP, a chunk boundary, tiny and empty tensors
  const std::vector<int64_t> sizes = {3 * C + 5, C + 1, 7, 1, 0, 2 * C, C - 3, 13};
  check<T, ILP>(sizes, false, kBlockSize);
  check<T, ILP>(sizes, true, kBlockSize);
  check<T, ILP>({C + 3, 9}, false, 96);  // a thread count that does not divide the chunk
}

int main() {
  check_both<float, ilp<float>()>();
  check_both<uint16_t, ilp<uint16_t>()>();
  check_both<uint16_t, 4>();  // Adam's 16-bit kernels: 8-byte vectors
  check_both<double, ilp<double>()>();
  std::printf("ok\n");
  return 0;
}
"""


def test_chunk_walk_vectorises_every_chunk_but_its_ragged_tail(tmp_path):
    _compile_and_run(tmp_path, "walk_check", WALK_PROGRAM)
