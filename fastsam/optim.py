"""FusedSAM: Sharpness-Aware Minimization as a drop-in torch.optim.Optimizer.

One SAM step (Foret et al., 2021): g = grad L(w); e = rho * g / ||g|| (ASAM:
rho * w^2 g / || |w| g ||); g_sam = grad L(w + e); restore w; the base
optimizer steps with g_sam.

This module is the torch surface: the constructor, ``step(closure)`` and its closure
conventions, the two-step form, hooks, the GradScaler protocol and the state dict.
The step itself is the core's (fastsam/core/engine.py): plan the buckets, perturb,
update, finish, each call all or nothing, through the backends (fastsam/backends).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from itertools import chain
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Type

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import _checks
from .core import checkpoint
from .core.engine import Extension, SAMCore
from .core.state import Settings, Shared, check_group
from .integrations import lightning

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT


def optimizer_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` under ``torch.no_grad()`` and outside ``torch.inference_mode()``.

    Grad mode is switched by hand: the decorator builds and enters context objects on every
    call, a cost a SAM pass pays twice per step with cold caches.  Inference mode is left
    because what a step creates there (restore copies, momentum, a variant's buffers, undo
    snapshots) would be inference tensors, which torch refuses to update in place once the mode
    is off: ``torch.optim.SGD`` with momentum, stepped once inside it, raises at every step after."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return call(*args, **kwargs)
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_grad_enabled(prev)

    return call


class SAMOptimizer(Optimizer):
    """What every fastsam optimizer shares with torch.optim: the base optimizer and its
    ``param_groups``/``state`` (one list and one mapping, so LR schedulers and tools that
    read optimizer state see the base optimizer's), the settings as checked public
    attributes, the state dict in torch's layout, and pickling."""

    core: SAMCore  # set in _setup (through __dict__: wrappers' attribute writes never rebind it)

    num_steps = Shared("run", "Completed optimizer steps, SAM or plain (settable, e.g. to migrate a run).")
    sam_active_override = Shared(
        "run", "The override ``opt.sam_active = True/False`` set (None: the schedule decides)."
    )
    perturb_eps = Shared("settings", "Added to the norm in 1/(||g|| + eps), so a zero gradient gives e = 0.")
    max_grad_norm = Shared(
        "settings", "Clip the gradient the base optimizer steps with to this global norm (None: no clip)."
    )
    sam_start_step = Shared(
        "settings", "Plain base steps until this many steps were taken, SAM afterwards (None: always SAM)."
    )
    schedule = Shared("settings", "An object deciding per step whether it is a SAM step (fastsam.schedules).")

    def _setup(
        self,
        params: ParamsT,
        base_optimizer: Type[Optimizer],
        defaults: Dict[str, Any],
        base_kwargs: Dict[str, Any],
        settings: Settings,
        ext: Optional[Extension],
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (the class, e.g. torch.optim.SGD, "
                f"not an instance); got {base_optimizer!r}"
            )
        self.__dict__["_building"] = []
        Optimizer.__init__(self, params, dict(defaults, **base_kwargs))
        groups = self.__dict__.pop("_building")
        self.__dict__.pop("_state_building", None)
        base = base_optimizer(groups, **base_kwargs)
        self.defaults.update(base.defaults)
        core = self.__dict__["core"] = SAMCore(self, base, settings, ext)
        for device in {p.device for g in groups for p in g["params"]}:
            core.backend_for(device)  # an unavailable explicit backend is refused here, not at the first step

    # ------------------------------------------------------------------ shared with the base optimizer
    @property
    def base_optimizer(self) -> Optimizer:
        """The base optimizer (built here from the class and keyword arguments)."""
        return self.core.base

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The base optimizer's param groups (one list, also after ``load_state_dict``)."""
        building = self.__dict__.get("_building")
        return building if building is not None else self.core.base.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        if "_building" in self.__dict__:  # torch's Optimizer.__init__
            self.__dict__["_building"] = value
        else:
            self.core.base.param_groups = value

    @property
    def state(self) -> Any:
        """The base optimizer's per-parameter state (momentum buffers, Adam moments)."""
        if "_building" in self.__dict__:
            return self.__dict__.setdefault("_state_building", {})
        return self.core.base.state

    @state.setter
    def state(self, value: Any) -> None:
        if "_building" in self.__dict__:
            self.__dict__["_state_building"] = value
        else:
            self.core.base.state = value

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (with its own ``rho``/``adaptive`` if given) to the base optimizer.
        A parameter listed twice is refused: SAM would perturb it twice."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        seen: Dict[int, int] = {}
        for i, p in enumerate(tensors):
            if id(p) in seen:
                raise ValueError(
                    f"param group lists parameter {seen[id(p)]} twice (again at position {i}); "
                    "SAM would perturb it twice"
                )
            seen[id(p)] = i
        group.setdefault("rho", self.defaults["rho"])
        group.setdefault("adaptive", self.defaults["adaptive"])
        check_group(group)
        group["params"] = params
        if "_building" in self.__dict__:
            return super().add_param_group(group)
        self.core.base.add_param_group(group)
        self.core.forget()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.core.base.zero_grad(set_to_none=set_to_none)

    @property
    def backend(self) -> str:
        """The backend the parameters' device runs on ("foreach", "triton", "cuda", "cpp")."""
        first = next((p for g in self.param_groups for p in g["params"]), None)
        return self.core.backend_for(first.device).NAME if first is not None else "foreach"

    def backend_for(self, device: torch.device) -> ModuleType:
        """The backend module that runs the parameters on ``device``."""
        return self.core.backend_for(torch.device(device))

    def grad_sq_norm(self) -> float:
        """||g||^2 over every parameter with a gradient now, through the fused backend norms (one host
        read; accumulated in float64, so finite for every finite gradient); what adaptive schedules
        decide from."""
        return self.core.grad_sq_norm()

    @property
    def skip_flag(self) -> Optional[torch.Tensor]:
        """The last step's skip flag: a 0-d device tensor, 1.0 when that step was skipped for
        non-finite gradients (or a GradScaler's inf), None before the first step.  Read-only."""
        return self.core.run.skip_flag

    @property
    def last_step_skipped(self) -> bool:
        """True when the last step was skipped for non-finite gradients (reads the device flag)."""
        flag = self.core.run.skip_flag
        return flag is not None and bool(flag)

    @property
    def _opt_called(self) -> bool:  # LR schedulers' step-tracking flag (torch.optim.lr_scheduler)
        return self.core.run.opt_called

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self.core.run.opt_called = value

    # ------------------------------------------------------------------ state dict (torch's layout)
    def state_dict(self) -> Dict[str, Any]:
        """torch's layout (``state``, ``param_groups``: the base optimizer's, with each group's
        rho/adaptive) plus ``"fastsam"``: the step count, the switches, the settings and the
        variant's buffers.  State-dict hooks fire as torch's optimizers fire them."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = dict(self.core.base.state_dict())
        sd["fastsam"] = self._fastsam_state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, sd)
            if out is not None:
                sd = out
        return sd

    @optimizer_call
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict of this optimizer (the current layout, fastsam's first one, or a plain
        ``{"state", "param_groups"}`` dict with a warning: fastsam/integrations/checkpoints.py).
        Everything is checked before anything changes; a pending perturbation is undone."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        self._load(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _fastsam_state(self) -> Dict[str, Any]:
        return checkpoint.state_dict(self.core)

    def _load(self, state_dict: Dict[str, Any]) -> None:
        with torch.no_grad():  # a pending perturbation is undone by writing into the parameters
            checkpoint.load(self.core, state_dict)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; the core holds the rest.
        st = dict(self.__dict__)
        st.pop("_state_building", None)
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        if "core" not in state:
            raise ValueError(
                "this pickle holds an optimizer of an earlier fastsam version; rebuild the optimizer "
                "and load its state_dict() instead"
            )
        Optimizer.__setstate__(self, state)
        self.core.owner = weakref.ref(self)


class FusedSAM(SAMOptimizer):
    r"""Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Same constructor and methods as the widely used ``SAM(params, base_optimizer,
    rho=0.05, adaptive=False, **kwargs)``: ``first_step``, ``second_step``,
    ``step(closure)``, ``base_optimizer`` and ``param_groups`` shared with the base
    optimizer (an LR scheduler attached to this object drives the base optimizer's lr).

    Args:
        params: parameters or param groups (groups may set their own ``rho`` and ``adaptive``).
        base_optimizer: a ``torch.optim.Optimizer`` subclass (the class, not an instance);
            built here with ``**kwargs``.
        rho: neighbourhood radius (>= 0). ASAM typically needs ~10x larger.
        adaptive: ASAM's scale-invariant perturbation rho * w^2 g / || |w| g || (a bool).
        perturb_eps: added to the gradient norm so that a zero gradient gives e = 0, never NaN
            (named so that a base optimizer's own ``eps``, e.g. Adam's, passes through).
        max_grad_norm: clip the SAM gradient (the second one) to this global L2 norm before the
            base step.  The first gradient is never clipped: the perturbation uses only its
            direction g/||g||, which clipping does not change.
        backend: "auto" | "foreach" | "triton" | "cuda" | "cpp".  An explicit name always wins;
            the ``FASTSAM_BACKEND`` environment variable is consulted only for "auto"
            (fastsam.backends.resolve).  The choice is visible as ``opt.backend``.
        sam_start_step: late-phase SAM: plain base-optimizer steps until this many steps have
            been taken, SAM from then on.  ``None``: SAM from the start.  ``opt.sam_active``
            overrides it when set.
        schedule: decides per step whether it is a SAM step (fastsam.schedules): an object with
            ``decide(opt) -> bool``, asked once per step before its first pass's perturbation,
            and optionally ``rho_scale(opt) -> float`` (a multiplier of every group's rho on SAM
            steps), ``state_dict()`` and ``load_state_dict(d)``.  Takes precedence over
            ``sam_start_step``; ``opt.sam_active`` overrides both.
        perturbation: "local" (default) | "global": under DDP, whether the perturbation uses
            each rank's own gradient (m-sharpness, as the original SAM) or the all-reduced one;
            see fastsam.distributed.
        capturable: keep every group's lr in a 0-d float32 tensor on its parameters' device, so
            that a CUDA graph of the step follows LR schedules (fastsam.cuda_graphs).
        closure_convention: what ``step(closure)`` expects of the closure.  "sam": the caller has
            run the first forward+backward; the closure runs the second (the widely used SAM
            class's contract).  "torch": the closure runs a whole forward+backward from scratch
            and FusedSAM calls it for both passes (torch.optim's convention, as LBFGS and
            Lightning's automatic optimization use it).  "auto" (default): "torch" when no
            backward ran since the last step (no gradient at all, the very gradients the last
            step ended with, or gradients zeroed in place: read once in that case), else "sam".
        **kwargs: passed to ``base_optimizer``.

    Every setting is checked wherever it enters (constructor, setters, ``add_param_group``,
    ``load_state_dict``, and at the next step for a param group's ``rho``/``adaptive`` edited in
    place).  Every public call that changes anything is all or nothing: if it raises, the
    parameters, the gradients and the optimizer state are as they were before it.

    Non-finite gradients (first or second pass) skip the perturbation and the step: the
    parameters and the optimizer state stay bitwise unchanged, and ``opt.skip_flag`` and
    ``opt.last_step_skipped`` say so.

    ``torch.amp.GradScaler``: ``scaler.step(opt)`` works: the scaler hands over its scale and
    inf flag, and the second pass's fused step unscales the SAM gradient and skips on inf
    inside its scalars, with no host synchronisation.

    Step hooks fire once per optimizer step in every form: in ``step()`` around the whole
    step; in the two-step form the pre hooks at ``first_step`` (or at ``second_step`` when no
    ``first_step`` ran) and the post hooks at the end of ``second_step``.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler.step hands over grad_scale/found_inf
    perturbation = Shared("settings", "'local' or 'global' perturbation under DDP (fastsam.distributed).")
    closure_convention = Shared("settings", "What step(closure) expects of the closure: 'auto', 'sam' or 'torch'.")
    skip_reducer = Shared(
        "settings",
        "Called with the first pass's skip flag before the perturbation "
        "(fastsam.distributed reduces it over DDP ranks); not saved.",
    )

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: Type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        perturb_eps: float = 1e-12,
        max_grad_norm: Optional[float] = None,
        backend: str = "auto",
        sam_start_step: Optional[int] = None,
        perturbation: str = "local",
        schedule: Any = None,
        closure_convention: str = "auto",
        capturable: bool = False,
        extension: Optional[Extension] = None,
        **kwargs: Any,
    ) -> None:
        settings = Settings(
            perturb_eps=perturb_eps,
            max_grad_norm=max_grad_norm,
            sam_start_step=sam_start_step,
            schedule=schedule,
            perturbation=perturbation,
            closure_convention=closure_convention,
            backend=backend,
            capturable=capturable,
            skip_reducer=None,
        )
        defaults = dict(rho=_checks.real("rho", rho, lo=0), adaptive=_checks.flag("adaptive", adaptive))
        self._setup(params, base_optimizer, defaults, kwargs, settings, extension)
        if settings.capturable:  # every group's lr in a 0-d device tensor the kernels read
            from .cuda_graphs import make_capturable

            make_capturable(self)

    @property
    def capturable(self) -> bool:
        return self.core.settings.capturable

    # ------------------------------------------------------------------ switches
    @property
    def sam_active(self) -> bool:
        """Whether the next step is a SAM step (settable: True/False overrides ``sam_start_step`` and
        the schedule, None returns to them)."""
        return self.core.sam_active()

    @sam_active.setter
    def sam_active(self, value: Optional[bool]) -> None:
        self.core.run.sam_active_override = value

    # ------------------------------------------------------------------ GradScaler's protocol
    @property
    def grad_scale(self) -> torch.Tensor:
        """The loss scale a ``torch.amp.GradScaler`` hands over for one ``scaler.step(opt)``."""
        scale = self.core.run.grad_scale
        if scale is None:
            raise AttributeError("grad_scale")  # getattr(opt, "grad_scale", default), as the scaler reads it
        return scale

    @grad_scale.setter
    def grad_scale(self, value: Optional[torch.Tensor]) -> None:
        self.core.run.grad_scale = value

    @grad_scale.deleter
    def grad_scale(self) -> None:
        self.core.run.grad_scale = None

    @property
    def found_inf(self) -> Optional[torch.Tensor]:
        """During ``scaler.step(opt)``: the scaler's inf flag.  Otherwise the last step's skip flag."""
        run = self.core.run
        return run.scaler_found_inf if run.scaler_found_inf is not None else run.skip_flag

    @found_inf.setter
    def found_inf(self, value: Optional[torch.Tensor]) -> None:
        self.core.run.scaler_found_inf = value

    @found_inf.deleter
    def found_inf(self) -> None:
        self.core.run.scaler_found_inf = None

    # ------------------------------------------------------------------ SAM steps
    # torch.compiler.disable: a compiled training step graph-breaks around the SAM steps
    # instead of tracing them; the kernels inside are opaque custom ops anyway.
    @torch.compiler.disable
    @optimizer_call
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb the parameters: w <- w + e (keeps an exact copy of w for the restore).

        Does nothing (besides ``zero_grad``) while SAM is inactive: the next ``second_step``
        is then a plain base-optimizer step.  A second ``first_step`` before ``second_step``
        raises (it would perturb w + e again and lose w); ``undo_first_step()`` or
        ``load_state_dict`` undo a pending perturbation.
        """
        self._fire_pre_hooks()
        try:
            self.core.first_step()
        except BaseException:
            self.core.run.pre_hooks_fired = False
            raise
        if zero_grad:
            self.zero_grad()

    @torch.compiler.disable
    @optimizer_call
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and let the base optimizer step with the SAM gradient.

        While SAM is inactive this is the base optimizer's step on the current gradient
        (nothing to restore), with the same non-finite skip and ``max_grad_norm`` clipping as
        SAM steps.  Under ``scaler.step(opt)`` the gradient is unscaled inside the same fused step.
        """
        self._fire_pre_hooks()
        run = self.core.run
        try:
            self.core.second_step()
        except BaseException:
            if run.pending is None:
                run.pre_hooks_fired = False
            raise
        if zero_grad:
            self.zero_grad()
        run.pre_hooks_fired = False
        if not run.in_step:
            self._fire_post_hooks()

    @optimizer_call
    def undo_first_step(self) -> None:
        """Put the parameters back at w after ``first_step`` without taking a step (no-op if
        nothing is pending)."""
        self.core.undo()
        self.core.run.pre_hooks_fired = False

    def _fire_pre_hooks(self) -> None:
        run = self.core.run
        if run.in_step or run.pre_hooks_fired:
            return
        run.pre_hooks_fired = True
        if _global_optimizer_pre_hooks or self._optimizer_step_pre_hooks:
            for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                hook(self, (), {})

    def _fire_post_hooks(self) -> None:
        if self._optimizer_step_post_hooks or _global_optimizer_post_hooks:
            for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                hook(self, (), {})

    @optimizer_call
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimizer step.

        - After ``first_step()`` (a perturbation is pending): ``second_step()``; a closure, if
          given, is called first for the second pass.  This is how ``scaler.step(opt)`` and
          frameworks that step without a closure finish a SAM step.
        - ``step(closure)``, SAM convention (the caller has run the first forward+backward):
          the closure runs the second pass; returns its loss (the loss at w + e).
        - ``step(closure)``, torch convention: the closure runs a whole forward+backward;
          FusedSAM calls it at w and again at w + e and returns the first loss.
        - While SAM is inactive: the base optimizer's step.  Under the SAM convention the
          closure is not called and ``None`` is returned; under the torch convention it is
          called once and its loss returned.
        - ``step()`` without a closure while SAM is active is refused (a SAM step needs a second
          pass), unless every gradient is zero: e = 0 then, so the step is whole (this is how
          torch's distributed checkpoint creates optimizer state).

        All or nothing: if anything raises (the closure included, ``KeyboardInterrupt`` too),
        the weights are back at w and the optimizer state is as it was before the exception
        propagates.  The gradients are as they were if the failure came before the step took
        them over (a check, a malformed gradient); once the closure has been called, the first
        gradient has been released (as ``first_step(zero_grad=True)`` releases it, so that a
        second copy of the gradients is not held through the second backward), and ``p.grad``
        is left empty (None) rather than holding what a failed closure computed.
        """
        run = self.core.run
        run.in_step = True
        began = run.pending is None  # a pending first_step is the caller's, and stays pending on failure
        handed: List[bool] = []  # set once the step has taken the gradients over
        try:
            return self._step(closure, handed)
        except BaseException:
            if began and handed:
                self.core.undo()
                for g in self.param_groups:
                    for p in g["params"]:
                        p.grad = None
            raise
        finally:
            run.in_step = False
            run.pre_hooks_fired = False

    def _step(self, closure: Optional[Callable[[], Any]], handed: List[bool]) -> Any:
        core = self.core
        run = core.run
        if run.pending is not None:  # finishing a step begun with first_step()
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.second_step()
            return loss
        auto = lightning.automatic_closure(closure)
        if auto is not None and lightning.accumulates(auto):
            raise RuntimeError(lightning.ACCUMULATION_RECIPE)
        torch_convention = closure is not None and (auto is not None or self._torch_convention())
        first_loss = None
        if closure is not None and torch_convention:  # (torch_convention implies a closure)
            handed.append(True)
            with torch.enable_grad():
                first_loss = closure()
            _check_produced(self.param_groups, "the closure's first call")
        if not self.sam_active:
            self.second_step()
            self._mark_grads()
            return first_loss
        if closure is None and self._all_gradients_zero():
            # e = 0: the gradient at w + e is the one at hand, so this is a whole SAM step (torch's
            # distributed checkpoint creates optimizer state this way, with zero gradients and lr 0).
            self.first_step()
            self.second_step()
            return None
        if closure is None:
            msg = (
                "FusedSAM.step() was called without a closure and without first_step() while SAM is active: "
                "a SAM step needs a second forward+backward pass at w + e.  Pass step(closure) or call "
                "first_step() after the first backward and step()/second_step() after the second."
            )
            if run.grad_scale is not None or run.scaler_found_inf is not None:
                msg += lightning.FP16_RECIPE
            raise RuntimeError(msg)
        if not torch_convention:
            _check_produced(self.param_groups, "the first backward pass (before step(closure))")
        self.first_step()
        handed.append(True)
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        _check_produced(self.param_groups, "the closure (the second pass, at w + e)")
        self.second_step()
        self._mark_grads()
        return first_loss if torch_convention else loss

    def _torch_convention(self) -> bool:
        """Under closure_convention="auto": True when no backward ran since the last step."""
        convention = self.core.settings.closure_convention
        if convention != "auto":
            return convention == "torch"
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        marks = self.core.run.last_grads
        if marks is None or len(marks) != len(grads) or any(ref() is not t for (ref, _), t in zip(marks, grads)):
            return False  # new gradient tensors: a first pass ran
        if self._marks_hold():
            return True  # the very gradients the last step ended with
        # The same tensors, changed in place: zero_grad(set_to_none=False), perhaps followed by a
        # backward.  Only their values tell: all zero means nobody ran a first pass.
        return not any(bool(t.any()) for t in grads)

    def _all_gradients_zero(self) -> bool:
        """Whether every gradient is zero or absent (reads them: only where step() would refuse)."""
        return all(p.grad is None or not bool(p.grad.any()) for g in self.param_groups for p in g["params"])

    def _marks_hold(self) -> bool:
        """Whether the gradients are the very tensors (and versions) the last step(closure) ended with."""
        marks = self.core.run.last_grads
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return (
            marks is not None
            and len(marks) == len(grads)
            and all(ref() is t and t._version == v for (ref, v), t in zip(marks, grads))
        )

    def __getstate__(self) -> Dict[str, Any]:
        # The marks are weak references, not copied: the copy marks its own copies of the gradients.
        return dict(super().__getstate__(), _marks_hold=self._marks_hold())

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        hold = state.pop("_marks_hold", False)
        super().__setstate__(state)
        if hold:
            self._mark_grads()

    def _mark_grads(self) -> None:
        """What the next step(closure) compares against to tell the conventions apart."""
        run = self.core.run
        run.last_grads = (
            [
                (weakref.ref(p.grad), p.grad._version)
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None
            ]
            if self.core.settings.closure_convention == "auto"
            else None
        )

    @contextlib.contextmanager
    def sam_forced(self, active: bool) -> Iterator[None]:
        """Inside the block every step is a SAM step (True) or a plain one (False), whatever the
        schedule says; the override in place before is restored after it."""
        run = self.core.run
        before = run.sam_active_override
        run.sam_active_override = active
        try:
            yield
        finally:
            run.sam_active_override = before

    def finish_step(self, skip_flag: Optional[torch.Tensor]) -> None:
        """Count a step taken outside ``step()`` (a replayed CUDA graph: fastsam.cuda_graphs)."""
        self.core.finish_step(skip_flag)


def _check_produced(param_groups: List[Dict[str, Any]], what: str) -> None:
    if not any(p.grad is not None for g in param_groups for p in g["params"]):
        raise RuntimeError(
            f"{what} left no gradient on any parameter: a SAM step needs one from each pass "
            "(call loss.backward() there)"
        )
