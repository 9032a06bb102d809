"""[<x, y>, ||x||^2, ||y||^2] over two tensor lists: the variants' reduction (GSAM's and LookSAM's
projections need the dot product of the two gradients and both norms).

Two stages, two launches whatever the tensor count, no atomics (deterministic), as
``sq_norm``: stage 1 writes three float64 partial sums per program (per BLOCK-element
chunk: rows 0, 1, 2 of ``partials``, each ``n`` long), stage 2 (one program) adds each row
in a fixed order, adds ``accumulate`` (the (3,) total of the buckets before this one) and
stores the (3,) float64 result.  Products and sums are float64 for every input dtype, as
the norms' (a finite float32 gradient's squares may overflow float32).  Reads each x and y
once.  A non-finite input makes the affected entries inf/nan.

Stage 2 loops with a constexpr trip count (see ``sq_norm``: triton 3.6's interpreter with
NumPy >= 2.4 fails on a loop bound taken from a kernel argument).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, locate

SUM_BLOCK = 1024


@triton.jit
def _dot_chunk(row, offs, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    x = tl.load(column(row, 0, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float64)
    y = tl.load(column(row, 1, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float64)
    if mask is not None:
        x = tl.where(mask, x, 0.0)
        y = tl.where(mask, y, 0.0)
    return tl.sum(x * y, axis=0), tl.sum(x * x, axis=0), tl.sum(y * y, axis=0)


@triton.jit
def _dot_sq_norms_partials_kernel(
    table, blk_tensor, blk_chunk, partials, n, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):
    _, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, 3, BLOCK)
    if (chunk + 1) * BLOCK <= numel:
        xy, xx, yy = _dot_chunk(row, offs, None, DTYPE, ALIGNED)
    else:
        xy, xx, yy = _dot_chunk(row, offs, offs < numel, DTYPE, ALIGNED)
    pid = tl.program_id(0)
    tl.store(partials + pid, xy)
    tl.store(partials + n + pid, xx)
    tl.store(partials + 2 * n + pid, yy)


@triton.jit
def _dot_sq_norms_sum_kernel(
    partials, n, out_ptr, acc_ptr, N_ITERS: tl.constexpr, HAS_ACC: tl.constexpr, BLOCK: tl.constexpr
):
    xy = tl.zeros([BLOCK], dtype=tl.float64)
    xx = tl.zeros([BLOCK], dtype=tl.float64)
    yy = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(N_ITERS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        xy += tl.load(partials + offs, mask=m, other=0.0)
        xx += tl.load(partials + n + offs, mask=m, other=0.0)
        yy += tl.load(partials + 2 * n + offs, mask=m, other=0.0)
    # The three totals as lanes 0..2 of one vector, stored once (the interpreter mishandles
    # some scalar-only paths; see sq_norm's epilogue).
    lane = tl.arange(0, 4)
    tot = tl.where(lane == 0, tl.sum(xy, axis=0), tl.where(lane == 1, tl.sum(xx, axis=0), tl.sum(yy, axis=0)))
    if HAS_ACC:
        tot = tot + tl.load(acc_ptr + lane, mask=lane < 3, other=0.0).to(tl.float64)
    tl.store(out_ptr + lane, tot, mask=lane < 3)


def dot_sq_norms(
    xs: List[torch.Tensor], ys: List[torch.Tensor], accumulate: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """(3,) float64 [<x, y>, ||x||^2, ||y||^2] (+ ``accumulate``).  Two launches.

    None when the layouts cannot be indexed flat: the caller (the backend) falls back.
    """
    tab = mt.table([xs, ys])
    if tab is None:
        return None
    device = xs[0].device
    nb = tab.n_blocks
    partials = torch.empty(3 * nb, dtype=torch.float64, device=device)
    out = torch.empty(3, dtype=torch.float64, device=device)
    # (the three rows of ``partials`` stay nb apart in every part's view)
    mt.launch_parts(
        _dot_sq_norms_partials_kernel, tab, nb, partials=partials, DTYPE=mt.DTYPE_IDS[xs[0].dtype], BLOCK=mt.BLOCK
    )
    mt.launch(
        _dot_sq_norms_sum_kernel,
        1,
        partials,
        nb,
        out,
        out if accumulate is None else accumulate,
        N_ITERS=triton.cdiv(nb, SUM_BLOCK),
        HAS_ACC=accumulate is not None,
        BLOCK=SUM_BLOCK,
        num_warps=4,
    )
    return out
