"""The cuda backend: the csrc/ CUDA kernels (apex-style multi_tensor_apply).

The ops are the ``torch.ops.fastsam`` operators of the cpp backend (same
Python wrappers); on CUDA tensors the dispatcher runs the kernels of
csrc/sam_kernels.cu, which share their per-element math (csrc/sam_math.h)
with the CPU twin.  They never synchronise with the host and are registered
with fake (Meta) kernels, so FusedSAM stays capturable by torch.compile and
CUDA graphs.
"""

from __future__ import annotations

import torch

from .. import _build
from . import _common
from .cpp import axpby, dot_sq_norms, grad_sq_norm, perturb, restore, restore_adam_step, restore_sgd_step, supports  # noqa: F401  - the same operators serve both devices

NAME = "cuda"
# The two passes with their norms: the CPU twin has them as operators of their own, the CUDA
# kernels are these compositions of the operators above.
norm_perturb = _common.norm_perturb_of(grad_sq_norm, perturb)
norm_restore_sgd_step = _common.norm_restore_sgd_step_of(grad_sq_norm, restore_sgd_step)


def is_available(device: torch.device, build: bool = True) -> tuple[bool, str]:
    """``build=False``: only a prebuilt or cached extension counts (no compile is started)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, (
            f"the cuda backend runs on CUDA tensors, not {device.type}; "
            "use backend='cpp' (or 'auto') for CPU parameters"
        )
    if torch.version.cuda is None:
        return False, (
            f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/) to use backend='cuda'"
        )
    if not torch.cuda.is_available():
        return (
            False,
            "no CUDA device is visible (torch.cuda.is_available() is False); check the driver and CUDA_VISIBLE_DEVICES",
        )
    ok, why = _build.load(build)
    if not ok:
        return False, why
    if not _build.has_cuda_kernels():
        _, no_toolkit = _build.cuda_toolkit()
        if no_toolkit:
            return False, f"the fastsam extension was built without CUDA kernels (CPU twin only): {no_toolkit}"
        return False, (
            "the loaded fastsam extension was built without CUDA kernels (CPU twin only); rebuild it "
            "with `FASTSAM_BUILD_CUDA=1 pip install -e . --no-build-isolation`, or remove the "
            "prebuilt fastsam/_C*.so so the JIT path builds the CUDA kernels (needs nvcc)"
        )
    return True, ""
