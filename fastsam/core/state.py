"""The core's shared objects: the settings and the run state, each checked on every write.

Frameworks wrap optimizers in objects whose attribute writes land on the wrapper
(Lightning's ``LightningOptimizer`` subclasses the optimizer's class and forwards
reads to it).  The optimizer therefore never rebinds anything after construction:
every value that changes lives in one of these objects, which the optimizer and any
wrapper reach through the same ``core`` attribute, and the optimizer's public
attributes forward to them (``Shared``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .. import _checks, backends

PERTURBATION_MODES = ("local", "global")
CLOSURE_CONVENTIONS = ("auto", "sam", "torch")


def unchecked(value: Any) -> Any:
    """The check of a value any object may take (``Checked`` stores it without the call)."""
    return value


class Checked:
    """An object whose attributes are checked on every write by ``CHECKS[name]`` (a function
    of the value returning the value to store).  Unknown names are refused, so a typo does
    not create a setting nobody reads."""

    CHECKS: Dict[str, Callable[[Any], Any]] = {}

    def __init__(self, **values: Any) -> None:
        for name in self.CHECKS:
            if name not in values:
                raise TypeError(f"{type(self).__name__} needs a value for {name!r}")
        for name, value in values.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        check = self.CHECKS.get(name)
        if check is None:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        object.__setattr__(self, name, value if check is unchecked else check(value))

    def as_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.CHECKS}

    def checked(self, values: Dict[str, Any]) -> Dict[str, Any]:
        """``values`` (a subset of the settings) checked, without assigning anything."""
        unknown = set(values) - set(self.CHECKS)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} entries: {sorted(unknown)}")
        return {name: self.CHECKS[name](v) for name, v in values.items()}


def check_schedule(schedule: Any) -> Any:
    if schedule is not None and not callable(getattr(schedule, "decide", None)):
        raise _checks.ArgumentError(f"schedule must have a decide(opt) -> bool method or be None, got {schedule!r}")
    return schedule


def check_backend(name: Any) -> str:
    return _checks.choice("backend", name, ("auto",) + backends.BACKENDS)


def check_reducer(fn: Any) -> Any:
    if fn is not None and not callable(fn):
        raise _checks.ArgumentError(f"skip_reducer must be callable or None, got {fn!r}")
    return fn


class Settings(Checked):
    """The settings of FusedSAM (and every optimizer built on the core)."""

    CHECKS = {
        "perturb_eps": lambda v: _checks.real("perturb_eps", v, lo=0, lo_open=True),
        "max_grad_norm": lambda v: _checks.real("max_grad_norm", v, lo=0, lo_open=True, none=True),
        "sam_start_step": lambda v: _checks.integer("sam_start_step", v, lo=0, none=True),
        "schedule": check_schedule,
        "perturbation": lambda v: _checks.choice("perturbation", v, PERTURBATION_MODES),
        "closure_convention": lambda v: _checks.choice("closure_convention", v, CLOSURE_CONVENTIONS),
        "backend": check_backend,
        "capturable": lambda v: _checks.flag("capturable", v),
        # Set by fastsam.distributed for a per-rank perturbation under DDP: the ranks' first
        # gradients differ, so the skip flag is reduced (MAX, on the device) before the
        # perturbation, or one rank would skip while others step.  Not saved.
        "skip_reducer": check_reducer,
    }
    SAVED = ("perturb_eps", "max_grad_norm", "sam_start_step", "perturbation", "closure_convention")

    # The checked values' types (annotations only: no class attributes, so every write goes through CHECKS).
    perturb_eps: float
    max_grad_norm: Optional[float]
    sam_start_step: Optional[int]
    schedule: Any
    perturbation: str
    closure_convention: str
    backend: str
    capturable: bool
    skip_reducer: Optional[Callable[[torch.Tensor], Any]]


class RunState(Checked):
    """Everything that changes from step to step."""

    CHECKS = {
        "num_steps": lambda v: _checks.integer("num_steps", v, lo=0),  # completed steps, SAM or plain
        "sam_active_override": lambda v: _checks.flag("sam_active", v, none=True),
        "pending": unchecked,  # the perturbation of a first_step not yet finished (core.Perturbation)
        "decision": unchecked,  # (num_steps, the schedule's answer for that step)
        "skip_flag": unchecked,  # the last step's skip flag (0-d device tensor)
        "opt_called": unchecked,  # LR schedulers' "an optimizer step happened"
        "grad_scale": unchecked,  # handed over by torch.amp.GradScaler.step for one step
        "scaler_found_inf": unchecked,  # likewise
        "in_step": unchecked,  # inside step(): hooks fire there, not in first/second_step
        "pre_hooks_fired": unchecked,  # this step's pre hooks already ran (first_step)
        "last_grads": unchecked,  # [(weakref(grad), version)] when the last step(closure) ended
        "variant": unchecked,  # a variant's data that lives from one pass (or step) to the next
    }

    num_steps: int
    sam_active_override: Optional[bool]
    pending: Any
    decision: Optional[Tuple[int, bool]]
    skip_flag: Optional[torch.Tensor]
    opt_called: bool
    grad_scale: Optional[torch.Tensor]
    scaler_found_inf: Optional[torch.Tensor]
    in_step: bool
    pre_hooks_fired: bool
    last_grads: Any
    variant: Dict[str, Any]

    def __init__(self) -> None:
        super().__init__(
            num_steps=0,
            sam_active_override=None,
            pending=None,
            decision=None,
            skip_flag=None,
            opt_called=False,
            grad_scale=None,
            scaler_found_inf=None,
            in_step=False,
            pre_hooks_fired=False,
            last_grads=None,
            variant={},
        )

    def count_step(self, skip_flag: Optional[torch.Tensor]) -> None:
        """End a step: nothing pending, one more step, the LR schedulers' flag, the step's skip flag.
        Stored without the per-write checks, which a step's end pays cold on every step: the count
        goes from a checked int to the next, the rest take any value."""
        store = object.__setattr__
        store(self, "pending", None)
        store(self, "num_steps", self.num_steps + 1)
        store(self, "opt_called", True)
        store(self, "skip_flag", skip_flag)

    def fresh(self) -> RunState:
        """A copy holding what survives pickling: the step count and the switches."""
        run = RunState()
        run.num_steps, run.sam_active_override, run.decision = self.num_steps, self.sam_active_override, self.decision
        run.opt_called = self.opt_called
        return run


class Shared:
    """A public attribute of an optimizer kept in one of its core's checked objects.

    ``Shared("settings")`` forwards reads and writes of the attribute to
    ``opt.core.settings``, so that writes through a framework's wrapper reach the
    optimizer and every write is checked there."""

    def __init__(self, where: str, doc: str = "", *, attr: Optional[str] = None) -> None:
        self.where, self.attr = where, attr
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.attr or name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj.core, self.where), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj.core, self.where), self.name, value)


def check_group(group: Dict[str, Any], gi: Optional[int] = None) -> Tuple[float, bool]:
    """A param group's SAM options, checked (and stored back as plain Python values)."""
    where = "" if gi is None else f" of param group {gi}"
    rho = _checks.real(f"rho{where}", group["rho"], lo=0)
    adaptive = _checks.flag(f"adaptive{where}", group["adaptive"])
    group["rho"], group["adaptive"] = rho, adaptive
    return rho, adaptive


def tensor_lr(group: Dict[str, Any]) -> bool:
    return isinstance(group.get("lr"), torch.Tensor)
