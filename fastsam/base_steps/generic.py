"""Any base optimizer: restore, then ``base_optimizer.step()`` on the SAM gradient.

Deciding the skip reads the flag on the host: the one synchronisation FusedSAM
makes, and only on this path.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.optim import Optimizer

from ..backends._common import FACTOR, SKIP


def step_all(base: Optimizer, buckets: List, slices: Dict[int, List], scalars: Dict[torch.device, torch.Tensor],
             clip: bool) -> None:
    for b in buckets:
        for s in slices[id(b)]:
            if s.copies:
                b.backend.restore(s.params, s.copies)
    main = scalars[buckets[0].device]
    if bool(main[SKIP]):
        return
    if clip:
        for b in buckets:  # fp32 factor, as the fused steps use it
            torch._foreach_mul_(b.grads, scalars[b.device][FACTOR])
    base.step()
