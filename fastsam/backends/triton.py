"""The triton backend: multi-tensor Triton kernels (fastsam/kernels/triton/), the GPU default.

Each op is one launch over all tensors of the bucket (the norm and the variants'
dot_sq_norms: two), so a
SAM step over SGD or Adam takes 6 launches per (device, dtype) bucket
whatever the number of tensors (7 in the rare SGD step where some momentum
buffers exist and others are new: FusedSAM makes two restore_sgd_step calls);
a bucket mixing 16-byte aligned and unaligned tensors takes one more launch per
kernel (fastsam/kernels/triton/multi_tensor.py: Alignment); nothing synchronises
with the host.
float32, float16 and bfloat16 (float32 arithmetic; the norms' and dot
products' squares and sums in float64); FusedSAM hands float64 buckets to
foreach.

This module decides what the kernels cannot do: a call whose tensors cannot
be indexed flat (the launcher returns False/None) runs on the foreach backend.
Under ``torch.compile`` the ops are called as the ``torch.library`` custom ops
``fastsam::triton_*`` defined here (opaque to the compiler); in eager mode the
launchers are called directly, since the dispatcher's per-call handling of
lists of hundreds of tensors costs more than the launch itself.

CUDA graphs: run one eager step before capturing (see
fastsam/kernels/triton/multi_tensor.py).  On the CPU the backend runs only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is what the tests use.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import _common, foreach
from ._common import Epilogue, sam_scalars

try:
    from ..kernels import triton as _kernels

    _WHY_NOT = ""
except ImportError as exc:  # triton missing or broken
    _kernels = None  # type: ignore[assignment]  # no kernels: is_available() says False, with _WHY_NOT
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
        return False, (
            "Triton kernels run on CUDA devices; on the CPU only in the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported), which is for testing"
        )
    return False, f"no Triton kernels for {device.type} devices"


def supports(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


_MODES = {None: 0, "perturb": 1, "step": 2}


# The ops: launcher first, foreach when the launcher declines.  The lists are validated
# (check_bucket) when the kernels build their pointer table, i.e. on the first call with
# these tensors, not on every call: see fastsam/kernels/triton/multi_tensor.py.


def _grad_sq_norm(
    grads: Tensors,
    params: Tensors,
    accumulate: Optional[torch.Tensor],
    out: Optional[torch.Tensor],
    mode: int,
    eps: float,
    max_norm: Optional[float],
    prev: Optional[torch.Tensor],
) -> torch.Tensor:
    total = _kernels.sq_norm.sq_norm(grads, params, accumulate, out, mode, eps, max_norm, prev)
    if total is None:
        ep = None if mode == 0 else Epilogue(out, "perturb" if mode == 1 else "step", eps, max_norm, prev)  # type: ignore[arg-type]  # out comes with mode != 0
        total = foreach.grad_sq_norm(grads, params or None, accumulate=accumulate, epilogue=ep)
    return total


def _perturb(params, grads, copies, scalars, rho, adaptive) -> None:
    if not _kernels.perturb.perturb(params, grads, copies, scalars, rho, adaptive):
        foreach.perturb(params, grads, copies, scalars, rho, adaptive)


def _restore(params, copies) -> None:
    if not _kernels.restore.restore(params, copies):
        torch._foreach_copy_(params, copies)


def _restore_sgd_step(
    params,
    grads,
    copies,
    momentum_buffers,
    grad_scale,
    skip,
    lr,
    momentum,
    dampening,
    nesterov,
    weight_decay,
    maximize,
    first,
) -> None:
    if not _kernels.restore_sgd_step.restore_sgd_step(
        params,
        grads,
        copies,
        momentum_buffers,
        grad_scale,
        skip,
        lr,
        momentum,
        dampening,
        nesterov,
        weight_decay,
        maximize,
        first,
    ):
        foreach.restore_sgd_step(
            params,
            grads,
            copies,
            momentum_buffers,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=maximize,
            first=first,
            grad_scale=grad_scale,
            skip=skip,
        )


def _restore_adam_step(
    params,
    grads,
    copies,
    exp_avgs,
    exp_avg_sqs,
    steps,
    grad_scale,
    skip,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    maximize,
) -> None:
    if not _kernels.restore_adam_step.restore_adam_step(
        params,
        grads,
        copies,
        exp_avgs,
        exp_avg_sqs,
        steps,
        grad_scale,
        skip,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        maximize,
    ):
        foreach.restore_adam_step(
            params,
            grads,
            copies,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled=decoupled,
            maximize=maximize,
            grad_scale=grad_scale,
            skip=skip,
        )


def _dot_sq_norms(xs, ys, accumulate) -> torch.Tensor:
    total = _kernels.dot_sq_norms.dot_sq_norms(xs, ys, accumulate)
    if total is None:
        total = foreach.dot_sq_norms(xs, ys, accumulate=accumulate)
    return total


def _axpby(xs, ys, coefs, out) -> None:
    if not _kernels.axpby.axpby(xs, ys, coefs, out):
        foreach.axpby(xs, ys, coefs, out=out)


_EAGER: dict = {
    "dot_sq_norms": _dot_sq_norms,
    "axpby": _axpby,
    "sq_norm": _grad_sq_norm,
    "perturb": _perturb,
    "restore": _restore,
    "restore_sgd_step": _restore_sgd_step,
    "restore_adam_step": _restore_adam_step,
    "restore_sgd_step_lr_tensor": _restore_sgd_step,
    "restore_adam_step_lr_tensor": _restore_adam_step,
}


def _call(name: str, *args):
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fastsam, f"triton_{name}")(*args)
    return _EAGER[name](*args)


def _lr_op(name: str, lr):
    """The op for this lr: a float goes in as a number, a 0-d device tensor (capturable) as a
    pointer the kernel reads, through the op's ``_lr_tensor`` twin (a schema has no float-or-tensor)."""
    return (f"{name}_lr_tensor", lr) if isinstance(lr, torch.Tensor) else (name, float(lr))


