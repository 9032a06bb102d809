"""The cpp backend: the compiled CPU twin of the CUDA kernels (csrc/sam_cpu.cpp).

Each op is one ``torch.ops.fastsam`` operator that makes one pass over
memory, parallel over (tensor, chunk) pieces with at::parallel_for; the
per-element math is csrc/sam_math.h, shared with the CUDA kernels.  The same
operators serve the cuda backend (fastsam/backends/cuda.py): the dispatcher
picks the CPU or the CUDA kernel from the tensors' device.

The kernels index every tensor as one flat array laid out like its parameter; the
operators check that (and everything else) before they write anything.  A call they
refuse for layout alone (a gradient that is a transposed view, say) runs on the foreach
backend instead, as the triton backend does: the check costs nothing on the usual path.

The element loops are compiled for SSE2, AVX2 and AVX-512 in the same .so
and chosen at run time (``code_path()`` says which; ``ATEN_CPU_CAPABILITY``
caps it as it caps torch's own kernels); every path gives the same bits.  On
AMD's Zen 4 the path is ``avx512-zen4``: the float32 norm, perturbation and
restore + SGD/Adam take the AVX2 loops there, which ran faster on it.

The extension comes from ``fastsam._C`` when it was built by setup.py
(``FASTSAM_BUILD_CPP=1`` / ``FASTSAM_BUILD_CUDA=1``), else from a JIT build
on first use, cached on disk (fastsam/_build.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional

import torch

from .. import _build
from . import BackendUnavailable, _common, foreach
from ._common import FACTOR, SKIP, Epilogue, finish_norm

Tensors = List[torch.Tensor]
NAME = "cpp"
# fp16 is left to foreach: the fused loop converts fp16 in software (no vectorised F16C from g++ 12),
# ~10 instructions per element each way, which made a ResNet-18-shaped fp16 step several times slower
# than foreach's multi-pass ATen kernels (measured in benchmarks/NOTES.md, issue 20).  The fp16 kernels stay (the
# operators take every floating dtype) and are tested bit for bit against the other dtypes' paths.
_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_ops = None  # torch.ops.fastsam once the extension is loaded


def _fastsam_ops():
    """torch.ops.fastsam, loading (or JIT-building) the extension on first use."""
    global _ops
    if _ops is None:
        ok, why = _build.load()
        if not ok:
            raise BackendUnavailable(why)
        _ops = torch.ops.fastsam
    return _ops


def is_available(device: torch.device, build: bool = True) -> tuple[bool, str]:
    """``build=False``: only a prebuilt or cached extension counts (no compile is started)."""
    device = torch.device(device)
    if device.type != "cpu":
        return False, (
            f"the cpp backend runs on CPU tensors, not {device.type}; "
            "use backend='cuda' (or 'auto') for CUDA parameters"
        )
    return _build.load(build)


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPES


def code_path() -> str:
    """The CPU kernels' code path: the instruction set of the element loops ("avx512-zen4",
    "avx512", "avx2" or "base") and the size from which write-only lists get streaming stores."""
    return _fastsam_ops().cpu_kernels("", -1)


def instruction_sets() -> List[str]:
    """The instruction sets of the element loops this CPU runs ("base" always); benchmarks and tests
    select one with ``torch.ops.fastsam.cpu_kernels(isa, -1)``."""
    ops, out = _fastsam_ops(), []
    now = code_path().split(";")[0]
    for isa in ("base", "avx2", "avx512", "avx512-zen4"):
        try:
            ops.cpu_kernels(isa, -1)
            out.append(isa)
        except (RuntimeError, ValueError):  # this CPU (or this build) lacks it
            pass
    ops.cpu_kernels(now, -1)
    return out


def _laid_out_alike(lists: List[Any]) -> bool:  # tensor lists or tuples
    """Every tensor dense and strided like the first list's tensor at its index."""
    ref = lists[0]
    return all(
        t.layout == torch.strided and (t.numel() <= 1 or (t.stride() == r.stride() and _dense(t)))
        for ls in lists
        for t, r in zip(ls, ref)
    )


