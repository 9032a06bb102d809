"""A step skipped for non-finite gradients, decided on the host where that is free (the CPU)."""

from __future__ import annotations

from typing import List

import torch

from ..backends._common import SKIP


def restored_only(bucket, slices: List, scalars: torch.Tensor, tx) -> bool:
    """On the CPU, when this step is skipped: register the restore of the perturbed parameters
    only and return True, so that no state is created for parameters that have none (a skipped
    step leaves the optimizer state as it was).  Elsewhere, or when the step is taken: False."""
    if bucket.device.type != "cpu" or not bool(scalars[SKIP]):
        return False
    for s in slices:
        if s.copies:
            tx.write(lambda s=s: bucket.backend.restore(s.params, s.copies), s.params, backend=bucket.backend)
    return True
