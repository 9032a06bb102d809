"""torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize) fused with the restore."""

from __future__ import annotations

import functools
import operator
from typing import List, Optional

import torch
from torch.optim import Optimizer

from ..backends._common import FACTOR, SKIP
from ._skipped import restored_only

_momentum_buffer = operator.itemgetter("momentum_buffer")
_is_none = functools.partial(operator.is_, None)


def handles(base: Optimizer) -> bool:
    return type(base) is torch.optim.SGD and all(not g.get("differentiable", False) for g in base.param_groups)


def _update_args(g: dict) -> dict:
    """The group's settings of torch.optim.SGD's update, as the backends' SGD ops take them."""
    return dict(
        lr=g["lr"],
        momentum=g["momentum"],
        dampening=g["dampening"],
        nesterov=g["nesterov"],
        weight_decay=g["weight_decay"],
        maximize=g.get("maximize", False),
    )


def prepare(base: Optimizer, bucket, slices: List, scalars: torch.Tensor, clip: bool, tx) -> None:
    """Create the momentum buffers this step needs (undone with the step) and register one fused
    restore + update write per slice with ``tx``."""
    if restored_only(bucket, slices, scalars, tx):
        return
    g = bucket.group
    state = base.state
    skip = scalars[SKIP]
    kw = dict(_update_args(g), grad_scale=scalars[FACTOR] if clip else None, skip=skip)
    call = bucket.backend.restore_sgd_step

    def write(s, bufs, first):
        tx.write(
            lambda: call(s.params, s.grads, s.copies, bufs, first=first, **kw), s.params + bufs, backend=bucket.backend
        )

    for s in slices:
        if g["momentum"] == 0:
            write(s, [], False)
            continue
        dicts = bucket.states_of(state, s)
        try:
            bufs = list(map(_momentum_buffer, dicts))
        except KeyError:
            bufs = [d.get("momentum_buffer") for d in dicts]
        if not any(map(_is_none, bufs)):  # every step after the first: one call
            write(s, bucket.view(bufs), False)
            continue
        # torch initialises a momentum buffer to the first gradient; params whose
        # buffers exist and fresh ones go in separate calls.
        old = [i for i, x in enumerate(bufs) if x is not None]
        new = [i for i, x in enumerate(bufs) if x is None]
        if old:
            write(s.take(old), bucket.view([bufs[i] for i in old]), False)
        sub = s.take(new)
        # A skipped first step must leave the state as torch would: no buffer yet (on the
        # CPU it returned above).  Elsewhere the kernels keep a skipped fresh buffer at zero,
        # which the next step turns into exactly torch's first buffer (m*0 + g) unless
        # dampening != 0: only then, and only on a parameter's first step, is the flag read
        # on the host.
        if g["dampening"] != 0 and bool(skip):
            if sub.copies:
                tx.write(
                    lambda sub=sub: bucket.backend.restore(sub.params, sub.copies), sub.params, backend=bucket.backend
                )
            continue
        for k in sub.keys:  # a DTensor for a DTensor parameter, as torch.optim.SGD keeps it
            d = state[k]
            d["momentum_buffer"] = torch.zeros_like(k, memory_format=torch.preserve_format)
            tx.on_undo(lambda d=d: d.pop("momentum_buffer", None))
        write(sub, bucket.view([state[k]["momentum_buffer"] for k in sub.keys]), True)


def prepare_with_norm(
    base: Optimizer, bucket, slices: List, scalars: torch.Tensor, prev: Optional[torch.Tensor], tx
) -> bool:
    """``prepare`` for a step whose second-pass norm has not been taken: register one write that
    takes it, writes ``scalars`` (skip flag: non-finite or ``prev``'s; factor 1: no clipping) and
    restores + updates (the backend's ``norm_restore_sgd_step``).  Only for a bucket in one slice
    whose momentum buffers all exist (a fresh buffer's handling reads the skip flag first); returns
    False, registering nothing and creating no state, otherwise."""
    if len(slices) != 1:
        return False
    s = slices[0]
    g = bucket.group
    bufs: List[torch.Tensor] = []
    if g["momentum"] != 0:
        # the buffers as the last step left them, looked up without inserting state (a skipped
        # step leaves none); anything else goes the general route, which reads the skip flag first
        dicts = bucket.cached_states(base.state) if s.keys is bucket.keys else None
        found = None if dicts is None else [d.get("momentum_buffer") for d in dicts]
        if found is None or any(map(_is_none, found)):
            return False
        bufs = bucket.view(found)
    call = bucket.backend.norm_restore_sgd_step
    kw = dict(_update_args(g), first=False)
    tx.write(
        lambda: call(s.params, s.grads, s.copies, bufs, scalars, prev, **kw), s.params + bufs, backend=bucket.backend
    )
    return True
