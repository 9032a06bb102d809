"""torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize) fused with the restore."""
from __future__ import annotations

from typing import List

import torch
from torch.optim import Optimizer

from ..backends._common import FACTOR, SKIP


def handles(base: Optimizer) -> bool:
    return type(base) is torch.optim.SGD and all(
        not g.get("differentiable", False) for g in base.param_groups)


def step(base: Optimizer, bucket, slices: List, scalars: torch.Tensor, clip: bool) -> None:
    g = bucket.group
    state = base.state
    skip = scalars[SKIP]
    kw = dict(lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"], nesterov=g["nesterov"],
              weight_decay=g["weight_decay"], maximize=g.get("maximize", False),
              grad_scale=scalars[FACTOR] if clip else None, skip=skip)
    call = bucket.backend.restore_sgd_step
    for s in slices:
        if g["momentum"] == 0:
            call(s.params, s.grads, s.copies, [], first=False, **kw)
            continue
        dicts = bucket.states_of(state, s)
        bufs = [d.get("momentum_buffer") for d in dicts]
        if all(x is not None for x in bufs):  # every step after the first: one call (not ``None in``: == on tensors)
            call(s.params, s.grads, s.copies, bucket.local(bufs), first=False, **kw)
            continue
        # torch initialises a momentum buffer to the first gradient; params whose
        # buffers exist and fresh ones go in separate calls.
        old = [i for i, x in enumerate(bufs) if x is not None]
        new = [i for i, x in enumerate(bufs) if x is None]
        if old:
            sub = s.take(old)
            call(sub.params, sub.grads, sub.copies, bucket.local([bufs[i] for i in old]), first=False, **kw)
        sub = s.take(new)
        # A skipped first step must leave the state as torch would: no buffer yet.
        # Reading the flag is free on the CPU; elsewhere the kernels keep a skipped
        # fresh buffer at zero, which the next step turns into exactly torch's first
        # buffer (m*0 + g) unless dampening != 0: only then, and only on a
        # parameter's first step, is the flag read on the host.
        if (bucket.device.type == "cpu" or g["dampening"] != 0) and bool(skip):
            if sub.copies:
                bucket.backend.restore(sub.params, sub.copies)
            continue
        for k in sub.keys:  # a DTensor for a DTensor parameter, as torch.optim.SGD keeps it
            state[k]["momentum_buffer"] = torch.zeros_like(k, memory_format=torch.preserve_format)
        fresh = bucket.local([state[k]["momentum_buffer"] for k in sub.keys])
        call(sub.params, sub.grads, sub.copies, fresh, first=True, **kw)
