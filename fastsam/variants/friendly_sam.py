"""FriendlySAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization").

The perturbation uses the batch gradient minus sigma times an EMA of past
batch gradients (the "full gradient" component), as in nblt/F-SAM, utils.py
(``FriendlySAM.first_step``):

    first SAM step:  m = g, the perturbation uses g
    afterwards:      d = g - sigma * m_old;  m = lmbda * m_old + (1 - lmbda) * g
    e = rho * d / (||d|| + 1e-12)   (ASAM: * w^2, the weighted norm)

then SAM's second pass and base step (the base optimizer steps with the
gradient at w + e).  Defaults sigma=1, lmbda=0.95 (train.py's defaults; their
run.sh uses 0.6 on CIFAR-100).  The rule is per parameter, as theirs: a
parameter without an EMA yet (the first SAM step, or its first gradient) starts
it with m = g and perturbs with its plain g, while the others of the same step
use theirs.  The EMA updates only on SAM steps (steps a schedule skips do not
see it) and not on a skipped (non-finite, first or second pass) step.

Through each bucket's backend (``axpby``): the new EMA goes to a scratch buffer
and d into the gradient (two passes), and second_step commits m <- m' with one
axpby masked by the second pass's skip flag (which folds in the first's): no
host read, except on a step where some parameter gets its first EMA (whether
it has one is host state; see ``_commit``).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import _ops
from ._base import VariantSAM


class FriendlySAM(VariantSAM):
    """``FriendlySAM(params, base_optimizer, rho=0.05, adaptive=False, sigma=1.0, lmbda=0.95, **kwargs)``."""

    _buffers = ("fsam_m",)

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *, sigma: float = 1.0,
                 lmbda: float = 0.95, **kwargs):
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda!r}")
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        self.sigma, self.lmbda = float(sigma), float(lmbda)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        self._pending_m = None
        if self.sam_active:
            buckets = self._buckets()
            if buckets:
                self._pending_m = self._ema(buckets)
        super().first_step(zero_grad)

    def _fsam_plan(self, b) -> tuple:
        """(indices with an EMA, their m, their m' scratch buffers, indices without one) of a bucket,
        cached on the bucket object (``_bucket_cache``) until a parameter gets its first EMA or
        the state is loaded."""
        cache = self._bucket_cache(b, "fsam_plan")
        hit = cache.get("plan")
        if hit is None:
            has = [i for i, k in enumerate(b.keys) if "fsam_m" in self.state[k]]
            new = [i for i, k in enumerate(b.keys) if "fsam_m" not in self.state[k]]
            ms = [self.state[b.keys[i]]["fsam_m"] for i in has]
            nexts = [self._buf(b.keys[i], "fsam_m_next", b.params[i]) for i in has]
            hit = cache["plan"] = (has, ms, nexts, new)  # not b itself: no cycle, it dies unreferenced
        return hit

    def _ema(self, buckets) -> list:
        """Per parameter, as nblt/F-SAM's first_step: with an EMA m, d = g - sigma m (in the
        gradient) and m' = lmbda m + (1 - lmbda) g into a scratch buffer (two axpby, g read before
        it is overwritten); without one, m' = g and d = g.  Nothing is read by the host."""
        pending = []
        for b in buckets:
            has, ms, nexts, new = self._fsam_plan(b)
            if has:
                g = b.grads if len(has) == len(b.keys) else [b.grads[i] for i in has]
                like = self._coef_like(b)
                b.backend.axpby(ms, g, self._const(like, self.lmbda, 1.0 - self.lmbda), out=nexts)
                b.backend.axpby(g, ms, self._const(like, 1.0, -self.sigma))
            fresh = [(b.keys[i], b.grads[i].clone()) for i in new]
            pending.append((b, ms, nexts, fresh))
        return pending

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        pending, self._pending_m = getattr(self, "_pending_m", None), None
        super().second_step(zero_grad)
        if pending:
            self._commit(pending)

    def _commit(self, pending: list) -> None:
        """m <- m' unless the step was skipped (first or second pass): one masked axpby per bucket
        with the second pass's skip flag, on the device.  Parameters getting their first EMA are
        the one host read: whether m exists is host state (it picks the code path above), so on
        such a step (the first SAM step, or a parameter's first gradient) the flag is read once."""
        flag = self._run.skip_flag
        fresh_taken = None
        for b, ms, nexts, fresh in pending:
            if ms:
                like = self._coef_like(b)
                if flag is None:
                    c = self._const(like, 0.0, 1.0)
                elif _ops.on_host(like) and flag.device.type == "cpu":
                    c = self._const(like, 0.0, 1.0, float(flag))
                else:
                    c = torch.cat([self._const(like, 0.0, 1.0)[:2], flag.to(like).view(1)])
                b.backend.axpby(ms, nexts, c)
            if fresh:
                if fresh_taken is None:
                    fresh_taken = flag is None or not bool(flag)  # the host read (see the docstring)
                if fresh_taken:
                    for k, m in fresh:
                        self.state[k]["fsam_m"] = m
                    self._drop_bucket_caches("fsam_plan")

    def _coef_like(self, b) -> torch.Tensor:
        """A 0-d tensor of the bucket's device and accumulation dtype (what its coefficients are made of)."""
        key = (b.device, b.dtype)
        likes = self.__dict__.setdefault("_fsam_likes", {})
        t = likes.get(key)
        if t is None:
            t = likes[key] = torch.zeros((), device=b.device, dtype=_ops._acc(b.dtype))
        return t

    def _const(self, like: torch.Tensor, a: float, b: float, skip: float = 0.0) -> torch.Tensor:
        """[a, b, skip] on like's device and dtype, made once per value."""
        consts = self.__dict__.setdefault("_fsam_consts", {})
        key = (like.device, like.dtype, a, b, skip)
        c = consts.get(key)
        if c is None:
            c = consts[key] = _ops.coefs(a, b, skip, like)
        return c

    def _variant_extra(self) -> Dict[str, Any]:
        return {"sigma": self.sigma, "lmbda": self.lmbda}

    def _load_variant_extra(self, d: Dict[str, Any]) -> None:
        self.sigma, self.lmbda = float(d["sigma"]), float(d["lmbda"])
        self._drop_bucket_caches("fsam_plan")  # the buffers were replaced
