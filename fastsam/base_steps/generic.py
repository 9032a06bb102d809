"""Any base optimizer: restore, then ``base_optimizer.step()`` on the SAM gradient.

Deciding the skip reads the flag on the host: the one synchronisation the core makes,
and only on this path.  The base optimizer's step is opaque, so the restore before it is
undone from a snapshot of the perturbed weights, and the step itself must be the last
write: a torch optimizer's ``step()`` checks its arguments before it writes.  Where the
base step must see another gradient than ``p.grad`` (a variant's update direction, or
the clipped gradient), ``p.grad`` is set to it for the duration of the call and put back.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch.optim import Optimizer

from ..backends._common import FACTOR, SKIP, scaled


def prepare(
    base: Optimizer, buckets: List, slices: Dict[int, List], scalars: Dict[torch.device, torch.Tensor], clip: bool, tx
) -> None:
    tx.ordered = True  # the restore must precede the step
    for b in buckets:
        for s in slices[id(b)]:
            if s.copies:
                tx.write(lambda b=b, s=s: b.backend.restore(s.params, s.copies), s.params, backend=b.backend)
    if bool(scalars[buckets[0].device][SKIP]):
        return
    feed: List = []  # (parameter, the gradient its step must see)
    for b in buckets:
        grads = b.grads
        if clip:  # fp32 factor, as the fused steps use it
            grads = scaled(grads, scalars[b.device][FACTOR])
        for k, gv in zip(b.keys, grads):
            g = torch.view_as_complex(gv) if k.is_complex() and not gv.is_complex() else gv
            if g is not k.grad:
                feed.append((k, g))

    def run() -> None:
        saved = [(k, k.grad) for k, _ in feed]
        try:
            for k, g in feed:
                k.grad = g
            base.step()
        finally:
            for k, g in saved:
                k.grad = g

    tx.write(run, [])
