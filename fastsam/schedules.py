"""When is a step a SAM step: schedule objects for FusedSAM and the fastsam variants.

Pass one as ``schedule=`` to ``fastsam.FusedSAM`` (or LookSAM, GSAM,
FriendlySAM, MomentumSAM).  The optimizer asks ``decide(opt) -> bool`` once per
step, before the first pass's perturbation (``opt.num_steps`` is the index of
the step being taken, counted from 0); on a ``False`` step ``step(closure)`` is
one base-optimizer step and the closure is never called.  ``rho_scale(opt)``
(optional) multiplies every group's rho on SAM steps.  ``state_dict()`` /
``load_state_dict()`` travel inside the optimizer's own state dict, so a
resumed run makes the same decisions as an uninterrupted one.

- ``LatePhase(start)``: SAM from step ``start`` on (Zhou et al., ICLR 2025),
  the same as ``sam_start_step=start``.
- ``Interval(k, rho_multiplier)``: SAM on every k-th step, as Composer's SAM
  ``interval`` (mosaicml/composer, composer/algorithms/sam/sam.py: SAM when
  ``(global_step + 1) % interval == 0``, i.e. steps k-1, 2k-1, ...), with an
  optional rho multiplier on those steps (e.g. sqrt(k), to keep the total
  perturbation).
- ``RandomSwitch(p, p_end, total_steps, seed)``: RST (Zhao et al., 2022,
  "Randomized Sharpness-Aware Training for Boosting Computational
  Efficiency"): each step is a SAM step with probability p_t, a Bernoulli trial
  from its own seeded generator; p_t is constant or linear from ``p`` to
  ``p_end`` over ``total_steps`` (their scheduled probability).
- ``Adaptive(delta, c, c_end, total_steps)``: AE-SAM (Jiang et al., ICLR 2023,
  "An Adaptive Policy to Employ Sharpness-Aware Minimization"): exponential
  moving mean mu and variance s2 of the squared stochastic gradient norm
  x = ||g||^2 (mu <- delta mu + (1-delta) x, s2 <- delta s2 + delta (1-delta) (x - mu_old)^2);
  SAM when x >= mu + c_t sqrt(s2), c_t linear from ``c`` to ``c_end``.
  Costs one gradient norm per step, which the optimizer hands over
  (``opt.grad_sq_norm()``: its backends' fused norm), and a host read of that one
  number (the decision whether to run the second pass is taken on the host).

A schedule sees the optimizer only through ``num_steps`` and (Adaptive) the
parameters' ``.grad``: any object with those works.

Settings (``k``, ``p``, ``delta``, ...) read as plain attributes and are checked
whenever they are set: in the constructor, on assignment (``sched.k = 4``) and
in ``load_state_dict``, which checks the whole state dict before it changes
anything.  Numbers may be Python, NumPy or 0-d tensor scalars and are stored as
Python numbers; a bad value raises ``ValueError`` naming the setting.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ._checks import ArgumentError, integer, real

__all__ = ["LatePhase", "Interval", "RandomSwitch", "Adaptive"]

_SEED_RANGE = {"lo": -(2**63), "hi": 2**64 - 1}  # torch.Generator.manual_seed's


class _Setting:
    """A schedule's setting, read as a plain attribute and checked whenever it is set (the
    constructor, an assignment such as ``sched.k = 4``, ``load_state_dict``), so a schedule
    never holds a value its ``decide`` would misread.  ``check(name, value)`` returns the
    stored value; the owner's ``_consistent(**changed)`` checks relations between settings."""

    def __init__(self, check: Callable[[str, Any], Any]) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj: Any, value: Any) -> None:
        v = self.check(self.name, value)
        obj._consistent(**{self.name: v})
        setattr(obj, self.slot, v)


def _fraction_steps(total_steps: Any) -> int:
    return integer("total_steps", total_steps, lo=0)


