"""Training throughput: SGD vs per-parameter reference SAM vs FusedSAM (each backend) vs late-phase SAM.

    python benchmarks/train_throughput.py            # CPU: minutes, narrow models; GPU: full size
    python benchmarks/train_throughput.py --quick    # CI smoke: a couple of steps
    python benchmarks/train_throughput.py --models resnet18 --batch-size 256 --dtype bf16 --channels-last

Synthetic data (one fixed random batch per model, no download, no data loading in the timings).
Every variant trains its own copy of the model from the same initial weights. All variants run
in the same process, interleaved: each round runs a block of steps of every variant, with the
order rotated every round, so that machine drift (clocks, other jobs) does not favour one.
Warm-up steps are excluded. On CUDA each step is timed with events, read after one synchronize
per block.

Variants (all SGD with momentum 0.9 underneath, rho 0.05):
  sgd              torch.optim.SGD, one forward+backward per step
  reference-sam    benchmarks/reference_sam.py: two passes, Python loop over parameters
  fusedsam-<b>     FusedSAM with backend b, for each backend that runs on the device
  compiled-sam     --peers: the SAM step written with foreach ops under torch.compile
                   (benchmarks/_peers.py; compile time reported apart, never timed)
  plain-sam        --peers: foreach norm and perturbation, copy_ restore, the base's fused=True step
  captured-triton  --captured (CUDA): FusedSAM(triton, capturable) in fastsam.cuda_graphs.CapturedSAMStep
  late-phase-<b>   FusedSAM(sam_start_step=...): plain steps, SAM on the last --late-frac of the
                   timed steps; its ratio is whole-run time over SGD's whole-run time
  with --family    the SAM family on the default backend: interval-k5 (FusedSAM, schedule
                   Interval(5)), looksam-k5, momentum-sam (one pass, step() without closure),
                   gsam, friendly-sam (issue 11's cost targets, ratios to SGD in the same run)
SAM's second pass runs under fastsam.frozen_bn_stats (BatchNorm statistics from the first pass).

Columns: images/s = batch * timed steps / total timed time; median step time; step-time ratio =
median / SGD's median from this run; whole-run ratio = total time / SGD's total time over the
same number of steps; peak memory: on CUDA torch.cuda.max_memory_allocated during a separate,
sequential pass over a fresh copy of the variant, minus what was allocated before it was built
(model + grads + optimizer state + activations; after one unmeasured priming run, so that
cudnn.benchmark's algorithm search is not counted); on the CPU the same quantity from the CPU
allocator (the peak of live tensor bytes, _common.peak_tensor_bytes), not the process's resident set,
which malloc's arenas and retention blur by more than one copy of these models' parameters.
ratio vs compiled SAM: whole-run time over the compiled peer's (--peers), whose optimizer is checked
equal to FusedSAM's before timing (two steps at the model's parameter shapes).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
import models
from _peers import CompiledSAM, PlainSAM, compare_steps, fused_step_is_correct
from reference_sam import ReferenceSAM

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM, backends, frozen_bn_stats
from fastsam.cuda_graphs import CapturedSAMStep
from fastsam.schedules import Interval

COLUMNS = [
    "model",
    "variant",
    "batch",
    "images/s",
    "median step (ms)",
    "step-time ratio vs SGD",
    "p25-p75",
    "whole-run ratio vs SGD",
    "90% CI",
    "ratio vs compiled SAM",
    "passes/step",
    "check",
    "peak memory (MiB)",
]
PEERS = {"compiled": CompiledSAM, "plain": PlainSAM}
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # small lr: the fixed random batch must not diverge


@dataclass
class Variant:
    name: str
    kind: str  # "sgd" | "reference" | "fused" | "late" | a FAMILY name
    backend: Optional[str] = None
    times: List[float] = field(default_factory=list)
    rounds: List[float] = field(default_factory=list)  # total time of each interleaved round's block
    second_passes: List[int] = field(default_factory=lambda: [0])  # closure calls (counted, the family's rows)


def paired_spread(v: Variant, sgd: Variant, n_boot: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Ratios to SGD from the interleaved rounds, paired round by round (drift cancels).

    step: median and p25/p75 of the per-round ratios (block time / SGD's block time in the same
    round); whole: total/total, with a 90% bootstrap interval over rounds (resampled in pairs)."""
    import random

    per = [a / b for a, b in zip(v.rounds, sgd.rounds) if b > 0]
    rng = random.Random(seed)
    n = len(v.rounds)
    boots = []
    for _ in range(n_boot if n > 1 else 0):
        idx = [rng.randrange(n) for _ in range(n)]
        den = sum(sgd.rounds[i] for i in idx)
        if den > 0:
            boots.append(sum(v.rounds[i] for i in idx) / den)
    return {
        "round_ratio_median": _common.percentile(per, 0.5) if per else math.nan,
        "round_ratio_p25": _common.percentile(per, 0.25) if per else math.nan,
        "round_ratio_p75": _common.percentile(per, 0.75) if per else math.nan,
        "whole_ci_lo": _common.percentile(boots, 0.05) if boots else math.nan,
        "whole_ci_hi": _common.percentile(boots, 0.95) if boots else math.nan,
        "rounds": n,
    }