def grad_sq_norm(
    grads: Tensors,
    params: Optional[Tensors] = None,
    *,
    accumulate: Optional[torch.Tensor] = None,
    epilogue: Optional[Epilogue] = None,
) -> torch.Tensor:
    if not grads:
        total = torch.zeros((), dtype=torch.float64, device="cpu") if accumulate is None else accumulate.clone()
        if epilogue is not None:
            sam_scalars(total, epilogue)
        return total
    if epilogue is None:
        return _call("sq_norm", grads, params or [], accumulate, None, 0, 0.0, None, None)
    return _call(
        "sq_norm",
        grads,
        params or [],
        accumulate,
        epilogue.out,
        _MODES[epilogue.mode],
        epilogue.eps,
        epilogue.max_norm,
        epilogue.prev,
    )


def perturb(
    params: Tensors, grads: Tensors, copies: Tensors, scalars: torch.Tensor, rho: float, adaptive: bool
) -> None:
    if params:
        _call("perturb", params, grads, copies, scalars, float(rho), bool(adaptive))


def restore(params: Tensors, copies: Tensors) -> None:
    if params:
        _call("restore", params, copies)


def restore_sgd_step(
    params: Tensors,
    grads: Tensors,
    copies: Tensors,
    momentum_buffers: Tensors,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    first: bool,
    grad_scale: Optional[torch.Tensor],
    skip: torch.Tensor,
) -> None:
    if params:
        name, lr = _lr_op("restore_sgd_step", lr)
        _call(
            name,
            params,
            grads,
            copies,
            momentum_buffers,
            grad_scale,
            skip,
            lr,
            float(momentum),
            float(dampening),
            bool(nesterov),
            float(weight_decay),
            bool(maximize),
            bool(first),
        )


def restore_adam_step(
    params: Tensors,
    grads: Tensors,
    copies: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    steps: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    grad_scale: Optional[torch.Tensor],
    skip: torch.Tensor,
) -> None:
    if params:
        name, lr = _lr_op("restore_adam_step", lr)
        _call(
            name,
            params,
            grads,
            copies,
            exp_avgs,
            exp_avg_sqs,
            steps,
            grad_scale,
            skip,
            lr,
            float(beta1),
            float(beta2),
            float(eps),
            float(weight_decay),
            bool(decoupled),
            bool(maximize),
        )


