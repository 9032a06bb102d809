"""The build description (fastsam/_build.py) and the availability messages.

No compiling here: what setup.py would build, that a plain install builds
nothing, and that asking for a backend that cannot run says why and which
command fixes it.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastsam import _build, backends
from fastsam.backends import cpp, cuda


def test_plain_install_builds_nothing(monkeypatch):
    monkeypatch.delenv("FASTSAM_BUILD_CUDA", raising=False)
    monkeypatch.delenv("FASTSAM_BUILD_CPP", raising=False)
    assert _build.setup_extensions() == ([], {})


def test_setup_cpu_build_is_the_cpu_twin(monkeypatch):
    monkeypatch.delenv("FASTSAM_BUILD_CUDA", raising=False)
    monkeypatch.setenv("FASTSAM_BUILD_CPP", "1")
    (ext,), cmdclass = _build.setup_extensions()
    assert ext.name == "fastsam._C" and "build_ext" in cmdclass
    assert sorted(os.path.basename(s) for s in ext.sources) == sorted(_build.CPU_SOURCES)
    assert all(os.path.exists(os.path.join(_build.ROOT, s)) for s in ext.sources)
    assert "-fopenmp" in ext.extra_compile_args["cxx"] and "-march=native" not in ext.extra_compile_args["cxx"]


def test_setup_cuda_build_targets_sm80_and_sm90(monkeypatch):
    import torch.utils.cpp_extension as ext_mod

    monkeypatch.setenv("FASTSAM_BUILD_CUDA", "1")
    if ext_mod.CUDA_HOME is None:  # a CPU torch: torch finds no toolkit, and the build refuses
        with pytest.raises(RuntimeError, match="CPU-only|CUDA_HOME"):
            _build.setup_extensions()
        if not os.path.exists("/usr/local/cuda/bin/nvcc"):
            pytest.skip("no CUDA toolkit")
        monkeypatch.setattr(ext_mod, "CUDA_HOME", "/usr/local/cuda")
    (ext,), _ = _build.setup_extensions()
    names = sorted(os.path.basename(s) for s in ext.sources)
    assert names == sorted(_build.CPU_SOURCES + _build.CUDA_SOURCES)
    nvcc = " ".join(ext.extra_compile_args["nvcc"])
    assert "code=sm_80" in nvcc and "code=sm_90" in nvcc and "use_fast_math" not in nvcc


def test_cpp_backend_is_cpu_only():
    ok, why = cpp.is_available(torch.device("cuda"))
    assert not ok and "backend='cuda'" in why


def test_cuda_backend_says_why_not(monkeypatch):
    ok, why = cuda.is_available(torch.device("cpu"))
    assert not ok and "backend='cpp'" in why
    if not torch.cuda.is_available():
        ok, why = cuda.is_available(torch.device("cuda"))
        assert not ok and ("CPU-only build" in why or "no CUDA device" in why)
        with pytest.raises(backends.BackendUnavailable, match="cuda"):
            backends.resolve("cuda", torch.device("cuda"))
    # a GPU and a CUDA torch, but an extension built without CUDA kernels
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "load", lambda build=True: (True, ""))
    monkeypatch.setattr(_build, "has_cuda_kernels", lambda: False)
    ok, why = cuda.is_available(torch.device("cuda"))
    assert not ok and "FASTSAM_BUILD_CUDA=1 pip install -e . --no-build-isolation" in why


def test_failed_build_names_the_fix(monkeypatch):
    monkeypatch.setattr(_build, "_state", {})  # as in a fresh process
    monkeypatch.setattr(_build, "_prebuilt_path", lambda: None)
    monkeypatch.setenv("FASTSAM_NO_JIT", "1")
    ok, why = _build.load()
    assert not ok and "FASTSAM_NO_JIT" in why and "FASTSAM_BUILD_CPP=1 pip install" in why
    assert _build.load() == (ok, why)  # remembered: one attempt per process
