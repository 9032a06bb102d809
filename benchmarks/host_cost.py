"""Host cost of a SAM step: FusedSAM's first_step + second_step against one torch.optim.SGD step.

Many tiny parameters (one element each by default) make the kernels' work negligible, so what is
timed is the Python and dispatch cost that, on a GPU, bounds a step whose kernels take ~0.3 ms
(ResNet-50's 161 tensors).  SGD with momentum 0.9, weight decay; 161 and 1,000 tensors; one
intra-op thread; the variants are timed round-robin (each round: a block of steps of every
variant), so load on a shared machine hits all of them alike.  Reported: median per step, the
20-80% spread, and each median as a ratio to torch's fused SGD step in the same run.

--cold times every step after copying 64 MiB (blocks of one step): the caches then hold none of
the step's Python objects or tensor metadata, as after a forward and backward pass that stream
more than the caches hold; each tensor a call touches first then costs a few misses to memory.

    python benchmarks/host_cost.py                       # CPU: cpp (if built), foreach, triton (GPU)
    python benchmarks/host_cost.py --sizes 62 --cold     # cold caches, ResNet-18's tensor count
    python benchmarks/host_cost.py --device cuda         # on a GPU: host time, device synchronised per block
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

from fastsam import FusedSAM, backends

KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def _params(n, device):
    ps = [torch.nn.Parameter(torch.randn(1, device=device)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _variants(n, device, names):
    out = {}
    ps = _params(n, device)
    torch_fused = torch.optim.SGD(ps, fused=True, **KW)
    out["torch SGD fused=True (1 step)"] = torch_fused.step
    ps = _params(n, device)
    torch_foreach = torch.optim.SGD(ps, foreach=True, **KW)
    out["torch SGD foreach=True (1 step)"] = torch_foreach.step
    for name in names:
        ps = _params(n, device)
        opt = FusedSAM(ps, torch.optim.SGD, rho=0.05, backend=name, **KW)

        def sam(opt=opt):
            opt.first_step()
            opt.second_step()

        out[f"FusedSAM {name} (first+second)"] = sam
    return out


def run(device, sizes, repeats, block, names, cold=False):
    """``cold``: every block (of one step, then) follows ``_common.cache_evictor``'s copy."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, data = [], {}
    evict = _common.cache_evictor() if cold else None
    for n in sizes:
        variants = _variants(n, device, names)
        for fn in variants.values():  # warm-up: state, caches, JIT
            for _ in range(3):
                fn()
        sync()
        times = {k: [] for k in variants}
        for _ in range(repeats):
            for k, fn in variants.items():
                if evict is not None:
                    evict()
                t0 = time.perf_counter()
                for _ in range(block):
                    fn()
                sync()
                times[k].append((time.perf_counter() - t0) / block)
        ref = _common.summarize(times["torch SGD fused=True (1 step)"])["median_s"]
        for k, ts in times.items():
            s = _common.summarize(ts)
            data[f"{n}/{k}"] = dict(s, tensors=n, ratio_to_torch_fused=s["median_s"] / ref)
            rows.append([n, k, s["median_s"] * 1e3, s["p20_s"] * 1e3, s["p80_s"] * 1e3, s["median_s"] / ref])
    return rows, data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="161,1000")
    ap.add_argument("--repeats", type=int, default=15, help="rounds (each: one block of every variant)")
    ap.add_argument("--block", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--backends", default=None, help="comma list (default: every backend that runs here)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="every step after a 64 MiB copy (caches cold; blocks of 1)")
    ap.add_argument("--out-dir", default=_common.RESULTS_DIR)
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    names = (
        a.backends.split(",")
        if a.backends
        else [b for b in backends.available(device, build=True) if not (b == "triton" and device.type == "cpu")]
    )
    info = _common.machine_info(device)
    block = 1 if a.cold else a.block
    rows, data = run(device, [int(s) for s in a.sizes.split(",")], a.repeats, block, names, a.cold)
    md = [
        "# Host cost of a SAM step (first_step + second_step) vs one torch SGD step",
        "",
        _common.machine_line(info),
        "",
        f"SGD momentum 0.9, wd 5e-4, one-element tensors, {a.threads} thread(s); {a.repeats} interleaved "
        f"rounds of {block} steps{', each after a 64 MiB copy (cold caches)' if a.cold else ''}; ms per step "
        "(median, p20, p80); ratio = median / torch fused SGD's median in the same run.",
        "",
        _common.markdown_table(["tensors", "variant", "median ms", "p20", "p80", "ratio"], rows),
    ]
    tag = a.tag or _common.device_tag(device) + ("_cold" if a.cold else "")
    paths = _common.write_results(a.out_dir, f"host_cost_{tag}", {"machine": info, "results": data}, "\n".join(md))
    print("\n".join(md))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