def dot_sq_norms(xs: Tensors, ys: Tensors, *, accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not xs:
        return torch.zeros(3, dtype=torch.float64, device="cpu") if accumulate is None else accumulate.clone()
    return _call("dot_sq_norms", xs, ys, accumulate)


def axpby(xs: Tensors, ys: Tensors, coefs: torch.Tensor, *, out: Optional[Tensors] = None) -> None:
    if xs:
        _call("axpby", xs, ys, coefs.contiguous(), xs if out is None else out)


# ---------------------------------------------------------------- custom ops (torch.compile)
if _kernels is not None:
    T = List[torch.Tensor]

    @torch.library.custom_op("fastsam::triton_sq_norm", mutates_args=("out",))
    def _sq_norm_op(
        grads: T,
        params: T,
        accumulate: Optional[torch.Tensor],
        out: Optional[torch.Tensor],
        epilogue: int,
        eps: float,
        max_norm: Optional[float],
        prev: Optional[torch.Tensor],
    ) -> torch.Tensor:  # no argument may be called "mode"
        return _grad_sq_norm(grads, params, accumulate, out, epilogue, eps, max_norm, prev).clone()

    @_sq_norm_op.register_fake
    def _(grads, params, accumulate, out, epilogue, eps, max_norm, prev):
        return grads[0].new_empty((), dtype=torch.float64)

    @torch.library.custom_op("fastsam::triton_dot_sq_norms", mutates_args=())
    def _dot_sq_norms_op(xs: T, ys: T, accumulate: Optional[torch.Tensor]) -> torch.Tensor:
        return _dot_sq_norms(xs, ys, accumulate).clone()

    @_dot_sq_norms_op.register_fake
    def _(xs, ys, accumulate):
        return xs[0].new_empty((3,), dtype=torch.float64)

    # ``out`` may hold the tensors of ``xs`` (in place): the op is called with out=xs then.
    @torch.library.custom_op("fastsam::triton_axpby", mutates_args=("out",))
    def _axpby_op(xs: T, ys: T, coefs: torch.Tensor, out: T) -> None:
        _axpby(xs, ys, coefs, out)

    @torch.library.custom_op("fastsam::triton_perturb", mutates_args=("params", "copies"))
    def _perturb_op(params: T, grads: T, copies: T, scalars: torch.Tensor, rho: float, adaptive: bool) -> None:
        _perturb(params, grads, copies, scalars, rho, adaptive)

    @torch.library.custom_op("fastsam::triton_restore", mutates_args=("params",))
    def _restore_op(params: T, copies: T) -> None:
        _restore(params, copies)

    @torch.library.custom_op("fastsam::triton_restore_sgd_step", mutates_args=("params", "momentum_buffers"))
    def _restore_sgd_step_op(
        params: T,
        grads: T,
        copies: T,
        momentum_buffers: T,
        grad_scale: Optional[torch.Tensor],
        skip: torch.Tensor,
        lr: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        weight_decay: float,
        maximize: bool,
        first: bool,
    ) -> None:
        _restore_sgd_step(
            params,
            grads,
            copies,
            momentum_buffers,
            grad_scale,
            skip,
            lr,
            momentum,
            dampening,
            nesterov,
            weight_decay,
            maximize,
            first,
        )

    @torch.library.custom_op(
        "fastsam::triton_restore_adam_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps")
    )
    def _restore_adam_step_op(
        params: T,
        grads: T,
        copies: T,
        exp_avgs: T,
        exp_avg_sqs: T,
        steps: T,
        grad_scale: Optional[torch.Tensor],
        skip: torch.Tensor,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        maximize: bool,
    ) -> None:
        _restore_adam_step(
            params,
            grads,
            copies,
            exp_avgs,
            exp_avg_sqs,
            steps,
            grad_scale,
            skip,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
            maximize,
        )

    # The same two steps with the lr in a 0-d device tensor (capturable; torch.library schemas
    # have no float-or-tensor type).
    @torch.library.custom_op("fastsam::triton_restore_sgd_step_lr_tensor", mutates_args=("params", "momentum_buffers"))
    def _restore_sgd_step_lr_op(
        params: T,
        grads: T,
        copies: T,
        momentum_buffers: T,
        grad_scale: Optional[torch.Tensor],
        skip: torch.Tensor,
        lr: torch.Tensor,
        momentum: float,
        dampening: float,
        nesterov: bool,
        weight_decay: float,
        maximize: bool,
        first: bool,
    ) -> None:
        _restore_sgd_step(
            params,
            grads,
            copies,
            momentum_buffers,
            grad_scale,
            skip,
            lr,
            momentum,
            dampening,
            nesterov,
            weight_decay,
            maximize,
            first,
        )

    @torch.library.custom_op(
        "fastsam::triton_restore_adam_step_lr_tensor", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps")
    )
    def _restore_adam_step_lr_op(
        params: T,
        grads: T,
        copies: T,
        exp_avgs: T,
        exp_avg_sqs: T,
        steps: T,
        grad_scale: Optional[torch.Tensor],
        skip: torch.Tensor,
        lr: torch.Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        maximize: bool,
    ) -> None:
        _restore_adam_step(
            params,
            grads,
            copies,
            exp_avgs,
            exp_avg_sqs,
            steps,
            grad_scale,
            skip,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
            maximize,
        )

    for _op in (
        _axpby_op,
        _perturb_op,
        _restore_op,
        _restore_sgd_step_op,
        _restore_adam_step_op,
        _restore_sgd_step_lr_op,
        _restore_adam_step_lr_op,
    ):
        _op.register_fake(lambda *args, **kwargs: None)


# The two passes of a step with their norms, as the core calls them on one bucket.
norm_perturb = _common.norm_perturb_of(grad_sq_norm, perturb)
norm_restore_sgd_step = _common.norm_restore_sgd_step_of(grad_sq_norm, restore_sgd_step)
