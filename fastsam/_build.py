"""The one description of the compiled extension in csrc/ (sources and flags).

Used three ways:

* ``setup.py`` calls :func:`setup_extensions`: ``FASTSAM_BUILD_CUDA=1`` builds
  the CPU twin and the CUDA kernels (``fastsam._C``, sm_80 + sm_90),
  ``FASTSAM_BUILD_CPP=1`` the CPU twin only; neither: nothing is compiled
  and the install stays pure Python.  This module imports torch only when a
  build is asked for (setup.py may run where torch is absent).
* the backends call :func:`load`: a prebuilt ``fastsam._C`` if there is one,
  else a JIT build with ``torch.utils.cpp_extension.load`` (g++ and ninja;
  nvcc too when torch has CUDA), cached on disk under
  ``$FASTSAM_CACHE_DIR`` or ``$TORCH_EXTENSIONS_DIR/fastsam`` or
  ``~/.cache/fastsam``, keyed by a hash of the sources, the flags and the
  torch/Python versions.  A cache hit loads the library directly (no ninja,
  no setuptools): milliseconds.  ``FASTSAM_NO_JIT=1`` turns the JIT off.
* CI calls :func:`nvcc_check` (``python fastsam/_build.py nvcc-check``,
  csrc/nvcc_check.sh): every .cu file compiled for sm_80 and sm_90 with the
  flags of the real build, objects thrown away.

The extension registers torch operators (``torch.ops.fastsam.*``); there is
no Python module to import, so both paths load it with
``torch.ops.load_library``.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_PKG_DIR)
# A source checkout builds from csrc/; an installed wheel from the copy build_py puts in the package.
CSRC = os.path.join(ROOT, "csrc")
if not os.path.isdir(CSRC):
    CSRC = os.path.join(_PKG_DIR, "_csrc")

# The CPU twin and the op schemas: every build has these.
CPU_SOURCES = ["bindings.cpp", "sam_cpu.cpp"]
# The CUDA kernels (raw pointers, CUDA headers only) and their torch binding.
CUDA_SOURCES = ["sam_cuda.cpp", "sam_kernels.cu"]
CPU_HEADERS = ["sam_math.h", "sam_checks.h", "sam_storage.h", "sam_cpu_loops.h"]
CUDA_HEADERS = ["sam_kernels.h", "multi_tensor_apply.cuh"]

# -O3 and nothing machine-specific (no -march=native): the .so may be built on
# one machine and run on another.  csrc/sam_cpu.cpp compiles its element loops
# for SSE2, AVX2 and AVX-512 itself (`#pragma GCC target`) and picks one at run
# time.  -ffp-contract=off keeps g++ from fusing a * b + c into an FMA in the
# AVX2/AVX-512 loops: every instruction set gives the same bits.
# -fno-trapping-math lets g++ compute both sides of a select on floats (the
# fp16 conversions' cases) and so vectorise the loop; it changes no value,
# only whether floating-point exception flags may be raised speculatively
# (nothing here reads them).  -fopenmp
# makes at::parallel_for parallel (it is an inline OpenMP loop in torch's
# headers); the link resolves to the libgomp.so.1 torch already loaded.
# -fno-math-errno lets g++ vectorise sqrt (Adam) without changing any result:
# it only drops the errno write for sqrt of a negative number.  torch's build
# adds the -std it needs (c++17 or c++20, by torch version).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# No --use_fast_math: it changes sqrt and division (-prec-sqrt/-prec-div
# false), which Adam's update uses, and gains nothing in memory-bound kernels.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_ARCHS = ("80", "90")
# torch's BuildExtension/load() add these to every nvcc call; the compile
# check uses them too so that it sees what the real build sees.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
BUILD_FIX = (
    "name the backend (backend=\"cpp\" or \"cuda\") to let the JIT path build it on first use (needs a "
    "C++ compiler and `pip install ninja`, plus nvcc for CUDA), or build it ahead of time in a source "
    "checkout with `FASTSAM_BUILD_CPP=1 pip install -e . --no-build-isolation` (CPU) or "
    "`FASTSAM_BUILD_CUDA=1 pip install -e . --no-build-isolation` (CUDA)"
)


def gencode_flags(archs=CUDA_ARCHS) -> List[str]:
    """-gencode for each arch, plus PTX of the newest so later GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _sources(cuda: bool, absolute: bool) -> List[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if cuda else [])
    base = CSRC if absolute else "csrc"
    return [os.path.join(base, n) for n in names]


