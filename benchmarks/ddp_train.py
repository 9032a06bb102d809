"""DDP training throughput: SGD vs FusedSAM with local and global perturbation.

Launch with torchrun (gloo on the CPU, nccl on GPUs)::

    torchrun --nproc_per_node=2 benchmarks/ddp_train.py                 # CPU defaults, ~1-2 min
    torchrun --nproc_per_node=8 benchmarks/ddp_train.py --device cuda --width 64 --batch 128

A CIFAR-style ResNet-18 (``--width`` channels in the stem; 64 is the real
one) trains on synthetic 32x32 images.  The modes run interleaved in rounds
(so that a shared machine's load drifts over all of them alike); each round
times ``--steps // --rounds`` steps per mode after warm-up, and the report
gives the median over rounds.  Images/s count the global batch (all ranks).

The extra cost of ``perturbation="global"`` is one more all-reduce of the
full gradient per step.  It is reported twice: measured as the step-time
difference global - local, and predicted as the time of one all-reduce of a
buffer the size of the gradient, timed alone.

Rank 0 prints a markdown table and writes results/ddp_train_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
from _lib.models import ResNet18

from fastsam import FusedSAM
from fastsam.distributed import sam_step

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("sgd", "sam-local", "sam-global")


# ----------------------------------------------------------------------------- helpers
def machine_info(device: torch.device, world: int, backend: str) -> dict:
    info = _common.machine_info(device)
    info.update(torch_threads_per_rank=info.pop("torch_threads"), world_size=world, backend=backend)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(mode: str, args, device: torch.device):
    torch.manual_seed(0)
    model = ResNet18(width=args.width).to(device).to(memory_format=torch.channels_last)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if mode == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), **kw)
    else:
        opt = FusedSAM(ddp.parameters(), torch.optim.SGD, rho=args.rho, perturbation=mode.split("-")[1], **kw)
    return ddp, opt


def train_step(mode: str, ddp, opt, x, y) -> None:
    if mode == "sgd":
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    else:
        sam_step(ddp, opt, F.cross_entropy, x, y)


def allreduce_ms(numel: int, device: torch.device, reps: int) -> float:
    """Median time of one all-reduce of a gradient-sized fp32 buffer (what global mode adds per step)."""
    buf = torch.ones(numel, device=device)
    times = []
    for i in range(reps + 2):
        dist.barrier()
        sync(device)
        t = time.perf_counter()
        dist.all_reduce(buf)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def params_identical_across_ranks(model: nn.Module) -> bool:
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).view(torch.int32)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([int(torch.equal(mine, ref))], device=mine.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="timed steps per mode, split over the rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before the rounds")
    ap.add_argument("--batch", type=int, default=32, help="images per rank per step")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 stem channels (64: the real model)")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tag", default=None, help="result file suffix (default: device and world size)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        modes = [m for m in args.modes.split(",") if m]
        bad = set(modes) - set(MODES)
        if bad:
            raise SystemExit(f"unknown modes {sorted(bad)}; choose from {MODES}")
        info = machine_info(device, world, backend)

        g = torch.Generator().manual_seed(1000 + rank)  # each rank its own synthetic sub-batches
        data = [
            (
                torch.randn(args.batch, 3, 32, 32, generator=g).to(device, memory_format=torch.channels_last),
                torch.randint(0, 10, (args.batch,), generator=g).to(device),
            )
            for _ in range(4)
        ]
        runs = {m: build(m, args, device) for m in modes}
        numel = sum(p.numel() for p in next(iter(runs.values()))[0].parameters())
        for m, (ddp, opt) in runs.items():
            for i in range(args.warmup):
                train_step(m, ddp, opt, *data[i % len(data)])

        per_round = max(1, args.steps // args.rounds)
        step_s = {m: [] for m in modes}
        for _ in range(args.rounds):
            for m, (ddp, opt) in runs.items():
                dist.barrier()
                sync(device)
                t = time.perf_counter()
                for i in range(per_round):
                    train_step(m, ddp, opt, *data[i % len(data)])
                sync(device)
                dist.barrier()
                step_s[m].append((time.perf_counter() - t) / per_round)
        ar_ms = allreduce_ms(numel, device, reps=10)
        identical = {m: params_identical_across_ranks(ddp) for m, (ddp, _) in runs.items()}

        if rank != 0:
            return
        global_batch = args.batch * world
        rows = []
        for m in modes:
            med = statistics.median(step_s[m])
            rows.append(
                dict(
                    mode=m,
                    step_ms=1e3 * med,
                    images_per_s=global_batch / med,
                    step_ms_rounds=[1e3 * s for s in step_s[m]],
                    ranks_identical=identical[m],
                )
            )
        by = {r["mode"]: r for r in rows}
        overhead = None
        if "sam-local" in by and "sam-global" in by:
            d = by["sam-global"]["step_ms"] - by["sam-local"]["step_ms"]
            overhead = dict(
                global_minus_local_ms=d, relative=d / by["sam-local"]["step_ms"], allreduce_of_gradient_ms=ar_ms
            )
        result = dict(
            benchmark="ddp_train",
            machine=info,
            args=vars(args),
            params=numel,
            global_batch=global_batch,
            rows=rows,
            global_overhead=overhead,
        )

        where = info.get("gpu") or f"{info['cpu']}, {info['cpu_cores']} cores"
        lines = [
            f"DDP training throughput: CIFAR ResNet-18 width {args.width} ({numel:,} params), "
            f"{world} ranks x {args.batch} images ({backend}, {where}); torch {info['torch']}, "
            f"fastsam {info['fastsam_commit']}, {info['date']}, load average at start "
            f"{info['load_average_at_start'][0]:.1f}",
            "",
            "| mode | images/s | step ms (median of rounds) | rounds | vs SGD | ranks bitwise equal |",
            "|---|---|---|---|---|---|",
        ]
        base = by.get("sgd")
        for r in rows:
            vs = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else "-"
            lines.append(
                f"| {r['mode']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
                f"{' / '.join(f'{s:.0f}' for s in r['step_ms_rounds'])} | {vs} | {r['ranks_identical']} |"
            )
        if overhead:
            lines += [
                "",
                f"Global-mode overhead: {overhead['global_minus_local_ms']:+.1f} ms/step "
                f"({100 * overhead['relative']:+.1f}% vs local); one all-reduce of the gradient "
                f"({numel * 4 / 2**20:.1f} MiB fp32) timed alone: {ar_ms:.2f} ms.",
            ]
        text = "\n".join(lines)
        print(text)
        if not args.no_save:
            tag = args.tag or f"{device.type}_{world}rank"
            os.makedirs(RESULTS, exist_ok=True)
            with open(os.path.join(RESULTS, f"ddp_train_{tag}.json"), "w") as f:
                json.dump(result, f, indent=1)
            with open(os.path.join(RESULTS, f"ddp_train_{tag}.md"), "w") as f:
                f.write(text + "\n")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
