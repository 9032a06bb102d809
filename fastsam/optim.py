"""FusedSAM: Sharpness-Aware Minimization as a drop-in torch.optim.Optimizer.

One SAM step (Foret et al., 2021): g = grad L(w); e = rho * g / ||g|| (ASAM:
rho * w^2 g / || |w| g ||); g_sam = grad L(w + e); restore w; the base
optimizer steps with g_sam.

The class decides and delegates; it reads as the step does:

    first_step:  buckets (fastsam/_buckets.py: param group x device x dtype)
                 -> pass_scalars: global norm -> skip flag, 1/(||g||+eps)  (on the device)
                 -> backend.perturb per bucket (keeps an exact copy of w)
    second_step: buckets of the second pass -> restore_slices (the restore contract:
                 each call restores from distinct copies or restores nothing)
                 -> pass_scalars: norm of g_sam -> skip flag, clip coefficient
                 -> fused base step per bucket (fastsam/base_steps: sgd, adam)
                    or restore + base_optimizer.step() (base_steps/generic)

The backends (fastsam/backends) hold the arithmetic.  The global norm, the
scale and the skip decision stay on the device: no host synchronisation on
the fused paths.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer

from . import backends, base_steps
from ._buckets import Bucket, Plan, copies_for, pass_scalars, restore_slices
from .backends._common import SKIP

PERTURBATION_MODES = ("local", "global")


class FusedSAM(Optimizer):
    r"""Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Same constructor and methods as the widely used ``SAM(params,
    base_optimizer, rho=0.05, adaptive=False, **kwargs)``: ``first_step``,
    ``second_step``, ``step(closure)``, ``base_optimizer`` and
    ``param_groups`` shared with the base optimizer (an LR scheduler attached
    to this object drives the base optimizer's lr).

    Args:
        params: parameters or param groups (groups may set their own ``rho``
            and ``adaptive``).
        base_optimizer: a ``torch.optim.Optimizer`` subclass (the class, not
            an instance); built here with ``**kwargs``.
        rho: neighbourhood radius (>= 0). ASAM typically needs ~10x larger.
        adaptive: ASAM's scale-invariant perturbation rho * w^2 g / || |w| g ||.
        perturb_eps: added to the gradient norm so that a zero gradient gives
            e = 0, never NaN (named so that a base optimizer's own ``eps``,
            e.g. Adam's, passes through untouched).
        max_grad_norm: clip the SAM gradient (the second one) to this global
            L2 norm before the base step.  The first gradient is never
            clipped: the perturbation uses only its direction g/||g||, which
            clipping does not change.
        backend: "auto" | "foreach" | "triton" | "cuda" | "cpp"; the
            ``FASTSAM_BACKEND`` environment variable takes precedence.  The
            choice is visible as ``opt.backend``.
        sam_start_step: late-phase SAM: plain base-optimizer steps until this
            many steps have been taken, SAM from then on.  ``None``: SAM from
            the start.  ``opt.sam_active`` overrides it when set.
        schedule: decides per step whether it is a SAM step (fastsam.schedules: every
            k-th step, random switching, adaptive switching, ...): an object with
            ``decide(opt) -> bool``, asked once per step before its first pass's
            perturbation, and optionally ``rho_scale(opt) -> float`` (a multiplier
            of every group's rho on SAM steps), ``state_dict()`` and
            ``load_state_dict(d)``.  Takes precedence over ``sam_start_step``;
            ``opt.sam_active`` overrides both.
        perturbation: "local" (default) | "global": under DDP, whether the
            perturbation uses each rank's own gradient (m-sharpness, as the
            original SAM) or the all-reduced one; see fastsam.distributed.
        **kwargs: passed to ``base_optimizer``.

    Non-finite gradients (first or second pass) skip the perturbation and
    the step: the parameters and the optimizer state stay bitwise unchanged,
    and ``opt.found_inf`` (a 0-d device tensor, 1.0 when skipped) says so.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 perturb_eps: float = 1e-12, max_grad_norm: Optional[float] = None, backend: str = "auto",
                 sam_start_step: Optional[int] = None, perturbation: str = "local", schedule: Any = None,
                 **kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (the class, e.g. torch.optim.SGD, "
                f"not an instance); got {base_optimizer!r}")
        _check_rho(rho)
        if not perturb_eps > 0:
            raise ValueError(f"perturb_eps must be positive, got {perturb_eps}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if sam_start_step is not None and (not isinstance(sam_start_step, int) or sam_start_step < 0):
            raise ValueError(f"sam_start_step must be a non-negative int or None, got {sam_start_step!r}")
        if schedule is not None and not callable(getattr(schedule, "decide", None)):
            raise TypeError(f"schedule must have a decide(opt) -> bool method, got {schedule!r}")
        if perturbation not in PERTURBATION_MODES:
            raise ValueError(f"perturbation must be one of {PERTURBATION_MODES}, got {perturbation!r}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {backends.BACKENDS}, got {backend!r}")

        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        for g in self.param_groups:
            _check_rho(g["rho"])
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

        self.perturb_eps = perturb_eps
        self.max_grad_norm = max_grad_norm
        self.sam_start_step = sam_start_step
        self.schedule = schedule
        self._decision: Optional[tuple] = None  # (num_steps, the schedule's answer for that step)
        self.perturbation = perturbation
        self.num_steps = 0  # completed optimizer steps (SAM or plain)
        self._sam_active_override: Optional[bool] = None
        self._requested_backend = backend
        self._backends: Dict[torch.device, Any] = {}
        self._plan = Plan(self._backend_for)
        self._pending: Optional[List[Bucket]] = None  # buckets perturbed by first_step
        self._first_scalars: Optional[Dict[torch.device, torch.Tensor]] = None  # first pass's, per device
        # Set by fastsam.distributed for per-rank ("local") perturbation under DDP: the
        # ranks' first gradients differ, so the skip flag is all-reduced (MAX, in place,
        # on the device) before the perturbation, or one rank would skip while others step.
        self._skip_hook: Optional[Callable[[torch.Tensor], None]] = None
        self.found_inf: Optional[torch.Tensor] = None
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.backend = self._backend_for(first.device).NAME if first is not None else "foreach"

    # ------------------------------------------------------------------ switches
    @property
    def sam_active(self) -> bool:
        """Whether the next step is a SAM step (settable; overrides ``sam_start_step``)."""
        if self._sam_active_override is not None:
            return self._sam_active_override
        if self.schedule is not None:  # asked once per step: both passes of a step see one answer
            if self._decision is None or self._decision[0] != self.num_steps:
                self._decision = (self.num_steps, bool(self.schedule.decide(self)))
            return self._decision[1]
        return self.sam_start_step is None or self.num_steps >= self.sam_start_step

    @sam_active.setter
    def sam_active(self, value: Optional[bool]) -> None:
        self._sam_active_override = None if value is None else bool(value)

    @property
    def last_step_skipped(self) -> bool:
        """True when the last SAM step was skipped for non-finite gradients (reads the device flag)."""
        return self.found_inf is not None and bool(self.found_inf)

    # ------------------------------------------------------------------ grouping
    def _backend_for(self, device: torch.device):
        mod = self._backends.get(device)
        if mod is None:
            mod = backends.get(backends.resolve(self._requested_backend, device))
            self._backends[device] = mod
        return mod

    def _buckets(self) -> List[Bucket]:
        return self._plan.buckets(self.param_groups, self.base_optimizer.state)

    # ------------------------------------------------------------------ SAM steps
    # torch.compiler.disable: a compiled training step graph-breaks around the
    # SAM steps instead of tracing them; dynamo would drop the attribute writes
    # (self._pending) that tie first_step to second_step.  The kernels inside
    # are opaque custom ops anyway.
    @torch.compiler.disable
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb the parameters: w <- w + e (keeps an exact copy of w for the restore).

        Does nothing (besides ``zero_grad``) while SAM is inactive: the next
        ``second_step`` is then a plain base-optimizer step.
        """
        self._pending = None
        self._first_scalars = None
        if self.sam_active:
            buckets = self._buckets()
            if buckets:
                scalars = pass_scalars(buckets, "perturb", weighted=True, eps=self.perturb_eps,
                                       skip_hook=self._skip_hook)
                scale = getattr(self.schedule, "rho_scale", None)
                scale = 1.0 if scale is None else float(scale(self))
                for b in buckets:
                    b.backend.perturb(b.params, b.grads, copies_for(b, self.state), scalars[b.device],
                                      b.group["rho"] * scale, bool(b.group["adaptive"]))
                self._first_scalars = scalars
            self._pending = buckets  # the cached bucket list: the same object if the grad pattern holds
        if zero_grad:
            self.zero_grad()

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and let the base optimizer step with the SAM gradient.

        While SAM is inactive this is the base optimizer's step on the current
        gradient (nothing to restore), with the same non-finite skip and
        ``max_grad_norm`` clipping as SAM steps: one more read of the gradient,
        no host synchronisation on the fused paths.
        """
        self.found_inf = None
        if self._pending is None:
            if self.sam_active:
                raise RuntimeError("second_step() called without first_step(): SAM is active, so call "
                                   "first_step() after the first backward pass")
            self._first_scalars = None
            self._update([])
        else:
            self._update(self._pending)
            self._pending = None
        self.num_steps += 1
        self._opt_called = True  # tells LR schedulers an optimizer step happened
        if zero_grad:
            self.zero_grad()

    def _update(self, perturbed: List[Bucket]) -> None:
        buckets = self._buckets()
        slices = restore_slices(perturbed, buckets)
        if not buckets:
            return
        # The SAM gradient is read once more: its norm for clipping, and the non-finite
        # check that keeps a bad second pass from corrupting w.
        clip = self.max_grad_norm is not None
        scalars = pass_scalars(buckets, "step", weighted=False, max_norm=self.max_grad_norm,
                               prev=self._first_scalars)
        self.found_inf = scalars[buckets[0].device][SKIP]
        adapter = base_steps.for_optimizer(self.base_optimizer)
        if adapter is None:
            base_steps.generic.step_all(self.base_optimizer, buckets, slices, scalars, clip)
            return
        for b in buckets:
            adapter.step(self.base_optimizer, b, slices[id(b)], scalars[b.device], clip)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One SAM step; the caller has already run the first forward+backward.

        ``closure`` must run the second forward and backward (it is called
        with grad enabled) and may return the loss, which is returned.  While
        SAM is inactive this is the base optimizer's step (see
        ``second_step``) and the closure is never called.
        """
        if not self.sam_active:
            self.first_step()  # records that no perturbation is pending
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError(
                "FusedSAM.step() needs a closure that runs the second forward and backward pass while SAM "
                "is active; pass step(closure) or call first_step() and second_step() yourself")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; FusedSAM
        # needs its base optimizer and settings too.  Caches are rebuilt.
        st = dict(self.__dict__)
        st.update(_plan=Plan(None), _backends={}, _pending=None, _first_scalars=None, _skip_hook=None)
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._plan = Plan(self._backend_for)
        self.param_groups = self.base_optimizer.param_groups

    # ------------------------------------------------------------------ bookkeeping
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        group = dict(param_group)
        group.setdefault("rho", self.defaults["rho"])
        group.setdefault("adaptive", self.defaults["adaptive"])
        _check_rho(group["rho"])
        self.base_optimizer.add_param_group(group)
        self._plan.clear()

    def state_dict(self) -> Dict[str, Any]:
        """One dict: the base optimizer's state (momentum, Adam moments, steps,
        param groups with rho/adaptive) plus the SAM settings and late-phase state."""
        return {
            "base": self.base_optimizer.state_dict(),
            "sam": {
                "num_steps": self.num_steps,
                "sam_start_step": self.sam_start_step,
                "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
                "sam_active_override": self._sam_active_override,
                "perturb_eps": self.perturb_eps,
                "max_grad_norm": self.max_grad_norm,
                "perturbation": self.perturbation,
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self._pending is not None:  # between first_step and second_step: undo the perturbation first
            for b in self._pending:
                b.backend.restore(b.params, b.copies)
            self._pending = None
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "sam"}:
            raise ValueError("state_dict is not a FusedSAM state dict (expected the keys 'base' and 'sam' "
                             "written by FusedSAM.state_dict())")
        base = state_dict["base"]
        mine = self.base_optimizer.param_groups
        theirs = base.get("param_groups", [])
        if len(theirs) != len(mine) or any(len(a["params"]) != len(b["params"]) for a, b in zip(mine, theirs)):
            raise ValueError(
                "state_dict has a different parameter layout: "
                f"{[len(g['params']) for g in theirs]} parameters per group, this optimizer has "
                f"{[len(g['params']) for g in mine]}")
        try:
            self.base_optimizer.load_state_dict(base)
        except ValueError as exc:
            raise ValueError(f"state_dict does not fit this optimizer's parameters: {exc}") from exc
        self.param_groups = self.base_optimizer.param_groups
        sam = state_dict["sam"]
        self.num_steps = int(sam["num_steps"])
        self.sam_start_step = sam["sam_start_step"]
        if sam.get("schedule") is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(sam["schedule"])
        self._decision = None
        self._sam_active_override = sam["sam_active_override"]
        self.perturb_eps = sam["perturb_eps"]
        self.max_grad_norm = sam["max_grad_norm"]
        self.perturbation = sam["perturbation"]
        self._plan.clear()


def _check_rho(rho) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
