"""The host half of the CUDA launcher (csrc/multi_tensor_apply.cuh: pack_launches), run on the CPU.

pack_launches is plain C++, so g++ compiles it here with a stand-in "kernel"
that records what each launch would do; the check: every chunk of every
non-empty tensor gets exactly one block, every list of a block points at the
same tensor, launches respect the block and tensor limits of the 4 KiB
argument struct, and block_offset indexes the blocks of all launches in
order (the grad norm's partial sums).  Tensor sizes are only numbers here, so
tensors of 2^31+ and 2^34 elements cost nothing.  What only a GPU can test:
the device half (tests/test_csrc_cuda.py).
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
static void* fake(int d, int64_t t) { return reinterpret_cast<void*>(((uintptr_t)(d + 1) << 40) | ((uintptr_t)(t + 1) << 4)); }
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


def test_pack_launches_covers_every_chunk_once(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "launcher_check.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "launcher_check"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{_build.CSRC}", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
