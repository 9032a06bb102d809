"""Restore + torch.optim.Adam / AdamW step (amsgrad off) in one pass, one launch.

Per element: p <- copy (exact); unless skipped, g = grad * grad_scale
(negated when maximising); AdamW: p <- p * (1 - lr * wd), Adam: g <- g + wd * p;
m <- lerp(m, g, 1 - beta1); v <- beta2 * v + (1 - beta2) * g^2;
p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), with bc = 1 - beta^t and
t = step + 1 read from the tensor's 0-d step counter (device-side, as torch's
capturable Adam).  float32 arithmetic, IEEE-rounded sqrt and division; the
moments are rounded to the tensor dtype before the update uses them, as in torch.
Bytes per element (x itemsize): reads copy, g, m, v; writes p, m, v: 7.

The step counters.  Every program of a tensor must read the old count, so no
program may write it before all have read it.  Each program, after its
element work, passes a CTA barrier (all its threads have read the count) and
adds 1 to the tensor's slot in an int32 counter array (atomic, acq_rel, gpu
scope); the program that sees n_chunks - 1 is the last of its tensor: it
writes step + 1 (unless skipped) and resets the slot to 0 for the next launch.
The count thus costs no extra launch.  The counter array belongs to the
block map of the bucket's sizes; launches on one stream never overlap, so
buckets of equal sizes may share it.  Do not run two Adam steps over
same-sized buckets concurrently on different streams.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, keep_mask, load_restored_and_sam_grad, locate, split_scale


@triton.jit
def _one_minus_pow(log_beta, t):
    """1 - beta**t from log(beta) <= 0, also accurate where beta**t is close to 1 (tl has no
    expm1): the Taylor series of -expm1(x) for x > -0.5 (9 terms, truncation < 1e-9
    relative), else 1 - exp(x) (cancellation at most 2.5x)."""
    x = t * log_beta
    xs = tl.maximum(x, -0.5)
    series = -xs * (
        1
        + xs
        / 2
        * (1 + xs / 3 * (1 + xs / 4 * (1 + xs / 5 * (1 + xs / 6 * (1 + xs / 7 * (1 + xs / 8 * (1 + xs / 9)))))))
    )
    return tl.where(x > -0.5, series, 1 - tl.exp(x))


@triton.jit
def _adam_chunk(
    row,
    offs,
    mask,
    kept,
    keep,
    grad_scale,
    grad_scale_lo,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    step_size,
    bc2_sqrt,
    HAS_GRAD_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    p0, p, g = load_restored_and_sam_grad(
        row, offs, mask, grad_scale, grad_scale_lo, HAS_GRAD_SCALE, MAXIMIZE, DTYPE, ALIGNED
    )
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    m_ptr = column(row, 3, DTYPE, ALIGNED) + offs
    v_ptr = column(row, 4, DTYPE, ALIGNED) + offs
    m = tl.load(m_ptr, mask=mask).to(tl.float32)
    v = tl.load(v_ptr, mask=mask).to(tl.float32)
    # The update uses the moments as stored (rounded to the tensor dtype), as torch's
    # Adam does: in 16 bits a tiny v rounds to 0 and the step is then m / eps.
    m = (m + one_minus_beta1 * (g - m)).to(p0.dtype)
    v = (beta2 * v + one_minus_beta2 * (g * g)).to(p0.dtype)
    tl.store(m_ptr, m, mask=kept)
    tl.store(v_ptr, v, mask=kept)
    denom = tl.div_rn(tl.sqrt_rn(v.to(tl.float32)), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m.to(tl.float32), denom)
    tl.store(column(row, 0, DTYPE, ALIGNED) + offs, tl.where(keep, p.to(p0.dtype), p0), mask=mask)


@triton.jit
def _restore_adam_step_kernel(
    table,
    blk_tensor,
    blk_chunk,
    counters,
    skip_ptr,
    grad_scale_ptr,
    lr,
    log_beta1,
    one_minus_beta1,
    log_beta2,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    LR_PTR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    DTYPE: tl.constexpr,
    STEP_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, 7, BLOCK)
    keep = keep_mask(skip_ptr, offs)
    step_ptr = column(row, 5, STEP_DTYPE, False)
    step = tl.load(step_ptr)
    t_new = step.to(tl.float32) + 1
    if LR_PTR:  # capturable: the lr lives in a device tensor that schedulers update in place
        lr = tl.load(lr).to(tl.float32)
        decay = 1.0 - lr * weight_decay
    step_size = tl.div_rn(lr, _one_minus_pow(log_beta1, t_new))
    bc2_sqrt = tl.sqrt_rn(_one_minus_pow(log_beta2, t_new))
    grad_scale = 1.0
    grad_scale_lo = 1.0
    if HAS_GRAD_SCALE:  # the clip factor, float64: applied as (g * hi) * lo (multi_tensor.split_scale)
        grad_scale, grad_scale_lo = split_scale(tl.load(grad_scale_ptr).to(tl.float64))
    if (chunk + 1) * BLOCK <= numel:
        _adam_chunk(
            row,
            offs,
            None,
            keep,
            keep,
            grad_scale,
            grad_scale_lo,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            weight_decay,
            decay,
            step_size,
            bc2_sqrt,
            HAS_GRAD_SCALE,
            MAXIMIZE,
            WEIGHT_DECAY,
            DECOUPLED,
            DTYPE,
            ALIGNED,
        )
    else:
        in_bounds = offs < numel
        _adam_chunk(
            row,
            offs,
            in_bounds,
            in_bounds & keep,
            keep,
            grad_scale,
            grad_scale_lo,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            weight_decay,
            decay,
            step_size,
            bc2_sqrt,
            HAS_GRAD_SCALE,
            MAXIMIZE,
            WEIGHT_DECAY,
            DECOUPLED,
            DTYPE,
            ALIGNED,
        )
    # The step count (see the module docstring): the last program of tensor t writes it.
    tl.debug_barrier()
    n_chunks = tl.maximum((numel + BLOCK - 1) // BLOCK, 1)
    finished = tl.atomic_add(counters + t, 1, sem="acq_rel", scope="gpu")
    if finished == n_chunks - 1:
        tl.store(counters + t, 0)
        if tl.load(skip_ptr) == 0:
            tl.store(step_ptr, step + 1)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def restore_adam_step(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    copies: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    skip: torch.Tensor,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
) -> bool:
    """``copies`` empty: nothing to restore (the params are read in their place).  False (nothing
    done) when the layouts cannot be indexed flat or the step counters live elsewhere.  ``lr``: a
    float, or a 0-d device tensor read by the kernel (capturable)."""
    lr_ptr = isinstance(lr, torch.Tensor)
    tab = mt.table(
        [params, grads, copies or params, exp_avgs, exp_avg_sqs], extra_ptrs=[steps], distinct_copies=bool(copies)
    )
    if tab is None:
        return False
    mt.launch_parts(
        _restore_adam_step_kernel,
        tab,
        tab.meta.counters(),
        skip,
        skip if grad_scale is None else grad_scale,
        lr if lr_ptr else float(lr),
        _log(beta1),
        1.0 - beta1,
        _log(beta2),
        float(beta2),
        1.0 - beta2,
        float(eps),
        float(weight_decay),
        1.0 if lr_ptr else 1.0 - lr * weight_decay,
        LR_PTR=lr_ptr,
        HAS_GRAD_SCALE=grad_scale is not None,
        MAXIMIZE=maximize,
        WEIGHT_DECAY=weight_decay != 0,
        DECOUPLED=decoupled,
        DTYPE=mt.DTYPE_IDS[params[0].dtype],
        STEP_DTYPE=mt.DTYPE_IDS[steps[0].dtype],
        BLOCK=mt.BLOCK,
    )
    return True
