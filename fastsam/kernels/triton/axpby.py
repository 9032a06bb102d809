"""out <- a * x + b * y over tensor lists, unless the skip flag is set: the variants' update
(GSAM's direction, LookSAM's reuse and projection, FriendlySAM's EMA and its commit).

One pass, one launch whatever the tensor count.  ``coefs`` is a device tensor [a, b, skip,
...] read by every program, so coefficients computed on the device never cross to the
host; with skip nonzero nothing is written (the store mask is off).  Arithmetic in float32
registers, each product and the sum rounded, then one rounding to the storage dtype.
``out`` may be x or y (each element is read before it is written, by the same program).
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, keep_mask, locate

# No contraction of a * x + b * y into an FMA (triton fuses by default): the contract's
# separately rounded float32 products and sum (fastsam/backends/__init__.py: axpby), as torch
# computes them.  tests/test_triton_compile.py checks the PTX.
COMPILE_OPTIONS: dict = {"enable_fp_fusion": False}


@triton.jit
def _axpby_chunk(row, offs, mask, kept, a, b, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    x = tl.load(column(row, 0, DTYPE, ALIGNED) + offs, mask=mask)
    y = tl.load(column(row, 1, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    new = a * x.to(tl.float32) + b * y
    tl.store(column(row, 2, DTYPE, ALIGNED) + offs, new.to(x.dtype), mask=kept)


@triton.jit
def _axpby_kernel(
    table, blk_tensor, blk_chunk, coefs_ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):
    _, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, 4, BLOCK)
    a = tl.load(coefs_ptr).to(tl.float32)
    b = tl.load(coefs_ptr + 1).to(tl.float32)
    keep = keep_mask(coefs_ptr + 2, offs)
    if (chunk + 1) * BLOCK <= numel:
        _axpby_chunk(row, offs, None, keep, a, b, DTYPE, ALIGNED)
    else:
        in_bounds = offs < numel
        _axpby_chunk(row, offs, in_bounds, in_bounds & keep, a, b, DTYPE, ALIGNED)


def axpby(xs: List[torch.Tensor], ys: List[torch.Tensor], coefs: torch.Tensor, out: List[torch.Tensor]) -> bool:
    """False (nothing done) when the layouts cannot be indexed flat: the backend falls back."""
    tab = mt.table([xs, ys, out])
    if tab is None:
        return False
    mt.launch_parts(_axpby_kernel, tab, coefs, DTYPE=mt.DTYPE_IDS[xs[0].dtype], BLOCK=mt.BLOCK, **COMPILE_OPTIONS)
    return True
