"""Shared by the benchmark scripts: machine description, parameter sets, step timing, memory, result files."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastsam import backends as fastsam_backends

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on; written into every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastsam_commit": _git_commit(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def machine_line(info: Dict[str, Any]) -> str:
    """One line for the top of a markdown report."""
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    extra = ""
    if info.get("cuda"):
        onoff = lambda b: "on" if b else "off"
        extra = f", CUDA {info['cuda']}, TF32 matmul {onoff(info['tf32_matmul'])} / conv {onoff(info['tf32_cudnn'])}"
    load = info.get("load_average_at_start")
    load_s = f", load average at start {load[0]:.2f}" if load else ""
    return (
        f"Machine: {where}{extra}; torch {info['torch']}, triton {info['triton'] or 'not installed'}; "
        f"fastsam {info['fastsam_commit']}; {info['date']}{load_s}"
    )


def device_tag(device: torch.device) -> str:
    """'cpu', or the GPU's short name ('h200', 'a100-sxm4-80gb'), for result file names."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    for prefix in ("nvidia ", "geforce "):
        name = name.replace(prefix, "")
    return "-".join(name.split()) or "cuda"


# ----------------------------------------------------------------------------- parameter sets
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
            shapes += [
                (planes, cin, 1, 1),
                (planes,),
                (planes,),
                (planes, planes, 3, 3),
                (planes,),
                (planes,),
                (planes * 4, planes, 1, 1),
                (planes * 4,),
                (planes * 4,),
            ]
            if b == 0:
                shapes += [(planes * 4, cin, 1, 1), (planes * 4,), (planes * 4,)]
            cin = planes * 4
    return shapes + [(1000, 2048), (1000,)]


# The optimizer benchmarks' parameter sets (shapes only: the optimizer side needs no model).
PARAM_SETS = {"resnet18_cifar": resnet18_cifar_shapes, "resnet50": resnet50_shapes, "tiny": lambda: [(3, 5), (7,)]}


# ----------------------------------------------------------------------------- timing
EVICT_BYTES = 64 << 20  # twice the last-level cache of the CPUs measured here


def cache_evictor() -> Callable[[], None]:
    """A call that copies EVICT_BYTES on the CPU, so that what runs next finds none of its data,
    Python objects or tensor metadata in cache: as after a forward and backward pass that stream
    more than the caches hold."""
    src, dst = torch.empty(EVICT_BYTES, dtype=torch.uint8), torch.empty(EVICT_BYTES, dtype=torch.uint8)
    return lambda: dst.copy_(src)


class StepTimer:
    """Times a sequence of steps. On CUDA each step is bracketed by events and read after one
    synchronize at the end of the block (no per-step host sync); on the CPU, perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: List = []

    def time(self, fn: Callable[[], Any]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self._pending.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self._pending.append(time.perf_counter() - t0)

    def collect(self) -> List[float]:
        """Seconds per step since the last collect."""
        if self.cuda:
            torch.cuda.synchronize()
            out = [s.elapsed_time(e) / 1e3 for s, e in self._pending]
        else:
            out = list(self._pending)
        self._pending = []
        return out


def interleaved(
    fns: Dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    block: int = 1,
    device: Optional[torch.device] = None,
) -> Dict[str, List[float]]:
    """Seconds per call of each function, one value per round: every round runs a block of
    ``block`` calls of each function in turn, the order rotated every round, so that drift
    (clocks, other jobs on a shared machine) hits all of them alike.  ``warmup`` untimed rounds
    first.  On CUDA the calls are timed with events, read once per round."""
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    timer = StepTimer(device or torch.device("cpu"))
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            for _ in range(block):
                timer.time(fns[k])
        per_call = timer.collect()
        for i, k in enumerate(order):
            times[k].append(sum(per_call[i * block : (i + 1) * block]) / block)
    return times


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(times: Sequence[float]) -> Dict[str, float]:
    return {
        "median_s": statistics.median(times) if times else math.nan,
        "p20_s": percentile(times, 0.2),
        "p80_s": percentile(times, 0.8),
        "total_s": float(sum(times)),
        "n": len(times),
    }


# ----------------------------------------------------------------------------- memory
def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of the CPU tensors that ``fn`` allocates and holds at once (parameters, gradients,
    optimizer state, activations, temporaries, including those a C++ kernel allocates), from the
    CPU allocator's events under the profiler (``profile_memory``): the CPU's counterpart of
    ``torch.cuda.max_memory_allocated`` minus what was allocated before.  Unlike the process's
    resident set it sees neither malloc's arenas, fragmentation and retention nor code pages,
    thread stacks and the Python heap.  Frees of tensors allocated before ``fn`` (garbage of
    earlier runs collected meanwhile) do not count."""
    import gc

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []  # (time, address, bytes: > 0 allocated, < 0 freed)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    live: Dict[int, int] = {}
    now = peak = 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            now += size
            peak = max(peak, now)
        elif ptr in live:
            now -= live.pop(ptr)
    return peak


def in_child(fn: Callable[[], float]) -> float:
    """Run ``fn`` in a forked child and return the float it returns (NaN if it fails)."""
    if not hasattr(os, "fork") or not os.path.exists("/proc/self/clear_refs"):
        return math.nan
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the parent's code
        os.close(r)
        try:
            val = float(fn())
        except BaseException:
            val = math.nan
        os.write(w, repr(val).encode())
        os.close(w)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        return float(data)
    except ValueError:
        return math.nan


# ----------------------------------------------------------------------------- results
def fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: str, stem: str, data: Dict[str, Any], markdown: str) -> List[str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=1, default=float)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(markdown.rstrip() + "\n")
    return paths


def available_backends(device: torch.device, only: Optional[List[str]] = None) -> List[str]:
    """Backends FusedSAM can run on ``device``: foreach always; triton/cuda on CUDA; cpp on the CPU."""
    # Triton on the CPU would be its interpreter (a correctness tool, not a speed path).
    return [
        n
        for n in fastsam_backends.available(device, build=True)
        if (n != "triton" or device.type == "cuda") and (not only or n in only)
    ]
