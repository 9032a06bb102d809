"""The per-element math of the SAM variants, in the multi-tensor (torch._foreach_*) style.

Each function takes the tensor lists of one bucket (one device, one dtype;
``fastsam/_buckets.py``) and issues a fixed number of multi-tensor launches,
whatever the tensor count.  Reductions return 0-d tensors on the bucket's
device, accumulated in float32 (float64 for float64 input); nothing here
synchronises with the host.  The variants combine the 0-d results of several
buckets with ``total``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

Tensors = List[torch.Tensor]


def _acc(ts: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if ts[0].dtype == torch.float64 else torch.float32


def sq_norm(xs: Tensors) -> torch.Tensor:
    """sum_i ||x_i||^2 (0-d)."""
    if not xs:
        return torch.zeros(())
    norms = torch._foreach_norm(xs)
    return torch.stack(norms).to(_acc(xs)).pow(2).sum()


def dot(xs: Tensors, ys: Tensors) -> torch.Tensor:
    """sum_i <x_i, y_i> (0-d) in five multi-tensor launches, no per-tensor loop: the sum of the
    positive products minus that of the negative ones, each an L1 norm (same-sign sums, so each
    is as accurate as a norm; the one subtraction is the dot product's own cancellation)."""
    if not xs:
        return torch.zeros(())
    acc = _acc(xs)
    prods = torch._foreach_mul(xs, ys)
    pos = torch._foreach_norm(torch._foreach_clamp_min(prods, 0.0), 1, dtype=acc)
    neg = torch._foreach_norm(torch._foreach_clamp_max(prods, 0.0), 1, dtype=acc)
    return torch.stack(pos).sum() - torch.stack(neg).sum()


def total(parts: Sequence[torch.Tensor], device: Optional[torch.device] = None) -> torch.Tensor:
    """The sum of per-bucket 0-d results, on ``device`` (the first part's by default)."""
    device = parts[0].device if device is None else device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    out = parts[0].to(device=device, dtype=dtype)
    for p in parts[1:]:
        out = out + p.to(device=device, dtype=dtype)
    return out


def copy_(dst: Tensors, src: Tensors) -> None:
    """dst <- src."""
    if dst:
        torch._foreach_copy_(dst, src)


def add_scaled_(xs: Tensors, ys: Tensors, scale: torch.Tensor, alpha: float = 1.0) -> None:
    """x <- x + alpha * scale * y (``scale`` a 0-d tensor)."""
    if xs:
        s = (scale * alpha).to(xs[0].dtype) if scale.device == xs[0].device else (scale * alpha).to(xs[0])
        torch._foreach_add_(xs, torch._foreach_mul(ys, s))


def axpy_into(out: Tensors, xs: Tensors, ys: Tensors, scale: torch.Tensor) -> None:
    """out <- x + scale * y (``scale`` a 0-d tensor)."""
    if out:
        s = scale.to(device=xs[0].device, dtype=xs[0].dtype)
        torch._foreach_copy_(out, xs)
        torch._foreach_add_(out, torch._foreach_mul(ys, s))


def scale_(xs: Tensors, scale: torch.Tensor) -> None:
    """x <- scale * x (``scale`` a 0-d tensor)."""
    if xs:
        torch._foreach_mul_(xs, scale.to(device=xs[0].device, dtype=xs[0].dtype))


def ema_(ms: Tensors, xs: Tensors, decay: float) -> None:
    """m <- decay * m + (1 - decay) * x (FriendlySAM's order: scale, then add)."""
    if ms:
        torch._foreach_mul_(ms, decay)
        torch._foreach_add_(ms, xs, alpha=1.0 - decay)


def sub_scaled_(xs: Tensors, ys: Tensors, alpha: float) -> None:
    """x <- x - alpha * y (a Python float alpha)."""
    if xs:
        torch._foreach_add_(xs, ys, alpha=-alpha)
