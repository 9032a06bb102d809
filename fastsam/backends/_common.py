"""What every backend shares: the list checks and the scalar epilogue in plain torch ops.

The *scalars* of a pass are one 1-D float64 tensor per device with ``SKIP`` and
``FACTOR`` slots, computed from the float64 squared norm (every backend accumulates
its norms in float64, whatever the gradients' dtype):

first pass (``mode="perturb"``)
    ``SKIP`` = 1.0 if the squared norm is not finite, ``FACTOR`` = 1 / (||g|| + eps);
    the perturbation of a group is ``rho * FACTOR * g`` (ASAM: ``* w**2``).
second pass (``mode="step"``)
    ``SKIP`` = max(first pass's SKIP, 1.0 if not finite), ``FACTOR`` = the clip
    coefficient min(max_norm / (||g_sam|| + 1e-6), 1) (1.0 without clipping).
    With a GradScaler's ``inv_scale`` (1/loss scale) and ``found_inf``: ``SKIP``
    also takes ``found_inf``, ``FACTOR`` = inv_scale * the clip coefficient of the
    unscaled norm ||g_sam|| * inv_scale (the fused step multiplies the gradient by it).

Why float64 (issue 24, "finite means finite"): a finite float32 gradient may hold
elements up to 3.4e38, whose squares overflow float32 (1e20 already does), and its norm
may exceed float32's range; a float32 norm made such a step look non-finite and skipped
it.  In float64 the squared norm of any finite float32/16-bit gradient is finite.  Its
FACTOR (rho / ||g|| down to ~1e-45, the clip coefficient max_norm / ||g|| likewise) is
below float32's normal range there (a float32 FACTOR would be subnormal, or 0, and e
would lose its digits or vanish), so FACTOR stays float64 and the kernels, which compute
in float32 for float32/16-bit tensors, apply ``s = FACTOR * rho`` as two float32
factors: ``(g * hi) * lo`` with ``hi, lo = split_scale(s)``, ``lo`` a power of two
(exact) and ``hi`` a normal float32.  For every s within float32's normal range lo = 1
and the product is the one a float32 scale gives, bit for bit; outside it the product is
still the correctly rounded ``g * s`` wherever that is a normal float32.

The triton backend computes the same epilogue inside its final reduction kernel;
foreach and cpp compose it from torch ops (``sam_scalars`` below).
"""

from __future__ import annotations

import math
import struct
from typing import Any, Callable, NamedTuple, Optional, Tuple

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

    out: torch.Tensor  # the pass's scalars, written
    mode: str  # "perturb" | "step"
    eps: float = 1e-12  # perturb: added to the norm
    max_norm: Optional[float] = None  # step: clip to this norm
    prev: Optional[torch.Tensor] = None  # step: the first pass's scalars (its SKIP is carried over)
    inv_scale: Optional[torch.Tensor] = None  # step: GradScaler's 1/scale (0-d), folded into FACTOR
    found_inf: Optional[torch.Tensor] = None  # step: GradScaler's inf flag (0-d), folded into SKIP


