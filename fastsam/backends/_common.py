"""Checks shared by every backend."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_bucket(*lists: Optional[Sequence[torch.Tensor]]) -> None:
    """All tensors of one call must share device and dtype, and lists must match in length.

    The fused kernels take one device and one dtype per launch; mixing them is
    a caller bug that would otherwise read memory of the wrong type.
    """
    lists = [ls for ls in lists if ls is not None]
    if not lists or not lists[0]:
        return
    n = len(lists[0])
    ref = lists[0][0]
    for ls in lists:
        if len(ls) != n:
            raise ValueError(f"tensor lists of one fused call must have equal lengths, got {n} and {len(ls)}")
        for t in ls:
            if t.device != ref.device:
                raise ValueError(
                    f"parameters on different devices in one fused call ({ref.device} and {t.device}); "
                    "FusedSAM groups tensors by device, so this is a bug in the caller")
            if t.dtype != ref.dtype:
                raise ValueError(
                    f"tensors of different dtypes in one fused call ({ref.dtype} and {t.dtype})")
            if t.is_sparse:
                raise ValueError("sparse tensors are not supported by the fused SAM kernels")
