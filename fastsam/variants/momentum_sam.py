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

A client of the core (fastsam/core): its buckets, its update (restore + base step,
all or nothing) and its perturbation, with the momentum buffers as the direction.
A steady-state step is four bucket-wide backend calls and no host synchronisation
on CUDA:

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

All or nothing: ``step()`` is two transactions, the update and the next
perturbation.  If anything raises before or during the update, the parameters,
gradients and state are as they were.  If the next perturbation's write raises
(after the update committed), the step is counted, the weights are at w, not
perturbed, and the exception propagates: the next step takes its gradient at w.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, cast

import torch
from torch.optim import Optimizer

from .. import _checks
from ..backends._common import FACTOR
from ..core.buckets import (
    Bucket,
    Buckets,
    backend_of,
    copies_for,
    new_scalars_like,
    perturbed_copies,
    to_device,
    tracked,
)
from ..core.engine import Extension, Perturbation
from ..core.state import Settings
from ..core.txn import Transaction
from ..optim import SAMOptimizer, optimizer_call

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

_DIRECTION = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg"}


class Applied:
    """The perturbation in place: the buckets to restore from (their ``copies`` hold w), the
    direction buckets and lists it followed, each group's signed rho, and its scalars."""

    def __init__(
        self, source: List[Bucket], dirs: List[Bucket], rhos: List[float], scalars: Dict[torch.device, torch.Tensor]
    ) -> None:
        self.source, self.dirs, self.rhos, self.scalars = source, dirs, rhos, scalars


class MomentumSAMState(Extension):
    """MomentumSAM's state on the core: the perturbation in place (or suspended by ``unperturbed``)."""

    name = "MomentumSAM"

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.applied: Optional[Applied] = None
        self.suspended: Optional[Tuple[Applied, int]] = None  # (Applied, num_steps) inside unperturbed()
        self.forget()

    def forget(self) -> None:
        self.applied = getattr(self, "applied", None)
        self.suspended = getattr(self, "suspended", None)
        self.dir_cache: Optional[tuple] = None  # (step buckets, state mapping, its version, direction buckets)

    transient = ("dir_cache",)

    def __getstate__(self) -> Dict[str, Any]:
        return dict(super().__getstate__(), applied=None, suspended=None)


