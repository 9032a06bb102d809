"""Time per Hessian-vector product: fastsam.hessian vs PyHessian (issue 13), same model and data.

    pip install pyhessian -c <(echo torch==2.13.0)      # only for this benchmark
    python benchmarks/hessian_vs_pyhessian.py            # CPU default: ~3 minutes
    python benchmarks/hessian_vs_pyhessian.py --model mnist_cnn --batch 128 --tag mnist
    python benchmarks/hessian_vs_pyhessian.py --device cuda --batch 512

Rows, each one Hessian-vector product (HVP) of the mean cross-entropy, model in eval mode (the
only mode PyHessian has), float32:

  pyhessian, 1 batch        ``hessian(model, crit, data=(x, y))``, then ``hessian_vector_product``
                            (PyHessian keeps the first backward's graph of its one batch)
  pyhessian, B batches      ``hessian(..., dataloader=batches).dataloader_hv_product`` (PyHessian
                            reruns forward and a create_graph backward per batch per product)
  fastsam, kept graph       ``HessianOperator(...).matvec``, default (graphs kept within budget)
  fastsam, recomputed       the same with ``cache_graph=False`` (the behaviour before issue 13)

Timing: after one warm-up product each (for the kept graphs: the product that builds them), the
rows are timed in ``--rounds`` rounds of ``--reps`` products each, the order of the rows rotated
every round (interleaved, so that load changes on a shared machine hit every row alike). Reported:
median and p20/p80 over all products, and the spread of the per-round medians. The build cost
(PyHessian's constructor, fastsam's first product) is reported separately. A fastsam train-mode
row pair (the late-phase paper's measurement) is added; PyHessian has no train mode.

Without pyhessian installed the PyHessian rows are skipped (reported as not installed).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common
from _lib import models
from _lib.models import MnistCNN

from fastsam import hessian


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--model",
        default="small_cnn",
        choices=["small_cnn", "mnist_cnn"],
        help="small_cnn: benchmarks/_lib/models.py SmallCNN on 1x8x8 (the issue's case); "
        "mnist_cnn: the late-phase MNIST CNN on 1x28x28",
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--num-batches", type=int, default=4, help="B of the several-batch rows")
    p.add_argument("--train-steps", type=int, default=30, help="SGD steps before measuring")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=_common.RESULTS_DIR)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.model == "small_cnn":
        model, shape, nc = models.build("small_cnn")
    else:
        model, shape, nc = MnistCNN(width=16, num_classes=10), (1, 28, 28), 10
    model = model.to(device)
    nb = a.num_batches
    xs = torch.randn(nb * a.batch, *shape, device=device)
    # labels from a fixed random linear teacher: learnable, so a few SGD steps leave the init
    teacher = torch.randn(xs[0].numel(), nc, device=device)
    ys = (xs.flatten(1) @ teacher).argmax(1)
    batches = [(xs[i * a.batch : (i + 1) * a.batch], ys[i * a.batch : (i + 1) * a.batch]) for i in range(nb)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for s in range(a.train_steps):
        x, y = batches[s % nb]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = _common.machine_info(device)
    print(_common.machine_line(info))
    print(f"{a.model} {tuple(shape)}, {n} parameters, batch {a.batch}, {nb} batches, eval mode")

    try:
        import pyhessian  # noqa: F401
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        have_py = True
    except ImportError:
        have_py = False
        print("pyhessian not installed: its rows are skipped (pip install pyhessian -c <(echo torch==2.13.0))")

    gen = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    vflat = torch.randn(n, generator=gen).to(device)
    vflat /= vflat.norm()
    sizes = [p.numel() for p in model.parameters()]
    vlist = [c.view_as(p).clone() for c, p in zip(vflat.split(sizes), model.parameters())]

    rows, build, hv = {}, {}, {}
    stack = []  # context managers to close at the end

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def add_fastsam(name, data, mode, cache):
        op = hessian.HessianOperator(model, F.cross_entropy, data, model_mode=mode, seed=a.seed, cache_graph=cache)
        op.__enter__()
        stack.append(op)
        t0 = time.perf_counter()
        hv[name] = op.matvec(vflat)
        sync()
        build[name] = time.perf_counter() - t0
        rows[name] = lambda: op.matvec(vflat)

    if have_py:
        pm1 = copy.deepcopy(model)
        t0 = time.perf_counter()
        h1 = PyHessian(pm1, F.cross_entropy, data=batches[0], cuda=gpu)
        sync()
        build["pyhessian, 1 batch"] = time.perf_counter() - t0
        hv["pyhessian, 1 batch"] = torch.cat(
            [t.reshape(-1) for t in hessian_vector_product(h1.gradsH, h1.params, vlist)]
        )
        rows["pyhessian, 1 batch"] = lambda: hessian_vector_product(h1.gradsH, h1.params, vlist)
    add_fastsam("fastsam, 1 batch, kept graph", batches[0], "eval", None)
    add_fastsam("fastsam, 1 batch, recomputed", batches[0], "eval", False)
    if have_py:
        pmb = copy.deepcopy(model)
        hb = PyHessian(pmb, F.cross_entropy, dataloader=batches, cuda=gpu)
        build[f"pyhessian, {nb} batches"] = 0.0
        t0 = time.perf_counter()
        hv[f"pyhessian, {nb} batches"] = torch.cat([t.reshape(-1) for t in hb.dataloader_hv_product(vlist)[1]])
        sync()
        build[f"pyhessian, {nb} batches"] = time.perf_counter() - t0
        rows[f"pyhessian, {nb} batches"] = lambda: hb.dataloader_hv_product(vlist)
    add_fastsam(f"fastsam, {nb} batches, kept graph", batches, "eval", None)
    add_fastsam(f"fastsam, {nb} batches, recomputed", batches, "eval", False)
    add_fastsam("fastsam, 1 batch, kept graph, train mode", batches[0], "train", None)
    add_fastsam("fastsam, 1 batch, recomputed, train mode", batches[0], "train", False)
    cached = {name: op.num_cached for name, op in zip([k for k in rows if k.startswith("fastsam")], list(stack))}

    names = list(rows)
    times = {k: [] for k in names}
    round_medians = {k: [] for k in names}
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            ts = []
            for _ in range(a.reps):
                sync()
                t0 = time.perf_counter()
                rows[k]()
                sync()
                ts.append(time.perf_counter() - t0)
            times[k] += ts
            round_medians[k].append(statistics.median(ts))
        print(
            f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {statistics.median(times[k]) * 1e3:.1f} ms" for k in names),
            file=sys.stderr,
            flush=True,
        )
    for op in stack:
        op.__exit__(None, None, None)

    def ref_of(k):
        if not have_py:
            return None
        if "train mode" in k:
            return None
        return "pyhessian, 1 batch" if "1 batch" in k else f"pyhessian, {nb} batches"

    summary = {}
    table = []
    for k in names:
        s = _common.summarize(times[k])
        rm = round_medians[k]
        ref = ref_of(k)
        ratio = (s["median_s"] / statistics.median(times[ref])) if ref and k != ref else None
        diff = None
        if ref and k != ref and ref in hv:
            diff = float((hv[k].cpu() - hv[ref].cpu()).norm() / hv[ref].cpu().norm())
        summary[k] = {
            **s,
            "round_medians_s": rm,
            "build_s": build.get(k),
            "ratio_to_pyhessian": ratio,
            "rel_diff_to_pyhessian": diff,
            "num_cached": cached.get(k),
        }
        table.append(
            [
                k,
                s["median_s"] * 1e3,
                s["p20_s"] * 1e3,
                s["p80_s"] * 1e3,
                f"{min(rm) * 1e3:.1f}-{max(rm) * 1e3:.1f}",
                (build.get(k) or float("nan")) * 1e3,
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{diff:.1e}" if diff is not None else "-",
            ]
        )
    md = [
        f"# Hessian-vector product: fastsam vs PyHessian ({_common.device_tag(device)})",
        "",
        _common.machine_line(info),
        "",
        f"Model {a.model} (input {tuple(shape)}, {n} parameters) after {a.train_steps} SGD steps, batch {a.batch}, "
        f"{nb} batches for the several-batch rows, mean cross-entropy, eval mode unless stated, float32. "
        f"{a.rounds} interleaved rounds x {a.reps} products per row (rotated order); ms per product. "
        f"Round medians: range of the {a.rounds} per-round medians. Build: PyHessian's constructor "
        f"(forward + create_graph backward) / fastsam's first product (for 'kept graph': the one that "
        f"builds the graphs), and for PyHessian {nb} batches its first product. Ratio: median / PyHessian's "
        f"median on the same data; rel. diff: ||Hv - Hv_pyhessian|| / ||Hv_pyhessian||."
        + ("" if have_py else " pyhessian not installed: its rows are missing."),
        "",
        _common.markdown_table(
            ["row", "ms / HVP (median)", "p20", "p80", "round medians", "build ms", "ratio to PyHessian", "rel. diff"],
            table,
        ),
        "",
        f"Command: `python benchmarks/hessian_vs_pyhessian.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
    ]
    markdown = "\n".join(md)
    print()
    print(markdown)
    name = f"hessian_vs_pyhessian_{_common.device_tag(device)}{'_' + a.tag if a.tag else ''}"
    result = {"machine": info, "config": dict(vars(a), num_params=n), "have_pyhessian": have_py, "rows": summary}
    paths = _common.write_results(a.out_dir, name, result, markdown)
    print("wrote", *paths)
    return result


if __name__ == "__main__":
    main()
