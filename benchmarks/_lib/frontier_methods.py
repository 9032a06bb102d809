"""The methods of the tuned frontier (benchmarks/frontier.py): each one's knob, the grid it is
tuned over (declared in benchmarks/NOTES.md before any run), its predicted forward/backward
passes per step, and how to build it.

Tuning is in three stages, each on the validation split: (0) SGD's learning rate and weight
decay; (1) every rho-tuned method on SGD's selected (lr, wd); (2) LookSAM, GSAM and FriendlySAM
tune their own knob at SAM's selected rho.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM
from fastsam.schedules import Adaptive, Interval, RandomSwitch

MOMENTUM = 0.9
LATE_FRACTION = 0.2  # late SAM: SAM on the last 20% of the steps


@dataclass(frozen=True)
class Method:
    name: str
    knob: str  # what the grid varies
    grid: Tuple  # from weakest to strongest (ties in selection go to the earlier value)
    passes: float  # predicted forward/backward passes per step (1 = SGD)
    stage: int  # 0: SGD, 1: tuned on SGD's base, 2: tuned at SAM's rho
    build: Callable  # (params, base, value, sam_rho, seed, total_steps) -> optimizer


def _sgd_kw(base):
    return dict(lr=base["lr"], momentum=MOMENTUM, weight_decay=base["wd"])


def _fused(**extra):
    def make(params, base, rho, sam_rho, seed, total):
        return FusedSAM(params, torch.optim.SGD, rho=rho, **extra, **_sgd_kw(base))

    return make


def _late(params, base, rho, sam_rho, seed, total):
    return FusedSAM(params, torch.optim.SGD, rho=rho, sam_start_step=int((1 - LATE_FRACTION) * total), **_sgd_kw(base))


def _random_switch(params, base, rho, sam_rho, seed, total):
    return FusedSAM(
        params, torch.optim.SGD, rho=rho, schedule=RandomSwitch(0.0, 0.4, total, seed=seed), **_sgd_kw(base)
    )


def _adaptive(params, base, rho, sam_rho, seed, total):
    return FusedSAM(params, torch.optim.SGD, rho=rho, schedule=Adaptive(0.9, c=0.5), **_sgd_kw(base))


def _interval(params, base, rho, sam_rho, seed, total):
    return FusedSAM(params, torch.optim.SGD, rho=rho, schedule=Interval(5), **_sgd_kw(base))


def methods(sgd_grid: Sequence[Tuple[float, float]]) -> Dict[str, Method]:
    """Every method of the frontier, SGD's (lr, wd) grid given per data set."""
    ms = [
        Method(
            "SGD",
            "lr, wd",
            tuple(sgd_grid),
            1.0,
            0,
            lambda p, base, v, r, s, t: torch.optim.SGD(p, lr=v[0], momentum=MOMENTUM, weight_decay=v[1]),
        ),
        Method("SAM", "rho", (0.01, 0.02, 0.05, 0.1, 0.2, 0.5), 2.0, 1, _fused()),
        Method("ASAM", "rho", (0.1, 0.2, 0.5, 1.0, 2.0), 2.0, 1, _fused(adaptive=True)),
        Method("late SAM (last 20%)", "rho", (0.05, 0.1, 0.2, 0.5), 1.2, 1, _late),
        Method("Interval(5)", "rho", (0.05, 0.1, 0.2, 0.5), 1.2, 1, _interval),
        Method("RandomSwitch(p 0->0.4)", "rho", (0.05, 0.1, 0.2, 0.5), 1.2, 1, _random_switch),
        Method("Adaptive(c 0.5)", "rho", (0.05, 0.1, 0.2, 0.5), 1.3, 1, _adaptive),
        Method(
            "MomentumSAM",
            "rho",
            (0.1, 0.3, 1.0, 3.0),
            1.0,
            1,
            lambda p, base, v, r, s, t: MomentumSAM(p, torch.optim.SGD, rho=v, **_sgd_kw(base)),
        ),
        Method(
            "LookSAM(k 5)",
            "alpha",
            (0.1, 0.3, 0.7, 1.0),
            1.2,
            2,
            lambda p, base, v, r, s, t: LookSAM(p, torch.optim.SGD, rho=r, k=5, alpha=v, **_sgd_kw(base)),
        ),
        Method(
            "GSAM",
            "alpha",
            (0.05, 0.1, 0.2, 0.4),
            2.0,
            2,
            lambda p, base, v, r, s, t: GSAM(p, torch.optim.SGD, rho=r, alpha=v, **_sgd_kw(base)),
        ),
        Method(
            "FriendlySAM",
            "sigma",
            (0.25, 0.5, 0.75, 1.0),
            2.0,
            2,
            lambda p, base, v, r, s, t: FriendlySAM(p, torch.optim.SGD, rho=r, sigma=v, lmbda=0.95, **_sgd_kw(base)),
        ),
    ]
    return {m.name: m for m in ms}


def setting_label(m: Method, value, sam_rho=None) -> str:
    """'rho 0.1', 'lr 0.05, wd 5e-4', 'alpha 0.7 at rho 0.05'."""
    if m.stage == 0:
        return f"lr {value[0]:g}, wd {value[1]:g}"
    s = f"{m.knob} {value:g}"
    return s + (f" at rho {sam_rho:g}" if sam_rho is not None else "")
