"""Keep BatchNorm running statistics out of SAM's second (perturbed) pass.

The original SAM implementation keeps the statistics of the first forward
pass: the perturbed pass must normalise with its own batch statistics (the
model is in train mode) but must not update ``running_mean``/``running_var``
or ``num_batches_tracked``.  Turning ``track_running_stats`` off for the pass
does exactly that in torch's _BatchNorm (and SyncBatchNorm): the forward then
uses batch statistics and leaves every buffer untouched.  Unlike the common
"set momentum to 0" trick it also leaves ``num_batches_tracked`` alone, which
matters for ``momentum=None`` (cumulative averaging).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm

_SAVED = "_fastsam_saved_track_running_stats"


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stop BatchNorm layers of ``model`` from updating their running statistics."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not hasattr(m, _SAVED):
            setattr(m, _SAVED, m.track_running_stats)
            m.track_running_stats = False


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo :func:`disable_running_stats`."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and hasattr(m, _SAVED):
            m.track_running_stats = getattr(m, _SAVED)
            delattr(m, _SAVED)


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context manager for SAM's second pass: BatchNorm statistics are not updated inside.

    >>> loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    >>> with frozen_bn_stats(model):
    ...     loss_fn(model(x), y).backward()
    >>> opt.second_step(zero_grad=True)
    """
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
