"""The error distribution behind tests/test_backend_ops.py's FOREACH_DOT_RTOL.

foreach's dot_sq_norms, in its two forms (``flat``: the CPU host path, torch.dot on flat copies;
``multi``: the path of other devices, torch's float32 L1 norms), on the data of the contract suite
(test_dot_sq_norms: the sizes of ``_shapes``, y scaled by 3, the pairs (x, y) and (x, x)) for many
seeds; prints, per dtype and entry ([<x, y>, ||x||^2, ||y||^2]), the maximum, p99.9 and median of
|got - ref| / scale (scale: sum |x y| for the dot product, the reference itself for the norms).

    python benchmarks/dot_sq_norms_error.py --seeds 1500 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from fastsam.backends import foreach

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _shapes():
    rand = int(torch.randint(2, 40000, ()))
    return [(1,), (7,), (1023,), (65537,), (0,), (3, 5, 7), (rand,), (2, 0, 3), (33, 31)]


def _like(shapes, dtype, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def _errors(got, xs, ys):
    x, y = [t.double() for t in xs], [t.double() for t in ys]
    ref = [sum((a * b).sum() for a, b in zip(x, y)), sum((a * a).sum() for a in x), sum((b * b).sum() for b in y)]
    scale = [sum((a * b).abs().sum() for a, b in zip(x, y)), ref[1], ref[2]]
    return [abs(float(got[k]) - float(ref[k])) / float(scale[k]) for k in range(3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    forms = {"flat": foreach._dot_sq_norms_flat, "multi": foreach._dot_sq_norms_multi}
    print(f"{args.seeds} seeds x 2 pairs, {args.threads} thread(s); relative error per entry [xy, xx, yy]")
    for form, fn in forms.items():
        for name, dtype in DTYPES.items():
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            rows = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                shapes = _shapes()
                xs, ys = _like(shapes, dtype), _like(shapes, dtype, 3.0)
                rows += [_errors(fn(a, b, acc), a, b) for a, b in ((xs, ys), (xs, xs))]
            e = torch.tensor(rows, dtype=torch.float64)
            fmt = lambda v: " ".join(f"{float(x):.2e}" for x in v)
            print(
                f"{form:5s} {name}: max {fmt(e.max(0).values)}  p99.9 {fmt(e.quantile(0.999, 0))}  "
                f"median {fmt(e.median(0).values)}"
            )


if __name__ == "__main__":
    main()
