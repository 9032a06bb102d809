"""The task runner of the science benchmarks.

An experiment is a list of tasks (train one run, measure one final model, ...), each a pure
function of (args, its inputs): the same numbers whether the tasks run one after another in this
process (``jobs`` 1) or in ``jobs`` spawned worker processes of ``threads`` torch threads each.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional


class Task:
    """``fn(a, *args(results))`` once the tasks named in ``deps`` are done; ``cost`` (about SGD
    epochs) only for the ETA. ``fn`` returns a dict; its "seconds" and "parts" are the timings."""

    def __init__(self, name: str, fn: Callable, args=(), deps=(), cost: float = 1.0):
        self.name, self.fn, self.deps, self.cost = name, fn, tuple(deps), float(cost)
        self.args = args if callable(args) else (lambda res, _a=tuple(args): _a)


def _worker_init(threads):
    import torch

    torch.set_num_threads(threads)


def _timed(fn, a, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(a, *args)
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return out


def run_tasks(a, tasks: List[Task], label: str, done: Optional[Dict[str, dict]] = None) -> Dict[str, dict]:
    """Run the tasks, ``a.jobs`` at a time (worker processes, spawned, ``a.threads`` torch threads
    each), in list order as their dependencies allow; progress (tasks and an ETA from the costs) on
    stderr. ``done``: results of tasks already run (by name), which are not run again."""
    res: Dict[str, dict] = dict(done or {})
    tasks = [t for t in tasks if t.name not in res]
    total = sum(t.cost for t in tasks)
    t0 = time.perf_counter()
    done_cost = [0.0]

    def report(t):
        done_cost[0] += t.cost
        el = time.perf_counter() - t0
        eta = el / done_cost[0] * (total - done_cost[0]) if done_cost[0] else math.nan
        r = res[t.name]
        extra = f", test {r['test_acc']:.2f}%" if "test_acc" in r else ""
        print(
            f"[{label}: {len(res)}/{len(tasks)} tasks, {el:.0f} s, ETA {eta:.0f} s] {t.name} done in "
            f"{r['seconds']:.0f} s{extra}",
            file=sys.stderr,
            flush=True,
        )

    if a.jobs <= 1:
        for t in tasks:
            missing = [d for d in t.deps if d not in res]
            if missing:
                raise RuntimeError(f"task {t.name} listed before its dependencies {missing}")
            res[t.name] = _timed(t.fn, a, *t.args(res))
            report(t)
        return res
    import concurrent.futures as cf
    import multiprocessing

    todo = list(tasks)
    running = {}
    with cf.ProcessPoolExecutor(
        a.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(a.threads,)
    ) as ex:
        while todo or running:
            for t in [t for t in todo if all(d in res for d in t.deps)]:
                running[ex.submit(_timed, t.fn, a, *t.args(res))] = t
                todo.remove(t)
            if not running:
                raise RuntimeError(f"tasks {[t.name for t in todo]} wait on dependencies that are not tasks")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                t = running.pop(f)
                res[t.name] = f.result()
                report(t)
    return res


def default_jobs(device: str) -> int:
    """Two worker processes on a CPU (at most one per core), one on a GPU."""
    import torch

    return 1 if torch.device(device).type != "cpu" else max(1, min(2, os.cpu_count() or 1))


def timing_line(a, parts: Dict[str, float], wall: float, cpu: float) -> str:
    """Where the time went: wall time inside the tasks by part, their CPU time, the wall time and load."""
    busy = sum(parts.values())
    shown = ", ".join(f"{k} {v:.0f} s ({100 * v / busy:.0f}%)" for k, v in parts.items() if v > 0) if busy else "-"
    return (
        f"Wall time {wall:.0f} s with --jobs {a.jobs} (worker processes of {a.threads} torch thread(s)), "
        f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; wall time inside the tasks "
        f"{busy:.0f} s: {shown}; CPU time of the tasks {cpu:.0f} s (an otherwise idle machine needs at "
        f"least that / jobs, more where the last tasks leave workers idle)."
    )


class Progress:
    """Epochs done and an ETA, on stderr."""

    def __init__(self, total_epochs, label):
        self.total, self.done, self.t0, self.label = total_epochs, 0, time.perf_counter(), label

    def epoch(self, msg):
        self.done += 1
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        print(
            f"[{self.label} {self.done}/{self.total} epochs, {el:.0f} s, ETA {eta:.0f} s] {msg}",
            file=sys.stderr,
            flush=True,
        )
