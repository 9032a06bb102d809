"""Fused base steps: the restore and the base optimizer's update in one backend call.

FusedSAM's second step restores w and lets the base optimizer step with the
SAM gradient.  For the optimizers listed here that is one fused backend call
per bucket slice (restore + update in one pass over memory); any other
optimizer goes through ``generic`` (restore, then ``base_optimizer.step()``).

An adapter is a module with

``handles(base: Optimizer) -> bool``
    whether every param group's options are ones the fused step implements;
``prepare(base, bucket, slices, scalars, clip, tx)``
    create the state the update needs (registering its undo with ``tx``, a
    fastsam.core.txn.Transaction) and register the writes that restore and
    update the parameters of ``slices`` (fastsam.core.buckets.Slice: each
    either restores from distinct copies or restores nothing) with the second
    pass's ``scalars`` (skip flag; clip coefficient used when ``clip``).  The
    core commits them, all or nothing.

and optionally

``prepare_with_norm(base, bucket, slices, scalars, prev, tx) -> bool``
    the same for a one-bucket pass whose norm has not been taken: the write takes it
    (the backend's ``norm_<step>`` op), writing ``scalars`` from it and ``prev`` (the first
    pass's scalars, or None); no clipping.  Returns False, registering nothing, where it
    cannot (the core then takes the norm first and calls ``prepare``).

A new base optimizer is a new module here and one line in ``ADAPTERS``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

from torch.optim import Optimizer

from . import adam, generic, sgd

ADAPTERS = (sgd, adam)  # tried in order; the first that handles the optimizer runs


def for_optimizer(base: Optimizer) -> Optional[ModuleType]:
    """The fused adapter for ``base``, or None (use ``generic``)."""
    for mod in ADAPTERS:
        if mod.handles(base):
            return mod
    return None


__all__ = ["ADAPTERS", "for_optimizer", "generic", "sgd", "adam"]
