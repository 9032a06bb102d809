"""LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization"), Algorithm 1.

Every k-th step (steps start, start + k, ...) is a full SAM step: g at w, g_s
at w + e, and the part of g_s orthogonal to g, one global projection over all
parameters,

    g_v = g_s - (<g, g_s> / (||g||^2 + 1e-12)) g,      stored normalised: g_v / ||g_v||,

and the base optimizer steps with g_s.  The k - 1 steps in between never call
the closure (one forward/backward) and step with

    g + alpha * ||g|| * g_v / ||g_v||.

Cost: (1 + 1/k) passes per step.  Update order and epsilons follow the SGD
LookSAM in MarlonBecker/MSAM (optimizer/looksam.py: move_up / move_back /
update_gradient): the projection uses ||g||^2 + 1e-12; we also add
``perturb_eps`` to ||g_v|| before dividing (their code divides by ||g_v||
alone, which is NaN for a zero g_v).  Defaults k=5, alpha=0.7 (the paper; the
unofficial Leminhbinh0209/LookSAM README uses the same).  Weight decay and
momentum are the base optimizer's, applied after the gradient is formed, as
there.

``schedule=`` (fastsam.schedules) replaces the every-k rule for the full SAM
steps; ``sam_start_step`` delays everything (plain steps before it, no
reuse).  Non-finite gradients skip the step (parameters bitwise unchanged)
and leave the stored g_v as it was.  On a full SAM step the finiteness of the
second gradient is read on the host once (once per k steps on a GPU).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import _ops
from ._base import VariantSAM


class EveryK:
    """Full SAM on steps start, start + k, start + 2k, ... (LookSAM's rule)."""

    def __init__(self, k: int, start: int = 0):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k, self.start = k, start

    def decide(self, opt) -> bool:
        t = opt.num_steps - self.start
        return t >= 0 and t % self.k == 0

    def state_dict(self) -> Dict[str, Any]:
        return {"k": self.k, "start": self.start}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.k, self.start = int(d["k"]), int(d["start"])


class LookSAM(VariantSAM):
    """LookSAM: full SAM every k-th step, the stored orthogonal direction reused in between.

    ``LookSAM(params, base_optimizer, rho=0.05, adaptive=False, k=5, alpha=0.7, **FusedSAM options, **base_kwargs)``.
    Use ``step(closure)``: the closure runs only on the full SAM steps.
    """

    _buffers = ("looksam_gv",)

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *, k: int = 5,
                 alpha: float = 0.7, schedule: Any = None, sam_start_step: Optional[int] = None, **kwargs):
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if schedule is None:
            schedule = EveryK(k, sam_start_step or 0)
        super().__init__(params, base_optimizer, rho, adaptive, schedule=schedule, sam_start_step=sam_start_step,
                         **kwargs)
        self.k, self.alpha = k, float(alpha)
        self.has_gv = False
        self.full_steps = 0   # full SAM steps taken (closure calls)
        self.reuse_steps = 0  # one-pass steps that used g_v

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        if self.sam_active:  # keep g for the projection in second_step
            for b in self._buckets():
                _ops.copy_([self._buf(k, "looksam_g", p) for k, p in zip(b.keys, b.params)], b.grads)
        super().first_step(zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        if self._pending is not None:
            self._store_gv()
            self.full_steps += 1
        elif self._reuses():
            self._reuse()
        super().second_step(zero_grad)

    def _reuses(self) -> bool:
        return (self.has_gv and self._sam_active_override is None
                and self.num_steps >= (self.sam_start_step or 0) and self.alpha != 0)

    def _store_gv(self) -> None:
        buckets = self._buckets()
        if not buckets:
            return
        gs = [[self._buf(k, "looksam_g", p, zero=True) for k, p in zip(b.keys, b.params)] for b in buckets]
        inner = _ops.total([_ops.dot(g, b.grads) for g, b in zip(gs, buckets)])
        gsq = _ops.total([_ops.sq_norm(g) for g in gs])
        ssq = _ops.total([_ops.sq_norm(b.grads) for b in buckets])
        if self._first_skipped() or not bool(torch.isfinite(inner + gsq + ssq)):
            return  # the step is skipped; g_v stays as it was
        coef = -inner / (gsq + 1e-12)
        gvs = []
        for g, b in zip(gs, buckets):
            gv = [self._buf(k, "looksam_gv", p) for k, p in zip(b.keys, b.params)]
            _ops.axpy_into(gv, b.grads, g, coef)
            gvs.append(gv)
        inv = 1.0 / (_ops.total([_ops.sq_norm(gv) for gv in gvs]).sqrt() + self.perturb_eps)
        for gv in gvs:
            _ops.scale_(gv, inv)
        self.has_gv = True
        self.__dict__.pop("_gv_lists", None)

    def _reuse(self) -> None:
        buckets = self._buckets()
        if not buckets:
            return
        cache = self.__dict__.setdefault("_gv_lists", {})
        gvs = []
        for b in buckets:
            hit = cache.get(id(b))
            if hit is None or hit[0] is not b:  # the bucket object is kept alive in the entry: ids stay unique
                hit = cache[id(b)] = (b, [self._buf(k, "looksam_gv", p, zero=True) for k, p in zip(b.keys, b.params)])
            gvs.append(hit[1])
        gnorm = _ops.total([_ops.sq_norm(b.grads) for b in buckets]).sqrt()
        if gnorm.device.type == "cpu":  # a host scalar is free on the CPU: one launch per bucket
            a = self.alpha * float(gnorm)
            for b, gv in zip(buckets, gvs):
                torch._foreach_add_(b.grads, gv, alpha=a)
        else:
            for b, gv in zip(buckets, gvs):
                _ops.add_scaled_(b.grads, gv, gnorm.to(b.device), alpha=self.alpha)
        self.reuse_steps += 1

    # ------------------------------------------------------------------ state
    def _variant_extra(self) -> Dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha, "has_gv": self.has_gv, "full_steps": self.full_steps,
                "reuse_steps": self.reuse_steps}

    def _load_variant_extra(self, d: Dict[str, Any]) -> None:
        self.k, self.alpha, self.has_gv = int(d["k"]), float(d["alpha"]), bool(d["has_gv"])
        self.__dict__.pop("_gv_lists", None)  # the buffers were replaced
        self.full_steps, self.reuse_steps = int(d["full_steps"]), int(d["reuse_steps"])
