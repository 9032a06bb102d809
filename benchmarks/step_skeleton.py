"""What the bf16 SAM step's data movement allows on this CPU: the step's reads and writes in plain
AVX2 loops (benchmarks/step_skeleton.c, built here with the C compiler), against FusedSAM's step.

Rows, each timed after a 64 MiB copy (the caches cold, as after a forward and backward pass), all
round-robin in one process, one thread, bf16 parameters at ResNet-18 (or --param-set) shapes:

  skeleton: moves only       the norm, perturbation (restore copy streamed), check and restore +
                             SGD's reads and writes, integer adds for math
  skeleton: math, truncating the step's float math, bf16 by truncation
  skeleton: math, rounding   the step's float math, rounding to nearest even (c10's, less the
                             NaN select): the cpp backend's semantics in loops with no host around them
  cpp ops, four              the cpp backend's four ops called directly (norm, perturb, norm, restore + SGD)
  cpp ops, two               its two passes with their norms (norm_perturb, norm_restore_sgd_step), the
                             ops FusedSAM's one-bucket step calls
  FusedSAM                   FusedSAM's first_step + second_step (backend cpp)
  torch fused fp32 SGD       torch.optim.SGD(fused=True).step on the same shapes in fp32: the mark

Each row's bytes/s (22 B per element: 11 reads and writes of 2 bytes) as a share of the fused fp32
step's (20 B per element), paired per round.  x86-64 with AVX2 only.

    python benchmarks/step_skeleton.py [--param-set resnet18_cifar] [--repeats 25]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

from fastsam import FusedSAM, backends

HERE = os.path.dirname(os.path.abspath(__file__))
MOMENTUM, LR, RHO = 0.9, 0.1, 0.05
# restore_sgd_step's arguments for the benchmark's plain SGD with momentum
SGD_ARGS = dict(lr=LR, momentum=MOMENTUM, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False, first=False)


def build(out_dir: str) -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise SystemExit("no C compiler (gcc or cc) on PATH")
    so = os.path.join(out_dir, "step_skeleton.so")
    src = os.path.join(HERE, "step_skeleton.c")
    subprocess.run([cc, "-O3", "-mavx2", "-mno-fma", "-shared", "-fPIC", src, "-o", so], check=True)
    lib = ctypes.CDLL(so)
    lib.skeleton_step.restype = ctypes.c_float
    return lib


def measure(lib: ctypes.CDLL, set_name: str, repeats: int) -> dict:
    shapes = _common.PARAM_SETS[set_name]()
    gen = torch.Generator().manual_seed(0)

    def lists():
        return [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes] for _ in range(4)]

    numel = sum(torch.Size(s).numel() for s in shapes)
    ptrs = lambda ts: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])
    lengths = (ctypes.c_long * len(shapes))(*[torch.Size(s).numel() for s in shapes])
    fns = {}
    for math, name in ((0, "skeleton: moves only"), (1, "skeleton: math, truncating"), (2, "skeleton: math, rounding")):
        held = lists()  # each row its own tensors: the integer skeleton leaves no numbers in them
        args = [ptrs(t) for t in held]
        fns[name] = lambda args=args, held=held, math=math: lib.skeleton_step(*args, lengths, len(shapes), math)
    if "cpp" in backends.available(torch.device("cpu"), build=True):
        from fastsam.backends import cpp

        w, g, c, b = lists()
        scalars, zero = torch.tensor([0.0, 1e-3], dtype=torch.float64), torch.tensor(0.0)

        def ops():
            cpp.grad_sq_norm(g)
            cpp.perturb(w, g, c, scalars, 1.0, False)
            cpp.grad_sq_norm(g)
            cpp.restore_sgd_step(w, g, c, b, **SGD_ARGS, grad_scale=None, skip=zero)

        fns["cpp ops, four"] = ops
        w2, g2, c2, b2 = lists()
        out, prev = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)

        def two_ops():
            cpp.norm_perturb(w2, g2, c2, out, RHO, False, eps=1e-12)
            cpp.norm_restore_sgd_step(w2, g2, c2, b2, out, prev, **SGD_ARGS)

        fns["cpp ops, two"] = two_ops
        params = [torch.nn.Parameter(t) for t in lists()[0]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt = FusedSAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, backend="cpp")
        fns["FusedSAM"] = lambda: (opt.first_step(), opt.second_step())
    fp32 = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in fp32:
        p.grad = torch.randn_like(p)
    fns["torch fused fp32 SGD"] = torch.optim.SGD(fp32, lr=LR, momentum=MOMENTUM, fused=True).step

    evict = _common.cache_evictor()
    for f in fns.values():
        f()
        f()
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            evict()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    mark = times["torch fused fp32 SGD"]
    rows = {}
    for k in names:
        share = statistics.median([(22 / 20) * m / t for t, m in zip(times[k], mark)])
        rows[k] = dict(
            ms=statistics.median(times[k]) * 1e3,
            p20_ms=_common.percentile(times[k], 0.2) * 1e3,
            p80_ms=_common.percentile(times[k], 0.8) * 1e3,
            share_of_fused_fp32_bytes_per_s=None if k == "torch fused fp32 SGD" else share,
        )
    return dict(param_set=set_name, numel=numel, tensors=len(shapes), repeats=repeats, rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--param-set", default="resnet18_cifar", choices=sorted(_common.PARAM_SETS))
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--out-dir", default=_common.RESULTS_DIR)
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise SystemExit(f"needs an x86-64 CPU with AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = measure(build(tmp), a.param_set, a.repeats)
    info = _common.machine_info(torch.device("cpu"))
    table = [
        [
            k,
            f"{r['ms']:.2f}",
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}",
            ""
            if r["share_of_fused_fp32_bytes_per_s"] is None
            else f"{100 * r['share_of_fused_fp32_bytes_per_s']:.0f}%",
        ]
        for k, r in out["rows"].items()
    ]
    md = [
        "# The bf16 SAM step's data movement, and what FusedSAM's step takes",
        "",
        _common.machine_line(info),
        "",
        f"{out['param_set']} shapes ({out['tensors']} tensors, {out['numel'] / 1e6:.1f}M), bf16, one thread, "
        f"every call after a 64 MiB copy; median of {out['repeats']} round-robin rounds; share = bytes/s "
        "(22 B/element) against torch's fused fp32 SGD step's (20 B/element), paired per round.",
        "",
        _common.markdown_table(["row", "median ms", "p20-p80 ms", "share of the fused fp32 step's bytes/s"], table),
    ]
    tag = a.tag or f"cpu_{a.param_set}"
    paths = _common.write_results(a.out_dir, f"step_skeleton_{tag}", {"machine": info, **out}, "\n".join(md))
    print("\n".join(md))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
