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
one norm of g and one axpby into the copy buffer of g, which the base step reads
(``p.grad`` keeps the plain gradient).  No host synchronisation: the skip flag of
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
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch

from .. import _checks
from ..core.buckets import Buckets, backend_of
from ..core.engine import Extension, Perturbation, SAMCore, Scalars
from ..core.state import Checked, Shared
from ..core.txn import Transaction
from ..optim import FusedSAM
from . import _ops

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT


class EveryK:
    """Full SAM on steps start, start + k, start + 2k, ... (LookSAM's rule)."""

    def __init__(self, k: int, start: int = 0) -> None:
        self.k = _checks.integer("k", k, lo=1)
        self.start = _checks.integer("start", start, lo=0)

    def decide(self, opt: Any) -> bool:
        t = opt.num_steps - self.start
        return t >= 0 and t % self.k == 0

    def state_dict(self) -> Dict[str, Any]:
        return {"k": self.k, "start": self.start}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        k, start = _checks.integer("k", d["k"], lo=1), _checks.integer("start", d["start"], lo=0)
        self.k, self.start = k, start


class LookSAMSettings(Checked):
    CHECKS = {"alpha": lambda v: _checks.real("alpha", v, lo=0)}
    alpha: float


class LookSAMStep(Extension):
    """LookSAM's additions to the core step: a copy of g on full steps (first pass), g_v stored
    after the base step of a full step, and the reuse direction on the steps in between."""

    name = "LookSAM"
    buffers = ("looksam_gv",)
    transient = ("full_buckets", "full_stale")
    settings: LookSAMSettings

    def __init__(self, alpha: float, k: int) -> None:
        self.settings = LookSAMSettings(alpha=alpha)
        self.k = k
        self.has_gv = False
        self.gv_sq: Optional[torch.Tensor] = None  # ||g_v||^2 of the stored g_v (a device scalar)
        self.full_steps = 0  # full SAM steps taken (closure calls)
        self.reuse_steps = 0  # one-pass steps that used g_v
        self.forget()

    def forget(self) -> None:
        self.full_buckets: Any = None  # the bucket list of the last full step, and its stale g_v
        self.full_stale: list = []

    # ------------------------------------------------------------------ hooks
    def first_gradient(self, core: SAMCore, buckets: Buckets, tx: Transaction) -> None:
        for b in buckets:  # keep g for the projection (scratch: the gradients stay the user's)
            b.backend.restore(core.buffers(b, "looksam_g", zero=True), b.grads)

    def commit(
        self,
        core: SAMCore,
        pending: Optional[Perturbation],
        buckets: Buckets,
        scalars: Optional[Scalars],
        tx: Transaction,
    ) -> None:
        """On a full step: g_v <- g_s - (<g, g_s> / (||g||^2 + 1e-12)) g, unnormalised, with
        ||g_v||^2 kept as a device scalar: one dot_sq_norms of (g_s, g) now, and one axpby writing
        g_v plus one norm of g_v as the step's write.  A skipped step (first pass non-finite, or
        any of the three sums) writes nothing: the skip flag of the axpby is formed on the device
        (no host read), and a ``where`` on the same flag keeps the old ||g_v||^2.

        The parameters' rule: g_v is this step's; a parameter that has a stored g_v but no
        gradient on this full step gets g_v = 0 (under the same skip flag), so the steps until
        the next full one reuse nothing stale for it."""
        if pending is None or not buckets:
            return
        gs = [core.buffers(b, "looksam_g", zero=True) for b in buckets]
        grads = [b.grads for b in buckets]
        gvs = [core.buffers(b, "looksam_gv", zero=True) for b in buckets]
        r = _ops.dot_sq_norms(buckets, grads, gs)  # [<g_s, g>, ||g_s||^2, ||g||^2]
        first = pending.scalars
        skip: Union[float, torch.Tensor]
        if _ops.on_host(r):
            inner, ssq, gsq = r.tolist()
            skip = 1.0 if _ops.skip_of(first, r) != 0 or not math.isfinite(inner + ssq + gsq) else 0.0
            c = _ops.coefs(1.0, -inner / (gsq + 1e-12), skip, r)
        else:
            # 1 if an entry is inf/nan (0 * inf is nan): fewer ops than isfinite.  Not r.sum() * 0:
            # a sum of finite entries may itself overflow.
            bad = ((r * 0).sum() != 0).to(r.dtype)
            first_skip = _ops.skip_of(first, r)
            # (off the host path skip_of gives a float only as 0.0, when there are no scalars)
            skip = (
                bad
                if isinstance(first_skip, float) and first_skip == 0.0
                else torch.maximum(bad, cast(torch.Tensor, first_skip))
            )
            c = _ops.coefs(1.0, -r[0] / (r[2] + 1e-12), skip, r)
        stale = self._stale_gv(core, buckets)
        written = [t for ts in gvs for t in ts] + [t for _, ts in stale for t in ts]
        before = (self.gv_sq, self.has_gv)

        def store() -> None:
            tx.on_undo(lambda: self._set(*before))
            _ops.axpby(buckets, grads, gs, c, out=gvs)
            self._zero_stale(stale, c)
            gv_sq = _ops.sq_norm_over(buckets, gvs, stale)
            old = before[0]
            if old is not None:  # skipped: the old value itself (the re-read may add in another order)
                if isinstance(skip, float):
                    gv_sq = old if skip != 0 else gv_sq
                else:
                    gv_sq = torch.where(skip != 0, old.to(gv_sq), gv_sq)
            self._set(gv_sq, True)

        tx.write(store, written, single=False)

    def plain_gradient(self, core: SAMCore, buckets: Buckets, tx: Transaction) -> None:
        """A reuse step: the base step's gradient is g + alpha ||g|| / (||g_v|| + eps) g_v, written
        into the copy buffer of g (one norm of g, one axpby; on the CPU the coefficient is formed
        on the host)."""
        core.run.variant["looksam_reused"] = False
        run, alpha = core.run, self.settings.alpha
        start = core.settings.sam_start_step or 0
        if not (self.has_gv and run.sam_active_override is None and run.num_steps >= start and alpha != 0):
            return
        if not buckets:
            return
        gvs = [core.buffers(b, "looksam_gv", zero=True) for b in buckets]
        grads = [b.grads for b in buckets]
        out = [core.buffers(b, "looksam_g", zero=True) for b in buckets]
        gsq = _ops.sq_norm_over(buckets, grads)
        gv_sq = self._gv_sq_on(gsq.device)
        eps = core.settings.perturb_eps
        scale: Union[float, torch.Tensor]
        if _ops.on_host(gsq) and gv_sq.device.type == "cpu":
            v = float(gv_sq)
            scale = alpha * math.sqrt(float(gsq)) / (math.sqrt(v) + eps) if v > 0 else 0.0
        else:
            gv_sq = gv_sq.to(gsq.dtype)
            scale = torch.where(gv_sq > 0, alpha * gsq.sqrt() / (gv_sq.sqrt() + eps), torch.zeros_like(gsq))
        c = _ops.coefs(1.0, scale, 0.0, gsq.reshape(1))
        _ops.axpby(buckets, grads, gvs, c, out=out)
        for b, g in zip(buckets, out):
            b.grads = g
        core.run.variant["looksam_reused"] = True

    def finished(self, core: SAMCore, sam: bool) -> None:
        if sam:
            self.full_steps += 1
        elif core.run.variant.pop("looksam_reused", False):
            self.reuse_steps += 1

    # ------------------------------------------------------------------ helpers
    def _set(self, gv_sq: Optional[torch.Tensor], has_gv: bool) -> None:
        self.gv_sq, self.has_gv = gv_sq, has_gv

    def _stale_gv(self, core: SAMCore, buckets: Buckets) -> List[Tuple[Any, List[torch.Tensor]]]:
        """(backend, g_v list) of the parameters with a stored g_v and no gradient on this full step;
        [] in the usual case (the same bucket list as at the last full step, checked by identity)."""
        if self.full_buckets is buckets:
            return self.full_stale
        present = {id(k) for b in buckets for k in b.keys}
        groups: Dict[tuple, List[torch.Tensor]] = {}
        for g in core.base.param_groups:
            for p in g["params"]:
                gv = core.sam_state.get(p, {}).get("looksam_gv")
                if gv is not None and id(p) not in present:
                    groups.setdefault((gv.device, gv.dtype), []).append(gv)
        stale = [(backend_of(core.backend_for, device, dtype), ts) for (device, dtype), ts in groups.items()]
        self.full_buckets, self.full_stale = buckets, stale
        return stale

    @staticmethod
    def _zero_stale(stale: list, c: torch.Tensor) -> None:
        per = _ops.CoefsOn(c)
        for be, ts in stale:
            coef = per(ts[0].device, ts[0].dtype)
            zero = torch.zeros(3, dtype=coef.dtype, device=ts[0].device)
            zero[2:] = coef[2]  # [0, 0, skip]
            be.axpby(ts, ts, zero)

    def _gv_sq_on(self, device: torch.device) -> torch.Tensor:
        gv_sq = self.gv_sq
        if gv_sq is None:
            gv_sq = self.gv_sq = torch.zeros((), device=device)
        elif gv_sq.device != device:
            gv_sq = self.gv_sq = gv_sq.to(device)
        return gv_sq

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "alpha": self.settings.alpha,
            "has_gv": self.has_gv,
            "full_steps": self.full_steps,
            "reuse_steps": self.reuse_steps,
            "gv_sq": None if self.gv_sq is None else self.gv_sq.clone(),
        }

    def load_state_dict(self, d: Dict[str, Any]) -> Callable[[], None]:
        if not d:  # a FusedSAM state dict: LookSAM starts without g_v
            return lambda: self._load(self.settings.alpha, False, 0, 0, None)
        alpha = _checks.real("alpha", d["alpha"], lo=0)
        has_gv = _checks.flag("has_gv", d["has_gv"])
        full = _checks.integer("full_steps", d["full_steps"], lo=0)
        reuse = _checks.integer("reuse_steps", d["reuse_steps"], lo=0)
        if "gv_sq" in d:
            gv_sq = d["gv_sq"]
            if gv_sq is not None and (not torch.is_tensor(gv_sq) or gv_sq.numel() != 1):
                raise ValueError(f"LookSAM state: gv_sq must be a one-element tensor or None, got {gv_sq!r}")
            gv_sq = None if gv_sq is None else gv_sq.detach().clone().reshape(())
        else:  # LookSAM's first layout stored g_v normalised: ||g_v|| ~ 1
            gv_sq = torch.ones((), dtype=torch.float64, device="cpu") if has_gv else None
        return lambda: self._load(alpha, has_gv, full, reuse, gv_sq)

    def _load(self, alpha: float, has_gv: bool, full: int, reuse: int, gv_sq: Optional[torch.Tensor]) -> None:
        self.settings.alpha = alpha
        self.has_gv, self.full_steps, self.reuse_steps, self.gv_sq = has_gv, full, reuse, gv_sq
        self.forget()


