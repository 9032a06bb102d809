"""SAM's perturbation: copies <- w (exact), then w <- w + scale * g (ASAM: scale * w^2 * g).

One pass, one launch: reads w and g, writes the copy and w (4 bytes x
itemsize per element).  ``scale`` = rho * factor, with ``factor`` = 1 / (||g|| + eps)
and ``skip`` read by every program from the first pass's scalars (device
memory, written by the norm's epilogue), so nothing waits for the host.  The
scale is float64 and applied as ``(g * hi) * lo`` (``multi_tensor.split_scale``):
float32 math, exact for a gradient whose norm exceeds float32's range too.  The
copy is stored exactly as loaded (bitwise); with ``skip`` nonzero w is not
written at all (bitwise unchanged) while the copy is still made, as the
restore that follows needs it.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, keep_mask, locate, split_scale


@triton.jit
def _perturb_chunk(
    row, offs, mask, kept, scale, scale_lo, ADAPTIVE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr
):
    w_ptr = column(row, 0, DTYPE, ALIGNED)
    w = tl.load(w_ptr + offs, mask=mask)
    tl.store(column(row, 2, DTYPE, ALIGNED) + offs, w, mask=mask)
    g = tl.load(column(row, 1, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    wf = w.to(tl.float32)
    e = (g * scale) * scale_lo
    if ADAPTIVE:
        e = e * wf * wf
    tl.store(w_ptr + offs, (wf + e).to(w.dtype), mask=kept)


@triton.jit
def _perturb_kernel(
    table,
    blk_tensor,
    blk_chunk,
    scalars_ptr,
    rho,
    ADAPTIVE: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, 4, BLOCK)
    # float64, as every backend forms it (rho arrives as a float32 argument)
    scale, scale_lo = split_scale(tl.load(scalars_ptr + 1).to(tl.float64) * rho)
    keep = keep_mask(scalars_ptr, offs)
    if (chunk + 1) * BLOCK <= numel:
        _perturb_chunk(row, offs, None, keep, scale, scale_lo, ADAPTIVE, DTYPE, ALIGNED)
    else:
        in_bounds = offs < numel
        _perturb_chunk(row, offs, in_bounds, in_bounds & keep, scale, scale_lo, ADAPTIVE, DTYPE, ALIGNED)


def perturb(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    copies: List[torch.Tensor],
    scalars: torch.Tensor,
    rho: float,
    adaptive: bool,
) -> bool:
    """False (nothing done) when the layouts cannot be indexed flat: the backend falls back."""
    tab = mt.table([params, grads, copies])
    if tab is None:
        return False
    mt.launch_parts(
        _perturb_kernel,
        tab,
        scalars,
        float(rho),
        ADAPTIVE=adaptive,
        DTYPE=mt.DTYPE_IDS[params[0].dtype],
        BLOCK=mt.BLOCK,
    )
    return True
