"""Lanczos with full reorthogonalisation, on the device.

The Krylov basis stays on the operator's device (in blocks, so it grows without copies); every
new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt, "twice is
enough"). Only the tridiagonal coefficients (two floats per step) come to the CPU, where the
small eigenproblem is solved in float64 with ``torch.linalg.eigh``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ._hvp import HessianOperator
from ._util import Callback, EigsOut, Progress, eps_of, generator, randn

_BLOCK = 32


class Basis:
    """Orthonormal vectors as rows, stored in (_BLOCK, n) blocks on the device."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.dtype, self.device = n, dtype, device
        self.blocks: List[torch.Tensor] = []
        self.size = 0

    def append(self, v: torch.Tensor) -> None:
        i = self.size % _BLOCK
        if i == 0:
            self.blocks.append(torch.empty(_BLOCK, self.n, dtype=self.dtype, device=self.device))
        self.blocks[-1][i].copy_(v)
        self.size += 1

    def row(self, j: int) -> torch.Tensor:
        return self.blocks[j // _BLOCK][j % _BLOCK]

    def _views(self) -> Iterator[torch.Tensor]:
        for b, block in enumerate(self.blocks):
            yield block[: min(_BLOCK, self.size - b * _BLOCK)]

    def orthogonalize_(self, w: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """w -= Q^T Q w, ``passes`` times (classical Gram-Schmidt on the whole basis)."""
        for _ in range(passes):
            coeffs = [V @ w for V in self._views()]
            for V, c in zip(self._views(), coeffs):
                w.sub_(V.t() @ c)
        return w

    def combine(self, S: torch.Tensor) -> torch.Tensor:
        """Q^T S as a (k, n) tensor, for S of shape (size, k)."""
        S = S.to(self.dtype).to(self.device)
        out = torch.zeros(S.shape[1], self.n, dtype=self.dtype, device=self.device)
        for b, V in enumerate(self._views()):
            out.addmm_(S[b * _BLOCK : b * _BLOCK + V.shape[0]].t(), V)
        return out


def tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> torch.Tensor:
    """The symmetric tridiagonal matrix T (float64, CPU) from the Lanczos coefficients."""
    a = torch.tensor(alphas, dtype=torch.float64, device="cpu")
    T = torch.diag(a)
    if len(betas):
        b = torch.tensor(betas, dtype=torch.float64, device="cpu")
        T += torch.diag(b, 1) + torch.diag(b, -1)
    return T


def run_lanczos(
    op: HessianOperator,
    v0: torch.Tensor,
    max_steps: int,
    *,
    stop: Optional[Callable[[List[float], List[float], float], bool]] = None,
    restart_gen: Optional[torch.Generator] = None,
    progress: Optional[Progress] = None,
) -> Tuple[List[float], List[float], float, Basis]:
    """Run up to ``max_steps`` Lanczos steps from ``v0`` on ``op.matvec``.

    After each step ``stop(alphas, betas, beta)`` may end the run (``beta`` is the norm of the
    next residual vector, so the Ritz residual of pair i is ``beta * |S[-1, i]|``). On breakdown
    (an invariant subspace) the run restarts with a random vector orthogonal to the basis if
    ``restart_gen`` is given (the coupling coefficient is then 0), otherwise it ends.
    Returns ``(alphas, betas, beta_last, basis)``; ``len(betas) == len(alphas) - 1``.
    """
    n, dtype, device = v0.numel(), v0.dtype, v0.device
    max_steps = min(max_steps, n)
    Q = Basis(n, dtype, device)
    q = v0 / v0.norm()
    alphas: List[float] = []
    betas: List[float] = []
    beta_prev, beta = 0.0, 0.0
    breakdown_rel = 1e3 * eps_of(dtype, op.dtype)
    for j in range(max_steps):
        Q.append(q)
        w = op.matvec(q)
        w_norm = float(w.norm())
        alpha = torch.dot(w, q)
        w.sub_(q * alpha)
        if j > 0 and beta_prev != 0.0:
            w.sub_(Q.row(j - 1), alpha=beta_prev)
        Q.orthogonalize_(w)
        alphas.append(float(alpha))
        beta = float(w.norm())
        if progress is not None:
            progress.update(1)
        done = stop(alphas, betas, beta) if stop is not None else False
        if op.agree(done or j + 1 == max_steps):
            break
        if op.agree(beta <= breakdown_rel * max(w_norm, abs(alphas[-1]), 1e-300)):
            if restart_gen is None:
                beta = 0.0
                break
            w = Q.orthogonalize_(randn(n, restart_gen, dtype, device))
            beta = 0.0
            q = w / w.norm()
        else:
            q = w / beta
        betas.append(beta)
        beta_prev = beta
    return alphas, betas, beta, Q


def lanczos_eigs(
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
    """Top-k (largest algebraic) eigenpairs of ``op`` by Lanczos.

    Stops when the Ritz residuals ``beta * |S[-1, i]|`` of the k wanted values are all at most
    ``tol * max(|theta_i|, sqrt(eps) * max_j |theta_j|)``, or after ``max_iter`` products.
    ``callback(info)`` is called after every step with ``info`` = dict(step, num_hvps,
    eigenvalues, residuals) (current top Ritz values, descending); returning True stops.
    Returns ``(values (k,) float64 CPU, vectors (k, n), residuals (k,), converged, steps, 0.0)``.
    """
    gen = generator(op.device, seed)
    v0 = randn(op.n, gen, dtype, op.device)
    min_steps = min(op.n, k + 2)
    state: Dict[str, Any] = {}
    hvps0 = op.num_hvps

    def stop(alphas: List[float], betas: List[float], beta: float) -> bool:
        theta, S = torch.linalg.eigh(tridiagonal(alphas, betas))
        kk = min(k, len(alphas))
        top = theta[-kk:].flip(0)
        res = beta * S[-1, -kk:].flip(0).abs()
        floor = eps_of(dtype, op.dtype) ** 0.5 * float(theta.abs().max())
        rel = res / top.abs().clamp_min(max(floor, 1e-300))
        done = len(alphas) >= max(k, min_steps) and bool((rel <= tol).all())
        state.update(theta=theta, S=S, rel=rel, done=done)
        if callback is not None:
            info = dict(step=len(alphas), num_hvps=op.num_hvps - hvps0, eigenvalues=top.clone(), residuals=rel.clone())
            done = bool(callback(info)) or done
        return done

    with Progress(progress, min(max_iter, op.n), "lanczos", op.rank) as bar:
        alphas, betas, beta, Q = run_lanczos(op, v0, max_iter, stop=stop, restart_gen=gen, progress=bar)
    if "theta" not in state or state["theta"].numel() != len(alphas):
        stop(alphas, betas, beta)
    theta, S = state["theta"], state["S"]
    if theta.numel() < k:
        raise RuntimeError(f"Lanczos ran {theta.numel()} steps, fewer than k={k}; increase max_iter")
    values = theta[-k:].flip(0)
    vectors = Q.combine(S[:, -k:].flip(1))
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    rel = state["rel"][:k]
    converged = bool((rel <= tol).all())
    return values, vectors, rel, converged, len(alphas), 0.0