# The SAM family (--family): name -> (constructor(params, backend, rho, **sgd kwargs), passes per step,
# predicted before any run; "one-pass": step() without a closure, the single pass is the perturbed one).
def _backend_kw(cls, backend):
    import inspect

    return {"backend": backend} if "backend" in inspect.signature(cls).parameters or issubclass(cls, FusedSAM) else {}


FAMILY = {
    "interval-k5": (
        lambda ps, b, rho, **kw: FusedSAM(ps, torch.optim.SGD, rho=rho, backend=b, schedule=Interval(5), **kw),
        1.2,
    ),
    "looksam-k5": (
        lambda ps, b, rho, **kw: LookSAM(ps, torch.optim.SGD, rho=rho, backend=b, k=5, alpha=0.7, **kw),
        1.2,
    ),
    "momentum-sam": (
        lambda ps, b, rho, **kw: MomentumSAM(ps, torch.optim.SGD, rho=0.3, **_backend_kw(MomentumSAM, b), **kw),
        1.0,
    ),
    "gsam": (lambda ps, b, rho, **kw: GSAM(ps, torch.optim.SGD, rho=rho, backend=b, alpha=0.1, **kw), 2.0),
    "friendly-sam": (
        lambda ps, b, rho, **kw: FriendlySAM(ps, torch.optim.SGD, rho=rho, backend=b, sigma=1.0, lmbda=0.95, **kw),
        2.0,
    ),
}


def predicted_passes(v: Variant, sam_frac: float) -> float:
    """Forward+backward passes per step: what the ratio to SGD should be when the passes dominate."""
    if v.kind in FAMILY:
        return FAMILY[v.kind][1]
    return {"sgd": 1.0, "reference": 2.0, "fused": 2.0, "compiled": 2.0, "plain": 2.0, "captured": 2.0}.get(
        v.kind, 1.0 + sam_frac
    )


def ratio_check(ratio: float, lo: float, hi: float, passes: float, tol: float) -> str:
    """'ok', or a warning when the ratio (or its interval) is outside what the pass count allows.

    A SAM step runs ``passes`` forward+backward passes plus an optimizer step at least as costly as
    SGD's, so its ratio cannot be far below ``passes`` (unless the optimizer step dominates, which
    it does not for these models): below passes * (1 - tol) is noise, not a result.  An interval
    wider than 2 * tol * passes is too noisy to read."""
    if passes == 1.0 and ratio == 1.0:
        return "baseline"
    msg = []
    if ratio < passes * (1 - tol):
        msg.append(f"WARNING below {passes:.2f} passes")
    if not math.isnan(lo) and hi - lo > 2 * tol * passes:
        msg.append("WARNING noisy (wide interval)")
    return "; ".join(msg) or "ok"


