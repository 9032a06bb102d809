"""Triton multi-tensor kernels for the SAM step (used by ``fastsam.backends.triton``).

One op per file (kernels, then the host launcher, then the ``torch.library``
custom op that wraps it so that ``torch.compile`` treats the launch as one
opaque op); ``multi_tensor`` holds the one launcher and the pointer tables
shared by all of them.  Importing this package raises ImportError when triton
is missing.

Launches per call: ``sq_norm`` 2 (partials, then their sum), ``perturb`` 1,
``restore`` 1, ``restore_sgd_step`` 1, ``restore_adam_step`` 1 (the step
counters included), whatever the number of tensors.
"""
from . import multi_tensor, perturb, restore, restore_adam_step, restore_sgd_step, sq_norm
from .multi_tensor import BLOCK, DTYPE_IDS

# Kernels decorated while TRITON_INTERPRET=1 was set run in the interpreter on CPU tensors
# (the variable is read when the kernels are decorated, i.e. at import).
INTERPRETED = type(sq_norm._sq_norm_partials_kernel).__name__ == "InterpretedFunction"

# Each op module ``x`` holds the plain launcher ``x.x`` and the custom op ``x.x_op``
# (also reachable as ``torch.ops.fastsam.triton_x``).
OPS = ("sq_norm", "perturb", "restore", "restore_sgd_step", "restore_adam_step")

__all__ = ["BLOCK", "DTYPE_IDS", "INTERPRETED", "OPS", "multi_tensor", *OPS]
