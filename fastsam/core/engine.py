"""The SAM core: a step as plan -> perturb -> update -> finish, each public call all or nothing.

``SAMCore`` owns what a SAM optimizer needs besides torch's ``Optimizer`` surface: the
settings and run state (fastsam/core/state.py), the buckets (fastsam/core/buckets.py),
the per-parameter restore copies and variant buffers (``sam_state``), the backends, and
the base-update dispatch (fastsam/base_steps).  ``FusedSAM`` and ``MomentumSAM`` are thin
torch surfaces over it; LookSAM, GSAM and FriendlySAM are ``Extension``s of its step.

Every call that writes (``first_step``, ``second_step``, ``undo``) prepares first (checks,
the plan, the norms: reads only; a pass over one bucket leaves its norm to the write, which takes
it before writing: ``_one_pass``) and then commits its writes through a
``Transaction`` (fastsam/core/txn.py), so whatever raises, the parameters, the
gradients and the optimizer state are left as they were before the call.
"""

from __future__ import annotations

import collections
import functools
import math
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .. import backends, base_steps
from ..backends._common import SKIP, new_scalars
from .buckets import (
    Bucket,
    Buckets,
    Lone,
    Plan,
    copies_for,
    describe_problem,
    pass_info,
    pass_scalars,
    restore_slices,
    scalars_on,
    to_device,
    tracked,
)
from .state import Checked, RunState, Settings, check_group
from .txn import Snapshots, Transaction

Scalars = Dict[torch.device, torch.Tensor]


class Perturbation(NamedTuple):
    """A perturbation in place: the buckets whose parameters sit at w + e (their ``copies`` hold
    w), and the scalars of the pass that made it (skip flag, 1/(||g|| + eps))."""

    buckets: List[Bucket]
    scalars: Optional[Scalars]


