"""fastsam: fused Sharpness-Aware Minimization for PyTorch.

A plain ``pip install -e .`` is pure Python: no compiler, no GPU.  The compiled
backends in csrc/ are optional and built only when asked for (see
``fastsam/_build.py`` for what is built and the environment variables that
turn it on); a JIT path builds them on first use as well.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastsam"))

ext_modules = []
cmdclass = {}
try:
    # _build.py holds the one description of the compiled extension, shared by
    # setup.py and the JIT loader.  It decides from FASTSAM_BUILD_CUDA /
    # FASTSAM_BUILD_CPP whether anything is built at all.
    import _build  # noqa: E402

    ext_modules, cmdclass = _build.setup_extensions()
except ImportError:  # _build.py not present yet: pure-Python install
    pass
finally:
    sys.path.pop(0)

setup(
    name="fastsam",
    version="0.1.0",
    description="Fused Sharpness-Aware Minimization (SAM) for PyTorch: multi-tensor kernels, "
    "late-phase switching, Hessian sharpness tools",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastsam", "fastsam.*"]),
    python_requires=">=3.9",
    # No triton here: a CPU install cannot use it, and on Linux the CUDA builds of torch already
    # bring the triton they were built with (a separate pin could only disagree with it).  The
    # test extra has it for the interpreter tests.
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "triton; platform_system == 'Linux'", "numpy", "ninja", "tqdm", "scikit-learn", "matplotlib", "mlxtend",
                 "lightning==2.6.6", "transformers==5.24.0", "accelerate==1.15.0", "hypothesis==6.170.27"],
        "bench": ["numpy", "ninja", "tqdm", "matplotlib", "scikit-learn", "pytest-benchmark", "mlxtend"],
        # fastsam.integrations (pip install fastsam[lightning] / fastsam[transformers]); the "test" extra pins
        # the versions tests/test_integrations_*.py run against (pip keeps the CPU torch already installed)
        "lightning": ["lightning>=2.2"],
        "transformers": ["transformers>=4.46", "accelerate>=0.26"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