def _dense(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous()
        or t.is_contiguous(memory_format=torch.channels_last)
        or t.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _or_foreach(op: Callable[..., Any], fallback: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
    """``op``, or ``fallback`` (default: foreach's op of the same name) when the operator refuses the
    call for the layout of its tensors (it refuses before it writes anything)."""
    fallback = fallback if fallback is not None else getattr(foreach, op.__name__)

    @functools.wraps(op)
    def call(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except ValueError:
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and torch.is_tensor(a[0])]
            if not lists or _laid_out_alike(lists):
                raise
            return fallback(*args, **kwargs)

    return call


@_or_foreach
def grad_sq_norm(
    grads: Tensors,
    params: Optional[Tensors] = None,
    *,
    accumulate: Optional[torch.Tensor] = None,
    epilogue: Optional[Epilogue] = None,
) -> torch.Tensor:
    if not grads:  # no tensor to dispatch on
        return finish_norm(torch.zeros((), dtype=torch.float64, device="cpu"), accumulate, epilogue)
    sq = _fastsam_ops().grad_sq_norm.default(grads, [] if params is None else params)
    return finish_norm(sq, accumulate, epilogue)  # the epilogue in torch ops (a few scalar launches)


@_or_foreach
def perturb(
    params: Tensors, grads: Tensors, copies: Tensors, scalars: torch.Tensor, rho: float, adaptive: bool
) -> None:
    if params:
        _fastsam_ops().perturb.default(params, grads, copies, scalars[FACTOR] * rho, scalars[SKIP], bool(adaptive))


@_or_foreach
def restore(params: Tensors, copies: Tensors) -> None:
    if params:
        _fastsam_ops().restore.default(params, copies)


@_or_foreach
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
    if not params:
        return
    # The restore contract: an empty copies list means nothing to restore.
    _fastsam_ops().restore_sgd_step.default(
        params,
        grads,
        copies,
        momentum_buffers,
        float(lr),
        float(momentum),
        float(dampening),
        bool(nesterov),
        float(weight_decay),
        bool(maximize),
        bool(first),
        grad_scale,
        skip,
    )


def _or_composed(composed: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """For a pass with its norm: where the operator refuses a layout, the pass composed of this
    backend's own ops, each falling back on its own, as the general route does (the norm of a
    gradient laid out unlike its parameter is still the cpp norm's, bit for bit)."""
    return lambda op: _or_foreach(op, composed)


@_or_composed(_common.norm_perturb_of(grad_sq_norm, perturb))
def norm_perturb(
    params: Tensors, grads: Tensors, copies: Tensors, scalars: torch.Tensor, rho: float, adaptive: bool, *, eps: float
) -> None:
    # One operator: the norm, the scalars and the perturbation without a return to Python between.
    _fastsam_ops().norm_perturb.default(params, grads, copies, scalars, float(rho), float(eps), bool(adaptive))


@_or_composed(_common.norm_restore_sgd_step_of(grad_sq_norm, restore_sgd_step))
def norm_restore_sgd_step(
    params: Tensors,
    grads: Tensors,
    copies: Tensors,
    momentum_buffers: Tensors,
    scalars: torch.Tensor,
    prev: Optional[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    first: bool,
) -> None:
    _fastsam_ops().norm_restore_sgd_step.default(
        params,
        grads,
        copies,
        momentum_buffers,
        scalars,
        prev,
        float(lr),
        float(momentum),
        float(dampening),
        bool(nesterov),
        float(weight_decay),
        bool(maximize),
        bool(first),
    )


@_or_foreach
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
    if not params:
        return
    _fastsam_ops().restore_adam_step.default(
        params,
        grads,
        copies,
        exp_avgs,
        exp_avg_sqs,
        steps,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(decoupled),
        bool(maximize),
        grad_scale,
        skip,
    )


@_or_foreach
def dot_sq_norms(xs: Tensors, ys: Tensors, *, accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not xs:
        return torch.zeros(3, dtype=torch.float64, device="cpu") if accumulate is None else accumulate.clone()
    return _fastsam_ops().dot_sq_norms.default(xs, ys, accumulate)


@_or_foreach
def axpby(xs: Tensors, ys: Tensors, coefs: torch.Tensor, *, out: Optional[Tensors] = None) -> None:
    if xs:  # an empty ``out`` tells the operator to write xs in place
        _fastsam_ops().axpby.default(xs, ys, coefs, [] if out is None or out is xs else out)