def _cxx_flags(cuda: bool) -> List[str]:
    return CXX_FLAGS + (["-DFASTSAM_WITH_CUDA"] if cuda else [])


# ------------------------------------------------------------------ setup.py
def setup_extensions():
    """(ext_modules, cmdclass) for setup.py, from FASTSAM_BUILD_CUDA / FASTSAM_BUILD_CPP."""
    want_cuda = os.environ.get("FASTSAM_BUILD_CUDA", "0") == "1"
    want_cpp = os.environ.get("FASTSAM_BUILD_CPP", "0") == "1"
    if not (want_cuda or want_cpp):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "building the fastsam extension needs torch at build time: install torch first and run "
            "`pip install -e . --no-build-isolation` so the build sees it"
        ) from exc
    if want_cuda:
        import torch
        import torch.utils.cpp_extension as ext

        if ext.CUDA_HOME is None:
            if torch.version.cuda is None:
                raise RuntimeError(
                    f"FASTSAM_BUILD_CUDA=1 needs a CUDA build of torch; this one ({torch.__version__}) "
                    "is CPU-only (use FASTSAM_BUILD_CPP=1 for the CPU twin)"
                )
            raise RuntimeError("FASTSAM_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit")
        root, why = cuda_toolkit()
        if root is None:
            raise RuntimeError(f"FASTSAM_BUILD_CUDA=1 but {why}")
        print(
            f"fastsam: building fastsam._C with CUDA kernels for sm_{', sm_'.join(CUDA_ARCHS)} "
            f"(nvcc from {ext.CUDA_HOME}, CUDA headers from {root})",
            file=sys.stderr,
        )
        module = CUDAExtension(
            "fastsam._C",
            _sources(True, absolute=False),
            include_dirs=[os.path.join(root, "include")] if root != ext.CUDA_HOME else [],
            library_dirs=[os.path.join(root, "lib64")] if root != ext.CUDA_HOME else [],
            extra_compile_args={"cxx": _cxx_flags(True), "nvcc": NVCC_FLAGS + gencode_flags()},
            extra_link_args=LINK_FLAGS,
        )
    else:
        print("fastsam: building fastsam._C (CPU twin only)", file=sys.stderr)
        module = CppExtension(
            "fastsam._C",
            _sources(False, absolute=False),
            extra_compile_args={"cxx": _cxx_flags(False)},
            extra_link_args=LINK_FLAGS,
        )
    return [module], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


# ------------------------------------------------------------------ loading
_state: dict = {}  # "ok": bool, "why": str, "path": str, "cuda": bool; set once per process


def _prebuilt_path() -> Optional[str]:
    spec = importlib.util.find_spec("fastsam._C")
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        return spec.origin
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_PKG_DIR, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def cache_dir() -> str:
    base = os.environ.get("FASTSAM_CACHE_DIR")
    if not base and os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "fastsam")
    return base or os.path.join(os.path.expanduser("~"), ".cache", "fastsam")


CUDA_TOOLKIT_USUAL = "/usr/local/cuda"


def _has_cuda_headers(root: str) -> bool:
    return os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))


