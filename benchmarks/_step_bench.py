"""What benchmarks/msam_step.py and benchmarks/variant_step.py share: the fixed problem (the
frontier's MnistCNN parameters with one backward's gradients), the interleaved timing of
optimizer steps (a block of steps per method per round, order rotated every round) and the report
(median and p10-p90 over rounds, paired per-round ratios to a reference row)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List

import _common
import torch
from _lib.models import MnistCNN

KW = dict(lr=1e-4, momentum=0.9, weight_decay=5e-4)


def cnn_problem():
    """(grads, fresh): the fixed gradients, and a function returning new parameter copies holding them."""
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

    return grads, fresh


def interleaved_ms(
    fns: Dict[str, Callable[[], object]], rounds: int, steps: int, warmup: int
) -> Dict[str, List[float]]:
    """Per round, milliseconds per call of each function (``steps`` calls in a block)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[k].append((time.perf_counter() - t0) / steps * 1e3)
    return times


def report(times: Dict[str, List[float]], ref_of: Callable[[str], str], ref_label: str, width: int, setup: str) -> None:
    """Prints the machine, ``setup`` and one row per method: ms/step median, p10-p90, the median
    per-round ratio to ``ref_of(name)``'s row and its p10-p90."""
    print(_common.machine_line(_common.machine_info(torch.device("cpu"))))
    print(f"load average {os.getloadavg()[0]:.2f} at the end; {setup}")
    print(
        f"{'method':{width}s} {'ms/step':>8s} {'p10-p90':>13s} {ref_label:>{len(ref_label) + 1}s} "
        f"{'ratio p10-p90':>14s}"
    )
    pct = _common.percentile
    for k, ts in times.items():
        ts = sorted(ts)
        ratios = sorted(t / s for t, s in zip(times[k], times[ref_of(k)]))
        print(
            f"{k:{width}s} {statistics.median(ts):8.3f} {pct(ts, 0.1):6.3f}-{pct(ts, 0.9):6.3f} "
            f"{statistics.median(ratios):{len(ref_label) + 1}.2f} {pct(ratios, 0.1):6.2f}-{pct(ratios, 0.9):.2f}"
        )
