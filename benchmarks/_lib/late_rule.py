"""When does late SAM pay off: the runs (A)-(E) of benchmarks/late_phase_rule.py, their task graph
and the decision rule (declared in benchmarks/NOTES.md before any run).

A schedule is a data set, model and training schedule; it trains per seed an SGD trunk
(checkpointed at every switch epoch of its late runs) and a full-SAM run. A late run is SGD up to
its switch epoch (the trunk's checkpoint), then SAM to the end, with the optimizer state carried
over the switch (fastsam's default) or rebuilt there (the late-phase paper's code). Every run of a
seed shares its initial weights, batch order and label-noise draw (``noise_seed = seed``).

Rule: late SAM matches full SAM when the mean paired accuracy difference (late - full) is
>= -0.5 points AND lambda_max(late) / lambda_max(full) <= 1.25 (ratio of the means over seeds).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List

from .late_runs import measure_task, memorisation_task, train_task
from .runner import Task
from .stats import paired

RULE_ACC, RULE_LAMBDA = -0.5, 1.25

_DIGITS = dict(
    dataset="digits",
    model="cnn",
    width=16,
    epochs=20,
    milestone=10,
    lr=0.01,
    batch_size=32,
    weight_decay=5e-4,
    rho=0.05,
    label_smoothing=0.1,
    label_noise=0.25,
)
_MNIST = dict(_DIGITS, dataset="mnist5k", batch_size=64, label_smoothing=0.0)
SCHEDULES = {
    "A": _DIGITS,  # issue 13's digits sweep
    "B": dict(_DIGITS, epochs=200, milestone=100),  # 72 SAM epochs x 44 steps = 3,168 SAM steps after the decay
    "D": _MNIST,  # issue 13's MNIST-5k setting without label smoothing
    "D-MLP": dict(_MNIST, model="mlp", width=256),  # the same with a model that memorises the noise
}
# late run: (schedule, switch epoch, optimizer rebuilt at the switch)
LATE = {
    "A": ("A", 15, False),
    "C5": ("A", 5, False),
    "C8": ("A", 8, False),
    "E": ("A", 15, True),
    "B": ("B", 128, False),
    "E-B": ("B", 128, True),
    "D": ("D", 15, False),
    "D-MLP": ("D-MLP", 15, False),
}
GROUPS = {"digits": ["A", "C5", "C8", "E", "B", "E-B"], "mnist5k": ["D", "D-MLP"]}
DESCRIBE = {
    "A": "(A) the current setting: SAM for the last 5 of 20 epochs (after the decay at 10)",
    "C5": "(C) switch at the high lr: SAM from epoch 5 (decay at 10)",
    "C8": "(C) switch at the high lr: SAM from epoch 8 (decay at 10)",
    "E": "(E) as (A), optimizer rebuilt at the switch (the paper's code)",
    "B": "(B) paper-length late phase: SAM for the last 72 of 200 epochs (3,168 steps after the decay at 100)",
    "E-B": "(E) as (B), optimizer rebuilt at the switch",
    "D": "(D) MNIST-5k, issue 13's CNN, no label smoothing: SAM for the last 5 of 20 epochs",
    "D-MLP": "(D) MNIST-5k, an MLP that memorises, no label smoothing: SAM for the last 5 of 20 epochs",
}
MEASURE = dict(hessian_samples=1000, hessian_batch=250, phase_samples=0, final_tol=1e-3, trace_samples=0)
TINY_EPOCHS = 4


def schedule_args(a, sched: str) -> argparse.Namespace:
    """The arguments of one schedule: its settings, the measurement settings, noise per seed."""
    s = dict(SCHEDULES[sched])
    if a.tiny:
        s.update(epochs=TINY_EPOCHS, milestone=TINY_EPOCHS // 2, width=4 if s["model"] == "cnn" else 16)
    tiny = {"hessian_samples": 32, "hessian_batch": 16} if a.tiny else {}
    return argparse.Namespace(
        **{
            **vars(a),
            **MEASURE,
            **s,
            **tiny,
            "noise_per_seed": True,
            "phase_epoch": 0,
            "phase_steps": None,
            "data_dir": None,
            "experiment": "rule",
        }
    )


def switch_epoch(a, run: str) -> int:
    sched, s, _ = LATE[run]
    if not a.tiny:
        return s
    return max(1, min(TINY_EPOCHS - 1, round(s * TINY_EPOCHS / SCHEDULES[sched]["epochs"])))


def in_schedule(a, sched, fn, *args):
    """``fn`` with the schedule's arguments (the runner calls task functions with the script's)."""
    return fn(schedule_args(a, sched), *args)


def tasks(a, runs: List[str], seed: int) -> List[Task]:
    """The tasks of one seed for the late runs ``runs``: per schedule the trunk and full SAM (each
    checkpointed at the switch epochs), the late runs from the trunk's checkpoints, the final
    measurements, and the memorisation of the trunk and of full SAM at each switch."""
    out = []
    for sched in dict.fromkeys(LATE[r][0] for r in runs):
        sa = schedule_args(a, sched)
        E = sa.epochs
        mine = [r for r in runs if LATE[r][0] == sched]
        switches = sorted({switch_epoch(a, r) for r in mine})
        k = f"{sched} s{seed}"
        for kind, sam in (("SGD", False), ("SAM", True)):
            out.append(
                Task(
                    f"{k} {kind}",
                    in_schedule,
                    (sched, train_task, seed, 0, E, sam, None, switches, False, f"{sched} {kind}"),
                    cost=E * (1 + sam),
                )
            )
            src = f"{k} {kind}"
            out.append(
                Task(
                    f"{src} measure",
                    in_schedule,
                    lambda res, src=src, sched=sched, E=E: (sched, measure_task, seed, res[src]["state"], E),
                    deps=[src],
                    cost=10,
                )
            )
            for t in switches:
                out.append(
                    Task(
                        f"{src} at {t}",
                        in_schedule,
                        lambda res, src=src, t=t, sched=sched: (
                            sched,
                            memorisation_task,
                            seed,
                            res[src]["ckpts"][t]["model"],
                        ),
                        deps=[src],
                        cost=0.2,
                    )
                )
        for r in mine:
            t, fresh = switch_epoch(a, r), LATE[r][2]
            name = f"{r} s{seed} late"
            trunk = f"{k} SGD"
            out.append(
                Task(
                    name,
                    in_schedule,
                    lambda res, t=t, fresh=fresh, sched=sched, r=r, trunk=trunk, E=E: (
                        sched,
                        train_task,
                        seed,
                        t,
                        E,
                        True,
                        res[trunk]["ckpts"][t],
                        (),
                        False,
                        f"{r} late",
                        fresh,
                    ),
                    deps=[trunk],
                    cost=2 * (E - t),
                )
            )
            out.append(
                Task(
                    f"{name} measure",
                    in_schedule,
                    lambda res, t=t, sched=sched, name=name: (sched, measure_task, seed, res[name]["state"], t),
                    deps=[name],
                    cost=10,
                )
            )
    return out


def collect(a, runs: List[str], res: Dict[str, dict]) -> Dict[str, dict]:
    """Per late run: the per-seed numbers of SGD, full SAM and late SAM, and the rule's verdict."""
    keep = ("test_acc", "lambda_max", "memorised", "memorised_chance", "train_acc_clean_labels")
    out = {}
    for r in runs:
        sched, _, fresh = LATE[r]
        t = switch_epoch(a, r)
        sa = schedule_args(a, sched)
        per = {"SGD": [], "SAM": [], "late": [], "SGD at switch": [], "SAM at switch": []}
        for s in a.seeds:
            k = f"{sched} s{s}"
            per["SGD"].append(res[f"{k} SGD measure"])
            per["SAM"].append(res[f"{k} SAM measure"])
            per["late"].append(res[f"{r} s{s} late measure"])
            per["SGD at switch"].append(res[f"{k} SGD at {t}"])
            per["SAM at switch"].append(res[f"{k} SAM at {t}"])
        per = {kind: {key: [x[key] for x in xs if key in x] for key in keep} for kind, xs in per.items()}
        late, full, sgd = per["late"], per["SAM"], per["SGD"]
        d_full = paired(late["test_acc"], full["test_acc"])
        ratio = statistics.mean(late["lambda_max"]) / statistics.mean(full["lambda_max"])
        spe = (len_train(sa)) // sa.batch_size
        out[r] = {
            "describe": DESCRIBE[r],
            "schedule": sched,
            "switch": t,
            "epochs": sa.epochs,
            "milestone": sa.milestone,
            "rebuilt": fresh,
            "sam_steps": (sa.epochs - t) * spe,
            "sam_steps_after_decay": (sa.epochs - max(t, sa.milestone)) * spe,
            "per_seed": per,
            "late_minus_full": d_full,
            "late_minus_sgd": paired(late["test_acc"], sgd["test_acc"]),
            "full_minus_sgd": paired(full["test_acc"], sgd["test_acc"]),
            "lambda_ratio": ratio,
            "lambda_ratio_per_seed": [x / y for x, y in zip(late["lambda_max"], full["lambda_max"])],
            "meets_accuracy": d_full["mean"] >= RULE_ACC,
            "meets_lambda": ratio <= RULE_LAMBDA,
        }
        out[r]["meets_rule"] = out[r]["meets_accuracy"] and out[r]["meets_lambda"]
    return out


def len_train(sa) -> int:
    from .late_runs import setup

    return len(setup(sa, 0)[0].train_x)
