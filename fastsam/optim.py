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

import functools
import math
import numbers
import warnings
import weakref
from itertools import chain
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import backends, base_steps
from ._buckets import Bucket, Plan, copies_for, pass_scalars, restore_slices, tracked
from .backends._common import SKIP

PERTURBATION_MODES = ("local", "global")
CLOSURE_CONVENTIONS = ("auto", "sam", "torch")
_LEGACY_KEYS = ("old_p", "e_w")  # restore copies other SAM classes keep in their state


class _RunState:
    """All of FusedSAM's mutable per-step state, in one object.

    Frameworks wrap optimizers in objects that copy the optimizer's ``__dict__``
    (Lightning's ``LightningOptimizer``); attribute writes made through such a
    wrapper land on the wrapper.  FusedSAM therefore never rebinds per-step
    attributes: it mutates this one shared object, which the wrapper's copied
    ``__dict__`` references too.
    """

    def __init__(self) -> None:
        self.num_steps = 0                 # completed optimizer steps (SAM or plain)
        self.pending = None                # buckets perturbed by first_step, or None
        self.first_scalars = None          # the first pass's scalars, per device
        self.decision = None               # (num_steps, the schedule's answer for that step)
        self.sam_active_override = None    # opt.sam_active = True/False
        self.skip_flag = None              # last step's skip flag (0-d device tensor)
        self.opt_called = False            # LR schedulers' "an optimizer step happened"
        self.grad_scale = None             # set by torch.amp.GradScaler.step for one step
        self.scaler_found_inf = None       # likewise
        self.in_step = False               # inside step(): hooks fire there, not in first/second_step
        self.pre_hooks_fired = False       # this step's pre hooks already ran (first_step)
        self.last_grads = None             # [(weakref(grad), version)] when the last step ended


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
        backend: "auto" | "foreach" | "triton" | "cuda" | "cpp".  An explicit
            name always wins; the ``FASTSAM_BACKEND`` environment variable is
            consulted only for "auto" (it then names the backend).  The choice
            is visible as ``opt.backend``.
        sam_start_step: late-phase SAM: plain base-optimizer steps until this
            many steps have been taken, SAM from then on.  ``None``: SAM from
            the start.  ``opt.sam_active`` overrides it when set.  Any integral
            number (``int``, ``numpy.int64``, a 0-d integer tensor) >= 0; ``rho``
            likewise any real number (``numpy.float32``, a 0-d tensor) >= 0,
            stored as a Python float.
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
        capturable: keep every group's lr in a 0-d float32 tensor on its parameters'
            device (schedulers update it in place) and read it there, so that a
            CUDA graph of the step follows LR schedules (torch.optim's name);
            ``fastsam.cuda_graphs.CapturedSAMStep`` captures a whole training
            step.  Needs backend "triton" or "foreach" for CUDA parameters.
        closure_convention: what ``step(closure)`` expects of the closure.
            "sam": the caller has run the first forward+backward; the closure
            runs the second (the widely used SAM class's contract).  "torch":
            the closure runs a whole forward+backward from scratch and FusedSAM
            calls it for both passes (torch.optim's convention, as LBFGS and
            Lightning's automatic optimization use it).  "auto" (default):
            "sam" when new gradients were computed since the last step, else
            "torch" (no gradient at all, or the very gradients the last step
            ended with: nobody ran a first pass).
        **kwargs: passed to ``base_optimizer``.

    Non-finite gradients (first or second pass) skip the perturbation and
    the step: the parameters and the optimizer state stay bitwise unchanged,
    and ``opt.skip_flag`` (a 0-d device tensor, 1.0 when skipped; also readable
    as ``opt.found_inf`` outside a GradScaler step) and ``opt.last_step_skipped``
    (a bool, reads the device) say so.

    ``torch.amp.GradScaler``: ``scaler.step(opt)`` works (the class sets
    ``_step_supports_amp_scaling``): the scaler hands over its scale and inf
    flag, and the second pass's fused step unscales the SAM gradient (the clip
    norm is the unscaled one) and skips on inf inside its scalars: no extra
    pass, no host synchronisation.  The first pass needs no unscale (g/||g|| does
    not depend on the loss scale), only its non-finite check.

    Step hooks (``register_step_pre_hook``/``register_step_post_hook``) fire
    once per optimizer step in every form: in ``step()`` around the whole step;
    in the two-step form the pre hooks at ``first_step`` (or at ``second_step``
    when no ``first_step`` ran, e.g. while SAM is inactive) and the post hooks
    at the end of ``second_step``.  Return values of pre hooks are ignored there.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler.step hands over grad_scale/found_inf

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 perturb_eps: float = 1e-12, max_grad_norm: Optional[float] = None, backend: str = "auto",
                 sam_start_step: Optional[int] = None, perturbation: str = "local", schedule: Any = None,
                 closure_convention: str = "auto", capturable: bool = False, **kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (the class, e.g. torch.optim.SGD, "
                f"not an instance); got {base_optimizer!r}")
        self._run = _RunState()
        rho = _check_rho(rho)
        if not perturb_eps > 0:
            raise ValueError(f"perturb_eps must be positive, got {perturb_eps}")
        _check_options(max_grad_norm, schedule, backend)
        sam_start_step = _check_start(sam_start_step)
        if closure_convention not in CLOSURE_CONVENTIONS:
            raise ValueError(f"closure_convention must be one of {CLOSURE_CONVENTIONS}, got {closure_convention!r}")
        if perturbation not in PERTURBATION_MODES:
            raise ValueError(f"perturbation must be one of {PERTURBATION_MODES}, got {perturbation!r}")

        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        for g in self.param_groups:
            g["rho"] = _check_rho(g["rho"])
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.__dict__.pop("_own_param_groups", None)  # from now on param_groups are the base optimizer's
        self.defaults.update(self.base_optimizer.defaults)

        self.perturb_eps = perturb_eps
        self.max_grad_norm = max_grad_norm
        self.sam_start_step = sam_start_step
        self.schedule = schedule
        self.perturbation = perturbation
        self.closure_convention = closure_convention
        self._requested_backend = backend
        self._backends: Dict[torch.device, Any] = {}
        self._plan = Plan(self._backend_for)
        # Set by fastsam.distributed for per-rank ("local") perturbation under DDP: the
        # ranks' first gradients differ, so the skip flag is all-reduced (MAX, in place,
        # on the device) before the perturbation, or one rank would skip while others step.
        self._skip_hook: Optional[Callable[[torch.Tensor], None]] = None
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.backend = self._backend_for(first.device).NAME if first is not None else "foreach"
        self.capturable = bool(capturable)
        if self.capturable:  # every group's lr in a 0-d device tensor the kernels read (fastsam.cuda_graphs)
            from .cuda_graphs import make_capturable
            make_capturable(self)

    # ------------------------------------------------------------------ shared state
    # Every per-step value lives in self._run (see _RunState): these properties keep
    # the public names while writes through a wrapper reach the optimizer.
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The base optimizer's param groups (one list, also after ``load_state_dict``)."""
        try:
            base = self.base_optimizer  # through a wrapper's __getattr__ too (LightningOptimizer)
        except AttributeError:  # inside Optimizer.__init__, before the base optimizer exists
            return self.__dict__.setdefault("_own_param_groups", [])
        return base.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        try:
            base = self.base_optimizer
        except AttributeError:
            self.__dict__["_own_param_groups"] = value
            return
        base.param_groups = value

    @property
    def num_steps(self) -> int:
        """Completed optimizer steps, SAM or plain (settable, e.g. when migrating a run)."""
        return self._run.num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self._run.num_steps = int(value)

    @property
    def _opt_called(self) -> bool:  # written by LR schedulers' step wrapper and by second_step
        return self._run.opt_called

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._run.opt_called = value

    @property
    def grad_scale(self) -> torch.Tensor:
        """The loss scale a ``torch.amp.GradScaler`` hands over for one ``scaler.step(opt)``."""
        if self._run.grad_scale is None:
            raise AttributeError("grad_scale")  # getattr(opt, "grad_scale", default) as the scaler reads it
        return self._run.grad_scale

    @grad_scale.setter
    def grad_scale(self, value: Optional[torch.Tensor]) -> None:
        self._run.grad_scale = value

    @grad_scale.deleter
    def grad_scale(self) -> None:
        self._run.grad_scale = None

    @property
    def found_inf(self) -> Optional[torch.Tensor]:
        """During ``scaler.step(opt)``: the scaler's inf flag.  Otherwise the last step's
        skip flag (the name FusedSAM used before it took GradScaler's; prefer ``skip_flag``)."""
        if self._run.scaler_found_inf is not None:
            return self._run.scaler_found_inf
        return self._run.skip_flag

    @found_inf.setter
    def found_inf(self, value: Optional[torch.Tensor]) -> None:
        self._run.scaler_found_inf = value

    @found_inf.deleter
    def found_inf(self) -> None:
        self._run.scaler_found_inf = None

    @property
    def skip_flag(self) -> Optional[torch.Tensor]:
        """The last step's skip flag: a 0-d device tensor, 1.0 when that step was skipped for
        non-finite gradients (or a GradScaler's inf), None before the first step.  Read-only."""
        return self._run.skip_flag

    @property
    def last_step_skipped(self) -> bool:
        """True when the last step was skipped for non-finite gradients (reads the device flag)."""
        flag = self._run.skip_flag
        return flag is not None and bool(flag)

    # ------------------------------------------------------------------ switches
    @property
    def sam_active(self) -> bool:
        """Whether the next step is a SAM step (settable; overrides ``sam_start_step``)."""
        run = self._run
        if run.sam_active_override is not None:
            return run.sam_active_override
        if self.schedule is not None:  # asked once per step: both passes of a step see one answer
            if run.decision is None or run.decision[0] != run.num_steps:
                run.decision = (run.num_steps, bool(self.schedule.decide(self)))
            return run.decision[1]
        return self.sam_start_step is None or run.num_steps >= self.sam_start_step

    @sam_active.setter
    def sam_active(self, value: Optional[bool]) -> None:
        self._run.sam_active_override = None if value is None else bool(value)

    @property
    def _sam_active_override(self) -> Optional[bool]:
        return self._run.sam_active_override

    @_sam_active_override.setter
    def _sam_active_override(self, value: Optional[bool]) -> None:  # fastsam.cuda_graphs saves/restores it
        self._run.sam_active_override = value

    @property
    def _pending(self):
        return self._run.pending

    @property
    def sam_start_step(self) -> Optional[int]:
        return self._run_settings.get("sam_start_step")

    @sam_start_step.setter
    def sam_start_step(self, value) -> None:
        self._run_settings["sam_start_step"] = _check_start(value)

    @property
    def _run_settings(self) -> Dict[str, Any]:
        return self._run.__dict__.setdefault("settings", {})

    # ------------------------------------------------------------------ grouping
    def _backend_for(self, device: torch.device):
        mod = self._backends.get(device)
        if mod is None:
            mod = backends.get(_resolve_backend(self._requested_backend, device))
            self._backends[device] = mod
        return mod

    def _buckets(self, recheck: bool = True) -> List[Bucket]:
        return self._plan.buckets(self.param_groups, tracked(self.base_optimizer), recheck)

    # ------------------------------------------------------------------ SAM steps
    # torch.compiler.disable: a compiled training step graph-breaks around the
    # SAM steps instead of tracing them; dynamo would drop the attribute writes
    # (the pending buckets) that tie first_step to second_step.  The kernels inside
    # are opaque custom ops anyway.
    @torch.compiler.disable
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb the parameters: w <- w + e (keeps an exact copy of w for the restore).

        Does nothing (besides ``zero_grad``) while SAM is inactive: the next
        ``second_step`` is then a plain base-optimizer step.  A second
        ``first_step`` before ``second_step`` raises (it would perturb w + e
        again and lose w); ``load_state_dict`` or ``undo_first_step()`` undo a
        pending perturbation.
        """
        run = self._run
        if run.pending:
            raise RuntimeError(
                "first_step() called twice without second_step(): the parameters are already perturbed "
                "(w + e); call second_step() (or step()) to finish this step, or undo_first_step() to return to w")
        self._fire_pre_hooks()
        run.first_scalars = None
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
                run.first_scalars = scalars
            run.pending = buckets  # the cached bucket list: the same object if the grad pattern holds
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def undo_first_step(self) -> None:
        """Restore w after ``first_step`` without taking a step (nothing happens if nothing is pending)."""
        run = self._run
        if run.pending is not None:
            for b in run.pending:
                b.backend.restore(b.params, b.copies)
        run.pending = None
        run.first_scalars = None
        run.pre_hooks_fired = False

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and let the base optimizer step with the SAM gradient.

        While SAM is inactive this is the base optimizer's step on the current
        gradient (nothing to restore), with the same non-finite skip and
        ``max_grad_norm`` clipping as SAM steps: one more read of the gradient,
        no host synchronisation on the fused paths.  Under ``scaler.step(opt)``
        (torch.amp.GradScaler) the gradient is unscaled inside the same fused step.
        """
        run = self._run
        self._fire_pre_hooks()
        if run.pending is None:
            if self.sam_active:
                run.pre_hooks_fired = False
                raise RuntimeError("second_step() called without first_step(): SAM is active, so call "
                                   "first_step() after the first backward pass")
            run.first_scalars = None
            self._update([])
        else:
            pending, run.pending = run.pending, None
            self._update(pending)
        run.first_scalars = None
        run.num_steps += 1
        run.opt_called = True  # tells LR schedulers an optimizer step happened
        if zero_grad:
            self.zero_grad()
        # What the next step(closure) compares against to tell torch's closure convention from
        # SAM's; recorded only for step(closure) under "auto" (0.5 ms at 1,000 parameters).
        run.last_grads = (_grad_marks(self.param_groups) if run.in_step and self.closure_convention == "auto"
                          else None)
        run.pre_hooks_fired = False
        if not run.in_step:
            self._fire_post_hooks()

    def _fire_pre_hooks(self) -> None:
        run = self._run
        if run.in_step or run.pre_hooks_fired:
            return
        run.pre_hooks_fired = True
        for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})

    def _fire_post_hooks(self) -> None:
        for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
            hook(self, (), {})

    def _update(self, perturbed: List[Bucket]) -> None:
        run = self._run
        buckets = self._buckets(recheck=not perturbed)  # a SAM step's first pass checked the layouts
        slices = restore_slices(perturbed, buckets)
        if not buckets:
            run.skip_flag = None
            return
        # GradScaler (scaler.step(opt)): the SAM gradient is unscaled and the scaler's inf
        # flag folded into this pass's scalars (FACTOR and SKIP), on the device.
        inv_scale = found = None
        if run.grad_scale is not None:
            inv_scale = run.grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
        if run.scaler_found_inf is not None:
            found = run.scaler_found_inf
        # The SAM gradient is read once more: its norm for clipping, and the non-finite
        # check that keeps a bad second pass from corrupting w.
        clip = self.max_grad_norm is not None or inv_scale is not None
        scalars = pass_scalars(buckets, "step", weighted=False, max_norm=self.max_grad_norm,
                               prev=run.first_scalars, inv_scale=inv_scale, found_inf=found)
        run.skip_flag = scalars[buckets[0].device][SKIP]
        adapter = base_steps.for_optimizer(self.base_optimizer)
        if adapter is None:
            base_steps.generic.step_all(self.base_optimizer, buckets, slices, scalars, clip)
            return
        for b in buckets:
            adapter.step(self.base_optimizer, b, slices[id(b)], scalars[b.device], clip)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One optimizer step.

        - After ``first_step()`` (a perturbation is pending): ``second_step()``; a
          closure, if given, is called first for the second pass.  This is how
          ``scaler.step(opt)`` and frameworks that step without a closure
          (Hugging Face Trainer, Lightning manual optimization) finish a SAM step.
        - ``step(closure)``, SAM contract (the caller has run the first
          forward+backward): the closure runs the second pass; returns its loss
          (the loss at w + e).
        - ``step(closure)``, torch contract (``closure_convention="torch"``, or
          "auto" and no new gradient since the last step): the closure runs a
          whole forward+backward; FusedSAM calls it at w and again at w + e and
          returns the first loss (the loss at w, as torch optimizers do).
        - While SAM is inactive: the base optimizer's step (see ``second_step``).
          Under the SAM contract the closure is not called and ``None`` is
          returned (no loss was computed by this call); under the torch contract
          the closure is called once and its loss returned.
        """
        run = self._run
        run.in_step = True
        try:
            return self._step(closure)
        finally:
            run.in_step = False
            run.pre_hooks_fired = False

    def _step(self, closure):
        run = self._run
        if run.pending is not None:  # finishing a step begun with first_step()
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.second_step()
            return loss
        lit = _lightning_closure(closure)
        if lit is not None and getattr(lit, "_zero_grad_fn", True) is None and getattr(lit, "_backward_fn", None):
            raise RuntimeError(
                "FusedSAM under Lightning's automatic optimization with accumulate_grad_batches > 1: Lightning "
                "runs the earlier micro-batches without the optimizer, so SAM's second pass (at w + e) could "
                "only see the last one.  Use manual optimization: accumulate the first pass over the "
                "micro-batches, opt.first_step(zero_grad=True), the second pass over the same micro-batches, "
                "opt.step() (README, 'Frameworks and AMP')")
        torch_convention = closure is not None and (
            self.closure_convention == "torch" or lit is not None  # Lightning's closure: a whole forward+backward
            or (self.closure_convention == "auto" and _grads_unchanged(self.param_groups, run.last_grads)))
        first_loss = None
        if torch_convention:
            with torch.enable_grad():
                first_loss = closure()
        if not self.sam_active:
            self.first_step()  # records that no perturbation is pending
            self.second_step()
            return first_loss
        if closure is None:
            msg = ("FusedSAM.step() was called without a closure and without first_step() while SAM is active: "
                   "a SAM step needs a second forward+backward pass at w + e.  Pass step(closure) or call "
                   "first_step() after the first backward and step()/second_step() after the second.")
            if run.grad_scale is not None or run.scaler_found_inf is not None:
                msg += ("  This call came from a GradScaler's step() without a closure, which is what "
                        "Lightning's precision='16-mixed' automatic optimization does (it runs the training "
                        "closure itself, so no second pass is possible there): use manual optimization "
                        "(self.automatic_optimization = False; manual_backward, opt.first_step(), "
                        "manual_backward, opt.step(); see examples/lightning_manual.py), or "
                        "precision='bf16-mixed' / '32' with automatic optimization.")
            raise RuntimeError(msg)
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return first_loss if torch_convention else loss

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; FusedSAM
        # needs its base optimizer and settings too.  Caches are rebuilt.
        st = dict(self.__dict__)
        run = _RunState()
        old = self._run
        run.num_steps, run.sam_active_override, run.decision = old.num_steps, old.sam_active_override, old.decision
        run.opt_called = old.opt_called
        run.__dict__["settings"] = dict(self._run_settings)
        st.update(_plan=Plan(None), _backends={}, _skip_hook=None, _run=run)
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        legacy = {k: state.pop(k) for k in ("num_steps", "_pending", "_first_scalars", "_decision",
                                            "_sam_active_override", "found_inf", "param_groups",
                                            "sam_start_step", "_opt_called") if k in state}
        self.__dict__.update(state)
        if "_run" not in self.__dict__:  # pickled by an older FusedSAM
            self._run = _RunState()
            self._run.num_steps = int(legacy.get("num_steps", 0))
            self._run.sam_active_override = legacy.get("_sam_active_override")
            self._run_settings["sam_start_step"] = legacy.get("sam_start_step")
        self.__dict__.setdefault("closure_convention", "auto")
        self._plan = Plan(self._backend_for)

    # ------------------------------------------------------------------ bookkeeping
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        group = dict(param_group)
        group.setdefault("rho", self.defaults["rho"])
        group.setdefault("adaptive", self.defaults["adaptive"])
        group["rho"] = _check_rho(group["rho"])
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
                "sam_active_override": self._run.sam_active_override,
                "perturb_eps": self.perturb_eps,
                "max_grad_norm": self.max_grad_norm,
                "perturbation": self.perturbation,
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load ``state_dict()``'s dict.  A plain ``{"state", "param_groups"}`` dict (a
        checkpoint of the widely used SAM class, of pytorch_optimizer's SAM, or of a
        plain base optimizer) loads as the base optimizer's state with a warning: such
        checkpoints hold no FusedSAM step count or late-phase settings (``num_steps``
        stays as it is; set it to resume a ``sam_start_step`` schedule), and the SAM
        classes' restore copies (``old_p``) are dropped."""
        self.undo_first_step()  # between first_step and second_step: undo the perturbation first
        legacy = isinstance(state_dict, dict) and set(state_dict) == {"state", "param_groups"}
        if legacy:
            state_dict = _from_legacy(state_dict)
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "sam"}:
            raise ValueError("state_dict is not a FusedSAM state dict (expected the keys 'base' and 'sam' "
                             "written by FusedSAM.state_dict(), or a plain {'state', 'param_groups'} "
                             "optimizer state dict)")
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
        for g in self.base_optimizer.param_groups:  # a plain checkpoint's groups may lack the SAM options
            g["rho"] = _check_rho(g.get("rho", self.defaults["rho"]))
            g.setdefault("adaptive", self.defaults["adaptive"])
        run = self._run
        run.decision = None
        self._plan.clear()
        if legacy:
            empty = not base["state"]
            warnings.warn(
                "FusedSAM.load_state_dict: loaded a plain {'state', 'param_groups'} state dict (another SAM "
                "class's or a base optimizer's) as the base optimizer's state.  It lacks FusedSAM's step count "
                f"(num_steps stays {run.num_steps}), sam_start_step/schedule and the SAM settings"
                + ("; it holds no base-optimizer state either (momentum, Adam moments: the widely used SAM "
                   "class does not save them), so those start from zero" if empty else "")
                + ".", UserWarning, stacklevel=2)
            return
        sam = state_dict["sam"]
        run.num_steps = int(sam["num_steps"])
        self.sam_start_step = sam["sam_start_step"]
        if sam.get("schedule") is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(sam["schedule"])
        run.sam_active_override = sam["sam_active_override"]
        self.perturb_eps = sam["perturb_eps"]
        self.max_grad_norm = sam["max_grad_norm"]
        self.perturbation = sam["perturbation"]


