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
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from late_phase_mnist import MnistCNN  # noqa: E402

import fastsam  # noqa: E402
from fastsam import FriendlySAM, FusedSAM, GSAM, LookSAM, backends  # noqa: E402

KW = dict(lr=1e-4, momentum=0.9, weight_decay=5e-4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("__init__.py", "_base.py", "_ops.py", "gsam.py", "looksam.py", "friendly_sam.py")


def _old_variants(rev: str):
    """fastsam/variants as committed at ``rev``, loaded as the package ``fastsam._old_variants``
    (so that their relative imports of fastsam.optim and fastsam.backends resolve)."""
    d = tempfile.mkdtemp()
    for name in FILES:
        src = subprocess.run(["git", "show", f"{rev}:fastsam/variants/{name}"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        if name == "__init__.py":
            src = ""  # the classes are imported one by one below
        with open(os.path.join(d, name), "w") as f:
            f.write(src)
    spec = importlib.util.spec_from_file_location("fastsam._old_variants", os.path.join(d, "__init__.py"),
                                                  submodule_search_locations=[d])
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
    torch.manual_seed(0)
    model = MnistCNN(16, 10, 1)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def fresh():
        ps = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return ps

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

    fns = {k: stepper(k) for k in opts}
    for f in fns.values():  # warm-up: buffers, buckets, caches (two LookSAM cycles)
        for _ in range(10):
            f()
    times = {k: [] for k in fns}
    names = list(fns)
    steps = -(-a.steps // 5) * 5  # whole LookSAM cycles
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[k].append((time.perf_counter() - t0) / steps * 1e3)
    info = _common.machine_info(torch.device("cpu"))
    print(_common.machine_line(info))
    print(f"load average {os.getloadavg()[0]:.2f} at the end; {len(grads)} tensors, "
          f"{sum(g.numel() for g in grads)} elements; {a.rounds} rounds x {steps} steps, {a.threads} thread(s); "
          f"fastsam at {fastsam.__file__}")
    print(f"{'method':34s} {'ms/step':>8s} {'p10-p90':>13s} {'x FusedSAM':>11s} {'ratio p10-p90':>14s}")
    for k in names:
        ref = times[f"FusedSAM {k.split()[1]}"]
        ts = sorted(times[k])
        ratios = sorted(t / s for t, s in zip(times[k], ref))
        print(f"{k:34s} {statistics.median(ts):8.3f} {_common.percentile(ts, 0.1):6.3f}-"
              f"{_common.percentile(ts, 0.9):6.3f} {statistics.median(ratios):11.2f} "
              f"{_common.percentile(ratios, 0.1):6.2f}-{_common.percentile(ratios, 0.9):.2f}")


if __name__ == "__main__":
    main()
