"""What every backend shares: the list checks and the scalar epilogue in plain torch ops.

The *scalars* of a pass are one 1-D tensor per device (float32; float64 when a
float64 bucket is involved) with ``SKIP`` and ``FACTOR`` slots:

first pass (``mode="perturb"``)
    ``SKIP`` = 1.0 if the squared norm is not finite, ``FACTOR`` = 1 / (||g|| + eps);
    the perturbation of a group is ``rho * FACTOR * g`` (ASAM: ``* w**2``).
second pass (``mode="step"``)
    ``SKIP`` = max(first pass's SKIP, 1.0 if not finite), ``FACTOR`` = the clip
    coefficient min(max_norm / (||g_sam|| + 1e-6), 1) (1.0 without clipping).
    With a GradScaler's ``inv_scale`` (1/loss scale) and ``found_inf``: ``SKIP``
    also takes ``found_inf``, ``FACTOR`` = inv_scale * the clip coefficient of the
    unscaled norm ||g_sam|| * inv_scale (the fused step multiplies the gradient by it).

The triton backend computes the same epilogue inside its final reduction kernel;
foreach and cpp compose it from torch ops (``sam_scalars`` below).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import math
import struct

import torch

from ..kernels.checks import check_bucket, check_copies  # noqa: F401  (re-exported for the backends)

SKIP, FACTOR = 0, 1
N_SCALARS = 2
CLIP_EPS = 1e-6  # added to ||g_sam|| in the clip coefficient, as torch.nn.utils.clip_grad_norm_ does
# The CPU is its own device, so the foreach backend and the scalar epilogue read the device
# scalars of CPU tensors (skip flags, coefficients, step counts) on the host, where that is free.
# False: they take the path of CUDA tensors, device-side formulas and masked writes, on CPU
# tensors too; the tests run the backend contract through it (tests/test_backend_ops.py).
HOST_READS = True


def on_host(t: torch.Tensor) -> bool:
    """Whether ``t`` is read on the host: a CPU tensor, unless HOST_READS is off."""
    return HOST_READS and t.device.type == "cpu"


class Epilogue(NamedTuple):
    """What ``grad_sq_norm`` writes after the reduction (see the module docstring)."""

    out: torch.Tensor                  # the pass's scalars, written
    mode: str                          # "perturb" | "step"
    eps: float = 1e-12                 # perturb: added to the norm
    max_norm: Optional[float] = None   # step: clip to this norm
    prev: Optional[torch.Tensor] = None  # step: the first pass's scalars (its SKIP is carried over)
    inv_scale: Optional[torch.Tensor] = None  # step: GradScaler's 1/scale (0-d), folded into FACTOR
    found_inf: Optional[torch.Tensor] = None  # step: GradScaler's inf flag (0-d), folded into SKIP


def new_scalars(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(N_SCALARS, dtype=dtype, device=device)


def sam_scalars(sq: torch.Tensor, ep: Epilogue) -> None:
    """The epilogue in torch ops: ``ep.out`` from the total squared norm ``sq`` (0-d)."""
    if on_host(ep.out) and all(t is None or on_host(t) for t in (sq, ep.prev, ep.inv_scale, ep.found_inf)):
        _host_scalars(sq, ep)
        return
    sq = sq.to(ep.out.dtype)
    bad = (~torch.isfinite(sq)).to(sq.dtype)
    if ep.mode == "perturb":
        ep.out[SKIP] = bad
        ep.out[FACTOR] = 1.0 / (sq.sqrt() + ep.eps)
        return
    if ep.found_inf is not None:
        bad = torch.maximum(bad, (ep.found_inf.to(device=bad.device, dtype=bad.dtype) != 0).to(bad.dtype))
    ep.out[SKIP] = bad if ep.prev is None else torch.maximum(ep.prev[SKIP].to(bad), bad)
    inv = None if ep.inv_scale is None else ep.inv_scale.to(device=sq.device, dtype=torch.float32)
    if ep.max_norm is None:
        ep.out[FACTOR] = 1.0 if inv is None else inv
    elif inv is None:
        ep.out[FACTOR] = torch.clamp(ep.max_norm / (sq.sqrt() + CLIP_EPS), max=1.0)
    else:  # the clip norm is the unscaled one; inv * coefficient in fp32, as the fused steps use FACTOR
        norm = sq.sqrt() * inv.to(sq.dtype)
        ep.out[FACTOR] = inv * torch.clamp(ep.max_norm / (norm + CLIP_EPS), max=1.0).float()


def _host_scalars(sq: torch.Tensor, ep: Epilogue) -> None:
    """The same epilogue computed on the host for CPU tensors (reading them is free there): the
    same operations in the same order as the torch ops above, each rounded to the scalars'
    dtype (one IEEE operation computed in float64 and rounded to float32 is the correctly
    rounded float32 result), at a fraction of the dispatch cost: the torch ops were a third of
    a SAM step's host time at 161 tensors.  Equal to the torch ops' bits but for about 1 in
    400 float32 values, which differ by one ulp (torch's vectorised reciprocal)."""
    r = _round32 if ep.out.dtype == torch.float32 else float
    v = r(sq.item())
    bad = 0.0 if math.isfinite(v) else 1.0
    root = r(math.sqrt(v)) if v >= 0 else math.nan  # v is +inf or nan when bad
    if ep.mode == "perturb":
        factor = r(1.0 / r(root + r(ep.eps))) if bad == 0.0 else math.nan
    else:
        if ep.found_inf is not None and float(ep.found_inf.item()) != 0:
            bad = 1.0
        if ep.prev is not None:
            bad = max(float(ep.prev[SKIP].item()), bad)
        inv = None if ep.inv_scale is None else _round32(float(ep.inv_scale.item()))  # float32, as the scaler's
        if ep.max_norm is None:
            factor = 1.0 if inv is None else inv
        else:
            norm = root if inv is None else r(root * inv)  # the clip norm is the unscaled one
            if not math.isfinite(norm):
                clip = math.nan if math.isnan(norm) else 0.0
            else:  # torch's max_norm / t is reciprocal(t) * max_norm
                clip = min(r(r(1.0 / r(norm + r(CLIP_EPS))) * r(ep.max_norm)), 1.0)
            factor = clip if inv is None else _round32(inv * _round32(clip))
    try:  # a NumPy view writes both slots without dispatching two torch ops
        out = ep.out.numpy()
        out[SKIP] = bad
        out[FACTOR] = factor
    except (RuntimeError, TypeError):  # no NumPy, or a tensor NumPy cannot view
        ep.out[SKIP] = bad
        ep.out[FACTOR] = factor


def scaled(grads, factor: torch.Tensor):
    """``grads`` times a pass's 0-d ``factor`` (the clip coefficient), each in its own dtype: a 0-d
    gradient times a 0-d factor would take the wider dtype of the two (0-d operands promote each
    other), which the state it meets next (lerp), or ``p.grad``, refuses."""
    out = torch._foreach_mul(grads, factor)
    return [s if s.dtype == g.dtype else s.to(g.dtype) for s, g in zip(out, grads)]


def _round32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as float32 arithmetic stores it."""
    if not math.isfinite(x):
        return x
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: rounds to an infinity
        return math.copysign(math.inf, x)


def finish_norm(sq: torch.Tensor, accumulate: Optional[torch.Tensor], epilogue: Optional[Epilogue]) -> torch.Tensor:
    """The tail of a composed ``grad_sq_norm``: add the running total, run the epilogue."""
    if accumulate is not None:
        sq = sq + accumulate  # 0-d tensors: promotes to the wider dtype
    if epilogue is not None:
        sam_scalars(sq, epilogue)
    return sq