def _from_legacy(sd: Dict[str, Any]) -> Dict[str, Any]:
    state = {}
    for k, v in sd["state"].items():
        kept = {n: t for n, t in v.items() if n not in _LEGACY_KEYS}
        if kept:
            state[k] = kept
    return {"base": {"state": state, "param_groups": sd["param_groups"]}, "sam": None}


def _check_rho(rho) -> float:
    """rho as a Python float: any real number (numpy scalars, 0-d tensors included), finite, >= 0."""
    if torch.is_tensor(rho):
        if rho.numel() != 1 or rho.is_complex() or rho.dtype == torch.bool:
            raise ValueError(f"rho must be a finite number >= 0, got a tensor of shape {tuple(rho.shape)}")
        rho = rho.item()
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    return float(rho)


def _check_options(max_grad_norm, schedule, backend) -> None:
    """The constructor options FusedSAM shares with MomentumSAM."""
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
    if schedule is not None and not callable(getattr(schedule, "decide", None)):
        raise TypeError(f"schedule must have a decide(opt) -> bool method, got {schedule!r}")
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {backends.BACKENDS}, got {backend!r}")


def _check_start(step) -> Optional[int]:
    """sam_start_step as a Python int (numpy integers, 0-d integer tensors included) or None."""
    if step is None:
        return None
    if torch.is_tensor(step) and step.numel() == 1 and not step.is_floating_point() and step.dtype != torch.bool:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"sam_start_step must be a non-negative integer or None, got {step!r}")
    return int(step)


