"""The triton backend: multi-tensor Triton kernels (fastsam/kernels/triton/), the GPU default.

Each op is one launch over all tensors of the bucket (the norm: two), so a
SAM step over SGD or Adam takes 6 launches per (device, dtype) bucket
whatever the number of tensors (7 in the rare SGD step where some momentum
buffers exist and others are new: FusedSAM makes two restore_sgd_step calls);
nothing synchronises with the host.
float32, float16 and bfloat16 (float32 arithmetic); FusedSAM hands float64
buckets to foreach.

Under ``torch.compile`` the ops are called as the ``torch.library`` custom ops
``fastsam::triton_*`` (opaque to the compiler); in eager mode the launchers
are called directly, since the dispatcher costs more than the launch itself
for lists of hundreds of tensors (~0.45 ms for two lists of 161 tensors on
the CI machine, against ~0.17 ms for the whole call).

CUDA graphs: run one eager step before capturing (see
fastsam/kernels/triton/multi_tensor.py).  On the CPU the backend runs only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is what the tests use.
"""
from __future__ import annotations

from typing import List, Optional

import torch

try:
    from ..kernels import triton as _kernels
    _WHY_NOT = ""
except ImportError as exc:  # triton missing or broken
    _kernels = None
    _WHY_NOT = f"triton cannot be imported ({exc}); install it with `pip install triton`"

Tensors = List[torch.Tensor]
NAME = "triton"


def is_available(device: torch.device, build: bool = True) -> tuple[bool, str]:
    """``build`` is part of the backend contract; Triton compiles its kernels lazily anyway."""
    if _kernels is None:
        return False, _WHY_NOT
    if device.type == "cuda":
        if _kernels.INTERPRETED:
            return False, "TRITON_INTERPRET=1 is set: the Triton interpreter runs on CPU tensors only"
        return True, ""
    if device.type == "cpu":
        if _kernels.INTERPRETED:
            return True, ""
        return False, ("Triton kernels run on CUDA devices; on the CPU only in the Triton interpreter "
                       "(TRITON_INTERPRET=1 set before triton is imported), which is for testing")
    return False, f"no Triton kernels for {device.type} devices"


def supports(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


def _call(name: str, *args):
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fastsam, f"triton_{name}")(*args)
    module = getattr(_kernels, name)
    return getattr(module, name)(*args)


# The lists are validated (check_bucket) when the kernels build their pointer table, i.e. on the
# first call with these tensors, not on every call: see fastsam/kernels/triton/multi_tensor.py.

def grad_sq_norm(grads: Tensors, params: Optional[Tensors] = None) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return _call("sq_norm", grads, params or [])


def perturb(params: Tensors, grads: Tensors, copies: Tensors, scale: torch.Tensor,
            skip: torch.Tensor, adaptive: bool) -> None:
    if params:
        _call("perturb", params, grads, copies, scale, skip, bool(adaptive))


def restore(params: Tensors, copies: Tensors) -> None:
    if params:
        _call("restore", params, copies)


def restore_sgd_step(params: Tensors, grads: Tensors, copies: Tensors, momentum_buffers: Tensors, *,
                     lr: float, momentum: float, dampening: float, nesterov: bool,
                     weight_decay: float, maximize: bool, first: bool,
                     grad_scale: Optional[torch.Tensor], skip: torch.Tensor) -> None:
    if params:
        _call("restore_sgd_step", params, grads, [] if copies is params else copies, momentum_buffers,
              grad_scale, skip, float(lr), float(momentum), float(dampening), bool(nesterov), float(weight_decay),
              bool(maximize), bool(first))


def restore_adam_step(params: Tensors, grads: Tensors, copies: Tensors, exp_avgs: Tensors,
                      exp_avg_sqs: Tensors, steps: Tensors, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, decoupled: bool,
                      maximize: bool, grad_scale: Optional[torch.Tensor],
                      skip: torch.Tensor) -> None:
    if params:
        _call("restore_adam_step", params, grads, [] if copies is params else copies, exp_avgs, exp_avg_sqs,
              steps, grad_scale, skip, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
              bool(decoupled), bool(maximize))
