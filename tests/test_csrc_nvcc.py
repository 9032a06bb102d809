"""Compile checks of the CUDA sources, for CI machines without a GPU.

* every csrc/*.cu is compiled by nvcc for sm_80 and sm_90 with the flags of
  the real build (fastsam/_build.py), objects thrown away: a syntax or
  template error in the kernels fails here.  The kernels include only CUDA
  headers, so this needs nvcc but not torch's CUDA headers.
* csrc/sam_cuda.cpp (the torch binding of the kernels) is syntax-checked by
  g++ against torch's headers.  The CPU torch wheel lacks the generated
  c10/cuda/impl/cuda_cmake_macros.h, whose only content is an export macro
  for Windows builds; -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE (torch's own switch
  for builds without it) skips it.  The file uses only c10/cuda stream and
  guard headers (no ATen/cuda, so no cusparse.h/cublas).  What stays
  unchecked here: linking against libc10_cuda/libcudart and running.

* every kernel of csrc/sam_kernels.cu, for sm_80 and sm_90, uses no stack and
  spills nothing, as ``nvcc -Xptxas -v`` reports (local memory costs a memory
  round trip per access in a memory-bound kernel); the table is printed.
* the axpby kernels contain no fused multiply-add (the backend contract rounds
  each product and the sum: fastsam/backends/__init__.py).

Skipped only when nvcc (or torch's include dir) is not found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from fastsam import _build

NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
if not os.path.exists(NVCC):
    NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
def test_every_cu_file_compiles_for_sm80_and_sm90():
    failures = _build.nvcc_check(nvcc=NVCC)
    assert not failures, "\n\n".join(failures)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
def test_nvcc_check_fails_on_a_broken_kernel(tmp_path, monkeypatch):
    """The check really compiles: a template error in a .cu file is reported."""
    bad = tmp_path / "broken.cu"
    bad.write_text(
        '#include "sam_math.h"\n__global__ void k(float* p) { p[0] = fastsam::perturb_element<float>(p[0]); }\n'
    )
    for header in ("sam_math.h",):
        (tmp_path / header).write_text(open(os.path.join(_build.CSRC, header)).read())
    monkeypatch.setattr(_build, "CSRC", str(tmp_path))
    failures = _build.nvcc_check(nvcc=NVCC, archs=("80",))
    assert failures and "perturb_element" in failures[0]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("arch", _build.CUDA_ARCHS)
def test_no_kernel_uses_stack_or_spills(arch):
    usage = _build.ptxas_usage(nvcc=NVCC, arch=arch)
    entries = _build.nvcc_ptx(nvcc=NVCC, arch=arch).count(".entry ")
    for kernel, u in sorted(usage.items()):
        print(
            f"sm_{arch} {u['registers']:4d} regs {u.get('stack', '?'):>4} B stack "
            f"{u.get('spill_stores', '?')}/{u.get('spill_loads', '?')} B spilled  {kernel[:150]}"
        )
    assert entries and len(usage) == entries, f"ptxas reported {len(usage)} of the {entries} kernels"
    bad = [k for k, u in usage.items() if (u["stack"], u["spill_stores"], u["spill_loads"]) != (0, 0, 0)]
    assert not bad, "kernels with local memory (stack or spills):\n" + "\n".join(f"{usage[k]} {k}" for k in bad)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
def test_axpby_kernels_contain_no_fused_multiply_add():
    ptx = _build.nvcc_ptx(nvcc=NVCC)
    kernels = [e for e in ptx.split(".entry ")[1:] if "AxpbyFunctor" in e.split("(")[0]]
    assert len(kernels) == 4, "one axpby kernel per dtype"
    for body in kernels:
        assert not re.search(r"\bfma\.", body), body.split("(")[0]
        assert re.search(r"\bmul\.rn\.f(32|64)", body), body.split("(")[0]


def test_cuda_binding_syntax_checks_against_torch_headers():
    import torch
    import torch.utils.cpp_extension as ext

    cuda_home = os.path.dirname(os.path.dirname(NVCC)) if NVCC else None
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        pytest.skip("CUDA headers not found")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [a for p in ext.include_paths() + [os.path.join(cuda_home, "include")] for a in ("-isystem", p)]
    # torch >= 2.10 headers need C++20; older ones build with C++17.
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    cmd = [
        cxx,
        std,
        "-fsyntax-only",
        "-Wall",
        "-Werror",
        "-DFASTSAM_WITH_CUDA",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *includes,
        os.path.join(_build.CSRC, "sam_cuda.cpp"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}"
