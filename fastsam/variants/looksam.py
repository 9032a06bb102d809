"""LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization"), Algorithm 1.

Every k-th step (steps start, start + k, ...) is a full SAM step: g at w, g_s
at w + e, and the part of g_s orthogonal to g, one global projection over all
parameters,

    g_v = g_s - (<g, g_s> / (||g||^2 + 1e-12)) g,      stored with ||g_v||^2 (a device scalar),

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
and leave the stored g_v as it was.

The math runs through each bucket's backend (``dot_sq_norms``, ``axpby``,
``grad_sq_norm``: fastsam/variants/_ops.py): a full step adds a copy of g, one
fused read of (g_s, g), one axpby writing g_v and one norm of g_v; a reuse step
one norm of g and one axpby into g.  No host synchronisation: the skip flag of
the g_v update is formed on the device from the first pass's flag and the
finiteness of the three sums, and g_v is stored unnormalised with its squared
norm, so nothing decides on the host whether it was written.

Parameters whose gradients come and go: g_v belongs to the last full step.  A
parameter without a gradient on a full step gets g_v = 0 there (unless that
step is skipped), so reuse steps never apply a stale g_v to it; one without a
g_v yet reuses with g_v = 0 (its plain gradient).  ||g_v|| is over the
parameters of the full step, ||g|| over those with a gradient now.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from .._buckets import backend_of
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
        super().first_step(False)
        if self._pending:  # a full step: keep g for the projection (one copy pass; the perturbation
            for b in self._pending:  # moved w, not the gradients)
                b.backend.restore(self._bufs(b, "looksam_g"), b.grads)
        if zero_grad:
            self.zero_grad()

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

    def _gv_lists(self, buckets) -> List[List[torch.Tensor]]:
        """Each bucket's g_v buffers (zero for a parameter that has none yet)."""
        return [self._bufs(b, "looksam_gv", zero=True) for b in buckets]

    def _store_gv(self) -> None:
        """g_v <- g_s - (<g, g_s> / (||g||^2 + 1e-12)) g, unnormalised, and ||g_v||^2 kept as a
        device scalar (``self._gv_sq``): one dot_sq_norms of (g_s, g), one axpby writing g_v,
        one norm of g_v.  A skipped step (first pass non-finite, or any of the three sums) writes
        nothing: the skip flag of the axpby is formed on the device (no host read), and a
        ``where`` on the same flag keeps the old ||g_v||^2, so both stay bitwise as they were.

        The parameters' rule: g_v is this step's; a parameter that has a stored g_v but no
        gradient on this full step gets g_v = 0 (under the same skip flag), so the steps until
        the next full one reuse nothing stale for it (its reuse steps use the plain gradient).
        """
        buckets = self._buckets(recheck=False)
        if not buckets:
            return
        gs = [self._bufs(b, "looksam_g", zero=True) for b in buckets]
        grads = [b.grads for b in buckets]
        gvs = self._gv_lists(buckets)
        r = _ops.dot_sq_norms(buckets, grads, gs)  # [<g_s, g>, ||g_s||^2, ||g||^2]
        first = self._run.first_scalars
        if _ops.on_host(r):
            inner, ssq, gsq = r.tolist()
            skip = 1.0 if _ops.skip_of(first, r) != 0 or not math.isfinite(inner + ssq + gsq) else 0.0
            c = _ops.coefs(1.0, -inner / (gsq + 1e-12), skip, r)
        else:
            # 1 if an entry is inf/nan (0 * inf is nan): fewer ops than isfinite.  Not r.sum() * 0:
            # a sum of finite entries may itself overflow (the host path checks the entries' sum in
            # float64, where it does not)
            bad = ((r * 0).sum() != 0).to(r.dtype)
            first_skip = _ops.skip_of(first, r)
            skip = bad if isinstance(first_skip, float) and first_skip == 0.0 else torch.maximum(bad, first_skip)
            c = _ops.coefs(1.0, -r[0] / (r[2] + 1e-12), skip, r)
        _ops.axpby(buckets, grads, gs, c, out=gvs)
        stale = self._stale_gv(buckets, c)
        gv_sq = _ops.sq_norm_over(buckets, gvs, stale)
        old = self.__dict__.get("_gv_sq")
        if old is not None:  # skipped: the old value itself (the re-read may add in another order)
            if isinstance(skip, float):
                gv_sq = old if skip != 0 else gv_sq
            else:
                gv_sq = torch.where(skip != 0, old.to(gv_sq), gv_sq)
        self._gv_sq = gv_sq
        self.has_gv = True

    def _stale_gv(self, buckets, c: torch.Tensor) -> list:
        """(backend, g_v list) of the parameters with a stored g_v and no gradient on this full step,
        zeroed under the step's skip flag; [] in the usual case (the same bucket list as at the
        last full step, checked by identity)."""
        if self.__dict__.get("_full_buckets") is buckets:
            stale = self.__dict__["_full_stale"]
            return self._zero_stale(stale, c) if stale else stale  # again: the last full step may have skipped
        present = {id(k) for b in buckets for k in b.keys}
        groups: Dict[tuple, List[torch.Tensor]] = {}
        for p in self._all_params():
            gv = self.state[p].get("looksam_gv") if p in self.state else None
            if gv is not None and id(p) not in present:
                groups.setdefault((gv.device, gv.dtype), []).append(gv)
        stale = []
        for (device, dtype), ts in groups.items():
            stale.append((backend_of(self._backend_for, device, dtype), ts))
        self.__dict__["_full_buckets"], self.__dict__["_full_stale"] = buckets, stale
        return stale if not stale else self._zero_stale(stale, c)

    def _zero_stale(self, stale: list, c: torch.Tensor) -> list:
        per = _ops.CoefsOn(c)
        for be, ts in stale:
            zero = torch.zeros(3, dtype=per(ts[0].device, ts[0].dtype).dtype, device=ts[0].device)
            zero[2:] = per(ts[0].device, ts[0].dtype)[2]  # [0, 0, skip]
            be.axpby(ts, ts, zero)
        return stale

    def _reuse(self) -> None:
        """g <- g + alpha ||g|| / (||g_v|| + eps) g_v: one norm of g, one axpby (no host read on a
        device; on the CPU the coefficient is formed on the host)."""
        buckets = self._buckets()
        if not buckets:
            return
        gvs = self._gv_lists(buckets)
        grads = [b.grads for b in buckets]
        gsq = _ops.sq_norm_over(buckets, grads)
        gv_sq = self._gv_sq_on(gsq.device)
        eps, alpha = self.perturb_eps, self.alpha
        if _ops.on_host(gsq) and gv_sq.device.type == "cpu":
            v = float(gv_sq)
            scale = alpha * math.sqrt(float(gsq)) / (math.sqrt(v) + eps) if v > 0 else 0.0
            c = _ops.coefs(1.0, scale, 0.0, gsq.reshape(1))
        else:
            gv_sq = gv_sq.to(gsq.dtype)
            scale = torch.where(gv_sq > 0, alpha * gsq.sqrt() / (gv_sq.sqrt() + eps), torch.zeros_like(gsq))
            c = _ops.coefs(1.0, scale, 0.0, gsq.reshape(1))
        _ops.axpby(buckets, grads, gvs, c)
        self.reuse_steps += 1

    def _gv_sq_on(self, device: torch.device) -> torch.Tensor:
        gv_sq = self.__dict__.get("_gv_sq")
        if gv_sq is None:
            gv_sq = self._gv_sq = torch.zeros((), device=device)
        elif gv_sq.device != device:
            gv_sq = self._gv_sq = gv_sq.to(device)
        return gv_sq

    # ------------------------------------------------------------------ state
    def _variant_extra(self) -> Dict[str, Any]:
        gv_sq = self.__dict__.get("_gv_sq")
        return {"k": self.k, "alpha": self.alpha, "has_gv": self.has_gv, "full_steps": self.full_steps,
                "reuse_steps": self.reuse_steps, "gv_sq": None if gv_sq is None else gv_sq.clone()}

    def _load_variant_extra(self, d: Dict[str, Any]) -> None:
        self.k, self.alpha, self.has_gv = int(d["k"]), float(d["alpha"]), bool(d["has_gv"])
        for name in ("_full_buckets", "_full_stale"):  # the buffers were replaced
            self.__dict__.pop(name, None)
        self.full_steps, self.reuse_steps = int(d["full_steps"]), int(d["reuse_steps"])
        if "gv_sq" in d:
            self._gv_sq = None if d["gv_sq"] is None else d["gv_sq"].clone()
        else:  # a state dict of the earlier LookSAM, which stored g_v normalised: ||g_v|| ~ 1
            self._gv_sq = torch.ones((), dtype=torch.float64, device="cpu") if self.has_gv else None
