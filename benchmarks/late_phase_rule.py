"""When does late SAM pay off: the decisive late-phase runs (A)-(E) and the rule that decides them.

    python benchmarks/late_phase_rule.py                     # digits: (A), (B), (C), (E); 8 seeds, 2 jobs
    python benchmarks/late_phase_rule.py --group mnist5k     # MNIST-5k without label smoothing: (D)
    python benchmarks/late_phase_rule.py --runs A C5 --seeds 0 1 2 3 4
    python benchmarks/late_phase_rule.py --tiny              # CI smoke test (seconds)

Runs (benchmarks/_lib/late_rule.py; settings, rule and predictions in benchmarks/NOTES.md, written
before any run): (A) issue 13's digits setting (25% label noise, label smoothing 0.1, 20 epochs, lr
0.01 decayed x0.1 at 10, SAM for the last 5); (B) a paper-length late phase (200 epochs, decay at
100, SAM for the last 72: 3,168 SAM steps after the decay); (C) the switch at the high lr, before
the decay (SAM from epoch 5 or 8 of (A)'s schedule); (D) MNIST-5k without label smoothing, with
issue 13's CNN and with an MLP that memorises the noise; (E) (A) and (B) with the optimizer rebuilt
at the switch (the paper's code) instead of carried over (fastsam's default). rho 0.05 throughout.

Each seed draws its own label noise and shares initial weights and batch order across the runs of
its schedule. Measured: test accuracy, λmax of the training loss (as trained, label smoothing
included) on the first 1,000 training images (Lanczos tol 1e-3, train-mode BN), and the % of
flipped training labels the model predicts, at the switch and at the end.

Rule (issue 21): late SAM matches full SAM when mean(late − full test accuracy) >= -0.5 points
AND mean λmax(late) / mean λmax(full) <= 1.25.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common
from _lib.late_rule import GROUPS, LATE, RULE_ACC, RULE_LAMBDA, collect, tasks
from _lib.late_rule_report import memorisation_table, rebuilt_lines, rule_table
from _lib.plots import plot_rule
from _lib.runner import default_jobs, run_tasks, timing_line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--group", default="digits", choices=sorted(GROUPS), help="the default set of runs")
    p.add_argument("--runs", nargs="+", default=None, choices=sorted(LATE), help="instead of the group's")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0..7")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=None, help="a fixed subset of N images (smoke tests)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default min(2, cores) on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--tiny", action="store_true", help="CI smoke test: 240 images, 4 epochs, 2 seeds")
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    a.runs = a.runs or GROUPS[a.group]
    if a.tiny:
        a.limit = a.limit or 240
        a.seeds = a.seeds or [0, 1]
    a.seeds = a.seeds if a.seeds is not None else list(range(8))
    a.jobs = a.jobs or default_jobs(a.device)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.stem = f"late_phase_rule_{a.group}" + (f"_{a.tag}" if a.tag else "") + ("_tiny" if a.tiny else "")
    return a


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    info = _common.machine_info(torch.device(a.device))
    info["jobs"] = a.jobs
    t0 = time.perf_counter()
    todo = [t for s in a.seeds for t in tasks(a, a.runs, s)]
    res = run_tasks(a, todo, "rule")
    wall = time.perf_counter() - t0
    out = collect(a, a.runs, res)
    cpu = sum(r["cpu_seconds"] for r in res.values())
    parts = {
        "training": sum(r["seconds"] for k, r in res.items() if "measure" not in k and " at " not in k),
        "measurements": sum(r["seconds"] for k, r in res.items() if "measure" in k or " at " in k),
    }
    timing = timing_line(a, parts, wall, cpu)
    title = f"Late SAM vs full SAM ({a.group}): the rule acc ≥ {RULE_ACC}, λ ratio ≤ {RULE_LAMBDA}"
    md = [
        f"# When does late SAM pay off: {a.group}",
        "",
        _common.machine_line(info),
        "",
        f"Seeds {a.seeds}, each its own label-noise draw (25% symmetric), shared initial weights and batch order "
        f"within a schedule; rho 0.05; FusedSAM(SGD, foreach), momentum 0.9, wd 5e-4; the second pass under "
        f"frozen_bn_stats. λmax: Lanczos tol 1e-3 on the first 1,000 training images (batches of 250), the "
        f"training loss as trained, train-mode BN. {timing}",
        "",
        f"Command: `python benchmarks/late_phase_rule.py {' '.join(a.argv)}`",
        "",
        "## The rule: late − full SAM test accuracy ≥ −0.5 points and λmax(late) / λmax(full) ≤ 1.25",
        "",
        rule_table(out),
        "",
        "Values: mean ± std over seeds; differences paired per seed with a 95% t-interval; λ ratio: ratio of the "
        "means over seeds.",
        "",
        "## Memorisation of the flipped training labels",
        "",
        "% of the training images with a flipped label on which the model predicts the flipped label (chance: its "
        "error rate on them / 9), at the switch epoch and at the end.",
        "",
        memorisation_table(out),
        "",
    ]
    reb = rebuilt_lines(out)
    if reb:
        md += ["## (E) Optimizer state rebuilt at the switch against carried over", "", *reb, ""]
    md += [f"Plot: {a.stem}.png"]
    text = "\n".join(md)
    print(text)
    os.makedirs(a.out_dir, exist_ok=True)
    plot_rule(out, os.path.join(a.out_dir, a.stem + ".png"), title, RULE_ACC, RULE_LAMBDA)
    data = {
        "machine": info,
        "config": {k: v for k, v in vars(a).items() if k != "stem"},
        "runs": out,
        "wall_s": wall,
        "cpu_s": cpu,
        "tasks": {k: {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"]} for k, r in res.items()},
    }
    _common.write_results(a.out_dir, a.stem, data, text)
    return data


if __name__ == "__main__":
    main()