class LookSAM(FusedSAM):
    """LookSAM: full SAM every k-th step, the stored orthogonal direction reused in between.

    ``LookSAM(params, base_optimizer, rho=0.05, adaptive=False, k=5, alpha=0.7, **FusedSAM options, **base_kwargs)``.
    Use ``step(closure)``: the closure runs only on the full SAM steps.
    """

    alpha = Shared("extension_settings", "LookSAM's alpha: the weight of the reused direction g_v.")

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        k: int = 5,
        alpha: float = 0.7,
        schedule: Any = None,
        sam_start_step: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        k = _checks.integer("k", k, lo=1)
        if schedule is None:
            start = _checks.integer("sam_start_step", sam_start_step, lo=0, none=True)
            schedule = EveryK(k, start or 0)
        super().__init__(
            params,
            base_optimizer,
            rho,
            adaptive,
            schedule=schedule,
            sam_start_step=sam_start_step,
            extension=LookSAMStep(alpha, k),
            **kwargs,
        )

    @property
    def k(self) -> int:
        """Every k-th step is a full SAM step (the period of the default schedule)."""
        return cast(LookSAMStep, self.core.ext).k

    @property
    def has_gv(self) -> bool:
        return cast(LookSAMStep, self.core.ext).has_gv

    @property
    def full_steps(self) -> int:
        return cast(LookSAMStep, self.core.ext).full_steps

    @property
    def reuse_steps(self) -> int:
        return cast(LookSAMStep, self.core.ext).reuse_steps
