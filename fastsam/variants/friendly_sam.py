"""FriendlySAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization").

The perturbation uses the batch gradient minus sigma times an EMA of past
batch gradients (the "full gradient" component), as in nblt/F-SAM, utils.py
(``FriendlySAM.first_step``):

    first SAM step:  m = g, the perturbation uses g
    afterwards:      d = g - sigma * m_old;  m = lmbda * m_old + (1 - lmbda) * g
    e = rho * d / (||d|| + 1e-12)   (ASAM: * w^2, the weighted norm)

then SAM's second pass and base step (the base optimizer steps with the
gradient at w + e).  Defaults sigma=1, lmbda=0.95 (train.py's defaults; their
run.sh uses 0.6 on CIFAR-100).  The EMA updates only on SAM steps (steps a
schedule skips do not see it) and not on a skipped (non-finite, first or
second pass) step: the new EMA goes to a second buffer, swapped in once the
step is taken.  The finiteness of g is read on the host once per SAM step.
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
        self._next_m = None
        if self.sam_active:
            buckets = self._buckets()
            if buckets and bool(torch.isfinite(_ops.total([_ops.sq_norm(b.grads) for b in buckets]))):
                nxt = []
                for b in buckets:
                    if any("fsam_m" not in self.state[k] for k in b.keys):  # first step: m = g, d = g
                        nxt.extend((k, g.clone()) for k, g in zip(b.keys, b.grads))
                        continue
                    ms = [self.state[k]["fsam_m"] for k in b.keys]
                    new = [self._buf(k, "fsam_m_next", p) for k, p in zip(b.keys, b.params)]
                    _ops.copy_(new, ms)
                    _ops.ema_(new, b.grads, self.lmbda)            # m' = lmbda m + (1 - lmbda) g
                    _ops.sub_scaled_(b.grads, ms, self.sigma)      # d = g - sigma m (in the gradient, as theirs)
                    nxt.extend(zip(b.keys, new))
                self._next_m = nxt
            # non-finite g: FusedSAM skips the perturbation and the step; m stays as it was
        super().first_step(zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        nxt, self._next_m = getattr(self, "_next_m", None), None
        super().second_step(zero_grad)
        if nxt and not self.last_step_skipped:  # the new EMA takes effect only on a step taken
            for k, m in nxt:
                st = self.state[k]
                old = st.get("fsam_m")
                st["fsam_m"] = m
                if old is not None and old is not m:
                    st["fsam_m_next"] = old  # reused as next step's buffer (a swap, no copy)

    def _variant_extra(self) -> Dict[str, Any]:
        return {"sigma": self.sigma, "lmbda": self.lmbda}

    def _load_variant_extra(self, d: Dict[str, Any]) -> None:
        self.sigma, self.lmbda = float(d["sigma"]), float(d["lmbda"])