def new_scalars(device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A pass's scalars (float64: see the module docstring; ``dtype`` is kept for callers that
    name it)."""
    return torch.empty(N_SCALARS, dtype=torch.float64, device=device)


def sam_scalars(sq: torch.Tensor, ep: Epilogue) -> None:
    """The epilogue in torch ops: ``ep.out`` from the total squared norm ``sq`` (0-d), in float64."""
    if on_host(ep.out) and all(t is None or on_host(t) for t in (sq, ep.prev, ep.inv_scale, ep.found_inf)):
        _host_scalars(sq, ep)
        return
    sq = sq.to(torch.float64)
    bad = (~torch.isfinite(sq)).to(sq.dtype)
    if ep.mode == "perturb":
        ep.out[SKIP] = bad
        ep.out[FACTOR] = 1.0 / (sq.sqrt() + ep.eps)
        return
    if ep.found_inf is not None:
        bad = torch.maximum(bad, (ep.found_inf.to(device=bad.device, dtype=bad.dtype) != 0).to(bad.dtype))
    ep.out[SKIP] = bad if ep.prev is None else torch.maximum(ep.prev[SKIP].to(bad), bad)
    # the scaler's 1/scale is a float32 number (GradScaler's); exact in float64
    inv = None if ep.inv_scale is None else ep.inv_scale.to(device=sq.device, dtype=torch.float32).double()
    if ep.max_norm is None:
        ep.out[FACTOR] = 1.0 if inv is None else inv
    elif inv is None:
        ep.out[FACTOR] = torch.clamp(ep.max_norm / (sq.sqrt() + CLIP_EPS), max=1.0)
    else:  # the clip norm is the unscaled one
        norm = sq.sqrt() * inv
        ep.out[FACTOR] = inv * torch.clamp(ep.max_norm / (norm + CLIP_EPS), max=1.0)


def _host_scalars(sq: torch.Tensor, ep: Epilogue) -> None:
    """The same epilogue computed on the host for CPU tensors (reading them is free there): the
    same float64 operations in the same order as the torch ops above, at a fraction of their
    dispatch cost (a handful of scalar torch ops per pass)."""
    v = float(sq.item())
    bad = 0.0 if math.isfinite(v) else 1.0
    root = math.sqrt(v) if v >= 0 else math.nan  # v is +inf or nan when bad
    if ep.mode == "perturb":
        factor = 1.0 / (root + ep.eps) if bad == 0.0 else math.nan
    else:
        if ep.found_inf is not None and float(ep.found_inf.item()) != 0:
            bad = 1.0
        if ep.prev is not None:
            bad = max(float(ep.prev[SKIP].item()), bad)
        inv = None if ep.inv_scale is None else _round32(float(ep.inv_scale.item()))  # float32, as the scaler's
        if ep.max_norm is None:
            factor = 1.0 if inv is None else inv
        else:
            norm = root if inv is None else root * inv  # the clip norm is the unscaled one
            if not math.isfinite(norm):
                clip = math.nan if math.isnan(norm) else 0.0
            else:  # torch's max_norm / t is reciprocal(t) * max_norm
                clip = min((1.0 / (norm + CLIP_EPS)) * ep.max_norm, 1.0)
            factor = clip if inv is None else inv * clip
    try:  # a NumPy view writes both slots without dispatching two torch ops
        out = ep.out.numpy()
        out[SKIP] = bad
        out[FACTOR] = factor
    except (RuntimeError, TypeError):  # no NumPy, or a tensor NumPy cannot view
        ep.out[SKIP] = bad
        ep.out[FACTOR] = factor


# ---------------------------------------------------------------- a float64 scale in float32 math
F32_TINY = 2.0**-126  # float32's smallest normal number
F32_MAX = float(torch.finfo(torch.float32).max)
SPLIT = 2.0**100  # the power of two split_scale moves


def split_scale(s: float) -> Tuple[float, float]:
    """A float64 scale as ``(hi, lo)`` with ``g * s == (g * hi) * lo`` in float32 arithmetic,
    rounded once: ``lo`` is 1, 2^-100 or 2^100 (exact), ``hi`` a normal float32 wherever
    |s| >= 2^-226.  Within float32's normal range ``(s, 1.0)``: the product is then the one
    a float32 scale gives, bit for bit.  Below it (the ``rho / ||g||`` of a gradient whose norm
    exceeds float32's range, or such a clip coefficient) ``g * hi`` is exact scaling away
    from the rounded result, which ``* lo`` restores exactly unless the result is subnormal;
    the order keeps ``g * hi`` between g and the result, so it cannot overflow on its own.
    The kernels (triton: ``multi_tensor.split_scale``; csrc: ``sam_math.h``) do the same."""
    a = abs(s)
    if 0.0 < a < F32_TINY:
        return s * SPLIT, 1.0 / SPLIT
    if F32_MAX < a < math.inf:
        return s / SPLIT, SPLIT
    return s, 1.0


def split_scale_tensor(s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``split_scale`` of a 0-d device tensor, on the device (no host read): float32 ``(hi, lo)``."""
    s = s.to(torch.float64)
    a = s.abs()
    one = torch.ones((), dtype=torch.float64, device=s.device)
    lo = torch.where(
        (a < F32_TINY) & (a > 0), one / SPLIT, torch.where((a > F32_MAX) & (a < math.inf), one * SPLIT, one)
    )
    return (s / lo).float(), lo.float()


def scaled(grads, factor: torch.Tensor):
    """``grads`` times a pass's 0-d ``factor`` (the clip coefficient, float64), each in its own dtype
    (a 0-d gradient times a 0-d factor would take the wider dtype of the two, which the state it
    meets next (lerp), or ``p.grad``, refuses)."""
    out = scaled_products(grads, factor)
    return [s if s.dtype == g.dtype else s.to(g.dtype) for s, g in zip(out, grads)]


def scaled_products(grads, factor: torch.Tensor):
    """``grads`` times the 0-d float64 ``factor`` (the clip coefficient, or the perturbation's scale)
    before any rounding back: float64 gradients in float64; the others in their own dtype where the
    factor is a normal float32 read on the host, else in float32 times ``split_scale(factor)``'s two
    factors (a float32 factor would be subnormal or 0 for a gradient whose norm exceeds float32's
    range)."""
    if grads[0].dtype == torch.float64:
        out = torch._foreach_mul(grads, factor.to(torch.float64))
    elif on_host(factor):
        hi, lo = split_scale(float(factor))
        if lo == 1.0:
            out = torch._foreach_mul(grads, hi)
        else:  # 16-bit values: in float32, where hi and lo are in range
            out = torch._foreach_mul([g.float() for g in grads], hi)
            torch._foreach_mul_(out, lo)
    else:
        hi_t, lo_t = split_scale_tensor(factor)
        xs = grads if grads[0].dtype == torch.float32 else [g.float() for g in grads]
        out = torch._foreach_mul(xs, hi_t)
        torch._foreach_mul_(out, lo_t)
    return out


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


# ---------------------------------------------------------------- a pass with its norm, composed
def check_pass_scalars(op: str, scalars: torch.Tensor) -> None:
    """The scalars a pass with its norm writes: 1-D float64, at least ``N_SCALARS`` elements (as the
    compiled operators check them, csrc/sam_checks.h)."""
    if not (
        isinstance(scalars, torch.Tensor)
        and scalars.dim() == 1
        and scalars.numel() >= N_SCALARS
        and scalars.dtype == torch.float64
    ):
        what = f"shape {tuple(scalars.shape)} and dtype {scalars.dtype}" if torch.is_tensor(scalars) else repr(scalars)
        raise ValueError(
            f"{op}: 'scalars' must be a pass's scalars, a 1-D float64 tensor of at least {N_SCALARS} elements, "
            f"got {what}"
        )


def norm_perturb_of(grad_sq_norm: Callable[..., torch.Tensor], perturb: Callable[..., None]) -> Callable[..., None]:
    """A backend's ``norm_perturb`` composed of its ``grad_sq_norm`` and ``perturb``: the first pass of
    a step over one bucket (fastsam/backends/__init__.py)."""

    def norm_perturb(params, grads, copies, scalars: torch.Tensor, rho: float, adaptive: bool, *, eps: float) -> None:
        check_pass_scalars("norm_perturb", scalars)
        grad_sq_norm(grads, params if adaptive else None, epilogue=Epilogue(scalars, "perturb", eps))
        perturb(params, grads, copies, scalars, rho, adaptive)

    return norm_perturb


def norm_restore_sgd_step_of(
    grad_sq_norm: Callable[..., torch.Tensor], restore_sgd_step: Callable[..., None]
) -> Callable[..., None]:
    """A backend's ``norm_restore_sgd_step`` composed of its ``grad_sq_norm`` and ``restore_sgd_step``:
    the second pass of a step over one bucket, neither clipped nor unscaled
    (fastsam/backends/__init__.py)."""

    def norm_restore_sgd_step(
        params, grads, copies, momentum_buffers, scalars: torch.Tensor, prev: Optional[torch.Tensor], **sgd: Any
    ) -> None:
        check_pass_scalars("norm_restore_sgd_step", scalars)
        grad_sq_norm(grads, epilogue=Epilogue(scalars, "step", prev=prev))
        restore_sgd_step(params, grads, copies, momentum_buffers, **sgd, grad_scale=None, skip=scalars[SKIP])

    return norm_restore_sgd_step