def make_variants(
    device: torch.device, only: Optional[List[str]], family: bool = False, peers: bool = False, captured: bool = False
) -> List[Variant]:
    names = _common.available_backends(device, only)
    late_backend = backends.resolve("auto", device)
    if late_backend not in names and names:
        late_backend = names[-1]
    vs = [Variant("sgd", "sgd"), Variant("reference-sam", "reference")]
    vs += [Variant(f"fusedsam-{b}", "fused", b) for b in names]
    if peers:
        vs += [Variant("compiled-sam", "compiled"), Variant("plain-sam", "plain")]
    if captured and device.type == "cuda" and "triton" in names:
        vs.append(Variant("captured-triton", "captured", "triton"))
    vs.append(Variant(f"late-phase-{late_backend}", "late", late_backend))
    if family:
        vs += [Variant(f"{n}-{late_backend}", n, late_backend) for n in FAMILY]
    return vs


def make_optimizer(
    kind: str, model: torch.nn.Module, backend: Optional[str], rho: float, sam_start_step: Optional[int] = None
):
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), **kw)
    if kind == "reference":
        return ReferenceSAM(model.parameters(), torch.optim.SGD, rho=rho, **kw)
    if kind in FAMILY:
        return FAMILY[kind][0](model.parameters(), backend, rho, **kw)
    if kind == "compiled":
        return CompiledSAM(model.parameters(), torch.optim.SGD, rho=rho, **kw)
    if kind == "plain":
        p = next(model.parameters())
        return PlainSAM(
            model.parameters(),
            torch.optim.SGD,
            rho=rho,
            fused=fused_step_is_correct(torch.optim.SGD, kw, p.dtype, p.device),
            **kw,
        )
    return FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=rho,
        backend=backend,
        sam_start_step=sam_start_step,
        capturable=kind == "captured",
        **kw,
    )


def make_step(kind: str, model, opt, x, y, autocast, counter: Optional[List[int]] = None) -> Callable[[], torch.Tensor]:
    """One training step. SAM variants pass the second pass as a closure: FusedSAM never calls it
    while SAM is inactive (late phase), so those steps cost one forward+backward."""

    def forward_backward():
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if kind == "captured":  # the whole step (both passes, frozen BN in the second) replayed from a CUDA graph
        captured = CapturedSAMStep(model, opt, F.cross_entropy)

        def step():
            with autocast():
                return captured(x, y)

        return step

    if kind in ("sgd", "momentum-sam"):  # one pass (MomentumSAM's is taken at the perturbed weights)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = forward_backward()
            opt.step()
            return loss

        return step

    def second_pass():
        if counter is not None:
            counter[0] += 1
        with frozen_bn_stats(model):
            return forward_backward()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward_backward()
        opt.step(second_pass)
        return loss

    return step


def peak_memory_mib(v: Variant, base_model, device, x, y, autocast, channels_last, rho, steps) -> float:
    """Peak memory of one variant, measured alone on a fresh copy (see the module docstring)."""
    kind = "fused" if v.kind == "late" else v.kind  # the late variant's peak is a SAM step's peak

    def run():
        model = copy.deepcopy(base_model).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        step = make_step(kind, model, make_optimizer(kind, model, v.backend, rho), x, y, autocast)
        for _ in range(steps):
            step()

    if device.type != "cuda":
        return _common.peak_tensor_bytes(run) / 2**20
    run()  # prime: cudnn.benchmark's algorithm search allocates workspaces on first use
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2**20


