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
product and both norms, one axpby pass writing d (the backends' ``dot_sq_norms`` and
``axpby``); no host synchronisation (fastsam/variants/_ops.py).  Memory beyond SAM: the
copy of g and d, one parameter-sized buffer each.  The base optimizer steps with d;
``p.grad`` is left holding g_s.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Union

import torch

from .. import _checks
from ..core.buckets import Buckets
from ..core.engine import Extension, Perturbation, SAMCore
from ..core.state import Checked, Shared
from ..core.txn import Transaction
from ..optim import FusedSAM
from . import _ops

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT


class ProportionalRho:
    """rho = min_rho + (max_rho - min_rho) * (lr - min_lr) / (max_lr - min_lr) (constant max_rho if
    max_lr == min_lr)."""

    def __init__(self, max_lr: float, min_lr: float, max_rho: float, min_rho: float = 0.0) -> None:
        max_lr, min_lr = _checks.real("max_lr", max_lr, lo=0), _checks.real("min_lr", min_lr, lo=0)
        max_rho, min_rho = _checks.real("max_rho", max_rho, lo=0), _checks.real("min_rho", min_rho, lo=0)
        if not (max_lr > min_lr or (max_lr == min_lr and max_rho == min_rho)) or max_rho < min_rho:
            raise _checks.ArgumentError(
                "ProportionalRho needs max_lr > min_lr (or both equal and the rhos equal) and max_rho >= min_rho"
            )
        self.max_lr, self.min_lr, self.max_rho, self.min_rho = max_lr, min_lr, max_rho, min_rho

    def __call__(self, lr: float) -> float:
        if self.max_lr > self.min_lr:
            return self.min_rho + (self.max_rho - self.min_rho) * (lr - self.min_lr) / (self.max_lr - self.min_lr)
        return self.max_rho


def _check_rho_schedule(fn: Any) -> Any:
    if fn is not None and not callable(fn):
        raise _checks.ArgumentError(f"rho_schedule must be callable (lr -> rho) or None, got {fn!r}")
    return fn


class GSAMSettings(Checked):
    CHECKS = {"alpha": lambda v: _checks.real("alpha", v, lo=0), "rho_schedule": _check_rho_schedule}
    alpha: float
    rho_schedule: Optional[Callable[[float], float]]


class GSAMStep(Extension):
    """GSAM's additions to the core step: the rho schedule and a copy of g (first pass), the
    decomposed direction d (second pass, into a scratch buffer of its own, which the base step
    reads: ``p.grad`` keeps g_s, and the copy of g survives a failed second step for its retry)."""

    name = "GSAM"
    settings: GSAMSettings

    def __init__(self, alpha: float, rho_schedule: Optional[ProportionalRho]) -> None:
        self.settings = GSAMSettings(alpha=alpha, rho_schedule=rho_schedule)

    def first_gradient(self, core: SAMCore, buckets: Buckets, tx: Transaction) -> None:
        schedule = self.settings.rho_schedule
        if schedule is not None:
            for gi, g in enumerate(core.base.param_groups):
                old = g["rho"]
                lr = g["lr"]
                g["rho"] = _checks.real(
                    f"rho of param group {gi} (from rho_schedule)", max(float(schedule(float(lr))), 0.0), lo=0
                )
                tx.on_undo(functools.partial(g.__setitem__, "rho", old))
        if self.settings.alpha != 0:  # keep g for the decomposition (scratch: the gradients stay the user's)
            for b in buckets:
                b.backend.restore(core.buffers(b, "gsam_g"), b.grads)

    def sam_gradient(self, core: SAMCore, pending: Perturbation, buckets: Buckets, tx: Transaction) -> None:
        """d = (1 - alpha c) g_s - alpha g with c = -cos * ||g|| / (||g_s|| + eps): their g_s - alpha
        (g + c g_s) in one axpby into the copy of g, after one dot_sq_norms of (g_s, g).  The
        coefficients stay on the device (on the CPU: formed on the host, where reading is free).
        No skip flag here: a non-finite g or g_s makes d non-finite, and the second pass's norm
        skips the step (its scalars also carry the first pass's flag)."""
        alpha = self.settings.alpha
        if alpha == 0 or not pending.buckets or not buckets:
            return
        eps = core.settings.perturb_eps
        gs = [core.buffers(b, "gsam_g", zero=True) for b in buckets]
        grads = [b.grads for b in buckets]
        r = _ops.dot_sq_norms(buckets, grads, gs)  # [<g_s, g>, ||g_s||^2, ||g||^2]
        coef: Union[float, torch.Tensor]
        if _ops.on_host(r):
            inner, new_sq, old_sq = r.tolist()
            new, old = math.sqrt(new_sq), math.sqrt(old_sq)
            coef = -((inner / (new * old + eps)) * old / (new + eps))
        else:
            new_t, old_t = r[1].sqrt(), r[2].sqrt()
            coef = -((r[0] / (new_t * old_t + eps)) * old_t / (new_t + eps))
        c = _ops.coefs(1.0 - alpha * coef, -alpha, 0.0, r)
        ds = [core.buffers(b, "gsam_d") for b in buckets]  # not over g: a failed step is retried from it
        _ops.axpby(buckets, grads, gs, c, out=ds)
        for b, d in zip(buckets, ds):
            b.grads = d

    def state_dict(self) -> Dict[str, Any]:
        return {"alpha": self.settings.alpha}

    def load_state_dict(self, d: Dict[str, Any]) -> Callable[[], None]:
        values = self.settings.checked({k: d[k] for k in ("alpha",) if k in d})

        def apply() -> None:
            for k, v in values.items():
                setattr(self.settings, k, v)

        return apply


class GSAM(FusedSAM):
    """``GSAM(params, base_optimizer, rho=0.05, adaptive=False, alpha=0.1, rho_schedule=None, **kwargs)``.

    ``p.grad`` keeps the SAM gradient g_s after a step; the base optimizer steps with d."""

    alpha = Shared("extension_settings", "GSAM's alpha: how much of g's component orthogonal to g_s is removed.")
    rho_schedule = Shared("extension_settings", "rho as a function of the lr (ProportionalRho), or None.")

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        alpha: float = 0.1,
        rho_schedule: Optional[ProportionalRho] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, adaptive, extension=GSAMStep(alpha, rho_schedule), **kwargs)
