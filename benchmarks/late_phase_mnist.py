"""Late-phase SAM and late-phase adversarial training on real images (issue 13).

    # MNIST-5k, 3 seeds, 2 worker processes; each ~1,200 s of CPU time (~10 min on an idle 2-core
    # machine, ~20 min with other jobs on it: benchmarks/NOTES.md, issue 13)
    python benchmarks/late_phase_mnist.py --experiment sweep         # (a)
    python benchmarks/late_phase_mnist.py --experiment phases        # (b) + (d)
    python benchmarks/late_phase_mnist.py --experiment adversarial   # (c)
    python benchmarks/late_phase_mnist.py --experiment sweep --dataset digits
    python benchmarks/late_phase_mnist.py --experiment sweep --label-noise 0      # clean labels
    python benchmarks/late_phase_mnist.py --experiment sweep --switches 0 5 10 15 18 20   # + t = 5 (+15 SAM epochs)
    # CIFAR-10 on a GPU (the paper's second script; data = a folder with the python batches; 1 job):
    python benchmarks/late_phase_mnist.py --experiment sweep --dataset cifar10 --data-dir DIR --device cuda
    python benchmarks/late_phase_mnist.py --experiment phases --dataset cifar10 --data-dir DIR --device cuda
    python benchmarks/late_phase_mnist.py --experiment sweep phases ...   # both, common runs once
    python benchmarks/late_phase_mnist.py --experiment adversarial --dataset cifar10 --data-dir DIR --device cuda

Experiments (every run of a seed shares its initial weights and data order):

sweep   (a) switch-point sweep: one SGD trunk per seed, checkpointed (model, FusedSAM state, data
        order RNG) at every switch epoch t; from each checkpoint SAM (``opt.sam_active = True``)
        runs to the end. t = 0 is full SAM, t = E is SGD. Final test accuracy, λmax (Lanczos) and
        Hessian trace (Hutch++) of the training loss on a fixed training subset, train mode.
phases  (b) the two phases after the switch at ``--phase-epoch``: at log-spaced steps after the
        switch, for late SAM and for the SGD trunk (continued SGD from the same weights): the
        distance from the switch weights, the distance between the two runs, λmax and the
        training loss of the subset; an exponential fit of the separation over the first epoch
        after the switch (the escape rate); and the training loss along the straight lines
        SGD -> late SAM and SGD -> full SAM (final weights, ``--interp-points`` points).
        (d) reverse check: SAM -> SGD from the full-SAM run's checkpoint at ``--phase-epoch``;
        SGD, full SAM and the reverse run measured as in (a) (SGD and full SAM are the sweep's
        t = E and t = 0 runs, bitwise: recording does not touch the training).
adversarial (c) standard training, full adversarial training (PGD, L-inf, random start), and
        standard -> AT for the last t epochs for each t of ``--at-epochs`` (branched from the
        standard run's checkpoints); clean and robust test accuracy (PGD-k, no random start).

Each experiment is a list of tasks (one training run, one final measurement, ...), each a pure
function of its inputs, run ``--jobs`` at a time in spawned worker processes of ``--threads``
torch threads: the numbers do not depend on ``--jobs`` (tests/test_late_phase_mnist.py checks
it bitwise on a tiny run). Default: 2 jobs on a CPU, 1 on a GPU.

Schedule (as the paper's CIFAR script): SGD momentum 0.9, one step decay x0.1 (half-way), the
late phase entirely at the decayed learning rate, label smoothing 0.1. SAM: FusedSAM(SGD) with
backend="foreach", rho 0.05, the second pass under frozen_bn_stats; momentum carries over the
switch. Pixels are in [0, 1]; the models normalise inside, so attacks clamp to [0, 1].
Outputs: benchmarks/results/late_phase_<dataset>_<experiment>[_tag].{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common
from _lib.late_experiments import adversarial_cost, adversarial_task, late_sam_tasks, phases_seed, sweep_seed
from _lib.late_reports import describe, report_adv, report_phases, report_sweep, task_timing
from _lib.late_runs import setup
from _lib.plots import plot_adv, plot_phases, plot_sweep
from _lib.runner import Task, default_jobs, run_tasks

# Chosen before any late-SAM result was seen (benchmarks/NOTES.md, issue 13 section, says why).
DEFAULTS = {
    "mnist5k": dict(
        width=16,
        epochs=20,
        milestone=10,
        lr=0.01,
        batch_size=64,
        weight_decay=5e-4,
        rho=0.05,
        label_noise=0.25,
        switches=[0, 10, 15, 18, 20],
        phase_epoch=15,
        hessian_samples=1000,
        hessian_batch=250,
        phase_samples=500,
        trace_samples=30,
        eps=0.1,
        at_alpha=0.05,
        at_steps=3,
        eval_alpha=0.025,
        eval_steps=10,
        at_epochs=[20, 10, 5, 2],
    ),
    # the paper's second script: 160 epochs, lr 0.01, batch 128, wd 1e-4, decay at 80, SAM from 150;
    # late AT: PGD-10, eps 4/255, step 2/255, epochs 150-160
    "cifar10": dict(
        width=0,
        epochs=160,
        milestone=80,
        lr=0.01,
        batch_size=128,
        weight_decay=1e-4,
        rho=0.05,
        label_noise=0.0,
        switches=[0, 80, 120, 150, 155, 160],
        phase_epoch=150,
        hessian_samples=5000,
        hessian_batch=500,
        phase_samples=1000,
        trace_samples=30,
        eps=4 / 255,
        at_alpha=2 / 255,
        at_steps=10,
        eval_alpha=2 / 255,
        eval_steps=10,
        at_epochs=[160, 10],
    ),
}
# digits: MNIST-5k's settings with half its batch (1,437 training images against 4,000)
DEFAULTS["digits"] = {**copy.deepcopy(DEFAULTS["mnist5k"]), "batch_size": 32}


# ----------------------------------------------------------------------------- main
EXPERIMENTS = ("sweep", "phases", "adversarial")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--experiment",
        nargs="+",
        choices=EXPERIMENTS,
        default=["sweep"],
        help="one or more; sweep and phases together train and measure their common runs once",
    )
    p.add_argument("--dataset", choices=sorted(DEFAULTS), default="mnist5k")
    p.add_argument(
        "--data-dir",
        default=None,
        help="cifar10: the folder with data_batch_1 ... test_batch, or a "
        "uint8 subset file made from it (benchmarks/README.md, CIFAR-10 on a GPU)",
    )
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--amp", default=None, choices=["bf16"], help="bf16 autocast for the training forward passes")
    p.add_argument("--channels-last", action="store_true", help="model and batches in channels-last layout")
    p.add_argument("--width-div", type=int, default=1, help="cifar10: divide the WRN-16-8's channel counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--label-noise", type=float, default=None, help="symmetric noise on the training labels")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    for k in (
        "width",
        "epochs",
        "milestone",
        "batch_size",
        "hessian_samples",
        "hessian_batch",
        "phase_samples",
        "trace_samples",
        "eval_steps",
        "at_steps",
        "phase_epoch",
    ):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    for k in ("lr", "weight_decay", "rho", "eps", "at_alpha", "eval_alpha"):
        p.add_argument("--" + k.replace("_", "-"), type=float, default=None)
    p.add_argument("--switches", type=int, nargs="+", default=None, help="switch epochs t (0 = SAM, E = SGD)")
    p.add_argument("--at-epochs", type=int, nargs="+", default=None, help="AT epochs at the end (E = full AT)")
    p.add_argument("--phase-steps", type=int, default=None, help="record the phases up to this many steps")
    p.add_argument("--no-reverse", dest="reverse", action="store_false", help="phases: skip the reverse check (d)")
    p.add_argument("--phase-tol", type=float, default=1e-2)
    p.add_argument("--final-tol", type=float, default=1e-3)
    p.add_argument("--interp-points", type=int, default=25)
    p.add_argument("--interp-lo", type=float, default=-0.2)
    p.add_argument("--interp-hi", type=float, default=1.2)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--num-seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (default: min(2, CPU cores) on the CPU, 1 on a GPU); the results do not depend on it",
    )
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    for k, v in DEFAULTS[a.dataset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.seeds is None:
        a.seeds = list(range(a.num_seeds))
    if a.jobs is None:
        a.jobs = default_jobs(a.device)
    if a.dataset == "cifar10" and not a.data_dir:
        p.error("--dataset cifar10 needs --data-dir")
    if a.interp_points < 2:
        p.error("--interp-points must be >= 2")
    a.experiments = list(dict.fromkeys(a.experiment))
    a.experiment = a.experiments[0]  # the one being reported (main sets each in turn)
    if "phases" in a.experiments and not 0 < a.phase_epoch < a.epochs:
        p.error("--phase-epoch must be in 1..epochs-1")
    a.switches = sorted({min(max(t, 0), a.epochs) for t in a.switches} | {0, a.epochs})
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.tag_s = f"_{a.tag}" if a.tag else ""
    return a


def main(argv=None):
    """Runs the experiments; returns the output dict of the last one (one per experiment written)."""
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    info = _common.machine_info(device)
    info["jobs"] = a.jobs
    t0 = time.perf_counter()
    d, _, _ = setup(a)
    a.n_train, a.n_test = len(d.train_x), len(d.test_x)
    print(_common.machine_line(info), file=sys.stderr)
    print(describe(a) + f"; experiments {a.experiments}, {a.jobs} job(s)", file=sys.stderr)
    late = [e for e in a.experiments if e in ("sweep", "phases")]
    tasks = [t for s in a.seeds for t in late_sam_tasks(a, s, late)] if late else []
    if "adversarial" in a.experiments:
        tasks += [Task(f"s{s} adversarial", adversarial_task, (s,), cost=adversarial_cost(a)) for s in a.seeds]
    done = run_tasks(a, tasks, "+".join(a.experiments))
    wall = time.perf_counter() - t0
    tasks_info = [
        (
            t.name,
            done[t.name]["seconds"],
            done[t.name].get("parts", {}).get("record_s") if "record" in done[t.name] else None,
        )
        for t in tasks
    ]
    timing = task_timing(a, tasks_info, wall, sum(done[t.name]["cpu_seconds"] for t in tasks))
    if len(a.experiments) > 1:
        timing = f"Run together with {' and '.join(a.experiments)} (common runs once): " + timing
    os.makedirs(a.out_dir, exist_ok=True)
    out = None
    for exp in a.experiments:
        a.experiment = exp
        if exp == "sweep":
            res = [sweep_seed(a, s, done) for s in a.seeds]
        elif exp == "phases":
            res = [phases_seed(a, s, done) for s in a.seeds]
        else:
            res = [
                {k: v for k, v in done[f"s{s} adversarial"].items() if k not in ("seconds", "cpu_seconds")}
                for s in a.seeds
            ]
        stem = f"late_phase_{a.dataset}_{exp}{a.tag_s}"
        png = os.path.join(a.out_dir, stem + ".png")
        report, plot = {
            "sweep": (report_sweep, plot_sweep),
            "phases": (report_phases, plot_phases),
            "adversarial": (report_adv, plot_adv),
        }[exp]
        text = report(a, res, info, wall, timing)
        plot(a, res, png)
        print(text)
        cfg = dict(vars(a).items())
        out = {
            "machine": info,
            "config": cfg,
            "experiment": exp,
            "seeds": res,
            "wall_s": wall,
            "tasks": [
                {"name": n, "seconds": sec, "record_s": rec, "cpu_seconds": done[n]["cpu_seconds"]}
                for n, sec, rec in tasks_info
            ],
        }
        paths = _common.write_results(a.out_dir, stem, out, text) + [png]
        print("wrote " + ", ".join(paths), file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
