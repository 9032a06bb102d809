"""Stochastic trace estimation: Hutchinson and Hutch++ (Meyer, Musco, Musco & Woodruff, 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
from torch import nn

from .._checks import choice, flag, integer
from ._hvp import HessianOperator, LossFn
from ._util import Progress, check_dtype, generator, rademacher

METHODS = ("hutch++", "hutchinson")


@dataclass
class TraceResult:
    """Result of :func:`trace`.

    - ``trace``: the estimate (float); ``std_error``: its standard error (float), estimated from
      the spread of the Rademacher quadratic forms (for Hutch++: conditional on the sketch, i.e.
      the error of the Hutchinson part on the deflated residual; the low-rank part is exact).
      ``nan`` when only one residual probe was left (Hutch++ with ``num_samples`` < 6).
    - ``num_hvps``: products spent; ``samples``: the quadratic forms z^T H z of the
      Hutchinson part (float64 CPU); ``seed``; ``method``.
    """

    trace: float
    std_error: float
    num_hvps: int
    samples: torch.Tensor
    seed: int
    method: str


def _hutchinson(
    op: HessianOperator,
    probes: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    bar: Progress,
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    vals: List[float] = []
    for _ in range(probes):
        z = rademacher((op.n,), gen, dtype, op.device)
        if project is not None:
            z = project(z)
        vals.append(float(torch.dot(z, op.matvec(z))))
        bar.update(1)
    return torch.tensor(vals, dtype=torch.float64, device="cpu")


def _std_error(samples: torch.Tensor) -> float:
    if samples.numel() < 2:  # not estimable from one probe (0 probes: the sketch was exact)
        return math.nan if samples.numel() else 0.0
    return float(samples.std(unbiased=True)) / math.sqrt(samples.numel())


def trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_samples: int = 100,
    method: str = "hutch++",
    seed: Optional[int] = None,
    *,
    hvp_mode: str = "double_backward",
    model_mode: str = "eval",
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    distributed: Optional[bool] = None,
    process_group: Any = None,
    cache_graph: Optional[bool] = None,
    cache_bytes: Optional[int] = None,
) -> TraceResult:
    """Estimate tr(H) of the Hessian of the sample-averaged loss with ``num_samples`` products.

    ``method="hutchinson"``: mean of z^T H z over ``num_samples`` Rademacher vectors (>= 2).
    ``method="hutch++"`` (default): the same budget split in thirds (>= 3): sketch S (n x m/3),
    Q = orth(H S), exact tr(Q^T H Q), plus Hutchinson on (I - QQ^T) H (I - QQ^T); much lower
    variance when the spectrum decays.
    Other keywords (``cache_graph``, ``cache_bytes``, ...) as in :func:`eigenvalues`.
    """
    choice("method", method, METHODS)
    num_samples = integer("num_samples", num_samples, lo=3 if method == "hutch++" else 2)
    dtype, progress = check_dtype(dtype), flag("progress", progress)
    with HessianOperator(
        model,
        loss_fn,
        data,
        hvp_mode=hvp_mode,
        model_mode=model_mode,
        distributed=distributed,
        process_group=process_group,
        seed=seed,
        cache_graph=cache_graph,
        cache_bytes=cache_bytes,
    ) as op:
        wdtype = dtype or op.dtype
        seed = op.seed
        gen = generator(op.device, seed)
        with Progress(progress, num_samples, method, op.rank) as bar:
            if method == "hutchinson":
                samples = _hutchinson(op, num_samples, gen, wdtype, bar)
                exact_part = 0.0
            else:
                s = min(num_samples // 3, op.n)
                S = rademacher((s, op.n), gen, wdtype, op.device)
                Y = torch.stack([op.matvec(row) for row in S])  # rows: H s_i
                bar.update(s)
                Q = torch.linalg.qr(Y.t()).Q.t()  # (s, n) orthonormal rows
                exact_part = 0.0
                for q in Q:
                    exact_part += float(torch.dot(q, op.matvec(q)))
                    bar.update(1)

                def project(z: torch.Tensor) -> torch.Tensor:
                    for _ in range(2):
                        z = z - Q.t() @ (Q @ z)
                    return z

                samples = _hutchinson(op, num_samples - 2 * s, gen, wdtype, bar, project)
        est = exact_part + (float(samples.mean()) if samples.numel() else 0.0)
        result = TraceResult(est, _std_error(samples), op.num_hvps, samples, seed, method)
    return result