class _Schedule:
    _SETTINGS: Tuple[str, ...] = ()  # the settings, in constructor order
    _STATE: Dict[str, Callable[[str, Any], Any]] = {}  # other state_dict entries and their checks
    _SHOWN: Tuple[str, ...] = ()  # other attributes the repr shows

    def _consistent(self, **changed: Any) -> None:
        """Relations between settings, with ``changed`` in place of the current values."""

    def _checked_state(self, d: Any) -> Dict[str, Any]:
        """``d``'s settings and state entries, each checked as its setter would, naming
        ``state_dict[key]``; nothing is assigned here, so a bad state dict changes nothing."""
        kind = type(self).__name__
        checks = {n: getattr(type(self), n).check for n in self._SETTINGS}
        checks.update(self._STATE)
        if not isinstance(d, Mapping):
            raise ArgumentError(f"{kind}.load_state_dict takes a dict, got {type(d).__name__}")
        missing = [k for k in checks if k not in d]
        if missing:
            raise ArgumentError(f"{kind} state_dict has no {', '.join(map(repr, missing))} (not a {kind} state dict?)")
        values = {k: check(f"{kind} state_dict[{k!r}]", d[k]) for k, check in checks.items()}
        self._consistent(**{n: values[n] for n in self._SETTINGS})
        return values

    def _assign(self, values: Dict[str, Any]) -> None:
        """Checked values in place, settings past their setters (they are checked together)."""
        for k, v in values.items():
            setattr(self, "_" + k if k in self._SETTINGS else k, v)

    def state_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in (*self._SETTINGS, *self._STATE)}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self._assign(self._checked_state(d))

    def __repr__(self) -> str:
        shown = self._SETTINGS + self._SHOWN
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"


class LatePhase(_Schedule):
    """SAM on steps ``start``, ``start + 1``, ...; plain base steps before."""

    _SETTINGS = ("start",)
    start = _Setting(lambda n, v: integer(n, v, lo=0))

    def __init__(self, start: int) -> None:
        self.start = start

    def decide(self, opt: Any) -> bool:
        return opt.num_steps >= self.start

    def sam_fraction(self, total_steps: int) -> float:
        total_steps = _fraction_steps(total_steps)
        return max(total_steps - self.start, 0) / total_steps if total_steps else 0.0


