"""FusedSAM under torch.distributed: DDP with per-rank or synchronised perturbation, and FSDP2.

A SAM step is two forward/backward passes; what differs between the modes
is which of the two gradients DDP all-reduces:

``perturbation="local"`` (the default; m-sharpness, as the original SAM ran
on several accelerators)
    Each rank perturbs its weights with the gradient of its own sub-batch:
    the first forward *and* backward run inside DDP's ``no_sync()`` (the
    forward must be inside too, or DDP still reduces), and only the SAM
    gradient (second pass) is all-reduced.  One gradient all-reduce per step,
    as much communication as plain DDP, and Foret et al. found the per-device
    perturbation (smaller m) to generalise *better* than a synchronised one.
    That is why it is the default.  A non-finite first gradient on any rank
    skips the step on every rank (the skip flag is all-reduced, MAX, on the
    device: one scalar).
``perturbation="global"``
    Both passes are all-reduced: every rank perturbs with the gradient of the
    whole global batch, so the perturbation is identical on all ranks and the
    step equals single-process SAM on the concatenated batch.  Costs a second
    gradient all-reduce per step.

Outside a process group (or with a model that is not DDP) both modes are
plain SAM.  After every step all ranks hold bitwise-identical parameters and
optimizer state (they step with the same all-reduced SAM gradient from the
same restored weights), so a checkpoint written by rank 0 resumes exactly.

BatchNorm: the second (perturbed) pass runs under :func:`fastsam.frozen_bn_stats`
and leaves the running statistics alone.  With DDP's default
``forward_sync_buffers=True`` (``broadcast_buffers``), rank 0's buffers are
broadcast at the start of the second pass too, so after each SAM step every
rank holds rank 0's statistics, updated once with rank 0's sub-batch at the
unperturbed weights (DDP itself, in plain training, leaves each rank's own
update in place until the next forward).  Use SyncBatchNorm for statistics
over the global batch.

FSDP2 (``torch.distributed.fsdp.fully_shard``): the parameters are DTensors;
FusedSAM runs its kernels on the local shards and all-reduces the sums of
squares over the shards, so the perturbation uses the norm of the whole
gradient.  Each rank holds only a shard of the weights, so every rank sees the
same perturbed weights: only ``perturbation="global"`` exists there, and
:func:`sam_step` refuses "local" rather than silently change its meaning.
The optimizer state is DTensors like the parameters: checkpoint it with
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model,
opt.base_optimizer)`` (plus ``opt.state_dict()["fastsam"]`` for the SAM settings).

The closure API works too, with :func:`first_pass` around the first pass::

    with first_pass(ddp_model, opt):          # local: no_sync + skip sync; global: nothing
        loss = loss_fn(ddp_model(x), y)
        loss.backward()

    def closure():
        with frozen_bn_stats(ddp_model):      # the second pass keeps BN statistics
            second = loss_fn(ddp_model(x), y)
        second.backward()
        return second

    opt.step(closure)
    opt.zero_grad()
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable, Iterator, cast

import torch
import torch.distributed as dist

from .bn import frozen_bn_stats
from .optim import FusedSAM

__all__ = ["sam_step", "first_pass"]


def _is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _is_fsdp(model: torch.nn.Module) -> bool:
    # An FSDP2 module exists only once torch.distributed.fsdp is imported (~1.5 s, so not here).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _all_reduce_max(flag: torch.Tensor, group: Any) -> None:
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)


@contextlib.contextmanager
def first_pass(model: torch.nn.Module, opt: FusedSAM) -> Iterator[None]:
    """Run SAM's first forward and backward pass inside this block.

    With a DDP model, a local perturbation and SAM active, the block runs under
    ``model.no_sync()`` (so the first gradient stays per-rank) and makes the
    optimizer all-reduce its skip flag; otherwise it does nothing, so the
    first gradient is DDP's usual all-reduced one (global perturbation, or the
    one synchronised pass of a plain step while ``opt.sam_active`` is False).
    """
    if not isinstance(opt, FusedSAM):
        raise TypeError(f"opt must be a fastsam.FusedSAM, got {type(opt).__name__}")
    local = opt.sam_active and opt.perturbation == "local"
    if local and dist.is_available() and dist.is_initialized() and _is_fsdp(model):
        raise ValueError(
            "perturbation='local' cannot run under FSDP2: each rank holds only a shard of the weights, so all "
            "ranks see one perturbation; build FusedSAM with perturbation='global'"
        )
    if not (local and _is_ddp(model)):
        opt.skip_reducer = None
        yield
        return
    ddp = cast(torch.nn.parallel.DistributedDataParallel, model)  # _is_ddp(model)
    opt.skip_reducer = functools.partial(_all_reduce_max, group=ddp.process_group)
    with ddp.no_sync():
        yield
    # A forward inside no_sync() tells DDP to skip the buffer broadcast at the
    # next forward; restore it, so the second pass starts from rank 0's buffers
    # (as in global mode) and every rank ends the step with the same BN statistics.
    ddp.require_forward_param_sync = True


def sam_step(
    model: torch.nn.Module, opt: FusedSAM, loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any, targets: Any
) -> torch.Tensor:
    """One training step of ``model`` with the SAM optimizer ``opt``; returns the first-pass loss (detached).

    ``loss_fn(model(inputs), targets)`` is the loss.  Gradients are cleared
    before and after.  While ``opt.sam_active`` is False this is one
    synchronised forward/backward and the base optimizer's step (see
    ``FusedSAM.second_step``): plain (DDP) training.  Works with DDP, FSDP2 and plain modules alike.
    """
    opt.zero_grad()
    with first_pass(model, opt):
        loss = loss_fn(model(inputs), targets)
        loss.backward()
    if not opt.sam_active:
        opt.step()
        opt.zero_grad()
        return loss.detach()
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        second = loss_fn(model(inputs), targets)
    second.backward()
    opt.second_step(zero_grad=True)
    return loss.detach()
