"""The epoch loop of the late-phase runs and its checkpoints (model, optimizer state, data-order RNG).

One FusedSAM(SGD) per run; SAM is switched on and off with ``opt.sam_active``, so the SGD momentum
carries over a switch; SAM's second pass runs under ``frozen_bn_stats`` (BatchNorm statistics come
from the first pass, as in SAM). For a GPU: ``a.amp == "bf16"`` runs both passes' forward under
bf16 autocast (parameters, gradients and optimizer state stay float32), ``a.channels_last`` feeds
the batches in channels-last layout (the model is converted where it is built).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch

from fastsam import adversarial, frozen_bn_stats


def checkpoint(model, opt, gen) -> dict:
    """Model, optimizer state and data-order RNG: a plain dict (it travels between processes)."""
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "gen": gen.get_state()}


def restore(ck: dict, model, opt, gen, with_opt: bool = True):
    model.load_state_dict(ck["model"])
    if with_opt:
        opt.load_state_dict(copy.deepcopy(ck["opt"]))
    gen.set_state(ck["gen"])


def lr_at(a, epoch: int) -> float:
    """``a.lr``, times 0.1 from epoch ``a.milestone`` on (one step decay)."""
    return a.lr * (0.1 if epoch >= a.milestone else 1.0)


def autocast(a):
    if getattr(a, "amp", None) == "bf16":
        return torch.autocast(device_type=torch.device(a.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_epochs(
    a,
    d,
    model,
    opt,
    gen,
    crit,
    start,
    end,
    *,
    sam: bool,
    attack: Optional[dict] = None,
    save_at=(),
    on_step=None,
    progress=None,
):
    """Epochs [start, end) with SAM on or off (or adversarial training); returns checkpoints taken at
    the start of the epochs in ``save_at``. ``on_step(global_step)`` is called after every step."""
    opt.sam_active = sam
    channels_last = getattr(a, "channels_last", False)
    n = len(d.train_x)
    spe = n // a.batch_size
    ckpts = {}
    for epoch in range(start, end):
        if epoch in save_at:
            ckpts[epoch] = checkpoint(model, opt, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(a, epoch)
        perm = torch.randperm(n, generator=gen)
        losses = []
        for b in range(spe):
            idx = perm[b * a.batch_size : (b + 1) * a.batch_size].to(d.train_x.device)
            x, y = d.train_x[idx], d.train_y[idx]
            if d.augment is not None:
                x = d.augment(x, gen)
            if attack is not None:
                x = adversarial.pgd(
                    model,
                    x,
                    y,
                    eps=attack["eps"],
                    alpha=attack["alpha"],
                    steps=attack["steps"],
                    random_start=True,
                    model_mode="train",
                    generator=attack.get("gen"),
                )
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with autocast(a):
                loss = crit(model(x), y)
            loss.backward()

            def closure(x=x, y=y):
                with frozen_bn_stats(model):
                    with autocast(a):
                        l2 = crit(model(x), y)
                    l2.backward()
                return l2

            opt.step(closure)
            losses.append(loss.detach())  # read once per epoch: no host sync per step on a GPU
            if on_step is not None:
                on_step(epoch * spe + b + 1)
        if progress is not None:  # the loss only: a test pass per epoch would cost 10-15% of an SGD epoch
            progress.epoch(f"epoch {epoch + 1}/{a.epochs} loss {float(torch.stack(losses).float().mean()):.4f}")
    if end in save_at:
        ckpts[end] = checkpoint(model, opt, gen)
    return ckpts
