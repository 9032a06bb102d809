"""Which cheap SAM should I use: every method at its best strength, against a tuned SGD.

    python benchmarks/frontier.py                         # digits, 25% label noise: select, then final
    python benchmarks/frontier.py --dataset mnist5k       # MNIST-5k, 25% noise, the MLP that memorises it
    python benchmarks/frontier.py --stage select          # only the tuning (writes *_select.{json,md})
    python benchmarks/frontier.py --stage final           # only the final runs, from the *_select.json
    python benchmarks/frontier.py --tiny                  # CI smoke test (seconds)

Methods: SGD, SAM, ASAM, late SAM (last 20% of the steps), Interval(5), RandomSwitch(p 0 -> 0.4),
Adaptive(c 0.5), MomentumSAM, LookSAM(k 5), GSAM, FriendlySAM (benchmarks/_lib/frontier_methods.py
has the grids, declared in benchmarks/NOTES.md before any run).

Selection (``--stage select``) on a validation split carved from the training split (20%, its
labels as noisy as the training labels), never the test split: (0) SGD's (lr, wd) grid; (1) each
rho-tuned method on SGD's selected (lr, wd); (2) LookSAM, GSAM and FriendlySAM tune their own knob
at SAM's selected rho. Rule: the highest mean validation accuracy over the selection seeds
(``--select-seeds``); ties to the weaker setting.

Final (``--stage final``): seeds 0..N-1 (``--seeds``), each with its own label-noise draw, initial
weights and batch order, shared by every method of the seed; all methods of a seed train in one
process, interleaved epoch by epoch (order rotated), so that the whole-run cost ratio to SGD is
measured on the same machine state. Reported per method: test accuracy, the paired difference to
SGD and to SAM with a 95% t-interval, λmax of the training loss (Lanczos, a fixed 512-image
training subset, train-mode BN), the % of flipped training labels the model predicts (memorised;
chance: its error rate on those images / 9), the cost ratio, the counted passes per step.

Tasks run ``--jobs`` at a time (worker processes of one torch thread); the numbers do not depend
on ``--jobs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common
from _lib.frontier_methods import methods
from _lib.frontier_report import final_table, selection_table, summarise
from _lib.frontier_runs import choose, chosen_settings, final_task, selection_tasks
from _lib.plots import plot_gain_cost
from _lib.runner import Task, default_jobs, run_tasks, timing_line

_WD = (5e-4, 5e-3)
DEFAULTS = {
    "digits": dict(
        model="cnn",
        width=16,
        epochs=30,
        batch=64,
        label_noise=0.25,
        val_size=0.2,
        sgd_grid=[(lr, wd) for lr in (0.02, 0.05, 0.1) for wd in _WD],
        num_select_seeds=3,
        seeds=10,
    ),
    "mnist5k": dict(
        model="mlp",
        width=256,
        epochs=20,
        batch=64,
        label_noise=0.25,
        val_size=0.2,
        sgd_grid=[(lr, wd) for lr in (0.01, 0.02, 0.05) for wd in _WD],
        num_select_seeds=3,
        seeds=10,
    ),
}
COMMON = dict(hessian_images=512, hessian_tol=1e-3)
TINY = dict(limit=300, epochs=2, width=4, hessian_images=64, hessian_tol=1e-2, num_select_seeds=1, seeds=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="digits", choices=sorted(DEFAULTS))
    p.add_argument("--stage", default="both", choices=("select", "final", "both"))
    p.add_argument("--model", default=None, choices=("cnn", "mlp"), help="MnistCNN or the MLP (width = hidden units)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--label-noise", type=float, default=None)
    p.add_argument("--val-size", type=float, default=None, help="fraction of the training split for validation")
    p.add_argument("--seeds", type=int, default=None, help="final seeds 0..N-1")
    p.add_argument("--num-select-seeds", type=int, default=None, help="selection seeds 100..100+N-1")
    p.add_argument("--limit", type=int, default=None, help="a fixed subset of N images (smoke tests)")
    p.add_argument("--hessian-images", type=int, default=None, help="the λmax subset (default 512; 0: no λmax)")
    p.add_argument("--hessian-tol", type=float, default=None, help="Lanczos tolerance (default 1e-3)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default min(2, cores))")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--tiny", action="store_true", help="CI smoke test: 300 images, 2 epochs, 2 grid values each")
    p.add_argument(
        "--extend",
        nargs="+",
        default=[],
        metavar="METHOD=V1,V2",
        help="append stronger values to a method's grid (e.g. 'Interval(5)=1,2'): a post-hoc extension",
    )
    p.add_argument("--reuse-select", default=None, help="a *_select.json whose runs are not run again")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (SGD and SAM always run)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    a = p.parse_args(argv)
    for k, v in {**DEFAULTS[a.dataset], **COMMON, **(TINY if a.tiny else {})}.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.select_seeds = list(range(100, 100 + a.num_select_seeds))
    a.jobs = a.jobs or default_jobs("cpu")
    a.device = "cpu"
    a.stem = f"frontier_{a.dataset}" + (f"_{a.tag}" if a.tag else "") + ("_tiny" if a.tiny else "")
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def _table(a):
    table = methods(a.sgd_grid)
    if a.tiny:  # two values per grid: the smoke test covers every stage and the selection rule
        table = {k: dataclasses.replace(m, grid=m.grid[:2]) for k, m in table.items()}
        a.sgd_grid = list(table["SGD"].grid)
    for e in a.extend:
        name, values = e.split("=")
        extra = tuple(float(v) for v in values.split(","))
        if name not in table or table[name].stage == 0 or min(extra) <= max(table[name].grid):
            raise SystemExit(f"--extend {e}: needs a tuned method other than SGD and values above its grid")
        table[name] = dataclasses.replace(table[name], grid=table[name].grid + extra)
    if a.methods:
        unknown = set(a.methods) - set(table)
        if unknown:
            raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {list(table)}")
        table = {k: m for k, m in table.items() if k in ("SGD", "SAM") or k in a.methods}
    return table


def describe(a, d_info) -> str:
    model = f"MLP 2x{a.width} (BN)" if a.model == "mlp" else f"MnistCNN width {a.width}"
    return (
        f"{a.dataset} ({d_info}), {a.label_noise:.0%} symmetric label noise drawn per seed, {model}, "
        f"{a.epochs} epochs, batch {a.batch}, cosine lr to 0, SGD momentum 0.9, no label smoothing"
    )


def run_select(a, table, info):
    t0 = time.perf_counter()
    tasks = selection_tasks(a, table)
    done = None
    if a.reuse_select:
        with open(a.reuse_select) as f:
            done = json.load(f)["runs"]
    res = run_tasks(a, tasks, "select", done)
    wall = time.perf_counter() - t0
    chosen = chosen_settings(a, res, table)
    new = [r for k, r in res.items() if k not in (done or {})]
    cpu = sum(r["cpu_seconds"] for r in new)
    timing = timing_line(a, {"selection runs": sum(r["seconds"] for r in new)}, wall, cpu)
    if done:
        timing += f" Runs reused from {os.path.basename(a.reuse_select)}: {len(res) - len(new)}; run here: {len(new)}."
    md = [
        f"# Frontier selection: {a.dataset}",
        "",
        _common.machine_line(info),
        "",
        f"Setup: {describe(a, _data_info(a))}. Validation split: {a.val_size:.0%} of the training split "
        f"(noisy labels). Selection seeds {a.select_seeds}. {timing}",
        "",
        f"Command: `python benchmarks/frontier.py {' '.join(a.argv)}`",
        "",
        selection_table(a, res, table, chosen),
    ]
    text = "\n".join(md)
    print(text)
    means = {
        m.name: [[list(v) if isinstance(v, tuple) else v, acc] for v, acc in choose(a, res, m)["means"].items()]
        for m in table.values()
    }
    out = {
        "machine": info,
        "config": _config(a),
        "chosen": _jsonable(chosen),
        "validation_means": means,
        "wall_s": wall,
        "cpu_s": cpu,
        "runs": res,
    }
    _common.write_results(a.out_dir, a.stem + "_select", out, text)
    return chosen


def run_final(a, table, chosen, info):
    t0 = time.perf_counter()
    tasks = [
        Task(f"seed {s}", final_task, (s, chosen), cost=sum(m.passes for m in table.values())) for s in range(a.seeds)
    ]
    res = run_tasks(a, tasks, "final")
    wall = time.perf_counter() - t0
    finals = [res[t.name] for t in tasks]
    summary = summarise(finals, chosen, table)
    cpu = sum(r["cpu_seconds"] for r in finals)
    timing = timing_line(a, {"final runs and measurements": sum(r["seconds"] for r in finals)}, wall, cpu)
    title = describe(a, _data_info(a))
    md = [
        f"# Which cheap SAM: the tuned frontier on {a.dataset}",
        "",
        _common.machine_line(info),
        "",
        f"Setup: {title}. Each method at its setting selected on the validation split "
        f"(`{a.stem}_select.md`); seeds 0-{a.seeds - 1}, each its own noise draw, initial weights and batch "
        f"order, shared by the methods of a seed. {timing}",
        "",
        f"Command: `python benchmarks/frontier.py {' '.join(a.argv)}`",
        "",
        final_table(summary),
        "",
        "test acc: mean ± std over seeds. − SGD / − SAM: paired per seed, mean and 95% t-interval. λmax: of the "
        f"training loss (noisy labels) on a fixed {a.hessian_images}-image training subset, train-mode BN, at w. "
        "memorised: % of the training images with a flipped label on which the model predicts the flipped "
        "label (chance: its error rate on them / 9). cost: whole-run training time over SGD's in the same "
        "process. passes/step: forward+backward passes counted.",
        "",
        f"Plot: {a.stem}.png",
    ]
    text = "\n".join(md)
    print(text)
    plot_gain_cost(summary, os.path.join(a.out_dir, a.stem + ".png"), title)
    out = {
        "machine": info,
        "config": _config(a),
        "chosen": _jsonable(chosen),
        "summary": summary,
        "seeds": finals,
        "wall_s": wall,
        "cpu_s": cpu,
    }
    _common.write_results(a.out_dir, a.stem, out, text)
    return out


def _data_info(a):
    from _lib.frontier_runs import data_for

    d = data_for(a, a.select_seeds[0])
    return f"{len(d.train_x)} train / {len(d.val_x)} validation / {len(d.test_x)} test images"


def _config(a):
    return {k: v for k, v in vars(a).items() if k != "stem"}


def _jsonable(chosen):
    return {
        k: {**c, "value": list(c["value"]) if isinstance(c["value"], tuple) else c["value"]} for k, c in chosen.items()
    }


def _load_chosen(a):
    path = os.path.join(a.out_dir, a.stem + "_select.json")
    with open(path) as f:
        chosen = json.load(f)["chosen"]
    for c in chosen.values():
        if isinstance(c["value"], list):
            c["value"] = tuple(c["value"])
    return chosen


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    table = _table(a)
    info = _common.machine_info(torch.device("cpu"))
    info["jobs"] = a.jobs
    os.makedirs(a.out_dir, exist_ok=True)
    chosen = run_select(a, table, info) if a.stage in ("select", "both") else _load_chosen(a)
    if a.stage == "select":
        return {"chosen": chosen}
    return run_final(a, table, {k: chosen[k] for k in table}, info)


if __name__ == "__main__":
    main()
