"""FusedSAM: Sharpness-Aware Minimization as a drop-in torch.optim.Optimizer.

One SAM step (Foret et al., 2021): g = grad L(w); e = rho * g / ||g|| (ASAM:
rho * w^2 g / || |w| g ||); g_sam = grad L(w + e); restore w; the base
optimizer steps with g_sam.

This class only collects tensors and decides; the arithmetic lives in the
backends (fastsam/backends/): the parameters of each param group are grouped
by (device, dtype) into buckets, and each bucket is handed to one backend op:

    first_step:  grad_sq_norm (per bucket) -> global norm, skip flag -> perturb
    second_step: grad_sq_norm of the SAM gradient (non-finite check, clipping)
                 -> restore_sgd_step | restore_adam_step   (fused base step)
                 or restore + base_optimizer.step()         (any other optimizer)

The global norm, the scale rho/(||g||+eps) and the skip decision stay on the
device: no host synchronisation on the fused paths.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _get_scalar_dtype

from . import backends

PERTURBATION_MODES = ("local", "global")


@dataclass
class _Bucket:
    """The tensors of one param group on one (device, dtype), in group order.

    ``params``/``grads`` are what the kernels see, ``keys`` the parameters the
    optimizer state is keyed by: the same tensors, except for DTensor
    parameters (FSDP2, tensor parallel), whose kernels see the local shards.
    ``shard`` is None for plain tensors, else (device mesh, mesh dims the
    parameters are sharded on): the dims over which sums of squares add up.
    """

    group: Dict[str, Any]
    params: List[torch.Tensor]
    backend: Any
    grads: List[torch.Tensor] = field(default_factory=list)
    keys: List[torch.Tensor] = field(default_factory=list)
    shard: Optional[Tuple] = None
    copies: Optional[List[torch.Tensor]] = None  # the restore copies, cached: looked up once

    def local(self, state: List[torch.Tensor]) -> List[torch.Tensor]:
        """Optimizer-state tensors as the kernels see them: the local shards of DTensors."""
        return state if self.shard is None else [_local(t) for t in state]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


def _fused_kind(base: Optimizer) -> Optional[str]:
    """'sgd' / 'adam' when every group's options are handled by the fused steps, else None."""
    cls = type(base)
    if cls is torch.optim.SGD:
        kind = "sgd"
    elif cls in (torch.optim.Adam, torch.optim.AdamW):
        kind = "adam"
    else:
        return None
    for g in base.param_groups:
        if g.get("differentiable", False) or isinstance(g["lr"], torch.Tensor):
            return None
        if kind == "adam" and (g.get("amsgrad", False) or any(isinstance(b, torch.Tensor) for b in g["betas"])):
            return None
    return kind


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
                 sam_start_step: Optional[int] = None, perturbation: str = "local", **kwargs):
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
        self.perturbation = perturbation
        self.num_steps = 0  # completed optimizer steps (SAM or plain)
        self._sam_active_override: Optional[bool] = None
        self._requested_backend = backend
        self._backends: Dict[torch.device, Any] = {}
        self._bucket_cache: Dict[Tuple, List[_Bucket]] = {}
        self._pending: Optional[List[_Bucket]] = None  # buckets perturbed by first_step
        self._skip: Optional[torch.Tensor] = None
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

    def _buckets(self) -> List[_Bucket]:
        """Buckets of the params that have a gradient now, with their gradients filled in."""
        # The cache key names every parameter with a gradient and its dtype, device and
        # layout: a replaced parameter, or one moved/cast/converted to channels_last
        # through p.data, builds new buckets (and new restore copies).
        mask = tuple((id(p), p.dtype, p.device, p.is_contiguous()) if p.grad is not None else None
                     for g in self.param_groups for p in g["params"])
        buckets = self._bucket_cache.get(mask)
        if buckets is None:
            buckets = []
            for gi, group in enumerate(self.param_groups):
                by_key: Dict[Tuple, _Bucket] = {}
                for pi, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            f"FusedSAM does not support sparse gradients (param group {gi}, parameter {pi}); "
                            "SAM needs a dense global gradient norm")
                    if p.is_complex():
                        raise RuntimeError(
                            f"FusedSAM does not support complex parameters (param group {gi}, parameter {pi}); "
                            "pass torch.view_as_real(p) views or keep complex parameters out of FusedSAM")
                    if p.grad.dtype != p.dtype or p.grad.device != p.device:
                        raise RuntimeError(
                            f"gradient of param group {gi}, parameter {pi} has dtype/device "
                            f"{p.grad.dtype}/{p.grad.device} but the parameter is {p.dtype}/{p.device}")
                    shard = _shard_key(p, gi, pi)
                    key = (p.device, p.dtype, shard)
                    if key not in by_key:
                        mod = self._backend_for(p.device)
                        if not mod.supports(p.dtype):
                            mod = backends.get("foreach")
                        by_key[key] = _Bucket(group, [], mod, shard=shard)
                    by_key[key].params.append(p)
                    by_key[key].keys.append(p)
                buckets.extend(by_key.values())
            self._bucket_cache.clear()  # the grad pattern rarely changes; keep one entry
            self._bucket_cache[mask] = buckets
            self._conform_state(buckets)
        for b in buckets:
            if b.shard is not None:  # DTensors: the kernels work on the local shards
                b.params = [p.to_local() for p in b.keys]
                b.grads = [p.grad.to_local() for p in b.keys]
            else:
                b.grads = [p.grad for p in b.params]
            if any(g.is_sparse for g in b.grads):
                raise RuntimeError("FusedSAM does not support sparse gradients")
        return buckets

    def _conform_state(self, buckets: List[_Bucket]) -> None:
        """Make the base optimizer's state follow parameters cast, moved or re-laid-out
        through ``p.data`` (``model.double()``, ``model.to(memory_format=...)``), as
        ``load_state_dict`` casts it, so that each fused call sees one dtype, device
        and layout.  Runs only when the buckets are rebuilt."""
        state = self.base_optimizer.state
        for b in buckets:
            if b.shard is not None:
                continue
            for p in b.keys:
                st = state.get(p)
                for name, v in (st or {}).items():
                    if (torch.is_tensor(v) and name != "step" and v.shape == p.shape
                            and (v.dtype != p.dtype or v.device != p.device or v.stride() != p.stride())):
                        st[name] = torch.empty_like(p).copy_(v)

    def _copies(self, keys: List[torch.Tensor], params: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for k, p in zip(keys, params):
            st = self.state[k]
            c = st.get("sam_copy")
            if (c is None or c.shape != p.shape or c.dtype != p.dtype or c.device != p.device
                    or c.stride() != p.stride()):
                c = torch.empty_like(p, memory_format=torch.preserve_format)
                st["sam_copy"] = c
            out.append(c)
        return out

    def _global_sq_norm(self, buckets: List[_Bucket], use_params: bool) -> torch.Tensor:
        """Sum over all buckets of the (ASAM-weighted when asked) squared gradient norm."""
        acc = torch.float64 if any(b.dtype == torch.float64 for b in buckets) else torch.float32
        dev = buckets[0].device
        partial: Dict[Optional[Tuple], torch.Tensor] = {}  # local sums, per kind of sharding
        for b in buckets:
            sq = b.backend.grad_sq_norm(b.grads, b.params if use_params and b.group["adaptive"] else None)
            sq = sq.to(device=dev, dtype=acc, non_blocking=True)
            partial[b.shard] = partial[b.shard] + sq if b.shard in partial else sq
        total = None
        for shard, sq in partial.items():  # bucket order: the same on every rank
            sq = self._reduce_sq_norm(sq, shard)
            total = sq if total is None else total + sq
        return total

    def _reduce_sq_norm(self, total: torch.Tensor, shard: Optional[Tuple] = None) -> torch.Tensor:
        """Combine a local sum of squares across the shards that hold the rest of the parameters.

        Plain tensors (``shard`` None, DDP included): the sum is already whole.
        Sharded DTensors (FSDP2): all-reduced (SUM, on the device) over each mesh
        dim the parameters are sharded on, so every rank perturbs with the norm
        of the whole gradient and takes the same skip decision.
        """
        if shard is not None:
            mesh, dims = shard
            for d in dims:
                torch.distributed.all_reduce(total, group=mesh.get_group(d))
        return total

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
        self._skip = None
        if self.sam_active:
            buckets = self._buckets()
            if buckets:
                total = self._global_sq_norm(buckets, use_params=True)
                skip = (~torch.isfinite(total)).to(total.dtype)
                if self._skip_hook is not None:
                    self._skip_hook(skip)
                inv_norm = 1.0 / (total.sqrt() + self.perturb_eps)
                for b in buckets:
                    if b.copies is None:
                        b.copies = self._copies(b.keys, b.params)
                    scale = (inv_norm * b.group["rho"]).to(b.device, non_blocking=True)
                    b.backend.perturb(b.params, b.grads, b.copies, scale,
                                      skip.to(b.device, non_blocking=True), bool(b.group["adaptive"]))
                self._skip = skip
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
            self._skip = None
            self._sam_update([])
        else:
            self._sam_update(self._pending)
            self._pending = None
        self.num_steps += 1
        self._opt_called = True  # tells LR schedulers an optimizer step happened
        if zero_grad:
            self.zero_grad()

    def _sam_update(self, perturbed: List[_Bucket]) -> None:
        # The restore source of each parameter: its copy if first_step perturbed
        # it, else the parameter itself (nothing to restore).
        snapshot = [(b, list(b.params), b.copies) for b in perturbed]  # before _buckets() renews views
        buckets = self._buckets()
        if buckets is perturbed:  # the usual case: the same parameters had gradients in both passes
            sources = {id(b): b.copies for b in buckets}
        else:
            by_key: Dict[int, torch.Tensor] = {}  # keyed by the parameters (DTensor views are renewed)
            for b, _, copies in snapshot:
                for k, c in zip(b.keys, copies):
                    by_key[id(k)] = c
            stepped = {id(k) for b in buckets for k in b.keys}
            for b, params, copies in snapshot:  # perturbed params without a second gradient: restore only
                lone = [i for i, k in enumerate(b.keys) if id(k) not in stepped]
                if lone:
                    b.backend.restore([params[i] for i in lone], [copies[i] for i in lone])
            sources = {id(b): [by_key.get(id(k), p) for k, p in zip(b.keys, b.params)] for b in buckets}
        if not buckets:
            return

        # The SAM gradient is read once more: its norm for clipping, and the
        # non-finite check that keeps a bad second pass from corrupting w.
        sq = self._global_sq_norm(buckets, use_params=False)
        bad = (~torch.isfinite(sq)).to(sq.dtype)
        skip = bad if self._skip is None else torch.maximum(self._skip.to(bad), bad)
        grad_scale = None
        if self.max_grad_norm is not None:
            grad_scale = torch.clamp(self.max_grad_norm / (sq.sqrt() + 1e-6), max=1.0)
        self.found_inf = skip

        kind = _fused_kind(self.base_optimizer)
        if kind is None:
            self._generic_update(buckets, sources, grad_scale, skip)
            return
        for b in buckets:
            srcs = sources[id(b)]
            dev = b.device
            gs = None if grad_scale is None else grad_scale.to(dev, non_blocking=True)
            sk = skip.to(dev, non_blocking=True)
            if kind == "sgd":
                self._fused_sgd(b, srcs, gs, sk)
            else:
                self._fused_adam(b, srcs, gs, sk)

    def _generic_update(self, buckets, sources, grad_scale, skip) -> None:
        # Any base optimizer: restore, then base_optimizer.step() on the SAM
        # gradient.  Deciding the skip reads the flag on the host: the one
        # synchronisation FusedSAM makes, and only on this path.
        for b in buckets:
            b.backend.restore(b.params, sources[id(b)])
        if bool(skip):
            return
        if grad_scale is not None:
            for b in buckets:
                torch._foreach_mul_(b.grads, grad_scale.to(b.device))  # fp32 factor, as the fused steps use it
        self.base_optimizer.step()

    def _fused_sgd(self, b: _Bucket, srcs, grad_scale, skip) -> None:
        g = b.group
        state = self.base_optimizer.state
        kw = dict(lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"], nesterov=g["nesterov"],
                  weight_decay=g["weight_decay"], maximize=g.get("maximize", False),
                  grad_scale=grad_scale, skip=skip)
        if g["momentum"] == 0:
            b.backend.restore_sgd_step(b.params, b.grads, srcs, [], first=False, **kw)
            return
        bufs = [state[k].get("momentum_buffer") for k in b.keys]
        if all(x is not None for x in bufs):  # every step after the first: one call
            b.backend.restore_sgd_step(b.params, b.grads, srcs, b.local(bufs), first=False, **kw)
            return
        # torch initialises a momentum buffer to the first gradient; params
        # whose buffers already exist and fresh ones go in separate calls.
        idx = {True: [], False: []}
        for i, x in enumerate(bufs):
            idx[x is None].append(i)
        for first, ids in idx.items():
            if not ids:
                continue
            ps = [b.params[i] for i in ids]
            if first:
                # A skipped first step must leave the state as torch would: no buffer yet.
                # Reading the flag is free on the CPU; elsewhere the kernels keep a
                # skipped fresh buffer at zero, which the next step turns into exactly
                # torch's first buffer (m*0 + g) unless dampening != 0: only then, and
                # only on a parameter's first step, is the flag read on the host.
                if (b.device.type == "cpu" or g["dampening"] != 0) and bool(skip):
                    b.backend.restore(ps, [srcs[i] for i in ids])
                    continue
                for i in ids:  # a DTensor for a DTensor parameter, as torch.optim.SGD keeps it
                    k = b.keys[i]
                    state[k]["momentum_buffer"] = torch.zeros_like(k, memory_format=torch.preserve_format)
            sub_bufs = b.local([state[b.keys[i]]["momentum_buffer"] for i in ids])
            b.backend.restore_sgd_step(ps, [b.grads[i] for i in ids], _sub(srcs, ids, ps), sub_bufs,
                                       first=first, **kw)

    def _fused_adam(self, b: _Bucket, srcs, grad_scale, skip) -> None:
        g = b.group
        state = self.base_optimizer.state
        step_dtype = _get_scalar_dtype()
        for p in b.keys:
            st = state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=step_dtype, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif st["step"].device != p.device:  # a CPU step counter left by torch's non-capturable Adam
                st["step"] = st["step"].to(p.device)
        sts = [state[p] for p in b.keys]
        decoupled = g.get("decoupled_weight_decay", type(self.base_optimizer) is torch.optim.AdamW)
        beta1, beta2 = g["betas"]
        b.backend.restore_adam_step(
            b.params, b.grads, srcs, b.local([s["exp_avg"] for s in sts]), b.local([s["exp_avg_sq"] for s in sts]),
            [s["step"] for s in sts], lr=g["lr"], beta1=beta1, beta2=beta2, eps=g["eps"],
            weight_decay=g["weight_decay"], decoupled=decoupled, maximize=g.get("maximize", False),
            grad_scale=grad_scale, skip=skip)

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
        st.update(_bucket_cache={}, _backends={}, _pending=None, _skip_hook=None)
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
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
        self._bucket_cache.clear()

    def state_dict(self) -> Dict[str, Any]:
        """One dict: the base optimizer's state (momentum, Adam moments, steps,
        param groups with rho/adaptive) plus the SAM settings and late-phase state."""
        return {
            "base": self.base_optimizer.state_dict(),
            "sam": {
                "num_steps": self.num_steps,
                "sam_start_step": self.sam_start_step,
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
        self._sam_active_override = sam["sam_active_override"]
        self.perturb_eps = sam["perturb_eps"]
        self.max_grad_norm = sam["max_grad_norm"]
        self.perturbation = sam["perturbation"]
        self._bucket_cache.clear()


def _dtensor_type():
    """DTensor's class once torch.distributed.tensor is imported, else None (no DTensor
    exists before; importing it here would add ~1.5 s to ``import fastsam``)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _local(t: torch.Tensor) -> torch.Tensor:
    dt = _dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def _shard_key(p: torch.Tensor, gi: int, pi: int) -> Optional[Tuple]:
    """None for a plain tensor; (mesh, sharded mesh dims) for a DTensor parameter."""
    dt = _dtensor_type()
    if dt is None or not isinstance(p, dt):
        return None
    if not isinstance(p.grad, dt) or p.grad.placements != p.placements:
        raise RuntimeError(
            f"DTensor parameter (param group {gi}, parameter {pi}) with placements {p.placements} has a "
            f"gradient placed {getattr(p.grad, 'placements', 'as a plain tensor')}; FusedSAM needs the "
            "gradient sharded like its parameter (as FSDP2 leaves it)")
    if any(pl.is_partial() for pl in p.placements):
        raise RuntimeError(f"DTensor parameter (param group {gi}, parameter {pi}) has a Partial placement")
    return (p.device_mesh, tuple(d for d, pl in enumerate(p.placements) if pl.is_shard()))


def _check_rho(rho) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


def _sub(srcs: List[torch.Tensor], ids: List[int], params: List[torch.Tensor]) -> List[torch.Tensor]:
    """The restore sources for a subset; the params list itself when nothing is to be restored."""
    sub = [srcs[i] for i in ids]
    return params if all(s is p for s, p in zip(sub, params)) else sub
