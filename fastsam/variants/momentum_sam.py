"""MomentumSAM (Becker, Altrock and Risse, 2024, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead").

One forward/backward per step.  Between steps the weights sit where the
gradient is evaluated, moved against the normalised momentum buffer v (the
update direction of SGD, w <- w - lr v):

    w~ = w - rho * v / (||v|| + 1e-12)          (||v|| global over all parameters)

``step()`` restores w exactly (from a copy), lets the base optimizer step
with the gradient taken at w~ (its momentum buffer absorbs it), and moves to
the next w~ with the new buffer.  Follows MarlonBecker/MSAM,
optimizer/msam.py (SGD: ``momentum_buffer``, ``inverse_norm_buffer`` =
1 / (||v|| + 1e-12), no perturbation before the first step) and
optimizer/adamW_msam.py (AdamW: the first moment ``exp_avg``).  Differences,
on purpose: w is restored from an exact copy rather than by adding the
perturbation back (so w is bitwise what the base optimizer produced), and the
base step is torch's own SGD/Adam/AdamW at w (their SGD adds weight decay at
w~, their AdamW decays after the Adam update).

``with opt.unperturbed():`` puts the weights at w (evaluation,
checkpointing) and back to w~ (bitwise) afterwards.  Non-finite gradients
skip the step (weights and state bitwise unchanged); ``max_grad_norm`` clips
the gradient before the base step; ``sam_start_step`` / ``schedule`` decide,
for each step, whether its gradient is taken at w~ (True) or at w: the
decision for step t is taken at the end of step t - 1 (``opt.num_steps`` = t
then).  ``adaptive`` is not part of the method and must stay False.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.optim import Optimizer

from . import _ops

_DIRECTION = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg"}


class MomentumSAM(Optimizer):
    """``MomentumSAM(params, base_optimizer, rho=..., **base_kwargs)``: SGD (momentum > 0), Adam or AdamW."""

    def __init__(self, params, base_optimizer, rho: float = 0.3, adaptive: bool = False, *,
                 max_grad_norm: Optional[float] = None, sam_start_step: Optional[int] = None, schedule: Any = None,
                 perturb_eps: float = 1e-12, **kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}")
        kind = next((v for k, v in _DIRECTION.items() if issubclass(base_optimizer, k)), None)
        if kind is None:
            raise TypeError("MomentumSAM needs torch.optim.SGD (with momentum), Adam or AdamW as base_optimizer, "
                            f"got {base_optimizer.__name__}")
        if adaptive:
            raise ValueError("MomentumSAM has no adaptive (ASAM) form; pass adaptive=False")
        if not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        if kind == "momentum_buffer" and not kwargs.get("momentum", 0):
            raise ValueError("MomentumSAM with SGD needs momentum > 0 (the perturbation follows the momentum buffer)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if schedule is not None and not callable(getattr(schedule, "decide", None)):
            raise TypeError(f"schedule must have a decide(opt) -> bool method, got {schedule!r}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.direction = kind
        self.max_grad_norm, self.sam_start_step, self.schedule = max_grad_norm, sam_start_step, schedule
        self.perturb_eps = perturb_eps
        self.num_steps = 0
        self.perturbed = False           # are the weights at w~ now?
        self.inv_norm: Optional[torch.Tensor] = None  # 1 / (||v|| + eps) of the current perturbation
        self.found_inf: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ helpers
    def _lists(self, with_grad: bool) -> Dict[Any, List]:
        """(group index, device, dtype) -> [(param, ...)] in group order."""
        out: Dict[Any, List] = {}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if with_grad and p.grad is None:
                    continue
                out.setdefault((gi, p.device, p.dtype), []).append(p)
        return out

    @torch.no_grad()
    def _restore(self) -> None:
        if not self.perturbed:
            return
        for ps in self._lists(False).values():
            ps = [p for p in ps if "msam_w" in self.state[p]]
            _ops.copy_(ps, [self.state[p]["msam_w"] for p in ps])
        self.perturbed = False

    @torch.no_grad()
    def _perturb(self, inv: Optional[torch.Tensor] = None) -> None:
        """w~ = w - rho * inv * v, with inv = 1 / (||v|| + eps) unless given (a resume)."""
        plan = self._perturb_plan()
        if not plan:
            return
        if inv is None:
            sq = _ops.total([_ops.sq_norm(vs) for _, _, vs, _ in plan])
            inv = 1.0 / (sq.sqrt() + self.perturb_eps)
        self.inv_norm = inv
        host = inv.device.type == "cpu"
        s = float(inv) if host else None  # a host scalar is free on the CPU: one launch per list
        for gi, ps, vs, ws in plan:
            rho = self.param_groups[gi]["rho"]
            _ops.copy_(ws, ps)
            if host:
                torch._foreach_add_(ps, vs, alpha=-rho * s)
            else:
                _ops.add_scaled_(ps, vs, inv.to(ps[0].device), alpha=-rho)
        self.perturbed = True

    def _perturb_plan(self):
        """[(group index, params, direction buffers, copies)] per (group, device, dtype), cached while the
        parameters with a buffer stay the same (buffers and copies are kept in place)."""
        bstate = self.base_optimizer.state
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(id(bstate[p][self.direction]) if self.direction in bstate.get(p, {}) else 0 for p in params)
        hit = self.__dict__.get("_plan_cache")
        if hit is not None and hit[0] == key:
            return hit[1]
        plan = []
        for (gi, _, _), ps in self._lists(False).items():
            ps = [p for p in ps if self.direction in bstate.get(p, {})]
            if not ps:
                continue
            for p in ps:
                c = self.state[p].get("msam_w")
                if c is None or c.shape != p.shape or c.dtype != p.dtype:
                    self.state[p]["msam_w"] = torch.empty_like(p)
            plan.append((gi, ps, [bstate[p][self.direction] for p in ps],
                         [self.state[p]["msam_w"] for p in ps]))
        self._plan_cache = (key, plan)
        return plan

    def _next_active(self) -> bool:
        if self.schedule is not None:
            return bool(self.schedule.decide(self))
        return self.sam_start_step is None or self.num_steps >= self.sam_start_step

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step with the gradient the caller took at the current (perturbed) weights.

        ``closure`` is optional, as for torch optimizers: it runs the forward and
        backward at the current weights and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lists = self._lists(True)
        grads = {k: [p.grad for p in ps] for k, ps in lists.items()}
        sq = _ops.total([_ops.sq_norm(g) for g in grads.values()]) if grads else torch.zeros(())
        bad = ~torch.isfinite(sq)
        self.found_inf = bad.float()
        if bool(bad):  # non-finite: weights (still at w~) and state bitwise unchanged
            return loss
        if self.max_grad_norm is not None:
            coef = torch.clamp(self.max_grad_norm / (sq.sqrt() + 1e-6), max=1.0)
            for g in grads.values():
                _ops.scale_(g, coef)
        self._restore()
        self.base_optimizer.step()
        self.num_steps += 1
        if self._next_active():
            self._perturb()
        return loss

    @property
    def last_step_skipped(self) -> bool:
        return self.found_inf is not None and bool(self.found_inf)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Weights at w inside the block, back at w~ (bitwise) after it."""
        was, inv = self.perturbed, self.inv_norm
        self._restore()
        try:
            yield
        finally:
            if was:
                self._perturb(inv)

    # ------------------------------------------------------------------ bookkeeping
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):
            return super().add_param_group(param_group)
        group = dict(param_group)
        group.setdefault("rho", self.defaults["rho"])
        self.base_optimizer.add_param_group(group)

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state, the settings, and w (the unperturbed weights) while perturbed."""
        params = [p for g in self.param_groups for p in g["params"]]
        return {
            "base": self.base_optimizer.state_dict(),
            "msam": {
                "num_steps": self.num_steps,
                "perturbed": self.perturbed,
                "inv_norm": self.inv_norm,
                "w": [self.state[p].get("msam_w") if self.perturbed else None for p in params],
                "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
                "sam_start_step": self.sam_start_step,
                "max_grad_norm": self.max_grad_norm,
                "perturb_eps": self.perturb_eps,
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads the state and puts the weights at the saved w~ (recomputed from the saved w and buffer,
        bitwise what the saving run had), whatever weights the model holds now."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "msam"}:
            raise ValueError("state_dict is not a MomentumSAM state dict (expected the keys 'base' and 'msam')")
        self._restore()
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        m = state_dict["msam"]
        self.num_steps, self.sam_start_step = int(m["num_steps"]), m["sam_start_step"]
        self.max_grad_norm, self.perturb_eps = m["max_grad_norm"], m["perturb_eps"]
        if m.get("schedule") is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(m["schedule"])
        params = [p for g in self.param_groups for p in g["params"]]
        if len(m["w"]) != len(params):
            raise ValueError(f"state_dict has {len(m['w'])} parameters, this optimizer has {len(params)}")
        self.perturbed = False
        if m["perturbed"]:
            with torch.no_grad():
                for p, w in zip(params, m["w"]):
                    if w is not None:
                        p.copy_(w)
            inv = m["inv_norm"]
            self._perturb(None if inv is None else inv.clone())
