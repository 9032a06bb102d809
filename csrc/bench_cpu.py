"""Each op of the cpp backend (the CPU twin) on every code path, against torch's fused SGD step.

The ops of one SAM step (grad norm, perturb, restore + SGD) at a parameter set's shapes
(benchmarks/_common.py: PARAM_SETS), on every instruction set this CPU runs (base = SSE2, avx2,
avx512) with and without streaming stores; torch's SGD(fused=True) step in float32 at the same
shapes is the attainable bytes per second.  All rows interleaved in one process (order rotated
every round); median per row and GB/s of the accesses each op must make (norm 1, perturb 4,
restore + SGD 5 per element).  benchmarks/optimizer_step.py is the whole-step comparison.

    python csrc/bench_cpu.py [--dtype fp32|bf16] [--param-set resnet18_cifar] [--threads 1] [--rounds 11]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import _common  # noqa: E402

from fastsam.backends import cpp  # noqa: E402

NEVER = 1 << 62


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp64"])
    ap.add_argument("--param-set", default="resnet18_cifar", choices=list(_common.PARAM_SETS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args(argv)
    ok, why = cpp.is_available(torch.device("cpu"))
    if not ok:
        sys.exit(why)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[args.dtype]
    shapes = _common.PARAM_SETS[args.param_set]()
    p, g, c, b = ([torch.randn(s).to(dtype) for s in shapes] for _ in range(4))
    n = sum(t.numel() for t in p)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scalars, zero = torch.tensor([0.0, 1e-3], dtype=acc), torch.tensor(0.0, dtype=acc)
    out = torch.zeros(2, dtype=torch.float64)
    sgd_args = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False, first=False)
    ops = {
        "norm + perturb": (5, lambda: cpp.norm_perturb(p, g, c, out, 1e-3, False, eps=1e-12)),
        "norm + restore + SGD": (6, lambda: cpp.norm_restore_sgd_step(p, g, c, b, out, None, **sgd_args)),
        "grad norm": (1, lambda: cpp.grad_sq_norm(g)),
        "perturb": (4, lambda: cpp.perturb(p, g, c, scalars, 1.0, False)),
        "restore + SGD": (5, lambda: cpp.restore_sgd_step(
            p, g, c, b, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
            first=False, grad_scale=None, skip=zero)),
    }
    default = cpp.code_path()
    isa0, stream0 = default.split(";")[0], int(default.rsplit(">= ", 1)[1].split()[0])
    isas = cpp.instruction_sets()
    rows, accesses, size = {}, {}, {}
    for isa in isas:
        for stream in (NEVER, 0):
            for name, (k, fn) in ops.items():
                def run(fn=fn, isa=isa, stream=stream):
                    torch.ops.fastsam.cpu_kernels(isa, stream)
                    fn()
                key = f"{name} [{isa}{', streaming' if stream == 0 else ''}]"
                rows[key], accesses[key], size[key] = run, k, p[0].element_size()
    fp = [torch.nn.Parameter(t.float()) for t in p]
    for q, gg in zip(fp, g):
        q.grad = gg.float()
    sgd = torch.optim.SGD(fp, lr=0.1, momentum=0.9, fused=True)
    rows["torch SGD(fused=True) step, fp32"], accesses["torch SGD(fused=True) step, fp32"] = sgd.step, 5
    size["torch SGD(fused=True) step, fp32"] = 4
    try:
        times = _common.interleaved(rows, rounds=args.rounds, warmup=2)
    finally:
        torch.ops.fastsam.cpu_kernels(isa0, stream0)
    print(_common.machine_line(_common.machine_info(torch.device("cpu"))))
    print(f"{args.param_set}: {len(shapes)} tensors, {n / 1e6:.1f}M elements, {args.dtype}; {args.threads} thread(s); "
          f"median of {args.rounds} interleaved rounds; load average after {os.getloadavg()[0]:.2f}; "
          f"default code path: {default}")
    print(f"{'op [code path]':44s} {'ms':>8s} {'p20-p80':>15s} {'GB/s':>7s}")
    for key, ts in times.items():
        ms = statistics.median(ts) * 1e3
        gbps = accesses[key] * n * size[key] / (ms / 1e3) / 1e9
        print(f"{key:44s} {ms:8.2f} {_common.percentile(ts, 0.2) * 1e3:7.2f}-{_common.percentile(ts, 0.8) * 1e3:<7.2f} "
              f"{gbps:7.1f}")


if __name__ == "__main__":
    main()
