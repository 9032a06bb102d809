"""Power iteration with deflation: the PyHessian baseline.

Eigenpairs are found one at a time; each new iterate is kept orthogonal to the eigenvectors
already found (deflation by projection). Power iteration converges to the eigenvalue of largest
*magnitude*. PyHessian returns that value even when it is negative; here, to keep the contract of
:func:`~fastsam.hessian.eigenvalues` (largest algebraic first), a negative dominant value
triggers one spectral shift: the iteration restarts on H - s I with s just below that value
(so H - s I is positive semi-definite and its dominant eigenvalue is the largest algebraic one
of H). A run that stalls far from any eigenpair, the mark of lambda_min ~ -lambda_max (the
iterate then swings between the two eigenvectors, and its Rayleigh quotient can be far below
lambda_max), is retried once on a shifted operator; of the two runs the one with the larger
Rayleigh quotient is kept (unless the shifted one converged), and the later pairs start
unshifted again. Shifting costs extra products and slows convergence (the ratios become
(l2 - s) / (l1 - s)); ``EigenResult.shift`` reports the shift in place at the end (0 if none).
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
    stalled: Optional[Tuple[float, torch.Tensor, float]] = None  # an unconverged run's theta, v, rel
    with Progress(progress, None, "power", op.rank) as bar:
        while len(vals) < k:
            i = len(vals)
            if stalled is None:
                v = _project_out(randn(op.n, gen, dtype, op.device), vecs)
                v = v / v.norm()
            else:  # a retry starts where the stalled run ended, and draws nothing: later starts stay
                v = stalled[1]
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
            if not shifted and op.agree(theta_s < 0):
                # the dominant eigenvalue is negative: restart this pair on H - s I, s <= lambda_min
                shift, shifted = theta - res - 1e-3 * abs(theta), True
                continue
            # A swinging iterate's Rayleigh quotient is within residual**2 / 2 of lambda_max (relative),
            # so below sqrt(tol) a stalled run is already as accurate as tol asks and is kept.
            if not shifted and op.agree(not ok and rel > tol**0.5):
                # The run stalled far from an eigenpair, which is what lambda_min ~ -lambda_max does
                # (the iterate swings between the two eigenvectors).  ||H v|| is then ~max |lambda|,
                # so s = -(1 + 1e-3) ||H v|| lies below lambda_min (and below the midpoint of
                # lambda_min and lambda_max where ||H v|| falls short), where H - s I's dominant
                # eigenvalue is lambda_max - s: retry this pair once on H - s I.
                stalled = (theta, v, rel)
                shift, shifted = -(1.0 + 1e-3) * float(w.norm()), True
                continue
            if stalled is not None:
                # Both values are Rayleigh quotients of H on the same complement, so the larger is
                # the nearer to the eigenvalue sought; a shifted run that converged (or that the
                # callback accepted) stands.  Later pairs go unshifted again: the shift slows them,
                # and one whose dominant eigenvalue is then negative shifts as above.
                if not op.agree(ok) and op.agree(stalled[0] > theta):
                    (theta, v, rel), ok = stalled, False
                shift, shifted, stalled = 0.0, False, None
            vals.append(theta)
            vecs.append(v)
            ress.append(rel)
            conv.append(ok)
    values = torch.tensor(vals, dtype=torch.float64, device="cpu")
    order = torch.argsort(values, descending=True)
    vectors = torch.stack(vecs)[order.to(op.device)]
    residuals = torch.tensor(ress, dtype=torch.float64, device="cpu")[order]
    return values[order], vectors, residuals, all(conv), op.num_hvps - hvps0, shift
