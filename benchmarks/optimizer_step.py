"""The optimizer side of one SAM step (first_step + second_step, no forward/backward) against what a
user would write instead.

Parameter sets: the shapes of a CIFAR ResNet-18 (62 tensors, 11.2M) and of torchvision's ResNet-50
(161 tensors, 25.6M); --dtypes fp32 bf16 (the parameters' dtype); --base sgd (momentum 0.9) or
adamw.  Rows:

  reference          the per-parameter SAM (benchmarks/reference_sam.py; SGD only)
  fusedsam-<b>       FusedSAM with every backend that runs on the device (triton: CUDA only)
  fusedsam-<b>-graph CUDA: the same step captured in a CUDA graph and replayed (triton, capturable)
  compiled           --peers: the SAM step in foreach ops under torch.compile (benchmarks/_peers.py);
                     compile time reported apart, never timed
  plain              --peers: foreach norm and perturbation, copy_ restore, the base's fused=True step
  torch-fused-<base> the base optimizer's fused=True step alone (no SAM): the attainable bytes/s
  copy               a copy_ as large as the parameter set: the other attainable bytes/s

Every peer is checked equal to FusedSAM's result (two steps from the same start, within rounding)
before timing.  All rows are timed round-robin in one process, the order rotated every round, so
drift cannot favour one; medians of --repeats rounds after warm-up, and each row's median per-round
ratio to the compiled peer (paired).  GB/s counts the bytes each design must move
(benchmarks/_peers.py: ACCESSES x element size).  --threads 1,2 repeats everything per thread count.

    python benchmarks/optimizer_step.py --peers [--dtypes fp32 bf16] [--threads 1,2] [--base adamw]
    python benchmarks/optimizer_step.py --device cuda --peers --dtypes fp32 bf16 --repeats 30
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
from _peers import ACCESSES, BASES, CompiledSAM, PlainSAM, compare_steps, fused_step_is_correct
from reference_sam import ReferenceSAM

from fastsam import FusedSAM, backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RHO = 0.05


def fusedsam_backends(device):
    """FusedSAM's backends to time: triton on the CPU is the interpreter (a test vehicle), never timed."""
    return [n for n in backends.available(device, build=True) if n != "triton" or device.type == "cuda"]


def cpp_code_path():
    """The cpp backend's element loops: the instruction set chosen at run time, or None."""
    try:
        from fastsam.backends import cpp

        return cpp.code_path() if cpp.is_available(torch.device("cpu"), build=False)[0] else None
    except (ImportError, AttributeError):
        return None