def bench_model(name: str, args, device: torch.device, only_backends) -> Dict:
    torch.manual_seed(0)
    width_div = args.width_div if name in models.CIFAR_MODELS else 1
    base_model, in_shape, num_classes = models.build(name, width_div=width_div)
    batch = args.batch_size or (args.batch_cifar if name in models.CIFAR_MODELS else args.batch_imagenet)
    x = torch.randn(batch, *in_shape, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

    variants = make_variants(device, only_backends, args.family, args.peers, args.captured)
    peer_checks, check_compile_s = check_peers(variants, base_model, device, args.rho)
    n_blocks = max(1, math.ceil(args.steps / args.block))
    n_timed = n_blocks * args.block
    n_sam_late = max(1, round(args.late_frac * n_timed))

    memory = {}
    if not args.no_memory:
        for v in variants:
            memory[v.name] = peak_memory_mib(
                v, base_model, device, x, y, autocast, args.channels_last, args.rho, args.memory_steps
            )

    steps, opts = {}, {}
    for v in variants:
        model = copy.deepcopy(base_model).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        start = args.warmup + n_timed - n_sam_late if v.kind == "late" else None
        opts[v.name] = opt = make_optimizer(v.kind, model, v.backend, args.rho, sam_start_step=start)
        if v.kind == "late":
            opt.sam_active = True  # warm up the SAM path too; released below
        steps[v.name] = make_step(v.kind, model, opt, x, y, autocast, v.second_passes)

    for v in variants:  # the compiled peer compiles in its first two steps (the second: momentum state exists)
        for _ in range(2 if v.kind == "compiled" else 0):
            steps[v.name]()
    timer = _common.StepTimer(device)
    for _ in range(args.warmup):  # interleaved too, so every variant sees the same warm machine
        for v in variants:
            steps[v.name]()
    timer.collect()
    for v in variants:
        v.second_passes[0] = 0  # count the timed steps' second passes only
        if v.kind == "late":
            opts[v.name].sam_active = None  # from here sam_start_step decides: SAM on the last steps
    if device.type == "cuda":
        torch.cuda.synchronize()

    last_loss = {}
    for r in range(n_blocks):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            step = steps[v.name]
            for _ in range(args.block):
                timer.time(step)
            block = timer.collect()
            v.times += block
            v.rounds.append(float(sum(block)))
    counted = {v.name: v.second_passes[0] for v in variants}
    for v in variants:
        last_loss[v.name] = float(steps[v.name]().detach())  # an untimed extra step: is the run still finite?

    sgd = _common.summarize(variants[0].times)
    compiled = next((v for v in variants if v.kind == "compiled"), None)
    rows = []
    for v in variants:
        s = _common.summarize(v.times)
        spread = paired_spread(v, variants[0])
        passes = predicted_passes(v, n_sam_late / n_timed)
        if v.kind in FAMILY:  # where a schedule decides, the check uses the passes this window ran
            passes = 1.0 + counted[v.name] / max(s["n"], 1)
        whole = s["total_s"] / sgd["total_s"]
        rows.append(
            {
                "model": name if width_div == 1 else f"{name} (width/{width_div})",
                "variant": v.name,
                "backend": v.backend,
                "batch": batch,
                "images_per_s": batch * s["n"] / s["total_s"],
                "median_step_ms": s["median_s"] * 1e3,
                "p20_step_ms": s["p20_s"] * 1e3,
                "p80_step_ms": s["p80_s"] * 1e3,
                "step_ratio_vs_sgd": s["median_s"] / sgd["median_s"],
                "whole_run_ratio_vs_sgd": s["total_s"] / sgd["total_s"],
                "whole_run_ratio_vs_compiled": s["total_s"] / sum(compiled.times) if compiled else None,
                "peak_memory_mib": memory.get(v.name, math.nan),
                **spread,
                "predicted_passes": passes,
                "check": ratio_check(whole, spread["whole_ci_lo"], spread["whole_ci_hi"], passes, args.ratio_tol),
                "predicted_passes_before_run": predicted_passes(v, n_sam_late / n_timed),
                "timed_steps": s["n"],
                "sam_steps": (
                    n_sam_late if v.kind == "late" else 0 if v.kind == "sgd" else None if v.kind in FAMILY else s["n"]
                ),
                "loss_after": last_loss[v.name],
                "step_times_ms": [t * 1e3 for t in v.times],
            }
        )
    compile_s = opts["compiled-sam"].compile_s + check_compile_s if "compiled-sam" in opts else None
    del steps, opts
    gc.collect()
    return {
        "model": name,
        "params": sum(p.numel() for p in base_model.parameters()),
        "rows": rows,
        "peer_checks": peer_checks,
        "compiled_peer_compile_s": compile_s,
    }


def check_peers(variants: List[Variant], base_model, device, rho: float):
    """Each peer's optimizer against FusedSAM's (the late-phase row's backend) before timing: two SAM
    steps from the model's weights with the same random gradients, compared after each half
    (benchmarks/_peers.py: compare_steps).
    Returns the lines to report and the seconds the compiled peer spent compiling here."""
    fused = next(v for v in variants if v.kind == "late").backend
    out, compile_s = [], 0.0
    for v in variants:
        if v.kind not in PEERS:
            continue
        pairs = []
        for kind, backend in (("fused", fused), (v.kind, None)):
            model = copy.deepcopy(base_model).to(device)
            params = list(model.parameters())
            pairs.append((params, make_optimizer(kind, model, backend, rho)))

        def set_grads(params, step):  # the same random gradients for both, new ones every step
            gen = torch.Generator(device=device).manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)

        diff = compare_steps(pairs[0], pairs[1], next(base_model.parameters()).dtype, set_grads=set_grads)
        if diff is not None:
            raise AssertionError(f"{v.name} does not compute fusedsam-{fused}'s step: {diff}")
        out.append(f"{v.name} = fusedsam-{fused} after each half of two steps at the model's shapes (within rounding)")
        compile_s += getattr(pairs[1][1], "compile_s", 0.0)
    return out, compile_s


