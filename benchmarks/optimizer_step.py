"""The optimizer side of one SAM step (first_step + second_step, no forward/backward).

Parameter sets: the shapes of a CIFAR ResNet-18 (62 tensors, 11.2M) and of
torchvision's ResNet-50 (161 tensors, 25.6M), fp32, SGD with momentum.
Variants: the per-parameter reference SAM (benchmarks/reference_sam.py) and
FusedSAM with every backend that runs on the device.  All variants are timed
round-robin in one process (drift cannot favour one); medians of --repeats
timed steps after warm-up.  Effective GB/s counts the bytes each variant must
move (see BYTES_PER_ELEMENT), and a large copy_ measures the ceiling.

    python benchmarks/optimizer_step.py [--device cuda] [--repeats 30] [--out-dir benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from reference_sam import ReferenceSAM  # noqa: E402

from fastsam import FusedSAM, backends  # noqa: E402

# Bytes per parameter element (fp32: x4) that each design must move for one
# SAM step with SGD+momentum, counted pass by pass (r = read, w = write; g =
# gradient, w = weight, c = restore copy, b = momentum buffer, t = temporary).
BYTES_PER_ELEMENT = {
    # norm r g | perturb r w,g w w,c | check r g | restore+sgd r c,g,b w w,b
    "fused": (1 + 4 + 1 + 5) * 4,
    # foreach on the CPU: norm r g | copy r w w c | add_ r w,g w w | check r g |
    # restore r c w w | buf*=m r b w b | buf+=g r b,g w b | w-=lr*buf r w,b w w
    "foreach": (1 + 2 + 3 + 1 + 2 + 2 + 3 + 3) * 4,
    # reference: norm of 1.0*g r g w t, r t | clone r w w c | e=(1.0*g)*s r g w t, r t w t |
    # w+=e r w,t w w | restore: pointer swap | torch SGD: buf*=m, buf+=g, w-=lr*buf
    "reference": (3 + 2 + 4 + 3 + 0 + 2 + 3 + 3) * 4,
}


def resnet18_cifar_shapes():
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            s = stride if b == 0 else 1
            shapes += [(planes, cin, 3, 3), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,)]
            if s != 1 or cin != planes:
                shapes += [(planes, cin, 1, 1), (planes,), (planes,)]
            cin = planes
    return shapes + [(10, 512), (10,)]


def resnet50_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, cin, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, cin, 1, 1), (planes * 4,), (planes * 4,)]
            cin = planes * 4
    return shapes + [(1000, 2048), (1000,)]


PARAM_SETS = {"resnet18_cifar": resnet18_cifar_shapes, "resnet50": resnet50_shapes}


class Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn) -> float:
        """Seconds for one call of fn."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def copy_bandwidth(device, numel, timer, repeats) -> float:
    """GB/s of a large copy_ (read + write counted)."""
    a = torch.randn(numel, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t = statistics.median(timer(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * a.numel() * a.element_size() / t / 1e9


def make_variant(name, shapes, device):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    kw = dict(lr=0.1, momentum=0.9)  # no weight decay: it would add a pass to the unfused variants
    if name == "reference":
        opt = ReferenceSAM(params, torch.optim.SGD, rho=0.05, **kw)
    else:
        opt = FusedSAM(params, torch.optim.SGD, rho=0.05, backend=name, **kw)

    def step():  # the gradients stay in place: the same tensors serve both passes
        opt.first_step()
        opt.second_step()

    return step


def available_backends(device):
    # triton on the CPU is the interpreter: a test vehicle, not a backend to time
    return [n for n in backends.available(device, build=True) if n != "triton" or device.type == "cuda"]


def run(args):
    device = torch.device(args.device)
    timer = Timer(device)
    variants = ["reference"] + available_backends(device)
    rows, ceilings = [], {}
    for set_name in args.param_sets:
        shapes = PARAM_SETS[set_name]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        # the ceiling: a copy as large as the parameter set, so it runs in the same
        # cache regime as the step (the CPU here has a 300 MiB L3)
        bw = ceilings[set_name] = copy_bandwidth(device, numel, timer, args.repeats)
        steps = {v: make_variant(v, shapes, device) for v in variants}
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        times = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v, fn in steps.items():  # round-robin
                times[v].append(timer(fn))
        ref_ms = statistics.median(times["reference"]) * 1e3
        for v in variants:
            ms = statistics.median(times[v]) * 1e3
            design = "reference" if v == "reference" else ("foreach" if v == "foreach" else "fused")
            nbytes = BYTES_PER_ELEMENT[design] * numel
            rows.append(dict(param_set=set_name, tensors=len(shapes), numel=numel, variant=v, ms=ms,
                             p20_ms=_common.percentile(times[v], 0.2) * 1e3,
                             p80_ms=_common.percentile(times[v], 0.8) * 1e3,
                             bytes=nbytes, gbps=nbytes / (ms / 1e3) / 1e9, ratio_to_reference=ms / ref_ms,
                             copy_gbps=bw, pct_of_copy=100 * nbytes / (ms / 1e3) / 1e9 / bw,
                             floor_ms=nbytes / (bw * 1e9) * 1e3))
        del steps
    return dict(machine=_common.machine_info(device), copy_gbps=ceilings, repeats=args.repeats, rows=rows)


def to_markdown(res) -> str:
    lines = ["Optimizer side of one SAM step (SGD+momentum, fp32), median of "
             f"{res['repeats']}; copy ceiling = a copy_ as large as the parameter set, "
             + ", ".join(f"{k} {v:.1f} GB/s" for k, v in res["copy_gbps"].items()) + ".",
             "",
             _common.machine_line(res["machine"]),
             "",
             "| param set | tensors | elements | variant | median ms | p20–p80 ms | bytes moved | GB/s | "
             "% of copy bw | floor ms | ratio to reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['param_set']} | {r['tensors']} | {r['numel'] / 1e6:.1f}M | {r['variant']} | "
                     f"{r['ms']:.2f} | {r['p20_ms']:.2f}–{r['p80_ms']:.2f} | {r['bytes'] / 1e6:.0f} MB | "
                     f"{r['gbps']:.1f} | {r['pct_of_copy']:.0f}% | {r['floor_ms']:.2f} | "
                     f"{r['ratio_to_reference']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--param-sets", nargs="+", default=list(PARAM_SETS), choices=list(PARAM_SETS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: cpu or the GPU's short name)")
    args = ap.parse_args(argv)
    res = run(args)
    md = to_markdown(res)
    os.makedirs(args.out_dir, exist_ok=True)
    tag = args.tag or _common.device_tag(torch.device(args.device))
    base = os.path.join(args.out_dir, f"optimizer_step_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