class Extension:
    """What a SAM variant adds to the core's step (fastsam/variants/).

    The hooks see the core and the step's buckets.  They may write scratch buffers
    (``core.buffers(b, name, scratch=True)``) freely: nothing but the variant reads them,
    and a step that fails leaves them meaningless but harmless.  Any change to what
    outlives the step (a persistent buffer, a counter) is registered with the step's
    transaction ``tx``: a write (``tx.write``) or the undo of a Python value
    (``tx.on_undo``), so that a call that raises leaves it as it was.
    """

    name = "FusedSAM"  # the class a state dict of this variant belongs to
    transient: Tuple[str, ...] = ()  # attributes holding caches (buckets, backends): dropped when pickled
    buffers: Tuple[str, ...] = ()  # persistent per-parameter buffers, saved in the state dict
    settings: Optional[Checked] = None  # the variant's settings (public attributes of its optimizer)

    def first_gradient(self, core: SAMCore, buckets: Buckets, tx: Transaction) -> None:
        """A SAM step's first pass, before its norm: may set ``b.grads`` to the direction the
        perturbation follows."""

    def sam_gradient(self, core: SAMCore, pending: Perturbation, buckets: Buckets, tx: Transaction) -> None:
        """A SAM step's second pass, before its norm: may set ``b.grads`` to what the base
        optimizer steps with."""

    def plain_gradient(self, core: SAMCore, buckets: Buckets, tx: Transaction) -> None:
        """A step without SAM, before its norm: may set ``b.grads``."""

    def commit(
        self,
        core: SAMCore,
        pending: Optional[Perturbation],
        buckets: Buckets,
        scalars: Optional[Scalars],
        tx: Transaction,
    ) -> None:
        """Register the writes of persistent variant state (the step's skip flag is in ``scalars``)."""

    def finished(self, core: SAMCore, sam: bool) -> None:
        """The step committed (count it); must not raise."""

    def undone(self, core: SAMCore) -> None:
        """A pending first step was undone: drop what it left for the second."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, d: Dict[str, Any]) -> Callable[[], None]:
        """Check ``d`` and return the function that applies it (which must not raise)."""
        return lambda: None

    def forget(self) -> None:
        """Drop every cache (the state was loaded, or the parameters changed)."""

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self.transient}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.forget()


class SAMCore:
    """The step machinery of one SAM optimizer; see the module docstring."""

    def __init__(
        self,
        owner: torch.optim.Optimizer,
        base: torch.optim.Optimizer,
        settings: Settings,
        ext: Optional[Extension] = None,
    ) -> None:
        self.owner = weakref.ref(owner)  # the optimizer the schedules are asked about
        self.base = base
        self.settings = settings
        self.ext = ext if ext is not None else Extension()
        self.run = RunState()
        # Per parameter: the restore copy ("sam_copy"), the variants' persistent buffers and
        # their scratch.  Keyed by the parameters, as torch keys optimizer state.
        self.sam_state: Dict[torch.Tensor, Dict[str, torch.Tensor]] = collections.defaultdict(dict)
        self.backends: Dict[torch.device, Any] = {}
        self.plan = Plan(self.backend_for)
        self.snapshots = Snapshots()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        st = dict(self.__dict__)
        keep = set(self.ext.buffers)
        kept = {k: {n: t for n, t in d.items() if n in keep} for k, d in self.sam_state.items()}
        st["sam_state"] = collections.defaultdict(dict, {k: d for k, d in kept.items() if d})
        st.update(plan=None, backends={}, run=self.run.fresh(), owner=None)
        settings = Settings(**{**self.settings.as_dict(), "skip_reducer": None})
        st["settings"] = settings
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.plan = Plan(self.backend_for)
        self.ext.forget()

    # ------------------------------------------------------------------ queries
    @property
    def extension_settings(self) -> Optional[Checked]:
        """The variant's settings (the public attributes of a variant optimizer forward to them)."""
        return self.ext.settings

    def optimizer(self) -> torch.optim.Optimizer:
        opt = self.owner() if self.owner is not None else None
        if opt is None:
            raise RuntimeError("the optimizer of this SAM core no longer exists")
        return opt

    def backend_for(self, device: torch.device) -> Any:
        """The backend module for parameters on ``device`` (resolved once per device)."""
        mod = self.backends.get(device)
        if mod is None:
            mod = self.backends[device] = backends.get(backends.resolve(self.settings.backend, device))
        return mod

    def buckets(self, recheck: bool = True) -> Buckets:
        """The buckets of the parameters that have a gradient now (fastsam/core/buckets.py)."""
        return self.plan.buckets(self.base.param_groups, tracked(self.base), recheck)

    def buffers(self, b: Bucket, name: str, *, zero: bool = False) -> List[torch.Tensor]:
        """Bucket ``b``'s per-parameter buffers ``name`` in ``sam_state``, shaped like the kernels'
        views of the parameters, created where missing (zeros when ``zero``), cached on the bucket."""
        cache = b.scratch.setdefault("buffers", {})
        hit = cache.get(name)
        if hit is None:
            hit = cache[name] = [self.buffer(k, name, p, zero) for k, p in zip(b.keys, b.params)]
        return hit

    def buffer(self, key: torch.Tensor, name: str, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        st = self.sam_state.setdefault(key, {})
        t = st.get(name)
        if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            t = torch.zeros_like(like) if zero else torch.empty_like(like)
            st[name] = t
        return t

    def forget(self) -> None:
        """Drop the cached buckets and the variant's caches (parameters or state replaced)."""
        self.plan.clear()
        self.ext.forget()

    def sam_active(self) -> bool:
        """Whether the step about to be taken is a SAM step: the override, else the schedule
        (asked once per step: both passes of a step see one answer), else ``sam_start_step``."""
        run, settings = self.run, self.settings
        if run.sam_active_override is not None:
            return run.sam_active_override
        if settings.schedule is not None:
            if run.decision is None or run.decision[0] != run.num_steps:
                run.decision = (run.num_steps, bool(settings.schedule.decide(self.optimizer())))
            return run.decision[1]
        return settings.sam_start_step is None or run.num_steps >= settings.sam_start_step

    def grad_sq_norm(self) -> float:
        """||g||^2 over every parameter with a gradient, through the backends' fused norms (float64),
        read on the host (one number)."""
        bs = self.buckets()
        if not bs:
            return 0.0
        acc, main, chain = bs.info or pass_info(bs)
        total = None
        for b in bs:
            if chain:
                total = b.backend.grad_sq_norm(b.grads, accumulate=total)
            else:
                part = to_device(b.backend.grad_sq_norm(b.grads), main, acc)
                total = part if total is None else total + part
        assert total is not None  # bs is not empty
        return float(total)

    def check_groups(self, tx: Transaction) -> None:
        """Every param group's rho and adaptive, checked at each step (users edit groups in place)."""
        for gi, g in enumerate(self.base.param_groups):
            rho, adaptive = g["rho"], g["adaptive"]
            if type(rho) is float and 0.0 <= rho < math.inf and type(adaptive) is bool:
                continue
            check_group(g, gi)  # stores plain Python values: undone with the step
            tx.on_undo(functools.partial(g.update, rho=rho, adaptive=adaptive))

    # ------------------------------------------------------------------ the step
    def first_step(self) -> None:
        """Perturb: w <- w + e on every parameter with a gradient (no-op while SAM is inactive)."""
        run = self.run
        if run.pending is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the parameters are already perturbed "
                "(w + e); call second_step() (or step()) to finish this step, or undo_first_step() to return to w"
            )

        def prepare(tx: Transaction) -> Optional[Perturbation]:
            self._decide(tx)
            if not self.sam_active():
                return None
            self.check_groups(tx)
            buckets = self.buckets()
            scalars = None
            if buckets:
                self.ext.first_gradient(self, buckets, tx)
                scalars = self.perturb(buckets, tx)
            return Perturbation(buckets, scalars)

        run.pending = self.transact(prepare)
        self.plan.release()  # the first gradient is not needed again: zero_grad() must free it

    def second_step(self) -> None:
        """Restore w and take the base step with the gradient now in ``p.grad`` (a plain base step
        when no first step is pending and SAM is inactive)."""
        pending = self.run.pending
        if pending is None and self.sam_active():
            raise RuntimeError(
                "second_step() called without first_step(): SAM is active, so call "
                "first_step() after the first backward pass"
            )

        def prepare(tx: Transaction) -> Update:
            self.check_groups(tx)
            buckets = self.buckets(recheck=pending is None)
            if pending is not None:
                self.ext.sam_gradient(self, pending, buckets, tx)
            else:
                self.ext.plain_gradient(self, buckets, tx)
            update = self.prepare_update(pending, buckets, tx)
            self.ext.commit(self, pending, buckets, update.scalars, tx)
            self.register_update(update, tx)
            return update

        update = self.transact(prepare)
        flag = update.skip_flag
        if flag is None and pending is not None and pending.scalars is not None:  # no second gradient
            flag = next(iter(pending.scalars.values()))[SKIP]
        self.finish_step(flag)
        self.ext.finished(self, pending is not None)

    def undo(self) -> None:
        """Put the parameters back at w after ``first_step`` (nothing happens if nothing is pending)."""
        pending = self.run.pending
        if pending is None:
            return

        def prepare(tx: Transaction) -> None:
            for b in pending.buckets:

                def restore(b: Bucket = b) -> None:
                    b.backend.restore(b.params, b.copies)

                tx.write(restore, b.params, backend=b.backend)

        self.transact(prepare)
        self.run.pending = None
        self.ext.undone(self)
        self.plan.release()

    def transact(self, prepare: Callable[[Transaction], Any]) -> Any:
        """Run ``prepare(tx)`` (the checks, the plan, the reads; it registers the writes with ``tx``),
        then commit: all or nothing.  An error a backend raised for a malformed gradient is
        re-raised naming the parameter."""
        tx = Transaction(self.snapshots)
        try:
            out = prepare(tx)
            tx.commit()
        except BaseException as exc:
            tx.rollback()
            self.explain(exc)
            raise
        return out

    def finish_step(self, skip_flag: Optional[torch.Tensor]) -> None:
        """Count a step that has been taken: ``num_steps``, LR schedulers' flag, the skip flag.
        (fastsam.cuda_graphs calls it after replaying a captured step.)"""
        self.run.count_step(skip_flag)
        self.plan.release()

    # ------------------------------------------------------------------ the parts of a step
    def perturb(
        self,
        buckets: List[Bucket],
        tx: Transaction,
        *,
        directions: Optional[List[List[torch.Tensor]]] = None,
        rhos: Optional[List[float]] = None,
        weighted: bool = True,
    ) -> Scalars:
        """Register w <- w + rho * d / ||d|| (ASAM where a group says so and ``weighted``) on the
        parameters of ``buckets`` with ``tx``: ``d`` is each bucket's gradient, or
        ``directions[i]``; ``rhos[i]`` replaces group i's rho times the schedule's multiplier.
        Returns the pass's scalars; each write is undone by restoring from the copy it makes."""
        settings = self.settings
        plain = directions is None and rhos is None and weighted  # the core's own pass, not a variant's
        if rhos is None:
            scale = getattr(settings.schedule, "rho_scale", None)
            scale = 1.0 if scale is None else float(scale(self.optimizer()))
            rhos = [b.group["rho"] * scale for b in buckets]
        if plain and self._one_pass(buckets, first=True):
            return self._norm_perturb(buckets[0], rhos[0], tx)
        scalars = pass_scalars(
            buckets,
            "perturb",
            weighted=weighted,
            grads=directions,
            eps=settings.perturb_eps,
            skip_hook=settings.skip_reducer,
        )
        for i, (b, rho) in enumerate(zip(buckets, rhos)):
            d = b.grads if directions is None else directions[i]
            copies = copies_for(b, self.sam_state)
            adaptive = weighted and b.group["adaptive"]

            def run(
                b: Bucket = b,
                d: List[torch.Tensor] = d,
                copies: List[torch.Tensor] = copies,
                rho: float = rho,
                adaptive: bool = adaptive,
            ) -> None:
                b.backend.perturb(b.params, d, copies, scalars[b.device], rho, adaptive)

            def undo(b: Bucket = b, copies: List[torch.Tensor] = copies) -> None:
                b.backend.restore(b.params, copies)

            tx.write(run, b.params + copies, undo=undo)
        return scalars

    def _one_pass(self, buckets: List[Bucket], first: bool) -> bool:
        """Whether a pass can take its norm inside the op that writes (``norm_perturb``,
        ``norm_restore_sgd_step``): one bucket of plain tensors (the norm is the bucket's alone), no
        variant (whose hooks may read the pass's scalars before the commit) and, in the ``first``
        pass, no skip hook (which reduces its flag between the norm and the write)."""
        return (
            len(buckets) == 1
            and buckets[0].shard is None
            and type(self.ext) is Extension
            and not (first and self.settings.skip_reducer is not None)
        )

    def _norm_perturb(self, b: Bucket, rho: float, tx: Transaction) -> Scalars:
        """``perturb`` of one bucket, its norm and scalars computed by the write itself."""
        copies = copies_for(b, self.sam_state)
        scalars = new_scalars(b.device)
        adaptive, eps, params, grads = b.group["adaptive"], self.settings.perturb_eps, b.params, b.grads

        def run() -> None:
            b.backend.norm_perturb(params, grads, copies, scalars, rho, adaptive, eps=eps)

        def undo() -> None:
            b.backend.restore(params, copies)

        tx.write(run, params + copies, undo=undo)
        return {b.device: scalars}

    def prepare_update(self, pending: Optional[Perturbation], buckets: Buckets, tx: Transaction) -> Update:
        """The second half of a step, prepared: the restore slices (perturbed parameters without a
        second gradient are registered for a restore only), the pass's scalars (skip flag, clip
        coefficient; a GradScaler's unscale and inf flag folded in).  Reads only."""
        slices, lone = restore_slices(pending.buckets if pending is not None else [], buckets)
        for part in lone:

            def restore(part: Lone = part) -> None:
                part.backend.restore(part.params, part.copies)

            tx.write(restore, part.params, backend=part.backend)
        if not buckets:
            return Update(buckets, slices, None, False)
        run = self.run
        inv_scale = None
        if run.grad_scale is not None:
            inv_scale = run.grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
        max_norm = self.settings.max_grad_norm
        if max_norm is None and inv_scale is None and run.scaler_found_inf is None and not lone:
            fused = self._norm_update(pending, buckets, slices, tx)
            if fused is not None:
                return Update(buckets, slices, fused, False, registered=True)
        scalars = pass_scalars(
            buckets,
            "step",
            weighted=False,
            max_norm=max_norm,
            prev=None if pending is None else pending.scalars,
            inv_scale=inv_scale,
            found_inf=run.scaler_found_inf,
        )
        return Update(buckets, slices, scalars, max_norm is not None or inv_scale is not None)

    def _norm_update(
        self, pending: Optional[Perturbation], buckets: Buckets, slices: Dict[int, list], tx: Transaction
    ) -> Optional[Scalars]:
        """The restore + base step of one bucket registered with its norm inside (the base step's
        adapter has ``prepare_with_norm``); None where the pass takes the general route."""
        if not self._one_pass(buckets, first=False):
            return None
        adapter = base_steps.for_optimizer(self.base)
        with_norm = getattr(adapter, "prepare_with_norm", None)
        if with_norm is None:
            return None
        b = buckets[0]
        prev = None if pending is None or pending.scalars is None else scalars_on(pending.scalars, b.device)
        scalars = new_scalars(b.device)
        if not with_norm(self.base, b, slices[id(b)], scalars, prev, tx):
            return None
        return {b.device: scalars}

    def register_update(self, update: Update, tx: Transaction) -> None:
        """Register the restore + base step of every bucket with ``tx`` (fastsam/base_steps)."""
        if update.scalars is None or update.registered:
            return
        adapter = base_steps.for_optimizer(self.base)
        if adapter is None:
            base_steps.generic.prepare(self.base, update.buckets, update.slices, update.scalars, update.clip, tx)
            return
        for b in update.buckets:
            adapter.prepare(self.base, b, update.slices[id(b)], update.scalars[b.device], update.clip, tx)

    # ------------------------------------------------------------------ helpers
    def _decide(self, tx: Transaction) -> None:
        """Ask the schedule for this step's decision now, with its state restorable: a step that
        fails leaves the schedule as it was (state_dict/load_state_dict, where it has them)."""
        run, schedule = self.run, self.settings.schedule
        if schedule is None or run.sam_active_override is not None:
            return
        if run.decision is not None and run.decision[0] == run.num_steps:
            return
        save, load = getattr(schedule, "state_dict", None), getattr(schedule, "load_state_dict", None)
        if callable(save) and callable(load):
            saved, decision = save(), run.decision

            def undo() -> None:
                load(saved)
                run.decision = decision

            tx.on_undo(undo)
        self.sam_active()

    def explain(self, exc: BaseException) -> None:
        """A backend refused the gradients: raise an error that names the parameter instead."""
        if not isinstance(exc, (ValueError, RuntimeError, TypeError)):
            return
        problem = describe_problem(self.base.param_groups)
        if problem is not None and str(exc) != problem:
            raise ValueError(problem) from exc


class Update(NamedTuple):
    """A prepared update: the buckets, their restore slices, the pass's scalars, whether to clip,
    and whether its writes are registered already (with the norm inside them)."""

    buckets: Buckets
    slices: Dict[int, list]
    scalars: Optional[Scalars]
    clip: bool
    registered: bool = False

    @property
    def skip_flag(self) -> Optional[torch.Tensor]:
        if self.scalars is None:
            return None
        return self.scalars[self.buckets[0].device][SKIP]