def table_rows(results: List[Dict]) -> List[List]:
    return [
        [
            r["model"],
            r["variant"],
            r["batch"],
            round(r["images_per_s"], 1),
            r["median_step_ms"],
            r["step_ratio_vs_sgd"],
            f"{r['round_ratio_p25']:.2f}-{r['round_ratio_p75']:.2f}",
            r["whole_run_ratio_vs_sgd"],
            f"{r['whole_ci_lo']:.2f}-{r['whole_ci_hi']:.2f}",
            "n/a" if r.get("whole_run_ratio_vs_compiled") is None else f"{r['whole_run_ratio_vs_compiled']:.2f}",
            f"{r['predicted_passes']:.2f}",
            r["check"],
            r["peak_memory_mib"],
        ]
        for res in results
        for r in res["rows"]
    ]


def family_targets(results: List[Dict]) -> List[str]:
    """Issue 11's cost targets for the SAM family rows (whole-run ratios to SGD in the same run)."""
    lines = []
    for res in results:
        rows = {r["variant"]: r for r in res["rows"]}
        for r in res["rows"]:
            kind = r["variant"].rsplit("-", 1)[0]
            if kind not in FAMILY:
                continue
            ratio, passes = r["whole_run_ratio_vs_sgd"], r["predicted_passes"]
            if kind == "momentum-sam":
                bound, what = 1.05, "<= 1.05"
            elif kind == "looksam-k5":
                bound, what = 1.3, "<= 1.3"
            elif kind == "interval-k5":
                bound, what = passes + 0.03, f"<= 1 + f + 0.03 = {passes + 0.03:.3f}"
            else:
                fused = rows.get(f"fusedsam-{r['backend']}")
                if fused is None:
                    continue
                bound = 1.03 * fused["whole_run_ratio_vs_sgd"]
                what = f"<= 1.03 x fusedsam-{r['backend']} = {bound:.3f}"
            lines.append(
                f"- {res['model']} {r['variant']}: whole-run ratio {ratio:.3f} ({what}): "
                f"{'met' if ratio <= bound else 'NOT met'}"
            )
    return lines


