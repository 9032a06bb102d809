"""Quick timing of the cpp backend (the CPU twin) against its floor.

The optimizer side of one SAM step (first_step + second_step, gradients in
place, SGD+momentum, fp32) at the CIFAR ResNet-18 parameter set (62 tensors,
11.2M elements): FusedSAM(backend="cpp") against the per-parameter reference
(benchmarks/reference_sam.py), plus each cpp op alone.  The floor is bytes
moved / measured copy bandwidth (a tensor copy_, counted as read + write),
measured twice: with one tensor as large as the whole parameter set (the
floor: same cache regime as the step; this machine's 300 MiB L3 holds much of
a ResNet-18 step's ~180 MB working set) and with 256 MiB tensors (DRAM).  benchmarks/optimizer_step.py is the full comparison; this script
adds the per-op split.

    python csrc/bench_cpu.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
from optimizer_step import resnet18_cifar_shapes  # noqa: E402
from reference_sam import ReferenceSAM  # noqa: E402

from fastsam import FusedSAM  # noqa: E402
from fastsam.backends import cpp  # noqa: E402


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    ok, why = cpp.is_available(torch.device("cpu"))
    if not ok:
        sys.exit(why)
    shapes = resnet18_cifar_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)

    def copy_bw(numel):  # GB/s, read + write
        src, dst = torch.randn(numel), torch.empty(numel)
        return 2 * numel * 4 / median_ms(lambda: dst.copy_(src), args.repeats) / 1e6

    bw, bw_dram = copy_bw(n), copy_bw(64 << 20)

    def sam(cls, **kw):
        params = [torch.randn(s, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = cls(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)
        return lambda: (opt.first_step(), opt.second_step())

    rows = [("reference (per-parameter SAM)", median_ms(sam(ReferenceSAM), args.repeats), 64),
            ("FusedSAM backend=cpp", median_ms(sam(FusedSAM, backend="cpp"), args.repeats), 44)]

    p = [torch.randn(s) for s in shapes]
    g, c, b = ([torch.randn(s) for s in shapes] for _ in range(3))
    one, zero = torch.tensor(1e-3), torch.tensor(0.0)
    ops = [
        ("  grad_sq_norm", lambda: cpp.grad_sq_norm(g), 4),
        ("  perturb", lambda: cpp.perturb(p, g, c, one, zero, False), 16),
        ("  restore_sgd_step", lambda: cpp.restore_sgd_step(
            p, g, c, b, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
            first=False, grad_scale=None, skip=zero), 20),
    ]
    rows += [(name, median_ms(fn, args.repeats), nbytes) for name, fn, nbytes in ops]

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}; ResNet-18 set: {len(shapes)} tensors, {n / 1e6:.1f}M "
          f"elements; copy bandwidth (r+w) {bw:.1f} GB/s at the set's size, {bw_dram:.1f} GB/s at 256 MiB; "
          f"median of {args.repeats}")
    print(f"{'variant':34s} {'ms':>8s} {'bytes/elem':>10s} {'floor ms':>9s} {'x floor':>8s} {'x ref':>6s}")
    ref_ms = rows[0][1]
    for name, ms, per_elem in rows:
        floor = per_elem * n / bw / 1e6
        ratio = f"{ms / ref_ms:.2f}" if not name.startswith("  ") else ""
        print(f"{name:34s} {ms:8.2f} {per_elem:10d} {floor:9.2f} {ms / floor:8.2f} {ratio:>6s}")


if __name__ == "__main__":
    main()
