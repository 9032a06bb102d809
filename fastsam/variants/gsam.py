"""GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization").

A SAM step whose update direction is the SAM gradient g_s minus alpha times
the component of the first gradient g orthogonal to g_s (global over all
parameters), as in juntang-zhuang/GSAM, gsam/gsam.py (``gradient_decompose``):

    cos = <g, g_s> / (||g_s|| ||g|| + eps)
    g_v = g - cos * ||g|| * g_s / (||g_s|| + eps)
    d   = g_s - alpha * g_v                 (eps = perturb_eps, 1e-12 there too)

The perturbation is SAM's/ASAM's (``perturb_weights``: rho / (||g|| + eps),
ASAM's weighted norm).  The rho schedule of their code (gsam/scheduler.py:
``ProportionScheduler``, rho_t - rho_min proportional to lr - lr_min) is
``ProportionalRho``, optional: GSAM sets each group's rho from its lr before the
perturbation.  alpha has no default in their code; 0.1 is ours (within the
paper's range).  Everything else (closure, two-step form, non-finite skip,
clipping of d, schedules, late phase, state_dict) is FusedSAM's.

Cost beyond SAM: one copy of g (first pass), one fused read of (g_s, g) for the dot
product and both norms, one axpby pass writing d into g_s (the backends' ``dot_sq_norms``
and ``axpby``); no host synchronisation (fastsam/variants/_ops.py).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from . import _ops
from ._base import VariantSAM


class ProportionalRho:
    """rho = min_rho + (max_rho - min_rho) * (lr - min_lr) / (max_lr - min_lr) (constant max_rho if max_lr == min_lr)."""

    def __init__(self, max_lr: float, min_lr: float, max_rho: float, min_rho: float = 0.0):
        if not (max_lr > min_lr or (max_lr == min_lr and max_rho == min_rho)) or max_rho < min_rho:
            raise ValueError("need max_lr > min_lr (or both and the rhos equal) and max_rho >= min_rho")
        self.max_lr, self.min_lr, self.max_rho, self.min_rho = max_lr, min_lr, max_rho, min_rho

    def __call__(self, lr: float) -> float:
        if self.max_lr > self.min_lr:
            return self.min_rho + (self.max_rho - self.min_rho) * (lr - self.min_lr) / (self.max_lr - self.min_lr)
        return self.max_rho


class GSAM(VariantSAM):
    """``GSAM(params, base_optimizer, rho=0.05, adaptive=False, alpha=0.1, rho_schedule=None, **kwargs)``."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *, alpha: float = 0.1,
                 rho_schedule: Optional[ProportionalRho] = None, **kwargs):
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        self.alpha = float(alpha)
        self.rho_schedule = rho_schedule

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        if self.sam_active:
            if self.rho_schedule is not None:
                for g in self.param_groups:
                    g["rho"] = max(float(self.rho_schedule(float(g["lr"]))), 0.0)
        super().first_step(False)
        if self._pending and self.alpha != 0:  # keep g for the decomposition (one copy pass; the
            for b in self._pending:            # perturbation moved w, not the gradients)
                b.backend.restore(self._bufs(b, "gsam_g"), b.grads)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        if self._pending is not None and self.alpha != 0:
            self._decompose()
        super().second_step(zero_grad)

    def _decompose(self) -> None:
        """g_s <- (1 - alpha c) g_s - alpha g with c = -cos * ||g|| / (||g_s|| + eps): their
        g_s - alpha (g + c g_s) in one axpby, after one dot_sq_norms of (g_s, g).  The
        coefficients stay on the device (on the CPU: formed on the host, where reading is free).
        No skip flag here: a non-finite g or g_s makes d non-finite, and the second pass's norm
        skips the step (its scalars also carry the first pass's flag)."""
        buckets = self._buckets(recheck=False)
        if not buckets:
            return
        eps, alpha = self.perturb_eps, self.alpha
        gs = [self._bufs(b, "gsam_g", zero=True) for b in buckets]
        grads = [b.grads for b in buckets]
        r = _ops.dot_sq_norms(buckets, grads, gs)  # [<g_s, g>, ||g_s||^2, ||g||^2]
        if _ops.on_host(r):
            inner, new_sq, old_sq = r.tolist()
            new, old = math.sqrt(new_sq), math.sqrt(old_sq)
            coef = -((inner / (new * old + eps)) * old / (new + eps))
            c = _ops.coefs(1.0 - alpha * coef, -alpha, 0.0, r)
        else:
            new, old = r[1].sqrt(), r[2].sqrt()
            coef = -((r[0] / (new * old + eps)) * old / (new + eps))
            c = _ops.coefs(1.0 - alpha * coef, -alpha, 0.0, r)
        _ops.axpby(buckets, grads, gs, c)

    def _variant_extra(self) -> Dict[str, Any]:
        return {"alpha": self.alpha}

    def _load_variant_extra(self, d: Dict[str, Any]) -> None:
        self.alpha = float(d["alpha"])
