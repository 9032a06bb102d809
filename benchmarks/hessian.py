"""Hessian eigen-solver benchmark (issue 5): Lanczos vs power iteration, and the two HVP modes.

On a CIFAR-size ResNet-18-style network (narrow on the CPU) and one batch of random data, after
``--train-steps`` SGD steps on that batch (at initialisation the dominant eigenvalue is often
negative, which sends power iteration through a shift; a few steps give the usual picture of a
positive lambda_max):

1. time per Hessian-vector product and peak memory of one product, per ``hvp_mode``;
2. a long Lanczos reference run for the top-5 eigenvalues;
3. for k = 1 and k = 5: products and wall time until all k values are within ``--rel``
   (default 1e-3) of the reference, Lanczos vs power iteration (both stopped by that oracle, so
   neither solver's own stopping rule is measured), plus the products Lanczos's own residual
   rule (tol = rel) spends and the error it then has.

    python benchmarks/hessian.py                       # CPU default: a couple of minutes
    python benchmarks/hessian.py --device cuda --width-div 1 --batch 128
    python benchmarks/hessian.py --cost-only --batch 128 --tag cost_b128   # per-mode cost only

Prints a markdown table and writes ``benchmarks/results/hessian_<tag>.json`` and ``.md``.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the level before the product; on
the CPU the peak of the CPU allocator's live bytes during one product (after a warm-up product),
read from the allocation/free events that ``torch.profiler`` records with ``profile_memory=True``:
tensor bytes, exact up to memory that bypasses the c10 allocator (none for these models). The
JSON also keeps the older, coarse number (``peak_rss_mib``): the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs) above the resident set before the product, in a
forked child after a warm-up product and ``malloc_trim(0)``; it counts touched pages, not bytes.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common
from _lib import models

from fastsam import hessian


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width-div", type=int, default=None, help="divide ResNet-18 widths (default: 16 on CPU, 1 on GPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 16 on CPU, 128 on GPU)")
    p.add_argument("--model-mode", default="train", choices=hessian.MODEL_MODES)
    p.add_argument("--train-steps", type=int, default=20, help="SGD steps on the batch before measuring")
    p.add_argument("--rel", type=float, default=1e-3, help="target relative accuracy")
    p.add_argument(
        "--ref-iter",
        type=int,
        default=None,
        help="max Lanczos steps of the reference and Lanczos runs (default 90 CPU, 150 GPU)",
    )
    p.add_argument(
        "--power-max-iter", type=int, default=None, help="power products per eigenpair (default 150 CPU, 500 GPU)"
    )
    p.add_argument("--timing-reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only the per-mode cost (time and peak memory per HVP); skip the solver comparison",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- memory
def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    return math.nan


def cpu_alloc_peak_mib(fn) -> float:
    """Peak of the CPU allocator's live bytes (MiB) while ``fn()`` runs, above the level at its
    start: the running sum of the allocation (+) and free (-) events of the profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        )
    except Exception as e:
        print(f"allocator peak not measured ({type(e).__name__}: {e})")
        return math.nan
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def peak_rss_mib(op_factory, v) -> float:
    """Resident-set high-water mark above the resident set before one product (MiB, coarse)."""

    def child():
        import ctypes
        import gc

        with op_factory() as op:
            op.matvec(v)
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            base = _vm("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident-set high-water mark
            op.matvec(v)
            return _vm("VmHWM") - base

    return _common.in_child(child)


def peak_memory_mib(op_factory, v, device) -> float:
    """Extra peak memory (MiB) of one product, see the module docstring."""
    if device.type == "cuda":
        with op_factory() as op:
            op.matvec(v)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            op.matvec(v)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with op_factory() as op:
        op.matvec(v)  # warm-up
        return cpu_alloc_peak_mib(lambda: op.matvec(v))


# ----------------------------------------------------------------------------- solvers
def run_until(model, data, k, method, ref, rel, max_iter, mode, seed, lanczos_tol=None):
    """Products/time until the top-k estimates are all within ``rel`` of ``ref`` (oracle stop)."""
    t0 = time.perf_counter()
    out = {"hit_hvps": None, "hit_s": None, "own_hvps": None, "own_err": None}

    def err(vals):
        return max(abs(a - b) / abs(b) for a, b in zip(vals, ref))

    if method == "lanczos":

        def cb(info):
            vals = info["eigenvalues"].tolist()
            if len(vals) == k and out["hit_hvps"] is None and err(vals) <= rel:
                out.update(hit_hvps=info["num_hvps"], hit_s=time.perf_counter() - t0)
            if (
                len(vals) == k
                and out["own_hvps"] is None
                and bool((info["residuals"] <= lanczos_tol).all())
                and info["step"] >= k + 2
            ):
                out.update(own_hvps=info["num_hvps"], own_err=err(vals))
            return out["hit_hvps"] is not None and out["own_hvps"] is not None
    else:

        def cb(info):  # accept eigenpair `index` once it matches the reference value
            i = info["index"]
            return abs(info["eigenvalue"] - ref[i]) <= rel * abs(ref[i])

    # Lanczos: oracle stop only (its own rule is read off the same trajectory). Power: its own
    # residual rule (tol = rel) or the oracle, whichever comes first, so that it is not charged
    # for iterating past a good answer, e.g. while converging to a negative dominant eigenvalue.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = hessian.eigenvalues(
            model,
            F.cross_entropy,
            data,
            k=k,
            method=method,
            tol=1e-12 if method == "lanczos" else rel,
            max_iter=max_iter,
            seed=seed,
            model_mode=mode,
            callback=cb,
        )
    total_s = time.perf_counter() - t0
    out.update(
        total_hvps=r.num_hvps,
        shift=r.shift,
        total_s=total_s,
        final=r.eigenvalues.tolist(),
        final_err=err(r.eigenvalues.tolist()),
    )
    if method == "power":
        out.update(own_hvps=r.num_hvps, own_err=out["final_err"])
        if out["final_err"] <= rel:
            out.update(hit_hvps=r.num_hvps, hit_s=total_s)
    return out


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    width_div = a.width_div or (1 if gpu else 16)
    batch = a.batch or (128 if gpu else 16)
    ref_iter = a.ref_iter or (150 if gpu else 90)
    power_max = a.power_max_iter or (500 if gpu else 150)
    torch.manual_seed(a.seed)
    model, shape, nc = models.build("resnet18", width_div=width_div)
    model = model.to(device)
    x, y = torch.randn(batch, *shape, device=device), torch.randint(0, nc, (batch,), device=device)
    data = (x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(a.train_steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in model.parameters())
    info = _common.machine_info(device)
    print(_common.machine_line(info))
    print(
        f"ResNet-18 width {64 // width_div}, {n} parameters, batch {batch}, model_mode={a.model_mode}, "
        f"after {a.train_steps} SGD steps (loss {F.cross_entropy(model(x), y).item():.3f})"
    )

    # 1. per-mode cost (memory first, before anything else has grown the process)
    modes = {}
    v = torch.randn(n, device=device)
    for mode in hessian.HVP_MODES:

        def factory(mode=mode):
            return hessian.HessianOperator(
                model, F.cross_entropy, data, hvp_mode=mode, model_mode=a.model_mode, seed=a.seed
            )

        # first: before this process grows; not with >1 thread (OpenMP can hang in a forked child)
        rss = math.nan if gpu or torch.get_num_threads() > 1 else peak_rss_mib(factory, v)
        mem = peak_memory_mib(factory, v, device)
        timer = _common.StepTimer(device)
        with factory() as op:
            hv = op.matvec(v)  # warm-up
            for _ in range(a.timing_reps):
                timer.time(lambda: op.matvec(v))
        modes[mode] = {"peak_mib": mem, **_common.summarize(timer.collect()), "hv": hv}
        if not gpu:
            modes[mode]["peak_rss_mib"] = rss
        print(
            f"{mode}: {modes[mode]['median_s'] * 1e3:.1f} ms/HVP, peak +{mem:.1f} MiB"
            + ("" if gpu else f" (resident-set high-water mark +{rss:.1f} MiB)")
        )
    hv0, hv1 = (modes[m].pop("hv") for m in hessian.HVP_MODES)
    mode_diff = float((hv0 - hv1).norm() / hv0.norm())
    cost_md = [
        _common.markdown_table(
            ["hvp_mode", "ms / HVP (median)", "p20", "p80", "peak extra MiB"],
            [[m, d["median_s"] * 1e3, d["p20_s"] * 1e3, d["p80_s"] * 1e3, d["peak_mib"]] for m, d in modes.items()],
        ),
        "",
        f"Relative difference between the two modes' products: {mode_diff:.1e}. "
        + (
            "Peak memory: torch.cuda.max_memory_allocated."
            if gpu
            else "Peak memory: peak of the CPU allocator's live tensor bytes during one product (torch.profiler "
            "allocation events); the coarser resident-set high-water mark is in the JSON (peak_rss_mib)."
        ),
    ]
    name = f"hessian_{_common.device_tag(device)}{'_' + a.tag if a.tag else ''}"
    if a.cost_only:
        markdown = "\n".join(
            [
                f"# Hessian-vector product cost ({_common.device_tag(device)})",
                "",
                _common.machine_line(info),
                "",
                f"ResNet-18-style network, width {64 // width_div} ({n} parameters), random batch of "
                f"{batch} CIFAR-size images, after {a.train_steps} SGD steps on it, "
                f"model_mode={a.model_mode}, float32 products.",
                "",
                "## Cost per product",
                "",
            ]
            + cost_md
        )
        print()
        print(markdown)
        result = {
            "machine": info,
            "config": dict(vars(a), width_div=width_div, batch=batch, num_params=n),
            "hvp_modes": modes,
            "mode_rel_diff": mode_diff,
        }
        paths = _common.write_results(a.out_dir, name, result, markdown)
        print("wrote", *paths)
        return result

    # 2. reference: float64 products on a float64 copy, tight tolerance (float32 products would
    # stop at their ~1e-6 noise level, far below the 1e-3 target anyway)
    t0 = time.perf_counter()
    model64 = copy.deepcopy(model).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = hessian.eigenvalues(
            model64,
            F.cross_entropy,
            (x.double(), y),
            k=5,
            tol=1e-10,
            max_iter=ref_iter,
            seed=a.seed + 1,
            model_mode=a.model_mode,
        )
    del model64
    ref_vals = ref.eigenvalues.tolist()
    print(
        f"reference: {ref_vals} ({ref.num_hvps} HVPs, {time.perf_counter() - t0:.1f} s, "
        f"max rel residual {float(ref.residuals.max()):.1e})"
    )

    # 3. Lanczos vs power
    runs = []
    for k in (1, 5):
        for method in ("lanczos", "power"):
            r = run_until(
                model,
                data,
                k,
                method,
                ref_vals[:k],
                a.rel,
                ref_iter if method == "lanczos" else power_max,
                a.model_mode,
                a.seed + 2,
                lanczos_tol=a.rel,
            )
            r.update(k=k, method=method)
            runs.append(r)
            print(
                f"k={k} {method}: reached {a.rel:g} after {r['hit_hvps']} HVPs / "
                f"{_common.fmt(r['hit_s'] or math.nan)} s (ran {r['total_hvps']}, shift {r['shift']:g})"
            )

    rows = []
    for r in runs:
        rows.append(
            [
                r["k"],
                r["method"],
                r["hit_hvps"] if r["hit_hvps"] is not None else f"> {r['total_hvps']}",
                r["hit_s"] if r["hit_s"] is not None else math.nan,
                r["own_hvps"] if r["own_hvps"] is not None else "-",
                f"{r['own_err']:.1e}" if r["own_err"] is not None else "-",
                f"{r['shift']:.4g}" if r["method"] == "power" else "-",
            ]
        )
    ratio = {}  # Lanczos products / power products at the same accuracy
    for k in (1, 5):
        lz, pw = (next(r for r in runs if r["k"] == k and r["method"] == m) for m in ("lanczos", "power"))
        if lz["hit_hvps"] and pw["hit_hvps"]:
            ratio[k] = lz["hit_hvps"] / pw["hit_hvps"]
    md = [
        f"# Hessian solver benchmark ({_common.device_tag(device)})",
        "",
        _common.machine_line(info),
        "",
        f"ResNet-18-style network, width {64 // width_div} ({n} parameters), random batch of {batch} "
        f"CIFAR-size images, after {a.train_steps} SGD steps on it, model_mode={a.model_mode}, float32 "
        f"products. HVPs/wall s: until all top-k are within {a.rel:g} of the reference. Lanczos: oracle stop "
        f"(first step where all k Ritz values match); power: each pair stops at its own residual rule "
        f"(tol={a.rel:g}) or when it matches, whichever is first. Own stop: the solver's residual rule "
        f"alone with tol={a.rel:g} (for power, the run just described).",
        "",
        f"Reference (Lanczos, float64 products, tol 1e-10, {ref.num_hvps} HVPs): top-5 = "
        + ", ".join(f"{v:.5g}" for v in ref_vals),
        "",
        f"## Products to reach all top-k within {a.rel:g} relative of the reference",
        "",
        _common.markdown_table(
            ["k", "method", "HVPs", "wall s", "HVPs (own stop)", "err at own stop", "power shift"], rows
        ),
        "",
        "Lanczos / power products: " + (", ".join(f"k={k}: {v:.2f}" for k, v in ratio.items()) or "n/a"),
        "",
        "## Cost per product",
        "",
    ] + cost_md
    markdown = "\n".join(md)
    print()
    print(markdown)
    result = {
        "machine": info,
        "config": dict(
            vars(a), width_div=width_div, batch=batch, ref_iter=ref_iter, power_max_iter=power_max, num_params=n
        ),
        "reference": {"eigenvalues": ref_vals, "num_hvps": ref.num_hvps, "residuals": ref.residuals.tolist()},
        "runs": runs,
        "lanczos_over_power": ratio,
        "hvp_modes": modes,
        "mode_rel_diff": mode_diff,
    }
    paths = _common.write_results(a.out_dir, name, result, markdown)
    print("wrote", *paths)
    return result


if __name__ == "__main__":
    main()
