"""Spectral density by stochastic Lanczos quadrature (SLQ; Ghorbani, Krishnan & Xiao 2019)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .._checks import flag, integer, real
from ._hvp import HessianOperator, LossFn
from ._util import Progress, check_dtype, generator, rademacher
from .lanczos import run_lanczos, tridiagonal


@dataclass
class DensityResult:
    """Result of :func:`density`.

    - ``grid``, ``density``: 1-D float64 CPU tensors of equal length; ``density`` is the
      Gaussian-smoothed spectral density on ``grid`` (integrates to 1), ready for
      ``plt.plot(d.grid, d.density)`` or ``d.plot()``.
    - ``nodes``, ``weights``: per run, the Gauss quadrature nodes (Ritz values) and weights
      (squared first components of the Ritz vectors; each run's weights sum to 1).
    - ``sigma``: the Gaussian width used; ``num_hvps``; ``seed``.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: List[torch.Tensor]
    weights: List[torch.Tensor]
    sigma: float
    num_hvps: int
    seed: int

    def plot(self, ax: Any = None, log: bool = True, **kwargs: Any) -> Any:
        """Plot the density with matplotlib (log y-axis by default, as in PyHessian); returns ax."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.gca()
        ax.plot(self.grid.numpy(), self.density.numpy(), **kwargs)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def smooth(
    nodes: List[torch.Tensor], weights: List[torch.Tensor], sigma: Optional[float] = None, num_points: int = 1000
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Gaussian-smoothed density of point masses averaged over runs: ``(grid, density, sigma)``.

    ``sigma`` defaults to 1% of the node range (or of max |node|, or 1, if the range is 0); the
    grid covers the nodes plus 6 sigma on each side.
    """
    allnodes = torch.cat(nodes)
    lo, hi = float(allnodes.min()), float(allnodes.max())
    if sigma is None:
        span = hi - lo if hi > lo else max(abs(hi), abs(lo), 1.0)
        sigma = 0.01 * span
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, num_points, dtype=torch.float64, device="cpu")
    dens = torch.zeros_like(grid)
    for x, w in zip(nodes, weights):
        g = torch.exp(-0.5 * ((grid[:, None] - x[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        dens += g @ w
    return grid, dens / len(nodes), float(sigma)


def density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_iter: int = 100,
    num_runs: int = 1,
    *,
    sigma: Optional[float] = None,
    num_points: int = 1000,
    seed: Optional[int] = None,
    hvp_mode: str = "double_backward",
    model_mode: str = "eval",
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    distributed: Optional[bool] = None,
    process_group: Any = None,
    cache_graph: Optional[bool] = None,
    cache_bytes: Optional[int] = None,
) -> DensityResult:
    """SLQ spectral density of the Hessian of the sample-averaged loss.

    Each of ``num_runs`` runs does ``num_iter`` Lanczos steps (fewer if the Krylov space is
    exhausted; capped at n) from a normalised Rademacher vector; the eigenpairs (theta_j, s_j)
    of the tridiagonal matrix give nodes theta_j with weights s_j[0]^2. Costs
    ``num_runs * num_iter`` products.
    Other keywords (``cache_graph``, ``cache_bytes``, ...) as in :func:`eigenvalues`.
    """
    num_iter = integer("num_iter", num_iter, lo=1)
    num_runs = integer("num_runs", num_runs, lo=1)
    num_points = integer("num_points", num_points, lo=2)
    sigma = real("sigma", sigma, lo=0, lo_open=True, none=True)
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
        nodes, weights = [], []
        with Progress(progress, num_runs * min(num_iter, op.n), "slq", op.rank) as bar:
            for _ in range(num_runs):
                v0 = rademacher((op.n,), gen, wdtype, op.device)
                alphas, betas, _, _ = run_lanczos(op, v0, num_iter, progress=bar)
                theta, S = torch.linalg.eigh(tridiagonal(alphas, betas))
                nodes.append(theta)
                weights.append(S[0] ** 2)
        grid, dens, sigma = smooth(nodes, weights, sigma, num_points)
        return DensityResult(grid, dens, nodes, weights, sigma, op.num_hvps, seed)
