"""Optimizer-step cost of GSAM, FriendlySAM and LookSAM against FusedSAM's SAM step, interleaved.

    python benchmarks/variant_step.py                  # the frontier's MnistCNN parameters, 1 thread
    python benchmarks/variant_step.py --old 2a34c51    # also the variants as they were at that commit

Fixed gradients (one backward of the frontier's MnistCNN, width 16, on an 8x8 batch of 64), SGD
lr 1e-4, momentum 0.9, weight decay 5e-4.  Every step first copies the fixed gradients back into
``p.grad`` (the variants write into the gradients; the copy is the same for every row), then runs
first_step + second_step (LookSAM k=5: a full step every fifth, reuse steps in between; its row is
the mean over its cycle).  Each round times ``--steps`` steps of every method in turn (order
rotated each round); reported: per-step time median and p10-p90 over rounds, and the median of the
per-round ratios to FusedSAM's SAM step on the same backend (paired, same round).  The step only:
no forward/backward.  The old variants ran their extra math in foreach ops whatever the backend;
their rows use the named backend for FusedSAM's core.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _step_bench import KW, cnn_problem, interleaved_ms, report

import fastsam
from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("__init__.py", "_base.py", "_ops.py", "gsam.py", "looksam.py", "friendly_sam.py")


def _old_variants(rev: str):
    """fastsam/variants as committed at ``rev``, loaded as the package ``fastsam._old_variants``
    (so that their relative imports of fastsam.optim and fastsam.backends resolve)."""
    d = tempfile.mkdtemp()
    for name in FILES:
        src = subprocess.run(
            ["git", "show", f"{rev}:fastsam/variants/{name}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        if name == "__init__.py":
            src = ""  # the classes are imported one by one below
        with open(os.path.join(d, name), "w") as f:
            f.write(src)
    spec = importlib.util.spec_from_file_location(
        "fastsam._old_variants", os.path.join(d, "__init__.py"), submodule_search_locations=[d]
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["fastsam._old_variants"] = pkg
    spec.loader.exec_module(pkg)
    mods = {n: importlib.import_module(f"fastsam._old_variants.{n}") for n in ("gsam", "looksam", "friendly_sam")}
    return mods["gsam"].GSAM, mods["friendly_sam"].FriendlySAM, mods["looksam"].LookSAM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old", default=None, help="a git revision: also time the variants as they were there")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    grads, fresh = cnn_problem()
    cpu_backends = [b for b in ("foreach", "cpp") if b in backends.available(torch.device("cpu"))]
    classes = {"GSAM": GSAM, "FriendlySAM": FriendlySAM, "LookSAM": LookSAM}
    old = dict(zip(("GSAM", "FriendlySAM", "LookSAM"), _old_variants(a.old))) if a.old else {}
    opts, params = {}, {}
    for b in cpu_backends:
        rows = [(f"FusedSAM {b}", FusedSAM, {})]
        rows += [(f"{n} {b}", c, {"k": 5} if n == "LookSAM" else {}) for n, c in classes.items()]
        rows += [(f"{n} {b} @{a.old}", c, {"k": 5} if n == "LookSAM" else {}) for n, c in old.items()]
        for name, cls, extra in rows:
            ps = fresh()
            opts[name] = cls(ps, torch.optim.SGD, rho=0.05, backend=b, **extra, **KW)
            params[name] = ps

    def stepper(name):
        o, gs = opts[name], [p.grad for p in params[name]]

        def step():
            torch._foreach_copy_(gs, grads)
            o.first_step()
            o.second_step()

        return step

    steps = -(-a.steps // 5) * 5  # whole LookSAM cycles
    # warm-up: buffers, buckets, caches (two LookSAM cycles)
    times = interleaved_ms({k: stepper(k) for k in opts}, a.rounds, steps, warmup=10)
    report(
        times,
        lambda k: f"FusedSAM {k.split()[1]}",
        "x FusedSAM",
        34,
        f"{len(grads)} tensors, {sum(g.numel() for g in grads)} elements; {a.rounds} rounds x {steps} steps, "
        f"{a.threads} thread(s); fastsam at {fastsam.__file__}",
    )


if __name__ == "__main__":
    main()