class Interval(_Schedule):
    """SAM on every k-th step (Composer's ``interval``: steps k-1, 2k-1, ...), rho times ``rho_multiplier``."""

    _SETTINGS = ("k", "rho_multiplier", "start")
    k = _Setting(lambda n, v: integer(n, v, lo=1))
    rho_multiplier = _Setting(lambda n, v: real(n, v, lo=0))
    start = _Setting(lambda n, v: integer(n, v, lo=0))

    def __init__(self, k: int, rho_multiplier: float = 1.0, start: int = 0) -> None:
        self.k, self.rho_multiplier, self.start = k, rho_multiplier, start

    def decide(self, opt: Any) -> bool:
        t = opt.num_steps - self.start
        return t >= 0 and (t + 1) % self.k == 0

    def rho_scale(self, opt: Any) -> float:
        return self.rho_multiplier

    def sam_fraction(self, total_steps: int) -> float:
        total_steps = _fraction_steps(total_steps)
        n = max(total_steps - self.start, 0)
        return (n // self.k) / total_steps if total_steps else 0.0


def _needs_total_steps(end_name: str, end: Any, total_steps: Any) -> None:
    if end is not None and total_steps is None:
        raise ArgumentError(
            f"{end_name}={end!r} needs total_steps (the steps over which it is reached); "
            f"set total_steps first, or {end_name}=None for a constant schedule"
        )


class RandomSwitch(_Schedule):
    """RST: a SAM step with probability p_t (constant, or linear from ``p`` to ``p_end`` over ``total_steps``).

    The Bernoulli draws come from a private ``torch.Generator`` seeded with
    ``seed``; its state is in ``state_dict()``, so a resumed run draws the same.
    Setting ``seed`` reseeds that generator.  The decision is drawn once per step
    (asked again for the same step, the optimizer reuses its answer).
    """

    _SETTINGS = ("p", "p_end", "total_steps")
    _STATE = {"seed": lambda n, v: integer(n, v, lo=_SEED_RANGE["lo"], hi=_SEED_RANGE["hi"])}
    _SHOWN = ("seed",)
    p = _Setting(lambda n, v: real(n, v, lo=0, hi=1))
    p_end = _Setting(lambda n, v: real(n, v, lo=0, hi=1, none=True))
    total_steps = _Setting(lambda n, v: integer(n, v, lo=1, none=True))

    def __init__(
        self, p: float = 0.5, p_end: Optional[float] = None, total_steps: Optional[int] = None, seed: int = 0
    ) -> None:
        self._p_end = self._total_steps = None  # read by _consistent before they are set
        self.p, self.total_steps, self.p_end = p, total_steps, p_end
        self.generator = torch.Generator(device="cpu")
        self.seed = seed

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: Any) -> None:
        self._seed = self._STATE["seed"]("seed", value)
        self.generator.manual_seed(self._seed)

    def _consistent(self, **changed: Any) -> None:
        _needs_total_steps("p_end", changed.get("p_end", self.p_end), changed.get("total_steps", self.total_steps))

    def probability(self, t: int) -> float:
        if self.p_end is None:
            return self.p
        frac = min(max(t, 0) / self.total_steps, 1.0)
        return self.p + (self.p_end - self.p) * frac

    def decide(self, opt: Any) -> bool:
        u = torch.rand((), generator=self.generator, dtype=torch.float64, device="cpu").item()
        return u < self.probability(opt.num_steps)

    def sam_fraction(self, total_steps: int) -> float:
        total_steps = _fraction_steps(total_steps)
        return sum(self.probability(t) for t in range(total_steps)) / total_steps if total_steps else 0.0

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        values = self._checked_state(d)
        try:  # on a scratch generator first: a malformed state must not reach ours
            torch.Generator(device="cpu").set_state(d["generator"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ArgumentError(
                f"RandomSwitch state_dict['generator'] must be a CPU torch.Generator state (generator.get_state()): {e}"
            ) from None
        self._assign(values)
        self.generator.set_state(d["generator"])


def grad_sq_norm(opt: Any) -> float:
    """||g||^2 over every parameter with a gradient, read on the host (one number).

    A fastsam optimizer hands it over through its backends' fused norms
    (``opt.grad_sq_norm()``); any other object with ``param_groups`` gets foreach norms per
    (device, dtype)."""
    norm = getattr(opt, "grad_sq_norm", None)
    if callable(norm):
        return float(norm())
    lists: Dict[Any, list] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                lists.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    total = 0.0
    for ts in lists.values():
        norms = torch._foreach_norm(
            ts, 2, dtype=torch.float64
        )  # float64: a finite gradient's squares may overflow float32
        total += float(torch.stack(norms).pow(2).sum())
    return total


class Adaptive(_Schedule):
    """AE-SAM: SAM when ||g||^2 >= mu + c_t * std, from moving statistics of ||g||^2.

    ``delta`` is the moving-average factor; ``c`` (and ``c_end`` with
    ``total_steps``: linear in between) the threshold in standard deviations.
    ``warmup`` steps (default 1) only collect statistics and are SGD steps.
    A non-finite norm leaves the statistics unchanged and is not a SAM step
    (the optimizer skips that step anyway).  ``mean``, ``var``, ``count`` and
    ``sam_steps`` are the statistics (state, restored by ``load_state_dict``).
    """

    _SETTINGS = ("delta", "c", "c_end", "total_steps", "warmup")
    delta = _Setting(lambda n, v: real(n, v, lo=0, hi=1, hi_open=True))
    c = _Setting(lambda n, v: real(n, v))
    c_end = _Setting(lambda n, v: real(n, v, none=True))
    total_steps = _Setting(lambda n, v: integer(n, v, lo=1, none=True))
    warmup = _Setting(lambda n, v: integer(n, v, lo=0))
    _STATE = {
        "mean": lambda n, v: real(n, v),
        "var": lambda n, v: real(n, v, lo=0),
        "count": lambda n, v: integer(n, v, lo=0),
        "sam_steps": lambda n, v: integer(n, v, lo=0),
    }

    def __init__(
        self,
        delta: float = 0.9,
        c: float = 0.0,
        c_end: Optional[float] = None,
        total_steps: Optional[int] = None,
        warmup: int = 1,
    ) -> None:
        self._c_end = self._total_steps = None  # read by _consistent before they are set
        self.delta, self.c, self.total_steps, self.c_end, self.warmup = delta, c, total_steps, c_end, warmup
        self.mean = 0.0
        self.var = 0.0
        self.count = 0
        self.sam_steps = 0

    def _consistent(self, **changed: Any) -> None:
        _needs_total_steps("c_end", changed.get("c_end", self.c_end), changed.get("total_steps", self.total_steps))

    def threshold_c(self, t: int) -> float:
        if self.c_end is None:
            return self.c
        return self.c + (self.c_end - self.c) * min(max(t, 0) / self.total_steps, 1.0)

    def decide(self, opt: Any) -> bool:
        x = grad_sq_norm(opt)
        if not math.isfinite(x):
            return False
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            d = self.delta
            old = self.mean
            self.mean = d * old + (1 - d) * x
            self.var = d * self.var + d * (1 - d) * (x - old) ** 2
        self.count += 1
        sam = self.count > self.warmup and x >= self.mean + self.threshold_c(opt.num_steps) * math.sqrt(self.var)
        self.sam_steps += int(sam)
        return sam

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        values = self._checked_state(d)
        if values["sam_steps"] > values["count"]:
            raise ArgumentError(
                f"Adaptive state_dict['sam_steps'] ({values['sam_steps']}) cannot exceed "
                f"state_dict['count'] ({values['count']})"
            )
        self._assign(values)
