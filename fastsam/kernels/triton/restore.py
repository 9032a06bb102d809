"""params <- copies: the restore alone (parameters that got no second gradient, and the
restore before a generic base optimizer's own step).  One launch, an exact copy."""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .multi_tensor import column, locate


@triton.jit
def _restore_kernel(table, blk_tensor, blk_chunk, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    _, row, chunk, numel, offs = locate(table, blk_tensor, blk_chunk, 3, BLOCK)
    src = column(row, 1, DTYPE, ALIGNED) + offs
    dst = column(row, 0, DTYPE, ALIGNED) + offs
    if (chunk + 1) * BLOCK <= numel:
        tl.store(dst, tl.load(src))
    else:
        in_bounds = offs < numel
        tl.store(dst, tl.load(src, mask=in_bounds), mask=in_bounds)


def restore(params: List[torch.Tensor], copies: List[torch.Tensor]) -> bool:
    """False (nothing done) when the layouts cannot be indexed flat: the backend falls back."""
    tab = mt.table([params, copies])
    if tab is None:
        return False
    mt.launch_parts(_restore_kernel, tab, DTYPE=mt.DTYPE_IDS[params[0].dtype], BLOCK=mt.BLOCK)
    return True
