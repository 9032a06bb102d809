"""The optional compiled extension, and the C++/CUDA sources shipped inside the package.

Everything else about the distribution is in pyproject.toml.  A plain install is pure Python: no
compiler, no GPU.  ``fastsam/_build.py`` holds the one description of the extension (sources,
flags), shared with the JIT loader; FASTSAM_BUILD_CPP=1 / FASTSAM_BUILD_CUDA=1 at install time build
it ahead of time, otherwise the JIT path builds it on first use from the sources that build_py copies
into the package (a wheel has no csrc/ beside it).
"""

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fastsam"))
try:
    import _build

    ext_modules, cmdclass = _build.setup_extensions()
finally:
    sys.path.pop(0)


class build_py_with_sources(build_py):
    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "fastsam", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for path in glob.glob(os.path.join(HERE, "csrc", "*")):
            if path.endswith((".cpp", ".cu", ".h", ".cuh")):
                shutil.copy(path, dest)


setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": build_py_with_sources})
