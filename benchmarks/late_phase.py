"""Late-phase SAM (Zhou et al., ICLR 2025): a few epochs of SAM at the end of SGD training reach
nearly the flatness and accuracy of SAM for the whole run.

    python benchmarks/late_phase.py                         # digits + small CNN, < 10 min on 2 CPU cores
    python benchmarks/late_phase.py --num-seeds 3           # mean +- std over seeds 0, 1, 2
    python benchmarks/late_phase.py --dataset cifar10 --data-dir ~/data/cifar-10-batches-py   # GPU

Runs, all with the same seed (same initial weights, same data order) and the same schedule:
  sgd       SGD for all E epochs
  sam       SAM (FusedSAM) for all E epochs
  late-sam  SGD, then SAM for the last t epochs
  late-sgd  (--reverse) SAM, then SGD for the last t epochs: the paper's reverse check
Every run uses one FusedSAM(SGD) optimizer for the whole run; the switch is FusedSAM's own
``sam_start_step`` (late-sam) or ``sam_active`` (sgd: False throughout, late-sgd: True then
False), so the SGD momentum buffer carries over the switch. (The paper's code builds a new
optimizer at the switch and loses the momentum.) While SAM is inactive a step costs one
forward+backward: ``opt.step(closure)`` does not call the closure. SAM's second pass runs under
``fastsam.frozen_bn_stats`` (BatchNorm statistics come from the first pass, as in SAM).

Sharpness, as in the paper: lambda_max (Lanczos) and the Hessian trace (Hutch++) of the training
loss on a fixed subset of the training set without augmentation, averaged exactly over its
mini-batches, model in train mode (fastsam.hessian, model_mode="train"). lambda_max is measured
every --hessian-every epochs, and every --switch-every steps during the first epoch after the
switch (sgd and late-sam, same steps). Up to the switch, late-sam computes exactly what sgd
computes (and late-sgd what sam computes): those epochs are trained again (checked bitwise at
the switch) but their Hessian measurements are taken from the parent run, not repeated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common
from _lib import models
from _lib.data import ImageData, load_cifar10, load_digits_standardised
from _lib.measure import evaluate, flat, hessian_batches, lam_max
from _lib.plots import plot_curves
from _lib.stats import mean_std

from fastsam import FusedSAM, frozen_bn_stats, hessian

RUN_LABELS = {"sgd": "SGD", "sam": "SAM", "late-sam": "SGD → SAM (last t)", "late-sgd": "SAM → SGD (last t)"}
PARENT = {"late-sam": "sgd", "late-sgd": "sam"}  # identical to the parent run up to the switch

# Schedules. digits: a scaled-down copy of the paper's second script (label smoothing 0.1,
# momentum 0.9, step decay x0.1 half-way, SAM on the last 20%: 420 SAM steps). cifar10: that script itself
# (160 epochs, lr 0.01, batch 128, wd 1e-4, decay at 80, SAM from 150) on a WRN-16-8.
DEFAULTS = {
    "digits": dict(
        model="small_cnn",
        width_div=2,
        epochs=50,
        late_epochs=10,
        lr=0.05,
        batch_size=32,
        weight_decay=5e-4,
        milestones=[25],
        rho=0.05,
        hessian_samples=256,
        hessian_batch=64,
        hessian_every=2,
        switch_every=6,
        trace_samples=30,
    ),
    "cifar10": dict(
        model="wrn16_8",
        width_div=1,
        epochs=160,
        late_epochs=10,
        lr=0.01,
        batch_size=128,
        weight_decay=1e-4,
        milestones=[80],
        rho=0.05,
        hessian_samples=5000,
        hessian_batch=500,
        hessian_every=10,
        switch_every=40,
        trace_samples=30,
    ),
}


# ----------------------------------------------------------------------------- one run
def train_run(kind: str, args, data: ImageData, seed: int, hbatches, parent: Optional[Dict] = None) -> Dict:
    """Train one run; return its history and final measurements."""
    torch.manual_seed(seed)  # same initial weights for every run of a seed
    model, _, _ = models.build(args.model, width_div=args.width_div)
    model.to(args.device).train()
    crit = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    n = len(data.train_x)
    steps_per_epoch = n // args.batch_size
    switch_epoch = args.epochs - args.late_epochs
    switch_step = switch_epoch * steps_per_epoch
    opt = FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=args.rho,
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
        sam_start_step=switch_step if kind == "late-sam" else None,
    )
    if kind == "sgd":
        opt.sam_active = False
    elif kind == "late-sgd":
        opt.sam_active = True
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestones, gamma=0.1)
    gen = torch.Generator().manual_seed(seed)  # same data order for every run of a seed

    hist = {"epoch": [], "lr": [], "train_loss": [], "test_acc": [], "lambda_max": []}
    fine = {"epoch": [], "lambda_max": []}  # lambda_max every few steps just after the switch
    dist = {"step": [], "distance": []}  # ||w - w_switch|| after the switch
    w_switch, identical_at_switch = None, None
    train_time = hessian_time = 0.0

    def measure():
        nonlocal hessian_time
        t = time.perf_counter()
        v = lam_max(model, crit, hbatches, args.hessian_tol)
        hessian_time += time.perf_counter() - t
        return v

    def second_pass(x, y):
        def closure():
            with frozen_bn_stats(model):
                loss = crit(model(x), y)
                loss.backward()
            return loss

        return closure

    step = 0
    for epoch in range(args.epochs):
        if epoch == switch_epoch:
            w_switch = flat(model)
            if parent is not None and parent.get("w_switch") is not None:
                identical_at_switch = bool(torch.equal(w_switch, parent["w_switch"].to(w_switch.device)))
            if kind == "late-sgd":
                opt.sam_active = False
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size].to(data.train_x.device)
            x, y = data.train_x[idx], data.train_y[idx]
            if data.augment is not None:
                x = data.augment(x, gen)
            opt.zero_grad(set_to_none=True)
            loss = crit(model(x), y)
            loss.backward()
            opt.step(second_pass(x, y))
            losses.append(loss.detach())
            step += 1
            if w_switch is not None:  # after the switch: bookkeeping, not timed as training
                train_time += time.perf_counter() - t0
                since = step - switch_step
                dist["step"].append(since)
                dist["distance"].append(float((flat(model) - w_switch).norm()))
                if kind in ("sgd", "late-sam") and since < steps_per_epoch and since % args.switch_every == 0:
                    fine["epoch"].append(switch_epoch + since / steps_per_epoch)
                    fine["lambda_max"].append(measure())
                t0 = time.perf_counter()
        sched.step()
        train_time += time.perf_counter() - t0
        _, acc = evaluate(model, data.test_x, data.test_y)
        hist["epoch"].append(epoch + 1)
        hist["lr"].append(opt.param_groups[0]["lr"])
        hist["train_loss"].append(float(torch.stack(losses).mean()))
        hist["test_acc"].append(acc)
        due = (epoch + 1) % args.hessian_every == 0 or epoch + 1 in (switch_epoch, args.epochs)
        if parent is not None and epoch < switch_epoch:
            lm = parent["history"]["lambda_max"][epoch]  # the same computation: see the docstring
        else:
            lm = measure() if due else None
        hist["lambda_max"].append(lm)
        print(
            f"[{kind} seed {seed}] epoch {epoch + 1}/{args.epochs} loss {hist['train_loss'][-1]:.4f} "
            f"test {acc:.2f}%" + (f" lambda_max {lm:.3f}" if lm is not None else ""),
            file=sys.stderr,
            flush=True,
        )

    t0 = time.perf_counter()
    final_lam = lam_max(model, crit, hbatches, args.final_tol)
    tr = hessian.trace(
        model, crit, hbatches, num_samples=args.trace_samples, method="hutch++", seed=0, model_mode="train"
    )
    hessian_time += time.perf_counter() - t0
    train_loss, train_acc = evaluate(model, data.train_x, data.train_y)
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
    return {
        "run": kind,
        "seed": seed,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "lambda_max": final_lam,
        "trace": tr.trace,
        "trace_std_error": tr.std_error,
        "train_time_s": train_time,
        "hessian_time_s": hessian_time,
        "sam_steps": _sam_steps(kind, args, steps_per_epoch),
        "switch_epoch": switch_epoch,
        "steps_per_epoch": steps_per_epoch,
        "identical_to_parent_at_switch": identical_at_switch,
        "history": hist,
        "fine": fine,
        "distance": dist,
        "w_switch": w_switch,
    }


def _sam_steps(kind, args, spe):
    return {"sgd": 0, "sam": args.epochs * spe}.get(
        kind, args.late_epochs * spe if kind == "late-sam" else (args.epochs - args.late_epochs) * spe
    )


# ----------------------------------------------------------------------------- report
def summary_table(runs: Dict[str, List[Dict]]) -> str:
    cols = ["run", "test acc (%)", "train loss (CE)", "λmax", "Hessian trace", "SAM steps", "train wall time (s)"]
    rows = []
    for kind, rs in runs.items():
        rows.append(
            [
                RUN_LABELS[kind],
                mean_std([r["test_acc"] for r in rs]),
                mean_std([r["train_loss"] for r in rs]),
                mean_std([r["lambda_max"] for r in rs]),
                mean_std([r["trace"] for r in rs]),
                rs[0]["sam_steps"],
                mean_std([r["train_time_s"] for r in rs]),
            ]
        )
    return _common.markdown_table(cols, rows)


def outcome(runs: Dict[str, List[Dict]]) -> List[str]:
    """The paper's expected ordering, checked on these numbers. The runs of one seed share initial
    weights and data order, so differences are taken per seed (paired): mean ± std over seeds."""
    mean = statistics.mean

    def paired(a, b):
        d = [x - y for x, y in zip(a, b)]
        sd = f" ± {statistics.stdev(d):.3g}" if len(d) > 1 else ""
        return f"{mean(d):+.3g}{sd}", sum(x < 0 for x in d)

    lines = []
    for metric, label, fmt in (
        ("lambda_max", "λmax", "%.3f"),
        ("trace", "Hessian trace", "%.1f"),
        ("test_acc", "test accuracy (%)", "%.2f"),
    ):
        s, late, sam = ([r[metric] for r in runs[k]] for k in ("sgd", "late-sam", "sam"))
        (d_sgd, below_sgd), (d_sam, _) = paired(late, s), paired(late, sam)
        lines.append(
            f"- {label}: SGD {fmt % mean(s)}, SGD → SAM {fmt % mean(late)}, SAM {fmt % mean(sam)}; "
            f"per seed, late-SAM − SGD = {d_sgd} (late-SAM lower in {below_sgd}/{len(s)} seeds), "
            f"late-SAM − SAM = {d_sam}."
        )
    if len(runs["sgd"]) == 1:
        lines.append("- One seed: no noise estimate (run with --num-seeds 3).")
    return lines


def describe(c: Dict) -> str:
    """One line of the setup, from the config dict (also in the JSON: replot with _lib.plots.plot_curves)."""
    width = f" (width/{c['width_div']})" if c["width_div"] > 1 else ""
    return (
        f"{c['dataset']}, {c['model']}{width}, {c['epochs']} epochs, SAM on the last {c['late_epochs']}, "
        f"lr {c['lr']} (x0.1 at {c['milestones']}), batch {c['batch_size']}, rho {c['rho']}, seeds {c['seeds']}"
    )


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=sorted(DEFAULTS), default="digits")
    p.add_argument("--data-dir", default=None, help="CIFAR-10: the folder with the python batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="small_cnn (digits), wrn16_8 / resnet18 (cifar10)")
    p.add_argument("--width-div", type=int, default=None, help="divide the model's channel counts")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--late-epochs", type=int, default=None, help="t: epochs of SAM at the end (late-sam)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs where lr is multiplied by 0.1")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--rho", type=float, default=None)
    p.add_argument("--reverse", action="store_true", help="also run SAM then SGD for the last t epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--num-seeds", type=int, default=1, help="seeds 0..N-1 (3 for mean +- std)")
    p.add_argument("--hessian-samples", type=int, default=None, help="the fixed training subset for sharpness")
    p.add_argument("--hessian-batch", type=int, default=None)
    p.add_argument("--hessian-every", type=int, default=None, help="epochs between lambda_max measurements")
    p.add_argument("--hessian-tol", type=float, default=1e-2, help="Lanczos tolerance of the per-epoch curve")
    p.add_argument("--final-tol", type=float, default=1e-3, help="Lanczos tolerance of the final lambda_max")
    p.add_argument(
        "--switch-every", type=int, default=None, help="steps between lambda_max in the epoch after the switch"
    )
    p.add_argument("--trace-samples", type=int, default=None, help="Hutch++ Hessian-vector products")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on the CPU: these models are too small to gain from more, "
        "and on a shared machine oversubscribed OpenMP threads slow every step down many times)",
    )
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seeds is None:
        args.seeds = list(range(args.num_seeds))
    if not 0 < args.late_epochs < args.epochs:
        p.error(f"--late-epochs must be in 1..epochs-1, got {args.late_epochs} with --epochs {args.epochs}")
    if args.dataset == "cifar10" and not args.data_dir:
        p.error("--dataset cifar10 needs --data-dir (the folder with data_batch_1 ... test_batch)")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    info = _common.machine_info(device)
    t_start = time.perf_counter()
    data = load_digits_standardised(device) if args.dataset == "digits" else load_cifar10(args.data_dir, device)
    m, hb = min(args.hessian_samples, len(data.train_x)), args.hessian_batch
    hbatches = hessian_batches(data.train_x, data.train_y, m, hb)

    kinds = ["sgd", "sam", "late-sam"] + (["late-sgd"] if args.reverse else [])
    runs: Dict[str, List[Dict]] = {k: [] for k in kinds}
    for seed in args.seeds:
        by_kind = {}
        for kind in kinds:
            par = by_kind.get(PARENT.get(kind))
            by_kind[kind] = r = train_run(kind, args, data, seed, hbatches, parent=par)
            runs[kind].append(r)
    for rs in runs.values():
        for r in rs:
            r.pop("w_switch")

    stem = (
        f"late_phase_{args.dataset}"
        + (f"_{len(args.seeds)}seeds" if len(args.seeds) > 1 else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, stem + ".png")
    cfg = describe(vars(args))
    plot_curves(runs, png, cfg, RUN_LABELS, PARENT)
    first = runs["sgd"][0]
    md = [
        f"# Late-phase SAM on {args.dataset}",
        "",
        _common.machine_line(info),
        "",
        f"Setup: {cfg}; momentum 0.9, weight decay {args.weight_decay}, label smoothing {args.label_smoothing}; "
        f"{first['steps_per_epoch']} steps per epoch; one FusedSAM(SGD) optimizer per run, switched by "
        f"sam_start_step / sam_active (momentum carries over the switch). λmax (Lanczos, tol {args.final_tol}) "
        f"and trace (Hutch++, {args.trace_samples} products) of the training loss (with its label smoothing) on "
        f"the first {m} training images in batches of {hb}, model in train mode, after the last epoch. Train "
        f"loss: plain cross-entropy over the training set, eval mode. Wall time: training steps only. Values: "
        f"{'mean ± std over seeds' if len(args.seeds) > 1 else 'one seed'}. "
        f"Total wall time {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Command: `python benchmarks/late_phase.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        summary_table(runs),
        "",
        "Against the paper's expected ordering:",
        *outcome(runs),
        "",
        f"Plot: {os.path.basename(png)} (λmax and test accuracy per epoch, switch dashed; distance from the "
        "weights at the switch).",
        "",
    ]
    ident = [r["identical_to_parent_at_switch"] for k in PARENT if k in runs for r in runs[k]]
    md.append(f"Branch runs bitwise identical to their parent run at the switch: {all(ident)}.")
    text = "\n".join(md)
    print(text)
    data_out = {"machine": info, "config": vars(args), "runs": runs, "outcome": outcome(runs)}
    paths = _common.write_results(args.out_dir, stem, data_out, text) + [png]
    print(f"\nwrote {', '.join(paths)}", file=sys.stderr)
    return data_out


if __name__ == "__main__":
    main()
