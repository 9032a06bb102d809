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
  Costs one gradient norm per step, through the optimizer's cached buckets and its
  backend's fused norm, and a host read of that one number (the decision whether to
  run the second pass is taken on the host).

A schedule sees the optimizer only through ``num_steps`` and (Adaptive) the
parameters' ``.grad``: any object with those works.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

__all__ = ["LatePhase", "Interval", "RandomSwitch", "Adaptive"]


def _check_int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _check_prob(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}")


class LatePhase:
    """SAM on steps ``start``, ``start + 1``, ...; plain base steps before."""

    def __init__(self, start: int):
        _check_int("start", start, 0)
        self.start = start

    def decide(self, opt) -> bool:
        return opt.num_steps >= self.start

    def sam_fraction(self, total_steps: int) -> float:
        return max(total_steps - self.start, 0) / total_steps if total_steps else 0.0

    def state_dict(self) -> Dict[str, Any]:
        return {"start": self.start}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.start = int(d["start"])

    def __repr__(self) -> str:
        return f"LatePhase(start={self.start})"


class Interval:
    """SAM on every k-th step (Composer's ``interval``: steps k-1, 2k-1, ...), rho times ``rho_multiplier``."""

    def __init__(self, k: int, rho_multiplier: float = 1.0, start: int = 0):
        _check_int("k", k, 1)
        _check_int("start", start, 0)
        if not (isinstance(rho_multiplier, (int, float)) and math.isfinite(rho_multiplier) and rho_multiplier >= 0):
            raise ValueError(f"rho_multiplier must be a finite number >= 0, got {rho_multiplier!r}")
        self.k, self.rho_multiplier, self.start = k, float(rho_multiplier), start

    def decide(self, opt) -> bool:
        t = opt.num_steps - self.start
        return t >= 0 and (t + 1) % self.k == 0

    def rho_scale(self, opt) -> float:
        return self.rho_multiplier

    def sam_fraction(self, total_steps: int) -> float:
        n = max(total_steps - self.start, 0)
        return (n // self.k) / total_steps if total_steps else 0.0

    def state_dict(self) -> Dict[str, Any]:
        return {"k": self.k, "rho_multiplier": self.rho_multiplier, "start": self.start}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.k, self.rho_multiplier, self.start = int(d["k"]), float(d["rho_multiplier"]), int(d["start"])

    def __repr__(self) -> str:
        return f"Interval(k={self.k}, rho_multiplier={self.rho_multiplier}, start={self.start})"


class RandomSwitch:
    """RST: a SAM step with probability p_t (constant, or linear from ``p`` to ``p_end`` over ``total_steps``).

    The Bernoulli draws come from a private ``torch.Generator`` seeded with
    ``seed``; its state is in ``state_dict()``, so a resumed run draws the same.
    The decision is drawn once per step (asked again for the same step, the
    optimizer reuses its answer).
    """

    def __init__(self, p: float = 0.5, p_end: Optional[float] = None, total_steps: Optional[int] = None,
                 seed: int = 0):
        _check_prob("p", p)
        if p_end is not None:
            _check_prob("p_end", p_end)
            _check_int("total_steps", total_steps, 1)
        self.p, self.p_end, self.total_steps, self.seed = float(p), p_end, total_steps, int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def probability(self, t: int) -> float:
        if self.p_end is None:
            return self.p
        frac = min(max(t, 0) / self.total_steps, 1.0)
        return self.p + (self.p_end - self.p) * frac

    def decide(self, opt) -> bool:
        u = torch.rand((), generator=self.generator, dtype=torch.float64, device="cpu").item()
        return u < self.probability(opt.num_steps)

    def sam_fraction(self, total_steps: int) -> float:
        return sum(self.probability(t) for t in range(total_steps)) / total_steps if total_steps else 0.0

    def state_dict(self) -> Dict[str, Any]:
        return {"p": self.p, "p_end": self.p_end, "total_steps": self.total_steps, "seed": self.seed,
                "generator": self.generator.get_state()}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.p, self.p_end, self.total_steps, self.seed = float(d["p"]), d["p_end"], d["total_steps"], int(d["seed"])
        self.generator.set_state(d["generator"])

    def __repr__(self) -> str:
        return f"RandomSwitch(p={self.p}, p_end={self.p_end}, total_steps={self.total_steps}, seed={self.seed})"


def grad_sq_norm(opt) -> float:
    """||g||^2 over every parameter with a gradient, read on the host (one number).

    On FusedSAM, its variants and MomentumSAM with a compiled backend (cpp, triton, cuda): the
    optimizer's own cached buckets, one fused ``grad_sq_norm`` backend call per bucket chained
    on the device (cpp: one C++ call per bucket; no Python loop over the parameters), then one
    host read.  Otherwise (the foreach backend, buckets on several devices or sharded, any
    other object with ``param_groups``): foreach norms per (device, dtype), as before."""
    buckets = getattr(opt, "_buckets", None)
    if buckets is not None:
        bs = buckets()
        if not bs:
            return 0.0
        info = getattr(bs, "info", None)
        # one device, one compiled backend, plain tensors: chain the partial sums (the foreach
        # backend's norm is the same foreach ops as below plus its list checks: measured slower)
        if info is not None and info[2] and bs[0].backend.NAME != "foreach":
            total = None
            for b in bs:
                total = b.backend.grad_sq_norm(b.grads, accumulate=total)
            return float(total)
    lists: Dict[Any, list] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                lists.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    total = 0.0
    for ts in lists.values():
        norms = torch._foreach_norm(ts)
        total += float(torch.stack(norms).double().pow(2).sum())
    return total


class Adaptive:
    """AE-SAM: SAM when ||g||^2 >= mu + c_t * std, from moving statistics of ||g||^2.

    ``delta`` is the moving-average factor; ``c`` (and ``c_end`` with
    ``total_steps``: linear in between) the threshold in standard deviations.
    ``warmup`` steps (default 1) only collect statistics and are SGD steps.
    A non-finite norm leaves the statistics unchanged and is not a SAM step
    (the optimizer skips that step anyway).
    """

    def __init__(self, delta: float = 0.9, c: float = 0.0, c_end: Optional[float] = None,
                 total_steps: Optional[int] = None, warmup: int = 1):
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta must be in [0, 1), got {delta!r}")
        if c_end is not None:
            _check_int("total_steps", total_steps, 1)
        _check_int("warmup", warmup, 0)
        self.delta, self.c, self.c_end, self.total_steps, self.warmup = float(delta), float(c), c_end, total_steps, warmup
        self.mean = 0.0
        self.var = 0.0
        self.count = 0
        self.sam_steps = 0

    def threshold_c(self, t: int) -> float:
        if self.c_end is None:
            return self.c
        return self.c + (self.c_end - self.c) * min(max(t, 0) / self.total_steps, 1.0)

    def decide(self, opt) -> bool:
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

    def state_dict(self) -> Dict[str, Any]:
        return {"delta": self.delta, "c": self.c, "c_end": self.c_end, "total_steps": self.total_steps,
                "warmup": self.warmup, "mean": self.mean, "var": self.var, "count": self.count,
                "sam_steps": self.sam_steps}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        for k in ("delta", "c", "mean", "var"):
            setattr(self, k, float(d[k]))
        self.c_end, self.total_steps = d["c_end"], d["total_steps"]
        self.warmup, self.count, self.sam_steps = int(d["warmup"]), int(d["count"]), int(d["sam_steps"])

    def __repr__(self) -> str:
        return f"Adaptive(delta={self.delta}, c={self.c}, c_end={self.c_end}, total_steps={self.total_steps})"
