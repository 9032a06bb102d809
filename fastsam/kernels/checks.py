"""Checks on the tensor lists of one fused call: the lowest layer, shared by every backend
and the kernels below them (nothing here imports from fastsam.backends)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_bucket(*lists: Optional[Sequence[torch.Tensor]]) -> None:
    """All tensors of one call must share device and dtype, and lists must match in length.

    The fused kernels take one device and one dtype per launch; mixing them is
    a caller bug that would otherwise read memory of the wrong type.
    """
    given = [ls for ls in lists if ls is not None]
    if not given or not given[0]:
        return
    n = len(given[0])
    ref = given[0][0]
    first = given[0]
    for ls in given:
        if len(ls) != n:
            raise ValueError(f"tensor lists of one fused call must have equal lengths, got {n} and {len(ls)}")
        for t, r in zip(ls, first):
            if t.shape != r.shape:  # the ops are element-wise over the lists: a mismatch reads out of bounds
                raise ValueError(
                    f"tensors of one element-wise fused call have shapes {tuple(t.shape)} and {tuple(r.shape)}"
                )
            if t.device != ref.device:
                raise ValueError(
                    f"parameters on different devices in one fused call ({ref.device} and {t.device}); "
                    "FusedSAM groups tensors by device, so this is a bug in the caller"
                )
            if t.dtype != ref.dtype:
                raise ValueError(f"tensors of different dtypes in one fused call ({ref.dtype} and {t.dtype})")
            if t.is_sparse:
                raise ValueError("sparse tensors are not supported by the fused SAM kernels")


def check_copies(params: Sequence[torch.Tensor], copies: Sequence[torch.Tensor]) -> None:
    """The restore contract: ``copies`` is empty (nothing to restore) or one distinct copy per
    parameter.  A copy that *is* its parameter means the caller mixed restored and
    unrestored tensors in one call, which the contract forbids (FusedSAM splits them)."""
    if not copies:
        return
    if len(copies) != len(params):
        raise ValueError(f"copies must be empty or one per parameter, got {len(copies)} for {len(params)}")
    for j, (p, c) in enumerate(zip(params, copies)):
        if c.numel() and c.data_ptr() == p.data_ptr():
            raise ValueError(
                f"copies[{j}] is the parameter itself: a restore call takes either no copies (nothing to "
                "restore) or a distinct copy for every parameter; split mixed lists into two calls"
            )
