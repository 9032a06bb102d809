"""Triton multi-tensor kernels for the SAM step (used by ``fastsam.backends.triton``).

One op per file (kernels, then the host launcher); ``multi_tensor`` holds the
one launcher and the pointer tables shared by all of them.  This layer sits
below the backends and never reaches back up: a launcher returns False (None
for ``sq_norm``) when it cannot index a call's tensors flat, and
fastsam/backends/triton.py decides the fallback and wraps the launchers as
``torch.library`` custom ops.  Importing this package raises ImportError when
triton is missing.

Launches per call: ``sq_norm`` 2 (partials, then their sum and the SAM scalar
epilogue), ``perturb`` 1,
``restore`` 1, ``restore_sgd_step`` 1, ``restore_adam_step`` 1 (the step
counters included); the variants' ``dot_sq_norms`` 2 (partials, then their sums) and
``axpby`` 1; whatever the number of tensors.  A bucket that mixes tensors
whose addresses allow 16-byte vector accesses with tensors whose addresses do
not takes one more launch per op (the partials pass, for the reductions): the
two parts run as separate kernel variants (``multi_tensor``: Alignment).
"""

from . import (  # noqa: F401  (each op module is exported through OPS, in __all__)
    axpby,
    dot_sq_norms,
    multi_tensor,
    perturb,
    restore,
    restore_adam_step,
    restore_sgd_step,
    sq_norm,
)
from .multi_tensor import BLOCK, DTYPE_IDS

# Kernels decorated while TRITON_INTERPRET=1 was set run in the interpreter on CPU tensors
# (the variable is read when the kernels are decorated, i.e. at import).
INTERPRETED = type(sq_norm._sq_norm_partials_kernel).__name__ == "InterpretedFunction"

# Each op module ``x`` holds the launcher ``x.x``.
OPS = ("sq_norm", "perturb", "restore", "restore_sgd_step", "restore_adam_step", "dot_sq_norms", "axpby")

__all__ = ["BLOCK", "DTYPE_IDS", "INTERPRETED", "OPS", "multi_tensor", *OPS]