class Problem:
    """One parameter set: fixed initial weights and gradients; ``fresh()`` gives new copies of both."""

    def __init__(self, shapes, dtype, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.w = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        self.g = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        self.numel = sum(t.numel() for t in self.w)
        self.element_size = self.w[0].element_size()

    def fresh(self):
        ps = [torch.nn.Parameter(w.clone()) for w in self.w]
        for p, g in zip(ps, self.g):
            p.grad = g.clone()
        return ps


def make_optimizer(row, params, base, fused_ok=True):
    """(design for the byte count, optimizer) of one SAM row; ``fused_ok``: torch's fused base step
    is correct for these parameters (else the plain peer takes the foreach step)."""
    cls, kw = BASES[base]
    if row == "reference":
        return "reference", ReferenceSAM(params, cls, rho=RHO, **kw)
    if row == "compiled":
        return "compiled", CompiledSAM(params, cls, rho=RHO, **kw)
    if row == "plain":
        return "plain", PlainSAM(params, cls, rho=RHO, fused=fused_ok, **kw)
    name = row.split("-")[1]
    opt = FusedSAM(params, cls, rho=RHO, backend=name, capturable=row.endswith("-graph"), **kw)
    return ("foreach" if name == "foreach" else "fused"), opt  # foreach's count is its CPU path's (a GPU adds masking)


def sam_step(opt):
    def step():  # the gradients stay in place: the same tensors serve both passes
        opt.first_step()
        opt.second_step()

    return step


def captured(step, warmup=3):
    """``step`` captured in a CUDA graph after ``warmup`` eager calls on a side stream; returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def sam_rows(device, base, peers):
    rows = ["reference"] if base == "sgd" else []
    rows += [f"fusedsam-{b}" for b in fusedsam_backends(device)]
    if device.type == "cuda" and "fusedsam-triton" in rows:
        rows.append("fusedsam-triton-graph")
    return rows + (["compiled", "plain"] if peers else [])


def build(problem, device, base, peers):
    """Every row's step function and design, and the SAM rows' optimizers.  Each peer is checked
    against FusedSAM on its compiled kernels (the last backend in fastsam's order: cpp on the CPU,
    cuda or triton on a GPU) before timing: two steps of both from the same start."""
    rows = sam_rows(device, base, peers)
    check_against = [r for r in rows if r.startswith("fusedsam-") and not r.endswith("-graph")][-1]
    steps, designs, opts, notes = {}, {}, {}, []
    cls, kw = BASES[base]
    dtype = problem.w[0].dtype
    fused_ok = fused_step_is_correct(cls, kw, dtype, device)
    if not fused_ok:
        notes.append(
            f"torch's fused {base} step is wrong for {dtype} on {device.type} (pytorch/pytorch#191763): "
            "plain takes the foreach step, and the ceiling row is the fused step in float32"
        )
    for row in rows:
        params = problem.fresh()
        designs[row], opts[row] = make_optimizer(row, params, base, fused_ok)
        steps[row] = sam_step(opts[row])
        if row in ("compiled", "plain"):
            ref_params = problem.fresh()
            ref_opt = make_optimizer(check_against, ref_params, base)[1]
            diff = compare_steps((ref_params, ref_opt), (params, opts[row]), dtype)
            if diff is not None:
                raise AssertionError(f"{row} does not compute {check_against}'s step: {diff}")
            notes.append(
                f"{row} = {check_against} after each half of two steps from the same start (within the "
                "dtype's rounding)"
            )
        if row.endswith("-graph"):
            steps[row] = captured(steps[row])
    ceiling = problem.fresh() if fused_ok else [torch.nn.Parameter(p.detach().float()) for p in problem.fresh()]
    for p in ceiling:
        p.grad = torch.randn_like(p)
    fused_base = cls(ceiling, fused=True, **kw)
    name = ceiling_row(base, fused_ok)
    steps[name], designs[name] = fused_base.step, "base"
    src = torch.randn(problem.numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    steps["copy"], designs["copy"] = (lambda: dst.copy_(src)), "copy"
    return steps, designs, opts, notes


def ceiling_row(base, fused_ok):
    return f"torch-fused-{base}" + ("" if fused_ok else "-fp32")


def accesses(design, base):
    return 2 if design == "copy" else ACCESSES[(design, base)]


def measure(set_name, dtype_name, base, device, args):
    shapes = _common.PARAM_SETS[set_name]()
    problem = Problem(shapes, DTYPES[dtype_name], device)
    torch._dynamo.reset()  # a fresh compile cache per set: the peers' graphs never pile up to dynamo's limit
    steps, designs, opts, notes = build(problem, device, base, args.peers)
    per_round = _common.interleaved(steps, rounds=args.repeats, warmup=args.warmup, device=device)
    med = {k: statistics.median(v) for k, v in per_round.items()}
    fused_base = next(k for k in steps if k.startswith("torch-fused-"))
    size = {k: 4 if k.endswith("-fp32") else problem.element_size for k in steps}
    gbps = {k: accesses(designs[k], base) * problem.numel * size[k] / med[k] / 1e9 for k in steps}
    out = []
    for k in steps:
        ratios = [a / b for a, b in zip(per_round[k], per_round["compiled"])] if "compiled" in steps else []
        out.append(
            dict(
                param_set=set_name,
                dtype=dtype_name,
                base=base,
                threads=torch.get_num_threads(),
                tensors=len(shapes),
                numel=problem.numel,
                row=k,
                design=designs[k],
                ms=med[k] * 1e3,
                p20_ms=_common.percentile(per_round[k], 0.2) * 1e3,
                p80_ms=_common.percentile(per_round[k], 0.8) * 1e3,
                bytes=accesses(designs[k], base) * problem.numel * size[k],
                gbps=gbps[k],
                pct_of_base=100 * gbps[k] / gbps[fused_base],
                pct_of_copy=100 * gbps[k] / gbps["copy"],
                ratio_to_compiled=statistics.median(ratios) if ratios else None,
                ratio_to_compiled_p10=_common.percentile(ratios, 0.1) if ratios else None,
                ratio_to_compiled_p90=_common.percentile(ratios, 0.9) if ratios else None,
                ratio_to_reference=med[k] / med["reference"] if "reference" in med else None,
            )
        )
    compile_s = opts["compiled"].compile_s if "compiled" in opts else None
    return dict(
        rows=out,
        compile_s=compile_s,
        notes=notes,
        load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )


def run(args):
    device = torch.device(args.device)
    configs = []
    for threads in args.threads or [torch.get_num_threads()]:
        if device.type == "cpu":
            torch.set_num_threads(threads)
            torch._dynamo.reset()  # inductor's CPU kernels are specialised on the thread count
        for set_name in args.param_sets:
            for dtype_name in args.dtypes:
                print(
                    f"[optimizer_step] {set_name} {dtype_name} {args.base}, {torch.get_num_threads()} thread(s) ...",
                    file=sys.stderr,
                    flush=True,
                )
                configs.append(measure(set_name, dtype_name, args.base, device, args))
    return dict(
        machine=_common.machine_info(device),
        repeats=args.repeats,
        base=args.base,
        cpp_code_path=cpp_code_path() if device.type == "cpu" else None,
        configs=configs,
    )


def _ratio(r):
    if r["ratio_to_compiled"] is None:
        return "n/a"
    return f"{r['ratio_to_compiled']:.2f} ({r['ratio_to_compiled_p10']:.2f}–{r['ratio_to_compiled_p90']:.2f})"


def to_markdown(res) -> str:
    lines = [
        f"Optimizer side of one SAM step ({res['base']}), median of {res['repeats']} interleaved rounds.",
        "",
        _common.machine_line(res["machine"]),
    ]
    if res.get("cpp_code_path"):
        lines.append(f"cpp backend code path: {res['cpp_code_path']}")
    cols = [
        "param set",
        "dtype",
        "threads",
        "row",
        "median ms",
        "p20–p80 ms",
        "MB moved",
        "GB/s",
        "% of fused base GB/s",
        "% of copy GB/s",
        "× compiled (p10–p90)",
        "× reference",
    ]
    for cfg in res["configs"]:
        load = cfg["load_average_after"]
        extra = (
            f"; compile time of the compiled peer {cfg['compile_s']:.1f} s (not timed)"
            if cfg["compile_s"] is not None
            else ""
        )
        lines += ["", f"Load average after this set: {load[0]:.2f}{extra}" if load else extra.lstrip("; ")]
        lines += [f"- {n}" for n in cfg["notes"]]
        rows = [
            [
                r["param_set"],
                r["dtype"],
                r["threads"],
                r["row"],
                r["ms"],
                f"{r['p20_ms']:.2f}–{r['p80_ms']:.2f}",
                f"{r['bytes'] / 1e6:.0f}",
                r["gbps"],
                f"{r['pct_of_base']:.0f}%",
                f"{r['pct_of_copy']:.0f}%",
                _ratio(r),
                "n/a" if r["ratio_to_reference"] is None else f"{r['ratio_to_reference']:.2f}",
            ]
            for r in cfg["rows"]
        ]
        lines += ["", _common.markdown_table(cols, rows)]
    lines += [
        "",
        "MB moved: the reads and writes each design must make (benchmarks/_peers.py: ACCESSES), "
        "so GB/s is comparable across rows; the fused SAM step also reads the second gradient once "
        "more (its non-finite check), which the peers do not.",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--param-sets", nargs="+", default=["resnet18_cifar", "resnet50"], choices=list(_common.PARAM_SETS))
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--base", default="sgd", choices=list(BASES))
    ap.add_argument(
        "--peers",
        action="store_true",
        help="add the compiled peer (torch.compile: a minute of compiling per set on a CPU) and plain torch's best",
    )
    ap.add_argument(
        "--threads",
        type=lambda s: [int(t) for t in s.split(",")],
        default=None,
        help="CPU: comma list of torch thread counts, each measured in turn (default: torch's)",
    )
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", default=_common.RESULTS_DIR)
    ap.add_argument("--tag", default=None, help="file name tag (default: cpu or the GPU's short name)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the optimizer step's profiler-hook notice
    res = run(args)
    md = to_markdown(res)
    tag = args.tag or _common.device_tag(torch.device(args.device))
    _common.write_results(args.out_dir, f"optimizer_step_{tag}", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