def cuda_toolkit() -> Tuple[Optional[str], str]:
    """(root of the CUDA toolkit the JIT build compiles against, "") or (None, why there is none).

    torch takes its CUDA_HOME from the environment or from where ``nvcc`` is on PATH; an nvcc
    that is a wrapper script (``/usr/local/bin/nvcc`` calling the toolkit's) makes that
    ``/usr/local``, which holds no CUDA headers, and every compile that includes them fails.
    The toolkit's usual place is tried next, as torch itself tries it when nvcc is not on PATH.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None, "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    for root in (CUDA_HOME, CUDA_TOOLKIT_USUAL):
        if _has_cuda_headers(root):
            return root, ""
    return None, (
        f"torch's CUDA_HOME ({CUDA_HOME}) holds no include/cuda_runtime.h, nor does {CUDA_TOOLKIT_USUAL}: "
        "set CUDA_HOME to the CUDA toolkit"
    )


def _jit_cuda() -> bool:
    """Whether the JIT build includes the CUDA kernels: torch has CUDA, and nvcc and the CUDA
    headers are there (without them the build is the CPU twin alone, not no build at all)."""
    import torch

    if os.environ.get("FASTSAM_JIT_CUDA") is not None:
        return os.environ["FASTSAM_JIT_CUDA"] == "1"
    if torch.version.cuda is None:
        return False
    return cuda_toolkit()[0] is not None


def _jit_archs() -> Tuple[str, ...]:
    """The visible GPUs' archs (one arch compiles twice as fast as two); sm_80+sm_90 without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return CUDA_ARCHS
    caps = sorted({"{}{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    return tuple(caps)


def _jit_key(cuda: bool, archs: Tuple[str, ...]) -> str:
    import torch

    h = hashlib.sha256()
    names = CPU_SOURCES + CPU_HEADERS + (CUDA_SOURCES + CUDA_HEADERS if cuda else [])
    for name in sorted(names):
        path = os.path.join(CSRC, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    flags = [torch.__version__, sys.version, str(cuda), *archs, *CXX_FLAGS, *LINK_FLAGS, *NVCC_FLAGS]
    h.update("\0".join(flags).encode())
    return h.hexdigest()[:16]


class NotBuilt(RuntimeError):
    """No prebuilt or cached extension, and the caller did not ask for a build."""


def _jit_build(build: bool = True) -> Tuple[str, bool]:
    """Build (or find in the cache) the extension; returns (path of the .so, has CUDA).

    With ``build=False`` only a cached build is used (raises NotBuilt otherwise).
    """
    cuda = _jit_cuda()
    archs = _jit_archs() if cuda else ()
    key = _jit_key(cuda, archs)
    name = f"fastsam_ext_{'cuda' if cuda else 'cpu'}_{key}"
    build_dir = os.path.join(cache_dir(), name)
    so_path = os.path.join(build_dir, name + ".so")
    stamp = so_path + ".ok"  # written after a complete build: a half-linked .so is never loaded
    if os.path.exists(stamp) and os.path.exists(so_path):
        return so_path, cuda
    if not build:
        raise NotBuilt(f"the extension is not built yet ({BUILD_FIX})")
    missing = [n for n in _sources(cuda, absolute=True) if not os.path.exists(n)]
    if missing:
        raise RuntimeError(
            f"the csrc/ sources are not next to the package ({', '.join(missing)} missing), so the "
            "JIT path cannot build the extension"
        )
    os.makedirs(build_dir, exist_ok=True)
    from torch.utils.cpp_extension import load, verify_ninja_availability

    verify_ninja_availability()
    what = f"CPU twin + CUDA kernels for sm_{', sm_'.join(archs)}" if cuda else "CPU twin"
    print(f"fastsam: building the C++ extension ({what}; first use, a minute or more) in {build_dir}", file=sys.stderr)
    includes: List[str] = []
    ldflags = list(LINK_FLAGS)
    if cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        root = cuda_toolkit()[0]
        if root is not None and root != CUDA_HOME:  # torch's CUDA_HOME has no headers (see cuda_toolkit)
            includes.append(os.path.join(root, "include"))
            ldflags.append("-L" + os.path.join(root, "lib64"))
    load(
        name,
        _sources(cuda, absolute=True),
        extra_cflags=_cxx_flags(cuda),
        extra_cuda_cflags=NVCC_FLAGS + gencode_flags(archs) if cuda else None,
        extra_ldflags=ldflags,
        extra_include_paths=includes,
        build_directory=build_dir,
        with_cuda=cuda,
        is_python_module=False,
        verbose=os.environ.get("FASTSAM_BUILD_VERBOSE") == "1",
    )
    with open(stamp, "w") as f:
        f.write(key + "\n")
    return so_path, cuda


def load(build: bool = True) -> Tuple[bool, str]:
    """Load the extension once per process; (True, "") or (False, why and how to fix it).

    ``build=False`` (what backend="auto" uses) loads only a prebuilt or cached
    extension and never starts a compile.  A failure is remembered for the
    rest of the process, so a missing compiler costs one attempt, not one per
    call; "not built yet" is not remembered, so an explicit request can build.
    """
    if "ok" in _state:
        return _state["ok"], _state["why"]
    import torch

    try:
        path = _prebuilt_path()
        if path is None:
            if os.environ.get("FASTSAM_NO_JIT") == "1":
                raise RuntimeError("no prebuilt fastsam._C and FASTSAM_NO_JIT=1 forbids the JIT build")
            path, _ = _jit_build(build)
        torch.ops.load_library(path)
        _state.update(ok=True, why="", path=path)
    except NotBuilt as exc:
        return False, str(exc)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        detail = msg[-1] if msg else type(exc).__name__
        _state.update(
            ok=False,
            why=f"the fastsam C++ extension is not available ({type(exc).__name__}: {detail}); {BUILD_FIX}",
            path=None,
        )
    return _state["ok"], _state["why"]


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels (a CUDA build, not the CPU twin only)."""
    import torch

    return bool(_state.get("ok")) and torch._C._dispatch_has_kernel_for_dispatch_key("fastsam::perturb", "CUDA")


# ------------------------------------------------------------------ CI compile check
def nvcc_check(nvcc: Optional[str] = None, archs=CUDA_ARCHS, keep_going: bool = False) -> List[str]:
    """Compile every csrc/*.cu for each arch (-c, objects in a temp dir); returns the failures' logs.

    The kernels include only CUDA headers, so this needs nvcc but not torch's
    CUDA headers (absent from the CPU torch wheel).
    """
    nvcc = nvcc or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(glob.glob(os.path.join(CSRC, "*.cu"))):
            for arch in archs:
                obj = os.path.join(tmp, f"{os.path.basename(src)}.sm_{arch}.o")
                cmd = [
                    nvcc,
                    "-c",
                    src,
                    "-o",
                    obj,
                    "-Xcompiler",
                    "-fPIC",
                    "-Werror",
                    "all-warnings",
                    "-std=c++17",
                    *TORCH_NVCC_DEFINES,
                    *NVCC_FLAGS,
                    f"-gencode=arch=compute_{arch},code=sm_{arch}",
                ]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    failures.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
                    if not keep_going:
                        return failures
    return failures


def nvcc_ptx(nvcc: Optional[str] = None, arch: str = "90", src: str = "sam_kernels.cu") -> str:
    """The PTX of ``csrc/<src>`` for compute_<arch>, with the flags of the real build."""
    nvcc = nvcc or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k.ptx")
        cmd = [
            nvcc,
            "-ptx",
            os.path.join(CSRC, src),
            "-o",
            out,
            "-std=c++17",
            *TORCH_NVCC_DEFINES,
            *NVCC_FLAGS,
            f"-arch=compute_{arch}",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        with open(out) as f:
            return f.read()


def ptxas_usage(nvcc: Optional[str] = None, arch: str = "90", src: str = "sam_kernels.cu") -> dict:
    """Per-kernel resources of ``csrc/<src>`` for sm_<arch>, as ``nvcc -Xptxas -v`` reports them
    (the flags of the real build, object thrown away): {kernel (demangled): {"registers",
    "stack", "spill_stores", "spill_loads"}}.  Raises RuntimeError if the compile fails."""
    import re
    import shutil

    nvcc = nvcc or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            nvcc,
            "-c",
            os.path.join(CSRC, src),
            "-o",
            os.path.join(tmp, "k.o"),
            "-Xcompiler",
            "-fPIC",
            "-std=c++17",
            *TORCH_NVCC_DEFINES,
            *NVCC_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xptxas",
            "-v",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    usage: dict = {}
    name = None
    for line in res.stderr.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            usage.setdefault(name, {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            usage[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            usage[name]["registers"] = int(m.group(1))
    kernels = {k: v for k, v in usage.items() if "registers" in v}  # entries, not device functions
    demangle = shutil.which("c++filt")
    if demangle and kernels:
        names = subprocess.run([demangle], input="\n".join(kernels), capture_output=True, text=True).stdout.split("\n")
        kernels = dict(zip(names, kernels.values()))
    return kernels


if __name__ == "__main__":
    if sys.argv[1:] == ["nvcc-check"]:
        errs = nvcc_check(keep_going=True)
        print("\n".join(errs) or f"nvcc-check: every csrc/*.cu compiles for sm_{', sm_'.join(CUDA_ARCHS)}")
        sys.exit(1 if errs else 0)
    if sys.argv[1:2] == ["ptxas-usage"]:
        for kernel, u in sorted(ptxas_usage(arch=(sys.argv[2:] or ["90"])[0]).items()):
            print(
                f"{u['registers']:4d} regs {u.get('stack', 0):4d} B stack {u.get('spill_stores', 0):4d}/"
                f"{u.get('spill_loads', 0):<4d} B spilled  {kernel}"
            )
        sys.exit(0)
    print("usage: python fastsam/_build.py nvcc-check | ptxas-usage [ARCH]", file=sys.stderr)
    sys.exit(2)