class MomentumSAM(SAMOptimizer):
    """``MomentumSAM(params, base_optimizer, rho=..., **base_kwargs)``: SGD (momentum > 0), Adam or AdamW."""

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: Type[Optimizer],
        rho: float = 0.3,
        adaptive: bool = False,
        *,
        max_grad_norm: Optional[float] = None,
        sam_start_step: Optional[int] = None,
        schedule: Any = None,
        perturb_eps: float = 1e-12,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}")
        kind = next((v for k, v in _DIRECTION.items() if issubclass(base_optimizer, k)), None)
        if kind is None:
            raise TypeError(
                "MomentumSAM needs torch.optim.SGD (with momentum), Adam or AdamW as base_optimizer, "
                f"got {base_optimizer.__name__}"
            )
        if _checks.flag("adaptive", adaptive):
            raise ValueError("MomentumSAM has no adaptive (ASAM) form; pass adaptive=False")
        if kind == "momentum_buffer" and not _checks.real("momentum", kwargs.get("momentum", 0), lo=0):
            raise ValueError("MomentumSAM with SGD needs momentum > 0 (the perturbation follows the momentum buffer)")
        settings = Settings(
            perturb_eps=perturb_eps,
            max_grad_norm=max_grad_norm,
            sam_start_step=sam_start_step,
            schedule=schedule,
            perturbation="local",
            closure_convention="torch",
            backend=backend,
            capturable=False,
            skip_reducer=None,
        )
        defaults = dict(rho=_checks.real("rho", rho, lo=0), adaptive=False)
        self._setup(params, base_optimizer, defaults, kwargs, settings, MomentumSAMState(kind))

    @property
    def _ms(self) -> MomentumSAMState:
        """The core's extension: the MomentumSAMState this optimizer was built with."""
        return cast(MomentumSAMState, self.core.ext)

    @property
    def direction(self) -> str:
        """The base optimizer's buffer the perturbation follows ("momentum_buffer" or "exp_avg")."""
        return self._ms.direction

    @property
    def perturbed(self) -> bool:
        """Are the weights at w~ now?"""
        return self._ms.applied is not None

    @property
    def inv_norm(self) -> Optional[torch.Tensor]:
        """1 / (||v|| + eps) of the current perturbation (0-d, on the device), or None."""
        applied = self._ms.applied
        return None if applied is None else next(iter(applied.scalars.values()))[FACTOR]

    @property
    def found_inf(self) -> Optional[torch.Tensor]:
        """The last step's skip flag (as ``skip_flag``)."""
        return self.core.run.skip_flag

    # ------------------------------------------------------------------ the step
    @optimizer_call
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One step with the gradient the caller took at the current (perturbed) weights.

        ``closure`` is optional, as for torch optimizers: it runs the forward and backward at
        the current weights and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        core, state = self.core, self._ms

        def prepare(tx: Transaction) -> Tuple[Buckets, Any]:
            self._check_groups(tx)
            buckets = core.buckets()
            applied = state.applied
            update = None
            if buckets:
                pending = None if applied is None else Perturbation(applied.source, None)
                update = core.prepare_update(pending, buckets, tx)
                core.register_update(update, tx)
            return buckets, update

        buckets, update = core.transact(prepare)
        if not buckets:
            # No gradient at all: nothing to update.  As after a skipped step, the weights stay at
            # w~ for the next step's gradient, unless the next step is not a SAM step.
            core.finish_step(None)
            if state.applied is not None and not core.sam_active():
                self._restore(state.applied)
                state.applied = None
            return loss
        state.applied = None
        core.finish_step(update.skip_flag)
        if buckets and core.sam_active():
            self._perturb(buckets)
        return loss

    def _check_groups(self, tx: Transaction) -> None:
        self.core.check_groups(tx)
        for gi, g in enumerate(self.param_groups):
            if g["adaptive"]:
                raise ValueError(f"param group {gi} sets adaptive=True; MomentumSAM has no adaptive (ASAM) form")

    def _perturb(self, buckets: Buckets) -> None:
        """w~ = w - rho * v / (||v|| + eps) on the parameters of ``buckets`` (copies <- w first)."""
        found = self._directions(buckets)
        if found is None:
            return
        source, dirs = found
        rhos = [-d.group["rho"] for d in dirs]
        scalars = self.core.transact(lambda tx: self.core.perturb(dirs, tx, rhos=rhos, weighted=False))
        self._ms.applied = Applied(source, dirs, rhos, scalars)

    def _directions(self, buckets: Buckets) -> Optional[Tuple[List[Bucket], Buckets]]:
        """(buckets to restore from next step, direction buckets), or None when no parameter has a
        buffer yet: the step's buckets with the direction buffers (momentum_buffer / exp_avg) as
        their ``grads`` and the restore copies.  Cached per bucket list while the base optimizer's state
        mapping is unchanged (the buffers are updated in place); parameters without a buffer yet (a
        skipped first step) are left out."""
        core, ms = self.core, self._ms
        state = tracked(core.base)
        hit = ms.dir_cache
        if hit is not None and hit[0] is buckets and hit[1] is state and hit[2] == state.version:
            return buckets, hit[3]
        dirs, source, complete = Buckets(), cast(List[Bucket], []), True
        for b in buckets:
            vs = [d.get(ms.direction) for d in b.states(state)]
            if all(v is not None for v in vs):
                copies = copies_for(b, core.sam_state)
                src, keys, params = b, b.keys, b.params
            else:  # a sub-bucket of the parameters that have a buffer
                complete = False
                ids = [i for i, v in enumerate(vs) if v is not None]
                if not ids:
                    continue
                keys, params, vs = [b.keys[i] for i in ids], [b.params[i] for i in ids], [vs[i] for i in ids]
                src = Bucket(b.group, params, b.backend, keys=keys, shard=b.shard, complex=b.complex)
                copies = copies_for(src, core.sam_state)
            source.append(src)
            dirs.append(
                Bucket(
                    b.group,
                    params,
                    b.backend,
                    grads=b.view(vs),
                    keys=keys,
                    shard=b.shard,
                    complex=b.complex,
                    copies=copies,
                )
            )
        if not dirs:
            return None
        if complete and all(b.shard is None for b in buckets):
            dirs.info = getattr(buckets, "info", None)
            ms.dir_cache = (buckets, state, state.version, dirs)
            return buckets, dirs
        return source, dirs

    @property
    def skip_flag(self) -> Optional[torch.Tensor]:
        """The last step's skip flag (0-d device tensor, 1.0 when skipped), None before the first step."""
        return self.core.run.skip_flag

    # ------------------------------------------------------------------ w~ and w
    def _restore(self, applied: Applied) -> None:
        def prepare(tx: Transaction) -> None:
            for b in applied.source:

                def restore(b: Bucket = b) -> None:
                    b.backend.restore(b.params, b.copies)

                tx.write(restore, b.params, backend=b.backend)

        self.core.transact(prepare)

    def _reapply(self, applied: Applied, tx: Transaction) -> None:
        """Register w~ from w, the buffers and the saved scalars: bitwise the perturbation that was."""
        for d, r in zip(applied.dirs, applied.rhos):

            def run(d: Bucket = d, r: float = r) -> None:
                d.backend.perturb(d.params, d.grads, d.copies, applied.scalars[d.device], r, False)

            def undo(d: Bucket = d) -> None:
                d.backend.restore(d.params, d.copies)

            tx.write(run, d.params + perturbed_copies(d), undo=undo)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Weights at w inside the block, back at w~ (bitwise) after it.  A ``step()`` taken inside
        the block (its gradient then taken at w) leaves the weights where that step put them."""
        ms = self._ms
        applied, n = ms.applied, self.core.run.num_steps
        if applied is not None:
            with torch.no_grad(), torch.inference_mode(False):  # as optimizer_call, for the same reason
                self._restore(applied)
            ms.applied = None
            # state_dict() inside the block saves the suspended perturbation (a checkpoint written
            # here resumes at w~, as one written outside the block)
            ms.suspended = (applied, n)
        try:
            yield
        finally:
            ms.suspended = None
            if applied is not None and ms.applied is None and self.core.run.num_steps == n:
                with torch.inference_mode(False):
                    self.core.transact(lambda tx: self._reapply(applied, tx))
                ms.applied = applied

    # ------------------------------------------------------------------ state dict
    def _fastsam_state(self) -> Dict[str, Any]:
        """The core's part plus the perturbation: w (the unperturbed weights) while perturbed, also
        inside ``unperturbed()``, where the perturbation is only suspended."""
        part = super()._fastsam_state()
        part.update(self._perturbation_state())
        return part

    def __getstate__(self) -> Dict[str, Any]:
        # The perturbation in place refers to backend modules, which do not pickle: a copy keeps what
        # load_state_dict rebuilds it from (w, 1/(||v||+eps), the rhos), so that it sits at the same w~.
        st = super().__getstate__()
        part = self._perturbation_state()
        st["_perturbation"] = part if part["perturbed"] else None
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        part = state.pop("_perturbation", None)
        super().__setstate__(state)
        if part is not None:
            tx = Transaction(self.core.snapshots)
            with torch.no_grad(), torch.inference_mode(False):
                self._load_perturbation(part, tx)
                tx.commit()

    def _perturbation_state(self) -> Dict[str, Any]:
        ms = self._ms
        applied = ms.applied
        if applied is None and ms.suspended is not None and ms.suspended[1] == self.core.run.num_steps:
            applied = ms.suspended[0]
        params = [p for g in self.param_groups for p in g["params"]]
        w: Dict[int, torch.Tensor] = {}
        for b in applied.source if applied is not None else ():
            w.update(zip(map(id, b.keys), perturbed_copies(b)))
        sc = None if applied is None else next(iter(applied.scalars.values()))
        return dict(
            perturbed=applied is not None,
            scalars=None if sc is None else sc.clone(),
            rho=None if applied is None else list(applied.rhos),
            w=[w.get(id(p)) for p in params],
        )

    def _load(self, state_dict: Dict[str, Any]) -> None:
        """Loads the state and puts the weights at the saved w~ (recomputed from the saved w, buffer and
        1/(||v||+eps): bitwise what the saving run had, on the same backend), whatever weights the model
        holds now."""
        ms = self._ms
        from ..core import checkpoint

        applied_before = ms.applied
        if applied_before is not None:
            with torch.no_grad():
                self._restore(applied_before)
            ms.applied = None
        try:
            with torch.no_grad():
                checkpoint.load(self.core, state_dict, kind="msam", extra=self._load_perturbation)
        except BaseException:
            if applied_before is not None:
                self.core.transact(lambda tx: self._reapply(applied_before, tx))
                ms.applied = applied_before
            raise

    def _load_perturbation(self, part: Dict[str, Any], tx: Transaction) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        ws = part.get("w")
        if ws is None:
            ws = [None] * len(params)
        if not isinstance(ws, (list, tuple)) or len(ws) != len(params):
            raise ValueError(
                f"state_dict has {len(ws) if isinstance(ws, (list, tuple)) else ws!r} saved weights, "
                f"this optimizer has {len(params)} parameters"
            )
        for i, (p, w) in enumerate(zip(params, ws)):
            if w is not None and (not torch.is_tensor(w) or w.shape != p.shape):
                raise ValueError(f"state_dict['fastsam']['w'][{i}] must be a tensor of shape {tuple(p.shape)}")
        if not part.get("perturbed"):
            return
        keep = [(p, w) for p, w in zip(params, ws) if w is not None]
        for p, w in keep:

            def put(p: torch.Tensor = p, w: torch.Tensor = w) -> None:
                p.copy_(w)

            tx.write(put, [p])
        buckets = self._static_buckets([p for p, _ in keep])
        found = self._directions(buckets)
        if found is None:
            return
        source, dirs = found
        saved = part.get("scalars")
        if saved is None and part.get("inv_norm") is not None:  # the first layout: 1/(||v||+eps) only
            saved = torch.stack([torch.zeros_like(part["inv_norm"]), part["inv_norm"]])
        if saved is None:
            raise ValueError("state_dict says the weights were perturbed but holds no perturbation scalars")
        main = new_scalars_like(dirs, saved)
        scalars = {main.device: main}
        for d in dirs:
            if d.device not in scalars:
                scalars[d.device] = to_device(main, d.device, main.dtype)
        rhos = part.get("rho")
        if rhos is None or len(rhos) != len(dirs):
            rhos = [-d.group["rho"] for d in dirs]
        applied = Applied(source, dirs, [float(r) for r in rhos], scalars)
        self._reapply(applied, tx)
        ms = self._ms
        ms.applied = applied
        tx.on_undo(lambda: setattr(ms, "applied", None))

    def _static_buckets(self, keep: List[torch.Tensor]) -> Buckets:
        """Buckets (param group x device x dtype, group order) of the parameters in ``keep``, without
        gradients: the perturbation restored by ``load_state_dict``."""
        ids = set(map(id, keep))
        out = Buckets()
        for g in self.param_groups:
            by: Dict[Any, Bucket] = {}
            for p in g["params"]:
                if id(p) not in ids:
                    continue
                view = torch.view_as_real(p) if p.is_complex() else p
                k = (p.device, view.dtype)
                if k not in by:
                    by[k] = Bucket(g, [], backend_of(self.core.backend_for, p.device, view.dtype))
                by[k].params.append(view)
                by[k].keys.append(p)
                by[k].complex = by[k].complex or p.is_complex()
            out.extend(by.values())
        return out
