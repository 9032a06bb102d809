"""MomentumSAM (Becker, Altrock and Risse, 2024, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead").

One forward/backward per step.  Between steps the weights sit where the
gradient is evaluated, moved against the normalised momentum buffer v (the
update direction of SGD, w <- w - lr v):

    w~ = w - rho * v / (||v|| + 1e-12)          (||v|| global over the parameters with a gradient)

``step()`` restores w exactly (from a copy), lets the base optimizer step
with the gradient taken at w~ (its momentum buffer absorbs it), and moves to
the next w~ with the new buffer.  Follows MarlonBecker/MSAM,
optimizer/msam.py (SGD: ``momentum_buffer``, ``inverse_norm_buffer`` =
1 / (||v|| + 1e-12) over the parameters with a gradient, no perturbation
before the first step) and optimizer/adamW_msam.py (AdamW: the first moment
``exp_avg``).  Differences, on purpose: w is restored from an exact copy
rather than by adding the perturbation back (so w is bitwise what the base
optimizer produced), the base step is torch's own SGD/Adam/AdamW update at w
(their SGD adds weight decay at w~, their AdamW decays after the Adam update),
and several param groups (each with its own ``rho``) share one global ||v||
(their SGD raises on more than one group).

On the fused core (the backends and buckets FusedSAM uses), a steady-state
step is four bucket-wide backend calls and no host synchronisation on CUDA:

    grad_sq_norm(g at w~)        -> skip flag, clip coefficient        (on the device)
    restore_sgd_step / restore_adam_step
                                 w <- copy, then the base update with g (unless skipped)
    grad_sq_norm(v)              -> 1 / (||v|| + eps)                   (on the device)
    perturb(w, v, copy, -rho)    copy <- w, w~ = w - rho v / (||v|| + eps)

``with opt.unperturbed():`` puts the weights at w (evaluation,
checkpointing) and back to w~ (bitwise) afterwards.  Non-finite gradients
skip the step: the base optimizer's state and w are bitwise unchanged, and the
weights are put back at the same w~ (bitwise: the same w, v and norm).  A
skipped step still counts in ``num_steps`` (as FusedSAM counts it: whether a
step was skipped is known on the device only), so the schedule is asked after
it as after any step.  ``max_grad_norm`` clips the gradient inside the fused
step (``p.grad`` is left as it is); ``sam_start_step`` / ``schedule`` decide,
for each step, whether its gradient is taken at w~ (True) or at w: the
decision for step t is taken at the end of step t - 1 (``opt.num_steps`` = t
then).  ``adaptive`` is not part of the method and must stay False.
``backend=`` as FusedSAM's ("auto" | "foreach" | "triton" | "cuda" | "cpp").
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.optim import Optimizer

from .. import base_steps
from .._buckets import (Bucket, Buckets, Plan, _to, backend_of, copies_for, pass_scalars, restore_slices,
                        tracked)
from ..backends._common import FACTOR, SKIP, new_scalars
from ..optim import FusedSAM, _check_options, _check_start

_DIRECTION = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg"}


class MomentumSAM(Optimizer):
    """``MomentumSAM(params, base_optimizer, rho=..., **base_kwargs)``: SGD (momentum > 0), Adam or AdamW."""

    def __init__(self, params, base_optimizer, rho: float = 0.3, adaptive: bool = False, *,
                 max_grad_norm: Optional[float] = None, sam_start_step: Optional[int] = None, schedule: Any = None,
                 perturb_eps: float = 1e-12, backend: str = "auto", **kwargs):
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
        _check_options(max_grad_norm, schedule, backend)
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.direction = kind
        self.max_grad_norm, self.schedule = max_grad_norm, schedule
        self.sam_start_step = _check_start(sam_start_step)
        self.perturb_eps = perturb_eps
        self.num_steps = 0
        self.found_inf: Optional[torch.Tensor] = None  # the last step's skip flag (0-d, on the device)
        self._requested_backend = backend
        self._backends: Dict[torch.device, Any] = {}
        self._plan = Plan(self._backend_for)
        # The perturbation now in place: the buckets whose params sit at w~ (their ``copies`` hold w),
        # the direction buckets and rho it was made with, and its scalars (skip flag, 1/(||v||+eps)).
        self._perturbed: Optional[List[Bucket]] = None
        self._applied: Optional[List] = None
        self._dir_scalars: Optional[Dict[torch.device, torch.Tensor]] = None
        self._dir_cache: Optional[tuple] = None  # (step buckets, state mapping, its version, direction buckets)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.backend = self._backend_for(first.device).NAME if first is not None else "foreach"

    # ------------------------------------------------------------------ helpers
    # FusedSAM's own: the backend per device (self._requested_backend, self._backends) and the cached
    # buckets of the parameters with a gradient now (schedules read the norm through them)
    _backend_for = FusedSAM._backend_for
    _buckets = FusedSAM._buckets

    @property
    def perturbed(self) -> bool:
        """Are the weights at w~ now?"""
        return self._perturbed is not None

    @property
    def inv_norm(self) -> Optional[torch.Tensor]:
        """1 / (||v|| + eps) of the current perturbation (0-d, on the device), or None."""
        if self._dir_scalars is None:
            return None
        return next(iter(self._dir_scalars.values()))[FACTOR]

    def _directions(self, buckets: List[Bucket]):
        """(buckets to restore from next step, direction buckets): the step's buckets with the
        direction buffers (momentum_buffer / exp_avg) as their ``grads`` and the restore copies.
        Cached per bucket list while the base optimizer's state mapping is unchanged (the buffers
        are updated in place); parameters without a buffer yet (a skipped first step) are left out."""
        state = tracked(self.base_optimizer)
        hit = self._dir_cache
        if hit is not None and hit[0] is buckets and hit[1] is state and hit[2] == state.version:
            return buckets, hit[3]
        name = self.direction
        dirs, source, complete = Buckets(), [], True
        for b in buckets:
            vs = [d.get(name) for d in b.states(state)]
            if all(v is not None for v in vs):
                copies = copies_for(b, self.state)
                src, keys, params = b, b.keys, b.params
            else:  # a sub-bucket of the parameters that have a buffer (restored through the general path)
                complete = False
                ids = [i for i, v in enumerate(vs) if v is not None]
                if not ids:
                    continue
                keys, params, vs = [b.keys[i] for i in ids], [b.params[i] for i in ids], [vs[i] for i in ids]
                src = Bucket(b.group, params, b.backend, keys=keys, shard=b.shard)
                copies = copies_for(src, self.state)
            source.append(src)
            dirs.append(Bucket(b.group, params, b.backend, grads=b.local(vs), keys=keys, shard=b.shard,
                               copies=copies))
        if not dirs:
            return None, None
        if complete and all(b.shard is None for b in buckets):
            dirs.info = getattr(buckets, "info", None)
            self._dir_cache = (buckets, state, state.version, dirs)
            return buckets, dirs
        return source, dirs

    def _perturb(self, buckets: List[Bucket]) -> None:
        """w~ = w - rho * v / (||v|| + eps) on the parameters of ``buckets`` (copies <- w first)."""
        source, dirs = self._directions(buckets)
        if dirs is None:
            return
        scalars = pass_scalars(dirs, "perturb", weighted=False, eps=self.perturb_eps)
        self._apply(dirs, scalars, [-d.group["rho"] for d in dirs])
        self._perturbed = source

    def _apply(self, dirs, scalars, rhos) -> None:
        for d, r in zip(dirs, rhos):
            d.backend.perturb(d.params, d.grads, d.copies, scalars[d.device], r, False)
        self._applied, self._dir_scalars = (dirs, rhos), scalars

    def _restore(self) -> None:
        if self._perturbed is not None:
            for b in self._perturbed:
                b.backend.restore(b.params, b.copies)
            self._perturbed = None

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
        buckets = self._buckets()
        perturbed, self._perturbed = self._perturbed, None
        if perturbed is None:
            slices = {id(b): [b.whole([])] for b in buckets}
        else:  # w <- copy inside the fused step (parameters perturbed but without a gradient: restored here)
            slices = restore_slices(perturbed, buckets)
        if buckets:
            scalars = pass_scalars(buckets, "step", weighted=False, max_norm=self.max_grad_norm)
            self.found_inf = scalars[buckets[0].device][SKIP]
            clip = self.max_grad_norm is not None
            adapter = base_steps.for_optimizer(self.base_optimizer)
            if adapter is None:
                base_steps.generic.step_all(self.base_optimizer, buckets, slices, scalars, clip)
            else:
                for b in buckets:
                    adapter.step(self.base_optimizer, b, slices[id(b)], scalars[b.device], clip)
        else:
            self.found_inf = None
        self.num_steps += 1
        self._applied = self._dir_scalars = None
        if self._next_active() and buckets:
            self._perturb(buckets)
        return loss

    @property
    def skip_flag(self) -> Optional[torch.Tensor]:
        """The last step's skip flag (0-d device tensor, 1.0 when skipped), None before the first step."""
        return self.found_inf

    @property
    def last_step_skipped(self) -> bool:
        """True when the last step was skipped for non-finite gradients (reads the device flag)."""
        return self.found_inf is not None and bool(self.found_inf)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Weights at w inside the block, back at w~ (bitwise) after it.  A ``step()`` taken inside
        the block (its gradient then taken at w) leaves the weights where that step put them."""
        was, applied, scalars, n = self._perturbed, self._applied, self._dir_scalars, self.num_steps
        with torch.no_grad():
            self._restore()
        # state_dict() inside the block saves the suspended perturbation (a checkpoint written
        # here resumes at w~, as one written outside the block)
        self._suspended = (was, applied, scalars, n) if was is not None else None
        try:
            yield
        finally:
            self._suspended = None
            if was is not None and self._perturbed is None and self.num_steps == n:
                with torch.no_grad():
                    self._apply(applied[0], scalars, applied[1])
                self._perturbed = was

    # ------------------------------------------------------------------ bookkeeping
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):
            return super().add_param_group(param_group)
        group = dict(param_group)
        group.setdefault("rho", self.defaults["rho"])
        self.base_optimizer.add_param_group(group)
        self._plan.clear()
        self._dir_cache = None

    def _flat(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state, the settings, and w (the unperturbed weights) while perturbed
        (also inside ``unperturbed()``, where the perturbation is only suspended)."""
        params = self._flat()
        perturbed, applied, dir_scalars = self._perturbed, self._applied, self._dir_scalars
        sus = self.__dict__.get("_suspended")
        if perturbed is None and sus is not None and sus[3] == self.num_steps:  # inside unperturbed()
            perturbed, applied, dir_scalars = sus[0], sus[1], sus[2]
        w: Dict[int, torch.Tensor] = {}
        for b in perturbed or ():
            w.update(zip(map(id, b.keys), b.copies))
        sc = None if dir_scalars is None else next(iter(dir_scalars.values()))
        return {
            "base": self.base_optimizer.state_dict(),
            "msam": {
                "num_steps": self.num_steps,
                "perturbed": perturbed is not None,
                "inv_norm": None if sc is None else sc[FACTOR].clone(),
                "scalars": None if sc is None else sc.clone(),  # skip flag and 1/(||v||+eps)
                "rho": None if applied is None else list(applied[1]),
                "w": [w.get(id(p)) for p in params],
                "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
                "sam_start_step": self.sam_start_step,
                "max_grad_norm": self.max_grad_norm,
                "perturb_eps": self.perturb_eps,
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads the state and puts the weights at the saved w~ (recomputed from the saved w, buffer and
        1/(||v||+eps): bitwise what the saving run had, on the same backend), whatever weights the model
        holds now.  Dicts written before the fused core (no "scalars") load too."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "msam"}:
            raise ValueError("state_dict is not a MomentumSAM state dict (expected the keys 'base' and 'msam')")
        m = state_dict["msam"]
        params = self._flat()
        if len(m["w"]) != len(params):
            raise ValueError(f"state_dict has {len(m['w'])} parameters, this optimizer has {len(params)}")
        with torch.no_grad():
            self._restore()
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self._plan.clear()
        self._dir_cache = self._applied = self._dir_scalars = None
        self.num_steps, self.sam_start_step = int(m["num_steps"]), _check_start(m["sam_start_step"])
        self.max_grad_norm, self.perturb_eps = m["max_grad_norm"], m["perturb_eps"]
        if m.get("schedule") is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(m["schedule"])
        if not m["perturbed"]:
            return
        params = self._flat()
        with torch.no_grad():
            for p, w in zip(params, m["w"]):
                if w is not None:
                    p.copy_(w)
            buckets = self._static_buckets([p for p, w in zip(params, m["w"]) if w is not None])
            source, dirs = self._directions(buckets)
            if dirs is None:
                return
            saved = m.get("scalars")
            if saved is None and m.get("inv_norm") is not None:  # an older dict: 1/(||v||+eps) only
                saved = torch.stack([torch.zeros_like(m["inv_norm"]), m["inv_norm"]])
            if saved is None:
                scalars = pass_scalars(dirs, "perturb", weighted=False, eps=self.perturb_eps)
            else:
                acc = torch.float64 if any(d.dtype == torch.float64 for d in dirs) else torch.float32
                main = new_scalars(dirs[0].device, acc)
                main.copy_(saved)
                scalars = {main.device: main}
                for d in dirs:
                    if d.device not in scalars:
                        scalars[d.device] = _to(main, d.device, main.dtype)
            rhos = m.get("rho")
            if rhos is None or len(rhos) != len(dirs):
                rhos = [-d.group["rho"] for d in dirs]
            self._apply(dirs, scalars, rhos)
            self._perturbed = source

    def _static_buckets(self, keep: List[torch.Tensor]) -> List[Bucket]:
        """Buckets (param group x device x dtype, group order) of the parameters in ``keep``, without
        gradients: the perturbation restored by ``load_state_dict``."""
        ids = set(map(id, keep))
        out: List[Bucket] = []
        for g in self.param_groups:
            by: Dict[Any, Bucket] = {}
            for p in g["params"]:
                if id(p) not in ids:
                    continue
                k = (p.device, p.dtype)
                if k not in by:
                    by[k] = Bucket(g, [], backend_of(self._backend_for, p.device, p.dtype))
                by[k].params.append(p)
                by[k].keys.append(p)
            out.extend(by.values())
        return out
