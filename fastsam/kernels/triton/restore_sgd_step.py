"""Restore + torch.optim.SGD step in one pass, one launch.

Per element: p <- copy (exact); unless skipped, d = g * grad_scale (negated
when maximising) + weight_decay * p; buf <- d on the first step (torch
initialises the momentum buffer to the gradient), else momentum * buf +
(1 - dampening) * d; d <- d + momentum * buf (nesterov) or buf; p <- p - lr * d.
All arithmetic in float32 registers, loads and stores in the tensor dtype; the
update uses the buffer as stored (rounded to the tensor dtype), as torch does.

Bytes per element (x itemsize): reads copy, g, buf; writes p, buf: 5 with
momentum (4 on the first step: no buf read), 3 without.  When there is
nothing to restore (``copies`` empty) the parameter itself is read instead of
the copy.  ``skip`` nonzero: p is written back exactly as read from the copy
and buf is not written (on a skipped first step FusedSAM's freshly zeroed
buffer stays zero).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, keep_mask, load_restored_and_sam_grad, locate, split_scale


@triton.jit
def _sgd_chunk(
    row,
    offs,
    mask,
    kept,
    keep,
    grad_scale,
    grad_scale_lo,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    HAS_GRAD_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    FIRST: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    p0, p, d = load_restored_and_sam_grad(
        row, offs, mask, grad_scale, grad_scale_lo, HAS_GRAD_SCALE, MAXIMIZE, DTYPE, ALIGNED
    )
    if WEIGHT_DECAY:
        d = d + weight_decay * p
    if MOMENTUM:
        buf_ptr = column(row, 3, DTYPE, ALIGNED) + offs
        if FIRST:
            buf = d
        else:
            buf = momentum * tl.load(buf_ptr, mask=mask).to(tl.float32) + one_minus_dampening * d
        buf = buf.to(p0.dtype)  # used as stored, as torch does
        tl.store(buf_ptr, buf, mask=kept)
        if NESTEROV:
            d = d + momentum * buf.to(tl.float32)
        else:
            d = buf.to(tl.float32)
    new = (p - lr * d).to(p0.dtype)
    tl.store(column(row, 0, DTYPE, ALIGNED) + offs, tl.where(keep, new, p0), mask=mask)


@triton.jit
def _restore_sgd_step_kernel(
    table,
    blk_tensor,
    blk_chunk,
    skip_ptr,
    grad_scale_ptr,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    LR_PTR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    FIRST: tl.constexpr,
    N_COLS: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, N_COLS, BLOCK)
    keep = keep_mask(skip_ptr, offs)
    if LR_PTR:  # capturable: the lr lives in a device tensor that schedulers update in place
        lr = tl.load(lr).to(tl.float32)
    grad_scale = 1.0
    grad_scale_lo = 1.0
    if HAS_GRAD_SCALE:  # the clip factor, float64: applied as (g * hi) * lo (multi_tensor.split_scale)
        grad_scale, grad_scale_lo = split_scale(tl.load(grad_scale_ptr).to(tl.float64))
    if (chunk + 1) * BLOCK <= numel:
        _sgd_chunk(
            row,
            offs,
            None,
            keep,
            keep,
            grad_scale,
            grad_scale_lo,
            lr,
            momentum,
            one_minus_dampening,
            weight_decay,
            HAS_GRAD_SCALE,
            MAXIMIZE,
            WEIGHT_DECAY,
            MOMENTUM,
            NESTEROV,
            FIRST,
            DTYPE,
            ALIGNED,
        )
    else:
        in_bounds = offs < numel
        _sgd_chunk(
            row,
            offs,
            in_bounds,
            in_bounds & keep,
            keep,
            grad_scale,
            grad_scale_lo,
            lr,
            momentum,
            one_minus_dampening,
            weight_decay,
            HAS_GRAD_SCALE,
            MAXIMIZE,
            WEIGHT_DECAY,
            MOMENTUM,
            NESTEROV,
            FIRST,
            DTYPE,
            ALIGNED,
        )


def restore_sgd_step(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    copies: List[torch.Tensor],
    momentum_buffers: List[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    skip: torch.Tensor,
    lr,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    first: bool,
) -> bool:
    """``copies`` empty: nothing to restore (the params are read in their place).  ``lr``: a float,
    or a 0-d device tensor read by the kernel (capturable).  False (nothing done) when the layouts
    cannot be indexed flat: the backend falls back."""
    lr_ptr = isinstance(lr, torch.Tensor)
    has_momentum = momentum != 0
    lists = [params, grads, copies or params] + ([momentum_buffers] if has_momentum else [])
    tab = mt.table(lists, distinct_copies=bool(copies))
    if tab is None:
        return False
    mt.launch_parts(
        _restore_sgd_step_kernel,
        tab,
        skip,
        skip if grad_scale is None else grad_scale,
        lr if lr_ptr else float(lr),
        float(momentum),
        1.0 - dampening,
        float(weight_decay),
        LR_PTR=lr_ptr,
        HAS_GRAD_SCALE=grad_scale is not None,
        MAXIMIZE=maximize,
        WEIGHT_DECAY=weight_decay != 0,
        MOMENTUM=has_momentum,
        NESTEROV=nesterov,
        FIRST=first,
        N_COLS=len(lists) + 1,
        DTYPE=mt.DTYPE_IDS[params[0].dtype],
        BLOCK=mt.BLOCK,
    )
    return True