def targets(results: List[Dict], args) -> List[str]:
    """The GPU targets of issue 7 (CIFAR ResNet-18, batch 128, fp32), checked on this run's numbers."""
    lines = []
    for res in results:
        rows = {r["variant"]: r for r in res["rows"]}
        if (
            res["model"] != "resnet18"
            or args.dtype != "fp32"
            or args.width_div != 1
            or rows["sgd"]["batch"] != 128
            or not args.device.startswith("cuda")
        ):
            continue
        ref = rows["reference-sam"]["step_ratio_vs_sgd"]
        for r in res["rows"]:
            if r["variant"].startswith("fusedsam-"):
                ok = r["step_ratio_vs_sgd"] <= 2.03 and r["step_ratio_vs_sgd"] < ref
                lines.append(
                    f"- {r['variant']}: step-time ratio {r['step_ratio_vs_sgd']:.3f} "
                    f"(target <= 2.03 and < reference {ref:.3f}): {'met' if ok else 'NOT met'}"
                )
            if r["variant"].startswith("late-phase-"):
                ok = r["whole_run_ratio_vs_sgd"] <= 1.12
                lines.append(
                    f"- {r['variant']}: whole-run ratio {r['whole_run_ratio_vs_sgd']:.3f} "
                    f"(target <= 1.12): {'met' if ok else 'NOT met'}"
                )
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--models",
        default=None,
        help="comma list from resnet18, wrn16_8, resnet50, vit_b_16 (default: the CIFAR models; "
        "on a GPU also resnet50 and vit_b_16 when torchvision or timm is importable)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="for every model (overrides the two below)")
    p.add_argument("--batch-cifar", type=int, default=None, help="default 128 on GPU, 16 on CPU")
    p.add_argument("--batch-imagenet", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast, fp32 weights")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--width-div",
        type=int,
        default=None,
        help="divide the CIFAR models' channel counts (default 1 on GPU, 4 on CPU)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50 GPU, 60 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 10 GPU, 3 CPU)")
    p.add_argument("--block", type=int, default=None, help="steps per variant per round (default 10 GPU, 3 CPU)")
    p.add_argument("--late-frac", type=float, default=0.1, help="fraction of timed steps with SAM (late phase)")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--backends", default=None, help="comma list to restrict the FusedSAM backends")
    p.add_argument(
        "--family",
        action="store_true",
        help="also time the SAM family (interval, LookSAM, MomentumSAM, GSAM, FriendlySAM)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also time what a user writes instead: the SAM step under torch.compile (compiled once per "
        "model: a minute on a CPU) and plain torch's best",
    )
    p.add_argument(
        "--captured",
        action="store_true",
        help="CUDA: also time FusedSAM(triton) inside fastsam.cuda_graphs.CapturedSAMStep",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny model, 2 timed steps")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on the CPU: 1; on a GPU: torch's). On a CPU shared with "
        "other jobs more threads than free cores spin and make the timings noise",
    )
    p.add_argument(
        "--ratio-tol",
        type=float,
        default=0.1,
        help="warn when a ratio is below predicted passes x (1 - tol), or its interval wider than 2 x tol x passes",
    )
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    args = p.parse_args(argv)

    gpu = args.device.startswith("cuda")
    if args.quick:
        defaults = dict(models="resnet18", batch_cifar=8, width_div=16, steps=2, warmup=1, block=1, memory_steps=1)
    elif gpu:
        defaults = dict(batch_cifar=128, width_div=1, steps=50, warmup=10, block=10)
    else:
        # 20 interleaved rounds of 3 steps: enough pairs for a median and an interval per ratio (~2 min)
        defaults = dict(models="resnet18,wrn16_8", batch_cifar=16, width_div=4, steps=60, warmup=3, block=3)
    for k, v in defaults.items():
        if getattr(args, k) is None or (k == "memory_steps" and args.quick):
            setattr(args, k, v)
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is None and device.type == "cpu":
        args.threads = 1  # a shared CPU: one thread, or oversubscribed OpenMP threads make the ratios noise
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"[train_throughput] torch threads: {torch.get_num_threads()}", file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = _common.machine_info(device)
    names = args.models.split(",") if args.models else list(models.CIFAR_MODELS) + list(models.IMAGENET_MODELS)
    only = args.backends.split(",") if args.backends else None
    notes, results = [], []
    if device.type == "cpu" and not any(n in models.IMAGENET_MODELS for n in names):
        notes.append("- resnet50 and vit_b_16 (224x224) run by default on a GPU only; on the CPU pass --models.")
    t_start = time.perf_counter()
    for name in names:
        if name in models.IMAGENET_MODELS:
            if device.type != "cuda" and not args.models:
                continue
            ok, why = models.imagenet_available(name)
            if not ok:
                notes.append(f"- {name} skipped: {why}")
                continue
        print(f"[train_throughput] {name} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, args, device, only))

    tag = (
        _common.device_tag(device)
        + ("" if args.dtype == "fp32" else f"_{args.dtype}")
        + ("_cl" if args.channels_last else "")
        + ("_family" if args.family else "")
        + ("_peers" if args.peers else "")
        + ("_quick" if args.quick else "")
    )
    table = _common.markdown_table(COLUMNS, table_rows(results))
    sam_frac = f"{args.late_frac:.0%}"
    md = [
        f"# Training throughput ({tag})",
        "",
        _common.machine_line(info),
        "",
        f"Synthetic data, {args.dtype}{', channels-last' if args.channels_last else ''}; "
        f"{args.warmup} warm-up + {results[0]['rows'][0]['timed_steps'] if results else 0} timed steps per "
        f"variant, interleaved in blocks of {args.block}; rho {args.rho}; late phase = SAM on the last "
        f"{sam_frac} of the timed steps; {torch.get_num_threads()} torch thread(s). "
        f"Total wall time {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Command: `python benchmarks/train_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        table,
        "",
    ]
    warn = [
        f"- {r['model']} {r['variant']}: {r['check']} (whole-run ratio {r['whole_run_ratio_vs_sgd']:.3f}, "
        f"90% CI {r['whole_ci_lo']:.2f}-{r['whole_ci_hi']:.2f}, predicted {r['predicted_passes']:.2f} passes)"
        for res in results
        for r in res["rows"]
        if "WARNING" in r["check"]
    ]
    if warn:
        md += ["Ratio warnings (rerun with more --steps, fewer --threads, or on a quiet machine):", *warn, ""]
        for w in warn:
            print(w, file=sys.stderr)
    tgt = targets(results, args)
    if tgt:
        md += ["Targets (issue 7):", *tgt, ""]
    ftgt = family_targets(results) if args.family else []
    if ftgt:
        md += [
            "SAM family cost targets (issue 11; passes/step of the schedule rows = counted closure calls):",
            *ftgt,
            "",
        ]
    peer_lines = [f"- {res['model']}: {c}" for res in results for c in res.get("peer_checks", [])]
    peer_lines += [
        f"- {res['model']}: compile time of the compiled peer {res['compiled_peer_compile_s']:.1f} s "
        "(in the check and the warm-up, not timed)"
        for res in results
        if res.get("compiled_peer_compile_s") is not None
    ]
    if peer_lines:
        md += ["Peers (checked before timing):", *peer_lines, ""]
    if notes:
        md += ["Notes:", *notes, ""]
    md += [
        "images/s: batch x timed steps / total timed time. Ratios against SGD in this run (median step "
        "time, with p25-p75 of the per-round ratios; whole-run = total time, with a 90% bootstrap interval "
        "over the interleaved rounds, resampled in pairs). passes/step: forward+backward passes per step, the "
        "ratio expected when they dominate; check: a warning when the ratio falls below it by more than "
        f"{args.ratio_tol:.0%} or its interval is too wide. Peak memory: CUDA max_memory_allocated of the variant "
        "alone "
        "(model, grads, optimizer state, activations); CPU: the same from the CPU allocator (peak live tensor "
        "bytes of the variant alone, not the process's resident set). ratio vs compiled SAM: whole-run time over "
        "the compiled peer's (--peers)."
    ]
    text = "\n".join(md)
    print(text)
    data = {
        "machine": info,
        "config": dict(vars(args).items()),
        "columns": COLUMNS,
        "results": results,
        "targets": tgt,
        "family_targets": ftgt,
        "notes": notes,
    }
    paths = _common.write_results(args.out_dir, f"train_throughput_{tag}", data, text)
    print(f"\nwrote {', '.join(paths)}", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
