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
    monkeypatch.setattr(_build, "cuda_toolkit", lambda: ("/usr/local/cuda", ""))
    ok, why = cuda.is_available(torch.device("cuda"))
    assert not ok and "FASTSAM_BUILD_CUDA=1 pip install -e . --no-build-isolation" in why
    # ... because the JIT build found no CUDA headers: that reason, not a rebuild recipe
    monkeypatch.setattr(_build, "cuda_toolkit", lambda: (None, "CUDA_HOME (/x) holds no include/cuda_runtime.h"))
    ok, why = cuda.is_available(torch.device("cuda"))
    assert not ok and "CPU twin only" in why and "/x" in why


def test_failed_build_names_the_fix(monkeypatch):
    monkeypatch.setattr(_build, "_state", {})  # as in a fresh process
    monkeypatch.setattr(_build, "_prebuilt_path", lambda: None)
    monkeypatch.setenv("FASTSAM_NO_JIT", "1")
    ok, why = _build.load()
    assert not ok and "FASTSAM_NO_JIT" in why and "FASTSAM_BUILD_CPP=1 pip install" in why
    assert _build.load() == (ok, why)  # remembered: one attempt per process


def _toolkit(root, headers):
    if headers:
        os.makedirs(os.path.join(root, "include"), exist_ok=True)
        open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    return str(root)


@pytest.mark.parametrize(
    "home_headers, usual_headers, expect",
    [(True, True, "home"), (False, True, "usual"), (False, False, None)],
)
def test_cuda_toolkit_is_where_the_headers_are(monkeypatch, tmp_path, home_headers, usual_headers, expect):
    """torch's CUDA_HOME comes from where nvcc is on PATH: a wrapper script in /usr/local/bin makes
    it /usr/local, with no CUDA headers, and the build of bindings.cpp would fail on
    cuda_runtime.h.  The toolkit's usual place is used then; with headers in neither, the reason
    names torch's CUDA_HOME."""
    import torch.utils.cpp_extension as ext_mod

    home = _toolkit(tmp_path / "home", home_headers)
    usual = _toolkit(tmp_path / "usual", usual_headers)
    monkeypatch.setattr(ext_mod, "CUDA_HOME", home)
    monkeypatch.setattr(_build, "CUDA_TOOLKIT_USUAL", usual)
    root, why = _build.cuda_toolkit()
    if expect is None:
        assert root is None and home in why and "cuda_runtime.h" in why and "CUDA_HOME" in why
    else:
        assert root == {"home": home, "usual": usual}[expect] and why == ""
    # a CUDA torch without the headers builds the CPU twin alone, not nothing
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("FASTSAM_JIT_CUDA", raising=False)
    assert _build._jit_cuda() is (expect is not None)


def test_cuda_toolkit_without_nvcc(monkeypatch):
    import torch.utils.cpp_extension as ext_mod

    monkeypatch.setattr(ext_mod, "CUDA_HOME", None)
    root, why = _build.cuda_toolkit()
    assert root is None and "nvcc" in why and "CUDA_HOME" in why


def test_setup_cuda_build_takes_the_headers_where_they_are(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext_mod

    home = _toolkit(tmp_path / "home", False)
    usual = _toolkit(tmp_path / "usual", True)
    monkeypatch.setenv("FASTSAM_BUILD_CUDA", "1")
    monkeypatch.setattr(ext_mod, "CUDA_HOME", home)
    monkeypatch.setattr(_build, "CUDA_TOOLKIT_USUAL", usual)
    (ext,), _ = _build.setup_extensions()
    assert os.path.join(usual, "include") in ext.include_dirs
    assert os.path.join(usual, "lib64") in ext.library_dirs
    monkeypatch.setattr(_build, "CUDA_TOOLKIT_USUAL", home)
    with pytest.raises(RuntimeError, match="cuda_runtime.h"):
        _build.setup_extensions()
