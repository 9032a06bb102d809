"""Optimizer-step cost of MomentumSAM against torch's SGD step and FusedSAM, interleaved.

    python benchmarks/msam_step.py                     # the frontier's MnistCNN parameters, 1 thread
    python benchmarks/msam_step.py --old 2a34c51       # also MomentumSAM as it was at that commit

Fixed gradients (one backward of the frontier's MnistCNN, width 16, on an 8x8 batch of 64),
SGD lr 1e-4, momentum 0.9, weight decay 5e-4.  Each round times ``--steps`` steps of every method
in turn (order rotated each round); reported: per-step time median and p10-p90 over rounds, and
the median of the per-round ratios to torch's SGD step (paired, same round).  The step only: no
forward/backward.  FusedSAM "plain" is a non-SAM step (``sam_active = False``), "SAM" is
first_step + second_step with the same gradient.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _step_bench import KW, cnn_problem, interleaved_ms, report

from fastsam import FusedSAM, MomentumSAM, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _old_class(rev: str):
    """MomentumSAM (and the _ops it imports) as committed at ``rev``, loaded from a temporary package."""
    d = tempfile.mkdtemp()
    pkg = os.path.join(d, "old_msam")
    os.makedirs(pkg)
    for name in ("momentum_sam.py", "_ops.py"):
        src = subprocess.run(
            ["git", "show", f"{rev}:fastsam/variants/{name}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        with open(os.path.join(pkg, name), "w") as f:
            f.write(src)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    sys.path.insert(0, d)
    spec = importlib.util.find_spec("old_msam.momentum_sam")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MomentumSAM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old", default=None, help="a git revision: also time MomentumSAM as it was there")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    grads, fresh = cnn_problem()
    cpu_backends = [b for b in ("foreach", "cpp") if b in backends.available(torch.device("cpu"))]
    opts = {"torch SGD": torch.optim.SGD(fresh(), **KW)}
    for b in cpu_backends:
        opts[f"MomentumSAM {b}"] = MomentumSAM(fresh(), torch.optim.SGD, rho=0.3, backend=b, **KW)
    if a.old:
        opts[f"MomentumSAM @{a.old}"] = _old_class(a.old)(fresh(), torch.optim.SGD, rho=0.3, **KW)
    for b in cpu_backends:
        o = FusedSAM(fresh(), torch.optim.SGD, rho=0.05, backend=b, **KW)
        o.sam_active = False
        opts[f"FusedSAM {b} plain"] = o
        opts[f"FusedSAM {b} SAM"] = FusedSAM(fresh(), torch.optim.SGD, rho=0.05, backend=b, **KW)

    def stepper(name, o):
        if name.endswith(" SAM"):
            return lambda: (o.first_step(), o.second_step())
        return o.step

    # warm-up: buffers, buckets, caches
    times = interleaved_ms({k: stepper(k, o) for k, o in opts.items()}, a.rounds, a.steps, warmup=5)
    report(
        times,
        lambda k: "torch SGD",
        "x torch SGD",
        28,
        f"{len(grads)} tensors, {sum(g.numel() for g in grads)} elements; {a.rounds} rounds x {a.steps} "
        f"steps, {a.threads} thread(s)",
    )


if __name__ == "__main__":
    main()
