"""The runs of the tuned frontier: one method at one setting on the validation split (selection),
and every method at its selected setting, interleaved in one process, on the test split (final).

Every run of a seed shares its initial weights (``torch.manual_seed(seed)``), its batch order
(generator ``100 + seed``) and its label-noise draw (``noise_seed = seed``). Cosine learning rate
per step from the run's base lr to 0; SGD momentum 0.9 under every method; the second pass of a
SAM step under ``frozen_bn_stats``; plain cross-entropy (no label smoothing).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from fastsam import FusedSAM, MomentumSAM, frozen_bn_stats

from . import data as datasets
from .frontier_methods import Method, methods
from .measure import accuracy, lam_max, memorisation
from .models import MLP, MnistCNN
from .runner import Task

_DATA: Dict[tuple, datasets.ImageData] = {}


def data_for(a, seed) -> datasets.ImageData:
    """The data set with seed ``seed``'s noise draw, loaded once per process."""
    key = (a.dataset, a.label_noise, seed, a.val_size, a.limit)
    if key not in _DATA:
        _DATA[key] = datasets.load(a.dataset, noise=a.label_noise, noise_seed=seed, val_size=a.val_size, limit=a.limit)
    return _DATA[key]


def make_model(a, d, seed):
    torch.manual_seed(seed)
    if a.model == "mlp":
        return MLP(d.train_x[0].numel(), a.width, 10, d.mean, d.std).train()
    return MnistCNN(a.width, 10, 1, d.mean, d.std).train()


def steps_per_epoch(a, d) -> int:
    return len(d.train_x) // a.batch


class Run:
    """One method at one setting: the model, its optimizer, the passes and time it took."""

    def __init__(self, method: Method, value, base: dict, sam_rho, d, a, seed: int):
        self.model = make_model(a, d, seed)
        self.total_steps = steps_per_epoch(a, d) * a.epochs
        self.opt = method.build(self.model.parameters(), base, value, sam_rho, seed, self.total_steps)
        self.lr0 = value[0] if method.stage == 0 else base["lr"]
        self.name, self.passes, self.time, self.steps = method.name, 0, 0.0, 0
        self.epoch_times: List[float] = []

    def lr_at(self, step: int) -> float:
        return 0.5 * self.lr0 * (1 + math.cos(math.pi * step / self.total_steps))

    def epoch(self, d, order):
        model, opt = self.model, self.opt
        t0 = time.perf_counter()
        for idx in order:
            x, y = d.train_x[idx], d.train_y[idx]
            for g in opt.param_groups:
                g["lr"] = self.lr_at(self.steps)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            self.passes += 1
            if isinstance(opt, FusedSAM):

                def closure(x=x, y=y):
                    self.passes += 1
                    with frozen_bn_stats(model):
                        return F.cross_entropy(model(x), y).backward()

                opt.step(closure)
            else:
                opt.step()
            self.steps += 1
        dt = time.perf_counter() - t0
        self.time += dt
        self.epoch_times.append(dt)

    def at_w(self):
        """Evaluate at w (MomentumSAM keeps its parameters perturbed between steps)."""
        return self.opt.unperturbed() if isinstance(self.opt, MomentumSAM) else contextlib.nullcontext()


def epoch_orders(a, d, seed):
    """The batch order of every epoch of seed ``seed`` (the same for every method)."""
    n, spe = len(d.train_x), steps_per_epoch(a, d)
    gen = torch.Generator().manual_seed(100 + seed)
    return [torch.randperm(n, generator=gen)[: spe * a.batch].view(spe, a.batch) for _ in range(a.epochs)]


def select_task(a, name: str, value, seed: int, base: dict, sam_rho):
    """Validation accuracy (noisy labels, as a user has them; clean labels for the record) of one
    method at one setting."""
    d = data_for(a, seed)
    run = Run(methods(a.sgd_grid)[name], value, base, sam_rho, d, a, seed)
    for order in epoch_orders(a, d, seed):
        run.epoch(d, order)
    with run.at_w():
        return {
            "val_acc": accuracy(run.model, d.val_x, d.val_y),
            "val_acc_clean_labels": accuracy(run.model, d.val_x, d.val_y_clean),
            "passes": run.passes / run.steps,
        }


