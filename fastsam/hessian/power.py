"""Power iteration with deflation: the PyHessian baseline.

Eigenpairs are found one at a time; each new iterate is kept orthogonal to the eigenvectors
already found (deflation by projection). Power iteration converges to the eigenvalue of largest
*magnitude*. PyHessian returns that value even when it is negative; here, to keep the contract of
:func:`~fastsam.hessian.eigenvalues` (largest algebraic first), a negative dominant value
triggers one spectral shift: the iteration restarts on H - s I with s just below that value
(so H - s I is positive semi-definite and its dominant eigenvalue is the largest algebraic one
of H). So does a run that stalls far from any eigenpair, the mark of lambda_min ~ -lambda_max
(the iterate then swings between the two eigenvectors, and its Rayleigh quotient can be far
below lambda_max); of the two runs the one with the smaller residual is kept. Shifting costs
extra products and slows convergence (the ratios become (l2 - s) / (l1 - s));
``EigenResult.shift`` reports s (0 if no shift was needed).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ._hvp import HessianOperator
from ._util import Callback, EigsOut, Progress, generator, randn


def _project_out(w: torch.Tensor, found: Sequence[torch.Tensor]) -> torch.Tensor:
    for _ in range(2):
        for u in found:
            w.sub_(u * torch.dot(u, w))
    return w


def power_eigs(
    op: HessianOperator,
    k: int,
    tol: float,
    max_iter: int,
    seed: int,
    dtype: torch.dtype,
    *,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> EigsOut:
    """Top-k (largest algebraic) eigenpairs by power iteration with deflation (and a shift if
    the dominant eigenvalue is negative, see the module docstring).

    Each pair iterates until ``||H v - theta v|| <= tol * |theta|`` or ``max_iter`` products
    (``max_iter`` is per eigenpair, and per run before/after a shift). ``callback(info)`` is
    called after every product with ``info`` = dict(index, step, num_hvps, eigenvalue,
    residual, shift); returning True accepts the current pair as converged (used by the
    benchmark for oracle stopping).
    Returns ``(values (k,) float64 CPU, vectors (k, n), residuals (k,), converged, steps, shift)``,
    values sorted largest first.
    """
    gen = generator(op.device, seed)
    hvps0 = op.num_hvps
    vals: List[float] = []
    vecs: List[torch.Tensor] = []
    ress: List[float] = []
    conv: List[bool] = []
    shift, shifted = 0.0, False
    stalled: Optional[Tuple[float, torch.Tensor, float]] = None
    with Progress(progress, None, "power", op.rank) as bar:
        while len(vals) < k:
            i = len(vals)
            v = _project_out(randn(op.n, gen, dtype, op.device), vecs)
            v = v / v.norm()
            theta_s, theta, res, rel, ok = 0.0, 0.0, 0.0, float("inf"), False
            for step in range(1, max_iter + 1):
                w = op.matvec(v)
                if shift:
                    w.sub_(v, alpha=shift)
                w = _project_out(w, vecs)  # (H - s I) v in the complement
                theta_s = float(torch.dot(v, w))
                theta = theta_s + shift
                res = float((w - theta_s * v).norm())  # = ||H v - theta v||
                rel = res / max(abs(theta), 1e-300)
                bar.update(1, eig=i, res=f"{rel:.1e}")
                ok = rel <= tol
                if callback is not None:
                    ok = (
                        bool(
                            callback(
                                dict(
                                    index=i,
                                    step=step,
                                    num_hvps=op.num_hvps - hvps0,
                                    eigenvalue=theta,
                                    residual=rel,
                                    shift=shift,
                                )
                            )
                        )
                        or ok
                    )
                if op.agree(ok):
                    break
                w_norm = w.norm()
                if op.agree(float(w_norm) == 0.0):  # v is in the null space of H - s I
                    ok = True
                    break
                v = w / w_norm
            # A swinging iterate's Rayleigh quotient is within residual**2 / 2 of lambda_max (relative),
            # so below sqrt(tol) a stalled run is already as accurate as tol asks and is kept.
            if not shifted and op.agree(theta_s < 0 or (not ok and rel > tol**0.5)):
                # Either the dominant eigenvalue is negative, or the run stalled far from an
                # eigenpair, which is what a pair lambda_min ~ -lambda_max does to it (the iterate
                # swings between the two). ||H v|| approaches max |lambda| from below, so
                # s = -(||H v|| + residual) lies at or below lambda_min (and below the midpoint of
                # lambda_min and lambda_max even if it falls short), where H - s I's dominant
                # eigenvalue is lambda_max - s: restart this pair on H - s I.
                shift, shifted = -(1.0 + 1e-3) * (float(w.norm()) + res), True
                if theta_s >= 0:
                    stalled = (theta, v, rel)
                continue
            if stalled is not None:
                if rel > stalled[2]:  # the shifted run did worse than the one it replaced
                    theta, v, rel = stalled
                stalled = None
            vals.append(theta)
            vecs.append(v)
            ress.append(rel)
            conv.append(ok)
    values = torch.tensor(vals, dtype=torch.float64, device="cpu")
    order = torch.argsort(values, descending=True)
    vectors = torch.stack(vecs)[order.to(op.device)]
    residuals = torch.tensor(ress, dtype=torch.float64, device="cpu")[order]
    return values[order], vectors, residuals, all(conv), op.num_hvps - hvps0, shift
