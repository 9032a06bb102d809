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
import math
import os
import statistics
import sys
import textwrap
import time
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import data as datasets  # noqa: E402
from fastsam import FusedSAM, adversarial, frozen_bn_stats, hessian  # noqa: E402

# Chosen before any late-SAM result was seen (benchmarks/NOTES.md, issue 13 section, says why).
DEFAULTS = {
    "mnist5k": dict(width=16, epochs=20, milestone=10, lr=0.01, batch_size=64, weight_decay=5e-4, rho=0.05,
                    label_noise=0.25, switches=[0, 10, 15, 18, 20], phase_epoch=15, hessian_samples=1000,
                    hessian_batch=250, phase_samples=500, trace_samples=30, eps=0.1, at_alpha=0.05, at_steps=3,
                    eval_alpha=0.025, eval_steps=10, at_epochs=[20, 10, 5, 2]),
    "digits": dict(width=16, epochs=20, milestone=10, lr=0.01, batch_size=32, weight_decay=5e-4, rho=0.05,
                   label_noise=0.25, switches=[0, 10, 15, 18, 20], phase_epoch=15, hessian_samples=1000,
                   hessian_batch=250, phase_samples=500, trace_samples=30, eps=0.1, at_alpha=0.05, at_steps=3,
                   eval_alpha=0.025, eval_steps=10, at_epochs=[20, 10, 5, 2]),
    # the paper's second script: 160 epochs, lr 0.01, batch 128, wd 1e-4, decay at 80, SAM from 150;
    # late AT: PGD-10, eps 4/255, step 2/255, epochs 150-160
    "cifar10": dict(width=0, epochs=160, milestone=80, lr=0.01, batch_size=128, weight_decay=1e-4, rho=0.05,
                    label_noise=0.0, switches=[0, 80, 120, 150, 155, 160], phase_epoch=150, hessian_samples=5000,
                    hessian_batch=500, phase_samples=1000, trace_samples=30, eps=4 / 255, at_alpha=2 / 255,
                    at_steps=10, eval_alpha=2 / 255, eval_steps=10, at_epochs=[160, 10]),
}


class MnistCNN(nn.Module):
    """conv-BN-ReLU x3 (widths w, 2w, 4w), two 2x2 max-pools, global average pool, linear.
    Inputs are raw pixels in [0, 1]; the first op normalises with the training mean/std."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1, mean: float = 0.0,
                 std: float = 1.0):
        super().__init__()
        w = width
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(self.features((x - self.mean) / self.std), 1))


class Normalized(nn.Module):
    """A CIFAR model behind a per-channel normalisation, so that it takes [0, 1] pixels."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


# ----------------------------------------------------------------------------- data / model
def load_data(a):
    if a.dataset == "cifar10":
        from late_phase import CIFAR_MEAN, CIFAR_STD, crop_flip, load_cifar10
        d = load_cifar10(a.data_dir, a.device)
        mean = torch.tensor(CIFAR_MEAN, device=d.train_x.device).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD, device=d.train_x.device).view(1, 3, 1, 1)
        raw = lambda x: (x * std + mean).clamp(0, 1)  # noqa: E731 - back to [0, 1] pixels
        ytr = d.train_y
        if a.label_noise > 0:
            ytr = torch.from_numpy(datasets.symmetric_noise(ytr.cpu().numpy(), a.label_noise, 10, 0)).to(ytr.device)
        out = datasets.ImageData(raw(d.train_x), ytr, raw(d.test_x), d.test_y, d.train_y, 0.0, 1.0, 10, "cifar10")
        out.augment = crop_flip
        return out
    d = datasets.load(a.dataset, noise=a.label_noise, device=a.device, limit=a.limit)
    d.augment = None
    return d


def build_model(a, d, seed):
    torch.manual_seed(seed)  # same initial weights for every run of a seed
    if a.dataset == "cifar10":
        import models
        from late_phase import CIFAR_MEAN, CIFAR_STD
        m, _, _ = models.build("wrn16_8")
        m = Normalized(m, CIFAR_MEAN, CIFAR_STD)
    else:
        m = MnistCNN(a.width, 10, 1, d.mean, d.std)
    return m.to(a.device).train()


def make_opt(a, model):
    return FusedSAM(model.parameters(), torch.optim.SGD, rho=a.rho, lr=a.lr, momentum=0.9,
                    weight_decay=a.weight_decay, backend="foreach")


def lr_at(a, epoch):
    return a.lr * (0.1 if epoch >= a.milestone else 1.0)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


@torch.no_grad()
def accuracy(model, x, y, batch=1000):
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return 100.0 * correct / len(x)


@torch.no_grad()
def subset_loss(model, crit, batches):
    """The training loss of the fixed subset as the Hessian sees it: train mode (batch statistics),
    running statistics untouched, sample-averaged over the batches."""
    was = model.training
    model.train()
    with frozen_bn_stats(model):
        tot = sum(float(crit(model(x), y)) * len(y) for x, y in batches)
    model.train(was)
    return tot / sum(len(y) for _, y in batches)


def lam_max(model, crit, batches, tol, seed=0):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = hessian.eigenvalues(model, crit, batches, k=1, tol=tol, seed=seed, model_mode="train")
    return float(r.eigenvalues[0])


def checkpoint(model, opt, gen) -> dict:
    """Model, FusedSAM state and data-order RNG: a plain dict (it travels between processes)."""
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "gen": gen.get_state()}


def restore(ck: dict, model, opt, gen):
    model.load_state_dict(ck["model"])
    opt.load_state_dict(copy.deepcopy(ck["opt"]))
    gen.set_state(ck["gen"])