def final_task(a, seed: int, chosen: Dict[str, dict]):
    """Every method at its selected setting (``chosen[name]``: value, base, sam_rho), interleaved
    epoch by epoch in this process (order rotated every epoch, after an untimed warm-up of three
    steps each), so that the cost ratios to SGD are measured on the same machine state; then test
    accuracy, λmax of the training loss on a fixed subset (train-mode BN), memorisation of the
    flipped training labels."""
    d = data_for(a, seed)
    table = methods(a.sgd_grid)
    make = lambda: [Run(table[k], c["value"], c["base"], c["sam_rho"], d, a, seed) for k, c in chosen.items()]
    warm = torch.arange(min(3, steps_per_epoch(a, d)) * a.batch).view(-1, a.batch)
    for r in make():
        r.epoch(d, warm)
    runs = make()
    for e, order in enumerate(epoch_orders(a, d, seed)):
        r0 = e % len(runs)
        for r in runs[r0:] + runs[:r0]:
            r.epoch(d, order)
    sub = torch.randperm(len(d.train_x), generator=torch.Generator().manual_seed(1234))[: a.hessian_images]
    hb = [(d.train_x[sub[i : i + 128]], d.train_y[sub[i : i + 128]]) for i in range(0, len(sub), 128)]
    sgd = runs[0]
    out = {}
    for r in runs:
        with r.at_w():
            mem = memorisation(r.model, d.train_x, d.train_y, d.train_y_clean)
            out[r.name] = {
                "test_acc": accuracy(r.model, d.test_x, d.test_y),
                "val_acc": accuracy(r.model, d.val_x, d.val_y),
                "lambda_max": lam_max(r.model, torch.nn.CrossEntropyLoss(), hb, a.hessian_tol)
                if a.hessian_images
                else math.nan,
                "memorised": mem["memorised"],
                "memorised_chance": mem["chance"],
                "time_s": r.time,
                "cost_ratio": r.time / sgd.time,
                "epoch_ratios": [x / y for x, y in zip(r.epoch_times, sgd.epoch_times)],
                "passes": r.passes / r.steps,
            }
    return {"seed": seed, "methods": out}


# ----------------------------------------------------------------------------- selection
def _task_name(name, value, seed):
    v = f"lr {value[0]:g} wd {value[1]:g}" if isinstance(value, tuple) else f"{value:g}"
    return f"sel {name} {v} s{seed}"


def choose(a, res, m: Method) -> dict:
    """The selection rule: the grid value with the highest mean validation accuracy (noisy labels)
    over the selection seeds; ties go to the earlier (weaker) value. Returns the value, every
    value's mean, and the per-seed accuracies."""
    means = {}
    for v in m.grid:
        accs = [res[_task_name(m.name, v, s)]["val_acc"] for s in a.select_seeds]
        means[v] = sum(accs) / len(accs)
    best = max(m.grid, key=lambda v: (means[v], -m.grid.index(v)))
    return {"value": best, "means": means}


def chosen_settings(a, res, table) -> Dict[str, dict]:
    """Every method's selected value, with the base (SGD's lr, wd) and SAM's rho it was tuned at."""
    base = chosen_base(a, res, table)
    sam_rho = choose(a, res, table["SAM"])["value"]
    return {
        k: {"value": choose(a, res, m)["value"], "base": base, "sam_rho": sam_rho if m.stage == 2 else None}
        for k, m in table.items()
    }


def _args_for(a, table, m: Method, v, s):
    """The task's arguments, from the results of the stages before it."""

    def args(res):
        base = chosen_base(a, res, table) if m.stage > 0 else None
        sam_rho = choose(a, res, table["SAM"])["value"] if m.stage == 2 else None
        return (m.name, v, s, base, sam_rho)

    return args


def selection_tasks(a, table) -> List[Task]:
    """Stage 0 (SGD's grid), then stage 1 on SGD's selected base, then stage 2 at SAM's selected rho."""
    names = {m.name: [_task_name(m.name, v, s) for v in m.grid for s in a.select_seeds] for m in table.values()}
    sgd_names = names["SGD"]
    deps = {0: [], 1: sgd_names, 2: sgd_names + names["SAM"]}
    return [
        Task(_task_name(m.name, v, s), select_task, _args_for(a, table, m, v, s), deps=deps[m.stage], cost=m.passes)
        for m in table.values()
        for v in m.grid
        for s in a.select_seeds
    ]


def chosen_base(a, res, table) -> dict:
    lr, wd = choose(a, res, table["SGD"])["value"]
    return {"lr": lr, "wd": wd}