def _resolve_backend(requested: str, device: torch.device) -> str:
    """An explicit backend name wins; ``FASTSAM_BACKEND`` is consulted only for "auto"."""
    if requested == "auto":
        return backends.resolve("auto", device)  # reads FASTSAM_BACKEND
    ok, why = backends.get(requested).is_available(device)
    if not ok:
        raise backends.BackendUnavailable(f"backend {requested!r} cannot run on {device}: {why}")
    return requested


def _lightning_closure(closure):
    """Lightning's automatic-optimization closure object inside ``closure`` (it comes wrapped in
    functools.partial by the precision plugin), or None."""
    seen = 0
    stack = [closure]
    while stack and seen < 16:
        c = stack.pop()
        seen += 1
        t = type(c)
        if t.__name__ == "Closure" and t.__module__.split(".")[0] in ("lightning", "pytorch_lightning"):
            return c
        if isinstance(c, functools.partial):
            stack.extend([c.func, *c.args])
    return None


def _grad_marks(param_groups) -> list:
    """Which gradient tensors exist now, and their versions (see _grads_unchanged)."""
    return [(weakref.ref(p.grad), p.grad._version) for g in param_groups for p in g["params"] if p.grad is not None]


def _grads_unchanged(param_groups, marks) -> bool:
    """True when no backward ran since the last step: no gradient at all, or exactly the
    gradient tensors (same objects, same versions) the last step ended with."""
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    if marks is None or len(marks) != len(grads):
        return False
    return all(ref() is t and t._version == v for (ref, v), t in zip(marks, grads))
