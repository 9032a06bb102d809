"""Global squared L2 norm of a bucket's gradients (or the ASAM norm ||w*g||^2), with the
SAM scalar epilogue in the same launches.

Two stages, two launches, no atomics, so the result is deterministic:
stage 1 writes one float64 partial sum per program (per BLOCK-element chunk),
stage 2 (one program) adds the partials in a fixed order, adds the running
total of the buckets before it on this device (``accumulate``), stores the
total and, when asked, the pass's scalars (fastsam/backends/_common.py):

first pass   skip = !isfinite(sq), factor = 1 / (sqrt(sq) + eps)
second pass  skip = max(previous skip, !isfinite(sq)), factor = the clip
             coefficient min(max_norm / (sqrt(sq) + 1e-6), 1) (1 without clipping)

so a SAM step needs no scalar torch op between the kernels.  Squares (ASAM: w * g
too) and sums are float64 for every input dtype, and so are the total, the
epilogue and the scalars it writes (fastsam/backends/_common.py: a finite float32
gradient's squares may overflow float32, its norm may exceed float32's range, and
1 / ||g|| may then be below it).  Only a non-finite gradient makes the total
inf/nan: that is the non-finite flag.  Reads each gradient once (and each
parameter once for the ASAM norm).  ``eps`` and ``max_norm`` arrive as float32
kernel arguments (triton passes Python floats so), widened in the kernel.

Stage 2 loops over the partials with a constexpr trip count: under triton
3.6's interpreter a loop bound taken from a kernel argument fails (the
argument arrives as a 1-element array, which NumPy >= 2.4 refuses to turn
into an int).  The count changes only with the bucket's sizes.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, locate

SUM_BLOCK = 1024  # stage 2: ResNet-50's ~12.6k partials in 13 iterations of one program
MODE_NONE, MODE_PERTURB, MODE_STEP = 0, 1, 2


@triton.jit
def _sq_norm_chunk(row, offs, mask, WEIGHTED: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    x = tl.load(column(row, 0, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float64)
    if WEIGHTED:  # ASAM: (|w| * g)^2 = (w * g)^2, exact in float64 for float32 w and g
        x = x * tl.load(column(row, 1, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float64)
    if mask is not None:
        x = tl.where(mask, x, 0.0)
    return tl.sum(x * x, axis=0)


@triton.jit
def _sq_norm_partials_kernel(
    table,
    blk_tensor,
    blk_chunk,
    partials,
    WEIGHTED: tl.constexpr,
    N_COLS: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, N_COLS, BLOCK)
    if (chunk + 1) * BLOCK <= numel:
        part = _sq_norm_chunk(row, offs, None, WEIGHTED, DTYPE, ALIGNED)
    else:
        part = _sq_norm_chunk(row, offs, offs < numel, WEIGHTED, DTYPE, ALIGNED)
    tl.store(partials + tl.program_id(0), part)


@triton.jit
def _sum_kernel(
    partials,
    n,
    total_ptr,
    acc_ptr,
    out_ptr,
    prev_ptr,
    eps,
    max_norm,
    N_ITERS: tl.constexpr,
    HAS_ACC: tl.constexpr,
    MODE: tl.constexpr,
    HAS_PREV: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(N_ITERS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    sq = tl.sum(acc, axis=0)
    if HAS_ACC:
        sq = sq + tl.load(acc_ptr).to(tl.float64)
    tl.store(total_ptr, sq)
    if MODE != 0:
        # The scalars are computed on a vector of 2 lanes (lane 0: skip, lane 1: factor)
        # and stored once: the interpreter mishandles some scalar-only paths.
        lane = tl.arange(0, 2)
        # float64 square root and division are correctly rounded (no approximate forms).
        sqv = tl.zeros([2], dtype=tl.float64) + sq
        one = tl.zeros([2], dtype=tl.float64) + 1.0
        bad = tl.where(sqv == sqv, 0.0, one)  # nan
        bad = tl.where(tl.abs(sqv) == float("inf"), one, bad)
        norm = tl.sqrt(sqv)
        if MODE == 1:
            factor = one / (norm + eps)
        else:
            if HAS_PREV:
                bad = tl.maximum(bad, tl.load(prev_ptr + lane * 0).to(tl.float64))
            if CLIP:
                factor = tl.minimum((one * max_norm) / (norm + 1e-6), one)  # 1e-6: _common.CLIP_EPS
            else:
                factor = one
        tl.store(out_ptr + lane, tl.where(lane == 0, bad, factor).to(out_ptr.dtype.element_ty))


def sq_norm(
    grads: List[torch.Tensor],
    params: List[torch.Tensor],
    accumulate: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    mode: int = MODE_NONE,
    eps: float = 0.0,
    max_norm: Optional[float] = None,
    prev: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """0-d float64 sum(g^2) (sum((w*g)^2) when ``params`` is not empty), plus ``accumulate``;
    with ``mode`` set, ``out`` (the pass's scalars, float64 [2]) is written too.  Two launches.

    None when the layouts cannot be indexed flat: the caller (the backend) falls back.
    """
    lists = [grads, params] if params else [grads]
    tab = mt.table(lists)
    if tab is None:
        return None
    device = grads[0].device
    partials = torch.empty(tab.n_blocks, dtype=torch.float64, device=device)
    total = torch.empty((), dtype=torch.float64, device=device)
    mt.launch_parts(
        _sq_norm_partials_kernel,
        tab,
        partials=partials,
        WEIGHTED=bool(params),
        N_COLS=len(lists) + 1,
        DTYPE=mt.DTYPE_IDS[grads[0].dtype],
        BLOCK=mt.BLOCK,
    )
    mt.launch(
        _sum_kernel,
        1,
        partials,
        tab.n_blocks,
        total,
        total if accumulate is None else accumulate,
        total if out is None else out,
        total if prev is None else prev,
        float(eps),
        float(max_norm or 0.0),
        N_ITERS=triton.cdiv(tab.n_blocks, SUM_BLOCK),
        HAS_ACC=accumulate is not None,
        MODE=mode,
        HAS_PREV=prev is not None,
        CLIP=max_norm is not None,
        BLOCK=SUM_BLOCK,
        num_warps=4,
    )
    return total
