"""Global squared L2 norm of a bucket's gradients (or the ASAM norm ||w*g||^2).

Two stages, two launches, no atomics, so the result is deterministic:
stage 1 writes one float32 partial sum per program (per BLOCK-element chunk),
stage 2 (one program) adds the partials in a fixed order.  Accumulation is in
float32 for every input dtype.  A non-finite gradient (or a square that
overflows float32) makes the result inf/nan: that is the non-finite flag.
Reads each gradient once (and each parameter once for the ASAM norm).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, locate

SUM_BLOCK = 1024  # stage 2: ResNet-50's ~12.6k partials in 13 iterations of one program


@triton.jit
def _sq_norm_chunk(row, offs, mask, WEIGHTED: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    x = tl.load(column(row, 0, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    if WEIGHTED:  # ASAM: (|w| * g)^2 = (w * g)^2
        x = x * tl.load(column(row, 1, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    if mask is not None:
        x = tl.where(mask, x, 0.0)
    return tl.sum(x * x, axis=0)


@triton.jit
def _sq_norm_partials_kernel(table, blk_tensor, blk_chunk, partials, WEIGHTED: tl.constexpr,
                             N_COLS: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                             BLOCK: tl.constexpr):
    _, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, N_COLS, BLOCK)
    if (chunk + 1) * BLOCK <= numel:
        part = _sq_norm_chunk(row, offs, None, WEIGHTED, DTYPE, ALIGNED)
    else:
        part = _sq_norm_chunk(row, offs, offs < numel, WEIGHTED, DTYPE, ALIGNED)
    tl.store(partials + tl.program_id(0), part)


@triton.jit(do_not_specialize=["n"])
def _sum_kernel(partials, n, out, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, axis=0))


def sq_norm(grads: List[torch.Tensor], params: List[torch.Tensor]) -> torch.Tensor:
    """0-d float32 sum(g^2), or sum((w*g)^2) when ``params`` is not empty.  Two launches."""
    lists = [grads, params] if params else [grads]
    tab = mt.table(lists)
    if tab is None:
        from ...backends import foreach
        return foreach.grad_sq_norm(grads, params or None).to(torch.float32)
    device = grads[0].device
    partials = torch.empty(tab.n_blocks, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    mt.launch(_sq_norm_partials_kernel, tab.n_blocks, *tab.args(), partials,
              WEIGHTED=bool(params), N_COLS=len(lists) + 1, DTYPE=mt.DTYPE_IDS[grads[0].dtype], ALIGNED=tab.aligned,
              BLOCK=mt.BLOCK)
    mt.launch(_sum_kernel, 1, partials, tab.n_blocks, out, BLOCK=SUM_BLOCK, num_warps=4)
    return out


@torch.library.custom_op("fastsam::triton_sq_norm", mutates_args=())
def sq_norm_op(grads: List[torch.Tensor], params: List[torch.Tensor]) -> torch.Tensor:
    return sq_norm(grads, params)


@sq_norm_op.register_fake
def _(grads, params):
    return grads[0].new_empty((), dtype=torch.float32)