class Progress:
    def __init__(self, total_epochs, label):
        self.total, self.done, self.t0, self.label = total_epochs, 0, time.perf_counter(), label

    def epoch(self, msg):
        self.done += 1
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        print(f"[{self.label} {self.done}/{self.total} epochs, {el:.0f} s, ETA {eta:.0f} s] {msg}",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- training
def train_epochs(a, d, model, opt, gen, crit, start, end, *, sam: bool, attack: Optional[dict] = None,
                 save_at=(), on_step=None, progress=None):
    """Epochs [start, end) with SAM on or off (or adversarial training); returns checkpoints taken at
    the start of the epochs in ``save_at``. ``on_step(global_step)`` is called after every step."""
    opt.sam_active = sam
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
            idx = perm[b * a.batch_size:(b + 1) * a.batch_size].to(d.train_x.device)
            x, y = d.train_x[idx], d.train_y[idx]
            if d.augment is not None:
                x = d.augment(x, gen)
            if attack is not None:
                x = adversarial.pgd(model, x, y, eps=attack["eps"], alpha=attack["alpha"], steps=attack["steps"],
                                    random_start=True, model_mode="train", generator=attack.get("gen"))
            opt.zero_grad(set_to_none=True)
            loss = crit(model(x), y)
            loss.backward()

            def closure(x=x, y=y):
                with frozen_bn_stats(model):
                    l2 = crit(model(x), y)
                    l2.backward()
                return l2
            opt.step(closure)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(epoch * spe + b + 1)
        if progress is not None:  # the loss only: a test pass per epoch would cost 10-15% of an SGD epoch
            progress.epoch(f"epoch {epoch + 1}/{a.epochs} loss {statistics.mean(losses):.4f}")
    if end in save_at:
        ckpts[end] = checkpoint(model, opt, gen)
    return ckpts


def log_steps(total: int, count: int = 14) -> List[int]:
    """About ``count`` log-spaced step numbers in 1..total (distinct integers)."""
    if total < 1:
        return []
    out = sorted({max(1, min(total, int(round(math.exp(i * math.log(total) / max(1, count - 1))))))
                  for i in range(count)})
    return out


def final_measures(a, model, crit, d, hb):
    t0 = time.perf_counter()
    lam = lam_max(model, crit, hb, a.final_tol)
    tr = hessian.trace(model, crit, hb, num_samples=a.trace_samples, seed=0, model_mode="train")
    return {"test_acc": accuracy(model, d.test_x, d.test_y),
            "train_acc_clean_labels": accuracy(model, d.train_x, d.train_y_clean),
            "train_loss_subset": subset_loss(model, crit, hb), "lambda_max": lam, "trace": tr.trace,
            "trace_std_error": tr.std_error, "hessian_s": time.perf_counter() - t0}


def fit_rate(steps, values):
    """Least-squares fit log(value) = c + r * step; returns (r, R^2) (NaN if < 3 positive points)."""
    pts = [(s, math.log(v)) for s, v in zip(steps, values) if v > 0]
    if len(pts) < 3:
        return math.nan, math.nan
    xs, ys = zip(*pts)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    c = my - r * mx
    ss_res = sum((y - c - r * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return r, (1 - ss_res / ss_tot) if ss_tot > 0 else math.nan


def interpolate(model_a_state, w_a, w_b, model, crit, batches, alphas):
    """Training loss of the subset at (1 - alpha) w_a + alpha w_b (parameters; train-mode BN)."""
    m = copy.deepcopy(model)
    m.load_state_dict(model_a_state)
    params = list(m.parameters())
    sizes = [p.numel() for p in params]
    out = []
    for al in alphas:
        w = (1 - al) * w_a + al * w_b
        with torch.no_grad():
            for p, c in zip(params, w.split(sizes)):
                p.copy_(c.view_as(p))
        out.append(subset_loss(m, crit, batches))
    return out


# ----------------------------------------------------------------------------- tasks
# Every experiment is a list of tasks (train one run; measure one final model; ...), each a pure
# function of (args, seed, its inputs): the same numbers whether the tasks run one after another in
# this process (--jobs 1) or in --jobs worker processes of --threads torch threads each.
_SETUP: Dict[tuple, tuple] = {}


def setup(a):
    """(data, Hessian batches, phase batches), loaded once per process."""
    key = (a.dataset, a.data_dir, a.device, a.label_noise, a.limit, a.hessian_samples, a.hessian_batch,
           a.phase_samples)
    if key not in _SETUP:
        d = load_data(a)
        m, hbs = min(a.hessian_samples, len(d.train_x)), a.hessian_batch
        hb = [(d.train_x[i:min(i + hbs, m)], d.train_y[i:min(i + hbs, m)]) for i in range(0, m, hbs)]
        mp = min(a.phase_samples, len(d.train_x))
        pb = [(d.train_x[i:min(i + hbs, mp)], d.train_y[i:min(i + hbs, mp)]) for i in range(0, mp, hbs)]
        _SETUP[key] = (d, hb, pb)
    return _SETUP[key]


def criterion(a):
    return nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)


class Task:
    """``fn(a, *args(results))`` once the tasks named in ``deps`` are done; ``cost`` (about SGD
    epochs) only for the ETA. ``fn`` returns a dict; its "seconds" and "parts" are the timings."""

    def __init__(self, name, fn, args=(), deps=(), cost=1.0):
        self.name, self.fn, self.deps, self.cost = name, fn, tuple(deps), float(cost)
        self.args = args if callable(args) else (lambda res, _a=tuple(args): _a)


def _worker_init(threads):
    torch.set_num_threads(threads)


def _timed(fn, a, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(a, *args)
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return out


def run_tasks(a, tasks: List[Task], label: str) -> Dict[str, dict]:
    """Run the tasks, ``a.jobs`` at a time (worker processes, spawned), in list order as their
    dependencies allow; progress (tasks and an ETA from the costs) on stderr."""
    total = sum(t.cost for t in tasks)
    res: Dict[str, dict] = {}
    t0 = time.perf_counter()
    done_cost = [0.0]

    def report(t):
        done_cost[0] += t.cost
        el = time.perf_counter() - t0
        eta = el / done_cost[0] * (total - done_cost[0]) if done_cost[0] else math.nan
        r = res[t.name]
        extra = f", test {r['test_acc']:.2f}%" if "test_acc" in r else ""
        print(f"[{label}: {len(res)}/{len(tasks)} tasks, {el:.0f} s, ETA {eta:.0f} s] {t.name} done in "
              f"{r['seconds']:.0f} s{extra}", file=sys.stderr, flush=True)

    if a.jobs <= 1:
        for t in tasks:
            missing = [d for d in t.deps if d not in res]
            if missing:
                raise RuntimeError(f"task {t.name} listed before its dependencies {missing}")
            res[t.name] = _timed(t.fn, a, *t.args(res))
            report(t)
        return res
    import concurrent.futures as cf
    import multiprocessing
    todo = list(tasks)
    running = {}
    with cf.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_worker_init, initargs=(a.threads,)) as ex:
        while todo or running:
            for t in [t for t in todo if all(d in res for d in t.deps)]:
                running[ex.submit(_timed, t.fn, a, *t.args(res))] = t
                todo.remove(t)
            if not running:
                raise RuntimeError(f"tasks {[t.name for t in todo]} wait on dependencies that are not tasks")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                t = running.pop(f)
                res[t.name] = f.result()
                report(t)
    return res


def train_task(a, seed, start, end, sam, ck=None, save_at=(), record=False, label=""):
    """One run of a seed: from the initial weights (start 0, ``ck`` None) or from a checkpoint at
    epoch ``start``, SAM on or off to ``end``. ``record``: from epoch ``a.phase_epoch`` on (or from
    ``start`` if later), at log-spaced steps after the switch, the weights, their distance from the
    switch weights, λmax and the loss of the phase subset."""
    d, _, pb = setup(a)
    crit = criterion(a)
    model = build_model(a, d, seed)
    opt = make_opt(a, model)
    gen = torch.Generator().manual_seed(seed)
    if ck is not None:
        restore(ck, model, opt, gen)
    spe = len(d.train_x) // a.batch_size
    P = a.phase_epoch
    prog = Progress(end - start, f"seed {seed} {label}")
    parts = {"record_s": 0.0}
    out = {"seed": seed, "start": start, "end": end, "sam": sam}
    if not record:
        ckpts = train_epochs(a, d, model, opt, gen, crit, start, end, sam=sam, save_at=set(save_at), progress=prog)
    else:
        step0 = P * spe
        rec_set = set(step0 + s for s in log_steps(a.phase_steps if a.phase_steps else (a.epochs - P) * spe))
        rec = {"step": [], "w": [], "distance": [], "lambda_max": [], "train_loss": []}
        ckpts = train_epochs(a, d, model, opt, gen, crit, start, P, sam=sam, save_at=set(save_at), progress=prog) \
            if start < P else {}
        w_p = flat(model)

        def on_step(gs):
            if gs in rec_set:
                t1 = time.perf_counter()
                w = flat(model)
                rec["step"].append(gs - step0)
                rec["w"].append(w)
                rec["distance"].append(float((w - w_p).norm()))
                rec["lambda_max"].append(lam_max(model, crit, pb, a.phase_tol))
                rec["train_loss"].append(subset_loss(model, crit, pb))
                parts["record_s"] += time.perf_counter() - t1
        ckpts.update(train_epochs(a, d, model, opt, gen, crit, max(start, P), end, sam=sam, save_at=set(save_at),
                                  on_step=on_step, progress=prog))
        out.update(record=rec, w_switch=w_p)
    out.update(state=copy.deepcopy(model.state_dict()), ckpts=ckpts, test_acc=accuracy(model, d.test_x, d.test_y),
               parts=parts)
    return out


def measure_task(a, seed, state, switch):
    """Final test accuracy, clean-label training accuracy, loss, λmax and trace of a trained model."""
    d, hb, _ = setup(a)
    model = build_model(a, d, seed)
    model.load_state_dict(state)
    return {**final_measures(a, model, criterion(a), d, hb), "switch": switch}


def _train_cost(a, start, end, sam, record=False):
    c = (end - start) * (2.0 if sam else 1.0)
    return c + (14 * 3.5 if record else 0.0)  # a phase record: 14 λmax of the phase subset ~ 3.5 SGD epochs each


_MEASURE_COST = 35.0  # final_measures ~ 35 SGD epochs (Lanczos tol 1e-3 + 30-product Hutch++, 4 batches)


# ----------------------------------------------------------------------------- (a), (b), (d)
def sweep_seed(a, seed, res):
    k = f"s{seed}"
    runs = {t: res[f"{k} measure t={t}"] for t in sorted(a.switches)}
    return {"seed": seed, "runs": runs}


def interp_task(a, seed, sgd, late, full):
    """Separation and escape-rate fits of the two records; the loss along SGD -> late SAM and
    SGD -> full SAM (final weights)."""
    d, hb, _ = setup(a)
    crit = criterion(a)
    spe = len(d.train_x) // a.batch_size
    srec, lrec = sgd["record"], late["record"]
    sep = [float((ws - wl).norm()) for ws, wl in zip(srec["w"], lrec["w"])]
    first = [i for i, s in enumerate(lrec["step"]) if s <= spe]
    r_sep, r2_sep = fit_rate([lrec["step"][i] for i in first], [sep[i] for i in first])
    r_sam, r2_sam = fit_rate([lrec["step"][i] for i in first], [lrec["distance"][i] for i in first])
    r_sgd, r2_sgd = fit_rate([srec["step"][i] for i in first], [srec["distance"][i] for i in first])
    alphas = [a.interp_lo + i * (a.interp_hi - a.interp_lo) / (a.interp_points - 1) for i in range(a.interp_points)]
    base = build_model(a, d, seed)
    w_sgd = _flat_state(base, sgd["state"])
    interp = {"alpha": alphas,
              "sgd_to_late_sam": interpolate(sgd["state"], w_sgd, _flat_state(base, late["state"]), base, crit, hb,
                                             alphas)}
    if full is not None:
        interp["sgd_to_full_sam"] = interpolate(sgd["state"], w_sgd, _flat_state(base, full["state"]), base, crit,
                                                hb, alphas)
    strip = lambda r: {k: v for k, v in r.items() if k != "w"}  # noqa: E731
    return {"sgd": strip(srec), "late_sam": strip(lrec), "separation": sep,
            "fit_first_epoch": {"separation_rate": r_sep, "separation_r2": r2_sep, "late_sam_distance_rate": r_sam,
                                "late_sam_distance_r2": r2_sam, "sgd_distance_rate": r_sgd,
                                "sgd_distance_r2": r2_sgd, "fit_steps": [lrec["step"][i] for i in first]},
            "interpolation": interp}


def _flat_state(model, state):
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return flat(m)


def late_sam_tasks(a, seed, exps) -> List[Task]:
    """The runs of one seed for the experiments ``exps`` (sweep and/or phases), each run once when
    both are asked for. sweep (a): one SGD trunk, checkpointed at every switch epoch; SAM from each
    checkpoint to the end (t = 0 from the initial weights); every final model measured. phases
    (b): the trunk and SAM from its checkpoint at P recorded after P (recording does not touch the
    training: the same runs, bitwise, as the sweep's); full SAM, for the SGD -> full SAM line and
    (d): SAM -> SGD from full SAM's checkpoint at P; SGD, full SAM and the reverse run measured."""
    E, P = a.epochs, a.phase_epoch
    sweep, phases = "sweep" in exps, "phases" in exps
    rev = phases and a.reverse
    k = f"s{seed}"
    trunk = f"{k} SGD"
    starts = sorted(t for t in a.switches if t < E) if sweep else [0]
    if phases and P not in starts:
        starts.append(P)
    saves = sorted(set(t for t in starts if t > 0))
    tasks = [Task(trunk, train_task, (seed, 0, E, False, None, saves, phases, "SGD"),
                  cost=_train_cost(a, 0, E, False, phases))]
    for t in sorted(starts):
        rec = phases and t == P
        if t == 0:
            tasks.append(Task(f"{k} SAM from 0", train_task, (seed, 0, E, True, None, (P,) if rev else (), False,
                                                              "SAM from 0"), cost=_train_cost(a, 0, E, True)))
        else:
            tasks.append(Task(f"{k} SAM from {t}", train_task,
                              lambda res, t=t, rec=rec: (seed, t, E, True, res[trunk]["ckpts"][t], (), rec,
                                                         f"SAM from {t}"),
                              deps=[trunk], cost=_train_cost(a, t, E, True, rec)))
    if rev:
        tasks.append(Task(f"{k} SAM->SGD from {P}", train_task,
                          lambda res: (seed, P, E, False, res[f"{k} SAM from 0"]["ckpts"][P], (), False,
                                       f"SAM->SGD from {P}"),
                          deps=[f"{k} SAM from 0"], cost=_train_cost(a, P, E, False)))
    if phases:
        deps = [trunk, f"{k} SAM from {P}", f"{k} SAM from 0"]
        tasks.append(Task(f"{k} interpolation", interp_task, lambda res: (seed, *(res[d] for d in deps)), deps=deps,
                          cost=2 * a.interp_points * 0.15))
    measured = sorted(a.switches) if sweep else [0, E]
    for t in measured:
        src = trunk if t >= E else f"{k} SAM from {t}"
        tasks.append(Task(f"{k} measure t={t}", measure_task, lambda res, src=src, t=t: (seed, res[src]["state"], t),
                          deps=[src], cost=_MEASURE_COST))
    if rev:
        tasks.append(Task(f"{k} measure reverse", measure_task,
                          lambda res: (seed, res[f"{k} SAM->SGD from {P}"]["state"], P),
                          deps=[f"{k} SAM->SGD from {P}"], cost=_MEASURE_COST))
    return tasks


def phases_seed(a, seed, res):
    k = f"s{seed}"
    return {"seed": seed, "sgd": res[f"{k} measure t={a.epochs}"], "full_sam": res[f"{k} measure t=0"],
            "reverse": res.get(f"{k} measure reverse"), "phases": res[f"{k} interpolation"]}


# ----------------------------------------------------------------------------- (c)
def adversarial_task(a, seed):
    d, _, _ = setup(a)
    return run_adversarial(a, d, seed)


def run_adversarial(a, d, seed):
    crit = criterion(a)
    E = a.epochs

    def atk(t):  # the training attack; its random starts are seeded per run
        return {"eps": a.eps, "alpha": a.at_alpha, "steps": a.at_steps,
                "gen": torch.Generator(device=d.train_x.device).manual_seed(10_000 + 1000 * seed + t)}

    def evaluate(model):
        r = adversarial.robust_accuracy(model, (d.test_x, d.test_y), eps=a.eps, alpha=a.eval_alpha,
                                        steps=a.eval_steps, random_start=False, batch_size=500)
        return {"clean_acc": 100 * r.clean_acc, "robust_acc": 100 * r.robust_acc}

    model = build_model(a, d, seed)
    opt = make_opt(a, model)
    gen = torch.Generator().manual_seed(seed)
    init = checkpoint(model, opt, gen)
    starts = sorted(set(E - t for t in a.at_epochs if 0 < t < E))
    ck = train_epochs(a, d, model, opt, gen, crit, 0, E, sam=False, save_at=set(starts),
                      progress=Progress(E, f"seed {seed} standard"))
    out = {0: evaluate(model)}  # key: AT epochs at the end
    for t in sorted(set(a.at_epochs), reverse=True):
        if t <= 0:
            continue
        model = build_model(a, d, seed)
        opt = make_opt(a, model)
        gen = torch.Generator()
        s = max(0, E - t)
        restore(init if s == 0 else ck[s], model, opt, gen)
        train_epochs(a, d, model, opt, gen, crit, s, E, sam=False, attack=atk(t),
                     progress=Progress(E - s, f"seed {seed} AT last {min(t, E)}"))
        out[min(t, E)] = evaluate(model)
    return {"seed": seed, "runs": out}


# ----------------------------------------------------------------------------- report
def ms(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    m, s = statistics.mean(xs), statistics.stdev(xs)
    return f"{m:.2f} ± {s:.2f}" if abs(m) >= 1 else f"{m:.3g} ± {s:.2g}"


def _timing_line(a, tasks_info, wall, cpu):
    """Where the time went: CPU seconds inside the tasks by part, and the wall time."""
    parts = {"training": 0.0, "phase records (λmax + loss of the phase subset)": 0.0,
             "final measurements (accuracy, λmax, trace)": 0.0, "interpolation and fits": 0.0,
             "training and PGD evaluation": 0.0}
    for name, sec, rec in tasks_info:
        if "measure" in name:
            parts["final measurements (accuracy, λmax, trace)"] += sec
        elif "interpolation" in name:
            parts["interpolation and fits"] += sec
        elif rec is not None:
            parts["phase records (λmax + loss of the phase subset)"] += rec
            parts["training"] += sec - rec
        else:
            parts["training and PGD evaluation" if "adversarial" in name else "training"] += sec
    busy = sum(parts.values())
    shown = ", ".join(f"{k} {v:.0f} s ({100 * v / busy:.0f}%)" for k, v in parts.items() if v > 0) if busy else "-"
    return (f"Wall time {wall:.0f} s with --jobs {a.jobs} (worker processes of {a.threads} torch thread(s)), "
            f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; wall time inside the tasks "
            f"{busy:.0f} s: {shown}; CPU time of the tasks {cpu:.0f} s (an otherwise idle machine needs at "
            f"least that / jobs, more where the last tasks leave workers idle).")


def report_sweep(a, res, info, wall, timing):
    E = a.epochs
    rows = []
    for t in sorted({t for r in res for t in r["runs"]}):
        rs = [r["runs"][t] for r in res if t in r["runs"]]
        label = "full SAM" if t == 0 else ("SGD" if t >= E else f"SGD → SAM from epoch {t}")
        rows.append([t, label, E - t, ms([x["test_acc"] for x in rs]), ms([x["train_acc_clean_labels"] for x in rs]),
                     ms([x["train_loss_subset"] for x in rs]), ms([x["lambda_max"] for x in rs]),
                     ms([x["trace"] for x in rs])])
    md = [f"# Late-phase SAM switch-point sweep: {a.dataset}", "", _common.machine_line(info), "",
          f"Setup: {describe(a)}. Values: mean ± std over seeds {a.seeds}. {timing}", "",
          f"Command: `python benchmarks/late_phase_mnist.py {' '.join(a.argv)}`", "",
          "## (a) Switch point t (SAM from epoch t to the end)", "",
          _common.markdown_table(["t", "run", "SAM epochs", "test acc (%)", "train acc, clean labels (%)",
                                  "train loss (subset)", "λmax", "Hessian trace"], rows), ""]
    # paired differences vs SGD and full SAM
    md.append("Paired per seed (same init and data order): test accuracy and λmax minus SGD's / full SAM's:")
    md.append("")
    for t in sorted({t for r in res for t in r["runs"]}):
        if t in (0, E):
            continue
        da = [r["runs"][t]["test_acc"] - r["runs"][E]["test_acc"] for r in res]
        db = [r["runs"][t]["test_acc"] - r["runs"][0]["test_acc"] for r in res if 0 in r["runs"]]
        dl = [r["runs"][t]["lambda_max"] - r["runs"][E]["lambda_max"] for r in res]
        dl0 = [r["runs"][t]["lambda_max"] - r["runs"][0]["lambda_max"] for r in res if 0 in r["runs"]]
        md.append(f"- t={t}: acc − SGD {ms(da)}, acc − SAM {ms(db)}; λmax − SGD {ms(dl)}, λmax − SAM {ms(dl0)}")
    md += ["", f"The two phases after the switch and the reverse check: `--experiment phases` "
               f"(late_phase_{a.dataset}_phases{a.tag_s}.md).", "",
           f"Plot: late_phase_{a.dataset}_sweep{a.tag_s}.png"]
    return "\n".join(md)


def report_phases(a, res, info, wall, timing):
    P, E = a.phase_epoch, a.epochs
    md = [f"# Late-phase SAM: the two phases after the switch, and the reverse check: {a.dataset}", "",
          _common.machine_line(info), "",
          f"Setup: {describe(a)}. Values: mean ± std over seeds {a.seeds}. {timing}", "",
          f"Command: `python benchmarks/late_phase_mnist.py {' '.join(a.argv)}`", ""]
    rows = []
    for key, label, sam_ep in (("sgd", "SGD", 0), ("full_sam", "full SAM", E),
                               ("reverse", f"SAM → SGD from epoch {P} (reverse)", P)):
        rs = [r[key] for r in res if r.get(key)]
        if rs:
            rows.append([label, sam_ep, ms([x["test_acc"] for x in rs]), ms([x["train_acc_clean_labels"] for x in rs]),
                         ms([x["train_loss_subset"] for x in rs]), ms([x["lambda_max"] for x in rs]),
                         ms([x["trace"] for x in rs])])
    md += ["## Final models (the same runs as the sweep's t = E and t = 0; SGD → SAM from "
           f"epoch {P} is the sweep's t = {P} row)", "",
           _common.markdown_table(["run", "SAM epochs", "test acc (%)", "train acc, clean labels (%)",
                                   "train loss (subset)", "λmax", "Hessian trace"], rows), ""]
    if any(r.get("reverse") for r in res):
        md.append("Paired per seed, the reverse run minus full SAM / minus SGD: test accuracy "
                  f"{ms([r['reverse']['test_acc'] - r['full_sam']['test_acc'] for r in res])} / "
                  f"{ms([r['reverse']['test_acc'] - r['sgd']['test_acc'] for r in res])}; λmax "
                  f"{ms([r['reverse']['lambda_max'] - r['full_sam']['lambda_max'] for r in res])} / "
                  f"{ms([r['reverse']['lambda_max'] - r['sgd']['lambda_max'] for r in res])}.")
        md.append("")
    ph = [r["phases"] for r in res if r["phases"]]
    if ph:
        md += [f"## (b) The two phases after the switch at epoch {a.phase_epoch}", "",
               "Exponential fits log y = c + r·step over the first epoch after the switch "
               f"(steps {ph[0]['fit_first_epoch']['fit_steps']}):", ""]
        f = [p["fit_first_epoch"] for p in ph]
        md.append(_common.markdown_table(
            ["quantity", "rate r per step", "R²", "doubling steps ln2/r"],
            [["‖w_lateSAM − w_SGD‖ (separation)", ms([x["separation_rate"] for x in f]),
              ms([x["separation_r2"] for x in f]), ms([math.log(2) / x["separation_rate"] if x["separation_rate"] > 0
                                                       else math.nan for x in f])],
             ["‖w_lateSAM − w_switch‖", ms([x["late_sam_distance_rate"] for x in f]),
              ms([x["late_sam_distance_r2"] for x in f]), "-"],
             ["‖w_SGD − w_switch‖", ms([x["sgd_distance_rate"] for x in f]), ms([x["sgd_distance_r2"] for x in f]),
              "-"]]))
        steps = ph[0]["late_sam"]["step"]
        rows = []
        for i, s in enumerate(steps):
            rows.append([s, ms([p["sgd"]["distance"][i] for p in ph]), ms([p["late_sam"]["distance"][i] for p in ph]),
                         ms([p["separation"][i] for p in ph]), ms([p["sgd"]["lambda_max"][i] for p in ph]),
                         ms([p["late_sam"]["lambda_max"][i] for p in ph]), ms([p["sgd"]["train_loss"][i] for p in ph]),
                         ms([p["late_sam"]["train_loss"][i] for p in ph])])
        md += ["", _common.markdown_table(["steps after switch", "dist SGD", "dist late SAM", "separation",
                                           "λmax SGD", "λmax late SAM", "loss SGD", "loss late SAM"], rows), ""]
        it = [p["interpolation"] for p in ph]
        al = it[0]["alpha"]
        for key, name in (("sgd_to_late_sam", "SGD → late SAM"), ("sgd_to_full_sam", "SGD → full SAM")):
            if key not in it[0]:
                continue
            curves = [x[key] for x in it]
            i0 = min(range(len(al)), key=lambda i: abs(al[i]))
            i1 = min(range(len(al)), key=lambda i: abs(al[i] - 1))
            ends = [(c[i0], c[i1]) for c in curves]
            inner = [max(c[i0:i1 + 1]) - max(c[i0], c[i1]) for c in curves]
            md.append(f"- Linear path {name} ({len(al)} points, α ∈ [{al[0]:.2f}, {al[-1]:.2f}]): loss at α=0 "
                      f"{ms([e[0] for e in ends])}, at α=1 {ms([e[1] for e in ends])}, barrier (max over α∈[0,1] "
                      f"minus the larger end) {ms(inner)}.")
    md += ["", f"Plot: late_phase_{a.dataset}_phases{a.tag_s}.png"]
    return "\n".join(md)


def report_adv(a, res, info, wall, timing):
    E = a.epochs
    rows = []
    for t in sorted({t for r in res for t in r["runs"]}):
        rs = [r["runs"][t] for r in res if t in r["runs"]]
        label = "standard" if t == 0 else ("full AT" if t >= E else f"standard → AT, last {t} epochs")
        rows.append([t, label, ms([x["clean_acc"] for x in rs]), ms([x["robust_acc"] for x in rs])])
    md = [f"# Late-phase adversarial training: {a.dataset}", "", _common.machine_line(info), "",
          f"Setup: {describe(a)}. Training attack: L∞ PGD-{a.at_steps}, ε={a.eps:.4g}, step {a.at_alpha:.4g}, "
          f"random start, model in train mode (BN statistics of the attack passes discarded). Evaluation: "
          f"L∞ PGD-{a.eval_steps}, ε={a.eps:.4g}, step {a.eval_alpha:.4g}, no random start, eval mode, "
          f"{a.n_test} test images; robust = correct on the clean and the attacked image. "
          f"Mean ± std over seeds {a.seeds}. {timing}", "",
          f"Command: `python benchmarks/late_phase_mnist.py {' '.join(a.argv)}`", "",
          _common.markdown_table(["AT epochs t", "run", "clean test acc (%)", "robust test acc (%)"], rows), "",
          "Paired per seed, robust accuracy minus full AT's:", ""]
    full = max(t for r in res for t in r["runs"])
    for t in sorted({t for r in res for t in r["runs"]}):
        if t == full:
            continue
        d = [r["runs"][t]["robust_acc"] - r["runs"][full]["robust_acc"] for r in res]
        c = [r["runs"][t]["clean_acc"] - r["runs"][full]["clean_acc"] for r in res]
        md.append(f"- t={t}: robust {ms(d)}, clean {ms(c)}")
    md += ["", f"Plot: late_phase_{a.dataset}_adversarial{a.tag_s}.png"]
    return "\n".join(md)


def describe(a):
    model = "WRN-16-8" if a.dataset == "cifar10" else f"CNN width {a.width}"
    hess = "" if a.experiment == "adversarial" else (
        f"; λmax (Lanczos tol {a.final_tol}) and trace (Hutch++ {a.trace_samples} HVPs) of the training loss on the "
        f"first {a.hessian_samples} training images in batches of {a.hessian_batch}, train mode")
    if a.experiment == "phases":
        hess += (f"; after the switch at epoch {a.phase_epoch}: λmax (tol {a.phase_tol}) and loss of the first "
                 f"{a.phase_samples} training images at 14 log-spaced steps; {a.interp_points} interpolation points, "
                 f"α ∈ [{a.interp_lo:g}, {a.interp_hi:g}]")
    return (f"{a.dataset} ({a.n_train} train / {a.n_test} test, symmetric label noise {a.label_noise:g} on the "
            f"training labels), {model}, {a.epochs} epochs, batch {a.batch_size}, lr {a.lr} x0.1 at epoch "
            f"{a.milestone}, momentum 0.9, wd {a.weight_decay}, label smoothing {a.label_smoothing}, rho {a.rho} "
            f"(FusedSAM(SGD), foreach)" + hess)


def _save(fig, path, title=None):
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(textwrap.fill(title, 230), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(a, res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    E = a.epochs
    ts = sorted({t for r in res for t in r["runs"]})
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for j, (key, lab) in enumerate((("test_acc", "test accuracy (%)"), ("lambda_max", "λmax"), ("trace", "Hessian trace"))):
        v = np.array([[r["runs"][t][key] for t in ts] for r in res], dtype=float)
        ax[j].errorbar(ts, v.mean(0), yerr=v.std(0, ddof=1) if len(res) > 1 else None, marker="o", capsize=3)
        ax[j].set_xlabel(f"switch epoch t (SAM from t to {E}; 0 = full SAM, {E} = SGD)")
        ax[j].set_ylabel(lab)
        ax[j].axvline(a.milestone, color="gray", ls=":", lw=1)
    _save(fig, path, describe(a))


def plot_phases(a, res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axs = plt.subplots(1, 4, figsize=(21, 4.8))
    ph = [r["phases"] for r in res]
    steps = ph[0]["late_sam"]["step"]

    def band(axis, vals, label, color):
        v = np.array(vals, dtype=float)
        m = v.mean(0)
        axis.plot(steps, m, marker="o", ms=3, color=color, label=label)
        if len(v) > 1:
            s = v.std(0, ddof=1)
            axis.fill_between(steps, m - s, m + s, color=color, alpha=0.2)
    band(axs[0], [p["sgd"]["distance"] for p in ph], "SGD: ‖w − w_switch‖", "tab:blue")
    band(axs[0], [p["late_sam"]["distance"] for p in ph], "late SAM: ‖w − w_switch‖", "tab:green")
    band(axs[0], [p["separation"] for p in ph], "‖w_lateSAM − w_SGD‖", "tab:red")
    axs[0].set_xscale("log")
    axs[0].set_yscale("log")
    axs[0].set_xlabel(f"steps after the switch at epoch {a.phase_epoch}")
    axs[0].legend(fontsize=8)
    band(axs[1], [p["sgd"]["lambda_max"] for p in ph], "SGD λmax", "tab:blue")
    band(axs[1], [p["late_sam"]["lambda_max"] for p in ph], "late SAM λmax", "tab:green")
    ax2 = axs[1].twinx()
    for p_key, c in (("sgd", "tab:blue"), ("late_sam", "tab:green")):
        v = np.array([p[p_key]["train_loss"] for p in ph]).mean(0)
        ax2.plot(steps, v, ls="--", color=c)
    ax2.set_ylabel("train loss of the subset (dashed)")
    axs[1].set_xscale("log")
    axs[1].set_xlabel("steps after the switch")
    axs[1].set_ylabel("λmax (solid)")
    axs[1].legend(fontsize=8, loc="upper left")
    it = [p["interpolation"] for p in ph]
    for key, c, lab in (("sgd_to_late_sam", "tab:green", "SGD → late SAM"),
                        ("sgd_to_full_sam", "tab:red", "SGD → full SAM")):
        if key in it[0]:
            v = np.array([x[key] for x in it])
            axs[2].plot(it[0]["alpha"], v.mean(0), marker=".", color=c, label=lab)
    axs[2].set_xlabel("α (0: SGD solution, 1: the other)")
    axs[2].set_ylabel("train loss of the subset")
    axs[2].set_yscale("log")
    axs[2].legend(fontsize=8)
    # (d): the final models, SGD / full SAM / reverse
    keys = [(k, lab) for k, lab in (("sgd", "SGD"), ("full_sam", "full SAM"),
                                    ("reverse", f"SAM → SGD at {a.phase_epoch}")) if all(r.get(k) for r in res)]
    for j, (k, lab) in enumerate(keys):
        lam = [r[k]["lambda_max"] for r in res]
        acc = statistics.mean(r[k]["test_acc"] for r in res)
        axs[3].bar(j, np.mean(lam), yerr=np.std(lam, ddof=1) if len(lam) > 1 else None, capsize=3,
                   color=("tab:blue", "tab:red", "tab:purple")[j])
        axs[3].text(j, np.mean(lam), f"{acc:.2f}%", ha="center", va="bottom", fontsize=8)
    axs[3].set_xticks(range(len(keys)), [lab for _, lab in keys], fontsize=8)
    axs[3].set_ylabel("final λmax (bar), test accuracy (label)")
    _save(fig, path, describe(a))


def plot_adv(a, res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    ts = sorted({t for r in res for t in r["runs"]})
    fig, ax = plt.subplots(1, 1, figsize=(6, 4.2))
    for key, c in (("clean_acc", "tab:blue"), ("robust_acc", "tab:red")):
        v = np.array([[r["runs"][t][key] for t in ts] for r in res], dtype=float)
        ax.errorbar(ts, v.mean(0), yerr=v.std(0, ddof=1) if len(res) > 1 else None, marker="o", capsize=3,
                    color=c, label=key.replace("_", " "))
    ax.set_xlabel(f"epochs of adversarial training at the end (0 = standard, {a.epochs} = full AT)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    _save(fig, path)


# ----------------------------------------------------------------------------- main
EXPERIMENTS = ("sweep", "phases", "adversarial")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", nargs="+", choices=EXPERIMENTS, default=["sweep"],
                   help="one or more; sweep and phases together train and measure their common runs once")
    p.add_argument("--dataset", choices=sorted(DEFAULTS), default="mnist5k")
    p.add_argument("--data-dir", default=None, help="cifar10: the folder with data_batch_1 ... test_batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--label-noise", type=float, default=None, help="symmetric noise on the training labels")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    for k in ("width", "epochs", "milestone", "batch_size", "hessian_samples", "hessian_batch", "phase_samples",
              "trace_samples", "eval_steps", "at_steps", "phase_epoch"):
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
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: min(2, CPU cores) on the CPU, 1 on a GPU); the results do not "
                        "depend on it")
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    for k, v in DEFAULTS[a.dataset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.seeds is None:
        a.seeds = list(range(a.num_seeds))
    if a.jobs is None:
        a.jobs = 1 if torch.device(a.device).type != "cpu" else max(1, min(2, os.cpu_count() or 1))
    if a.dataset == "cifar10" and not a.data_dir:
        p.error("--dataset cifar10 needs --data-dir")
    if a.interp_points < 2:
        p.error("--interp-points must be >= 2")
    a.experiments = list(dict.fromkeys(a.experiment))
    a.experiment = a.experiments[0]  # the one being reported (main sets each in turn)
    if "phases" in a.experiments and not 0 < a.phase_epoch < a.epochs:
        p.error("--phase-epoch must be in 1..epochs-1")
    a.switches = sorted(set(min(max(t, 0), a.epochs) for t in a.switches) | {0, a.epochs})
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
    E = a.epochs
    late = [e for e in a.experiments if e in ("sweep", "phases")]
    tasks = [t for s in a.seeds for t in late_sam_tasks(a, s, late)] if late else []
    if "adversarial" in a.experiments:
        cost = E + sum(min(t, E) for t in set(a.at_epochs) if t > 0) * (1 + a.at_steps)
        tasks += [Task(f"s{s} adversarial", adversarial_task, (s,), cost=cost) for s in a.seeds]
    done = run_tasks(a, tasks, "+".join(a.experiments))
    wall = time.perf_counter() - t0
    tasks_info = [(t.name, done[t.name]["seconds"], done[t.name].get("parts", {}).get("record_s")
                   if "record" in done[t.name] else None) for t in tasks]
    timing = _timing_line(a, tasks_info, wall, sum(done[t.name]["cpu_seconds"] for t in tasks))
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
            res = [{k: v for k, v in done[f"s{s} adversarial"].items() if k not in ("seconds", "cpu_seconds")}
                   for s in a.seeds]
        stem = f"late_phase_{a.dataset}_{exp}{a.tag_s}"
        png = os.path.join(a.out_dir, stem + ".png")
        report, plot = {"sweep": (report_sweep, plot_sweep), "phases": (report_phases, plot_phases),
                        "adversarial": (report_adv, plot_adv)}[exp]
        text = report(a, res, info, wall, timing)
        plot(a, res, png)
        print(text)
        cfg = {k: v for k, v in vars(a).items()}
        out = {"machine": info, "config": cfg, "experiment": exp, "seeds": res, "wall_s": wall,
               "tasks": [{"name": n, "seconds": sec, "record_s": rec, "cpu_seconds": done[n]["cpu_seconds"]}
                         for n, sec, rec in tasks_info]}
        paths = _common.write_results(a.out_dir, stem, out, text) + [png]
        print("wrote " + ", ".join(paths), file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
