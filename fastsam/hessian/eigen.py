"""``eigenvalues``: top-k Hessian eigenpairs by Lanczos (default) or power iteration."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import nn

from .._checks import ArgumentError, choice, flag, integer, real
from ._hvp import HessianOperator, LossFn, trainable_parameters
from ._util import Callback, check_callback, check_dtype
from .lanczos import lanczos_eigs
from .power import power_eigs

METHODS = ("lanczos", "power")


@dataclass
class EigenResult:
    """Result of :func:`eigenvalues`.

    - ``eigenvalues``: 1-D float64 CPU tensor of length k, largest first (algebraic).
    - ``eigenvectors``: a flat ``(k, n)`` tensor on the model's device (working dtype), row i the
      unit eigenvector of ``eigenvalues[i]``; columns follow the trainable parameters in
      ``named_parameters()`` order (``param_names``). ``vector(i)`` gives it parameter-shaped.
    - ``num_hvps``: Hessian-vector products spent; ``residuals``: relative residual
      ``||H v - lambda v|| / |lambda|`` per pair (Ritz estimate for Lanczos); ``converged``:
      whether all k met ``tol``; ``num_iter``: Lanczos steps (power: products); ``seed``;
      ``shift``: the spectral shift power iteration needed (0 when none, always 0 for Lanczos).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    num_hvps: int
    residuals: torch.Tensor
    converged: bool
    num_iter: int
    seed: int
    method: str
    param_names: List[str] = field(default_factory=list)
    param_shapes: List[torch.Size] = field(default_factory=list)
    shift: float = 0.0

    def vector(self, i: int) -> List[torch.Tensor]:
        """Eigenvector i as a list of tensors shaped like the trainable parameters."""
        sizes = [s.numel() for s in self.param_shapes]
        return [c.view(s) for c, s in zip(self.eigenvectors[i].split(sizes), self.param_shapes)]


def eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: Optional[int] = None,
    seed: Optional[int] = None,
    *,
    hvp_mode: str = "double_backward",
    model_mode: str = "eval",
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    callback: Optional[Callback] = None,
    distributed: Optional[bool] = None,
    process_group: Any = None,
    cache_graph: Optional[bool] = None,
    cache_bytes: Optional[int] = None,
) -> EigenResult:
    """Top-k eigenvalues (largest algebraic first) of the Hessian of the sample-averaged loss.

    - ``data``: one ``(inputs, targets)`` batch or an iterable of batches (see ``HessianOperator``).
    - ``method="lanczos"``: Lanczos with full reorthogonalisation; stops when the k wanted Ritz
      residuals are below ``tol`` relative. ``max_iter`` = total products (default
      ``min(n, max(100, 20 k))``); the basis costs ``max_iter * n`` numbers of device memory.
    - ``method="power"``: power iteration with deflation (PyHessian's baseline), residual stop;
      ``max_iter`` = products per eigenpair (default 1000). If the largest-*magnitude* eigenvalue
      is negative (where PyHessian would return it) it shifts once and continues, so it also
      returns the largest algebraic values; a run that stalls far from an eigenpair (lambda_min
      close to -lambda_max) is retried once shifted (see :mod:`fastsam.hessian.power`).
    - ``hvp_mode``: ``"double_backward"`` (default, any module) or ``"forward_over_reverse"``
      (forward-mode dual parameters through one forward and one plain backward; falls back to
      ``torch.func.jvp(torch.func.grad(...))`` for ops without a forward-mode backward formula).
    - ``model_mode``: ``"eval"`` (default, as PyHessian) or ``"train"`` (BatchNorm uses batch
      statistics, dropout masks fixed per batch). Mode, buffers and ``.grad`` are restored.
    - ``dtype``: working dtype of the solver vectors (default: parameter dtype); products are
      computed in the parameter dtype.
    - ``seed``: seeds the start vector and train-mode dropout masks (fresh when None; recorded
      in the result; rank 0's in a process group).
    - ``callback(info)``: called every step (see ``lanczos_eigs`` / ``power_eigs``); True stops.
    - ``cache_graph`` / ``cache_bytes``: double backward keeps each batch's first-order graph and
      reuses it for every product, within a memory budget (default automatic; see
      ``HessianOperator``); ``cache_graph=False`` recomputes forward and backward per product.
    Warns if not converged within ``max_iter``.
    """
    k = integer("k", k, lo=1)
    choice("method", method, METHODS)
    tol = real("tol", tol, lo=0, lo_open=True)
    max_iter = integer("max_iter", max_iter, lo=1, none=True)
    dtype, progress = check_dtype(dtype), flag("progress", progress)
    check_callback(callback)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n = sum(p.numel() for _, p in trainable_parameters(model))
    if k > n:
        raise ArgumentError(f"k must be at most the number of trainable parameters ({n}), got {k}")
    if method == "lanczos":
        steps = max_iter if max_iter is not None else min(n, max(100, 20 * k))
        if steps < k:
            raise ArgumentError(f"max_iter must be >= k for method='lanczos', got {max_iter}")
    else:
        steps = max_iter if max_iter is not None else 1000
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
        solve = lanczos_eigs if method == "lanczos" else power_eigs
        out = solve(op, k, tol, steps, seed, wdtype, callback=callback, progress=progress)
        values, vectors, residuals, converged, num_iter, shift = out
        result = EigenResult(
            values,
            vectors,
            op.num_hvps,
            residuals,
            converged,
            num_iter,
            seed,
            method,
            list(op.names),
            list(op.shapes),
            shift,
        )
    if not converged:
        warnings.warn(
            f"hessian.eigenvalues({method!r}) did not reach tol={tol:g} in max_iter={steps} "
            f"(relative residuals {residuals.tolist()})",
            RuntimeWarning,
            stacklevel=2,
        )
    return result
