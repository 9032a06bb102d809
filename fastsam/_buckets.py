"""The bucket machinery behind FusedSAM: grouping, state conforming, restore copies, norms.

A *bucket* is the tensors of one param group on one (device, dtype), in group
order: what one backend call sees.  This module

- builds the buckets of the parameters that have a gradient now (``Plan``),
  cached on the gradient pattern, and makes the base optimizer's state follow
  parameters cast or moved through ``p.data``;
- keeps the restore copies of a bucket (``copies_for``);
- states the **restore contract** (``restore_slices``): after the first pass,
  every parameter of a second-pass bucket is either *perturbed* (it has a copy
  of w to restore from) or *fresh* (it had no first gradient: nothing to
  restore).  A backend call gets one kind only, ``copies`` either a distinct
  copy per parameter or empty; no backend infers it;
- forms each pass's scalars (``pass_scalars``): the global (optionally ASAM
  weighted) squared norm over all buckets and the SAM epilogue
  (fastsam/backends/_common.py), on the device, across devices and FSDP2 shards.
"""
from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import backends
from .backends._common import SKIP, Epilogue, new_scalars, sam_scalars

Tensors = List[torch.Tensor]


@dataclass
class Bucket:
    """The tensors of one param group on one (device, dtype), in group order.

    ``params``/``grads`` are what the kernels see, ``keys`` the parameters the
    optimizer state is keyed by: the same tensors, except for DTensor
    parameters (FSDP2, tensor parallel), whose kernels see the local shards.
    ``shard`` is None for plain tensors, else (device mesh, mesh dims the
    parameters are sharded on): the dims over which sums of squares add up.
    """

    group: Dict[str, Any]
    params: Tensors
    backend: Any
    grads: Tensors = field(default_factory=list)
    keys: Tensors = field(default_factory=list)
    shard: Optional[Tuple] = None
    copies: Optional[Tensors] = None  # the restore copies, looked up once per bucket
    index: List[int] = field(default_factory=list)  # positions of the parameters in the flat parameter list
    _states: Optional[Tuple[Any, int, list]] = None  # (state mapping, its version, per-parameter dicts)

    def states(self, state: Dict) -> list:
        """The base optimizer's per-parameter state dicts of ``keys``, in order.

        Looked up again only when the mapping changed (a new mapping, or a TrackedState whose
        keys were cleared, deleted or replaced): hashing a tensor key runs Python code (~0.25
        us), which at 1,000 parameters was the largest host cost of a fused step.  The dicts
        themselves are the optimizer's, so values written into them are seen.  An untracked
        mapping is looked up every time.
        """
        version = getattr(state, "version", None)
        if (version is None or self._states is None or self._states[0] is not state
                or self._states[1] != version):
            dicts = [state[k] for k in self.keys]  # may insert fresh dicts: read the version after
            self._states = (state, getattr(state, "version", None), dicts)
        return self._states[2]

    def states_of(self, state: Dict, s: "Slice") -> list:
        """The state dicts of a slice's parameters: the cached list for the whole bucket."""
        return self.states(state) if s.keys is self.keys else [state[k] for k in s.keys]

    def local(self, state: Tensors) -> Tensors:
        """Optimizer-state tensors as the kernels see them: the local shards of DTensors."""
        return state if self.shard is None else [_local(t) for t in state]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def whole(self, copies: Tensors) -> "Slice":
        return Slice(self.params, self.grads, self.keys, copies)


class TrackedState(collections.defaultdict):
    """The base optimizer's ``state`` mapping, counting changes to its keys.

    ``Bucket.states`` caches the per-parameter state dicts; this counter tells it when the
    mapping was cleared, an entry deleted or replaced (``state[p] = {}``), so that a reset
    state is seen.  Writes *into* a parameter's dict need no tracking: the cache holds the
    dicts themselves.  FusedSAM installs it in place of the base optimizer's defaultdict
    (again whenever something, e.g. ``load_state_dict``, replaces the mapping).
    """

    __slots__ = ("version",)

    def __init__(self, *args):
        super().__init__(dict, *args)
        self.version = 0

    def __reduce__(self):  # pickles/deep-copies as the plain defaultdict torch.optim expects
        return (_tracked_from_items, (list(self.items()),))

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def clear(self):
        self.version += 1
        super().clear()

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)

    def popitem(self):
        self.version += 1
        return super().popitem()

    def update(self, *args, **kwargs):
        self.version += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self.version += 1
        return super().setdefault(key, default)


def _tracked_from_items(items):
    return TrackedState(items)


def tracked(base) -> "TrackedState":
    """``base.state`` as a TrackedState (installed on first use and after any replacement)."""
    state = base.state
    if type(state) is not TrackedState:
        state = TrackedState(state)
        base.state = state
    return state


class Slice(NamedTuple):
    """Part of a bucket for one backend call: ``copies`` is one distinct copy per
    parameter (restore from them) or empty (nothing to restore)."""

    params: Tensors
    grads: Tensors
    keys: Tensors
    copies: Tensors

    def take(self, ids: Sequence[int]) -> "Slice":
        pick = lambda ts: [ts[i] for i in ids]  # noqa: E731
        return Slice(pick(self.params), pick(self.grads), pick(self.keys), pick(self.copies) if self.copies else [])


class Plan:
    """Buckets of the parameters with a gradient, cached on the gradient pattern."""

    def __init__(self, backend_for: Callable[[torch.device], Any]):
        self._backend_for = backend_for
        self._cache: Dict[Tuple, List[Bucket]] = {}
        self._layout: Optional[Tuple] = None

    def clear(self) -> None:
        self._cache.clear()
        self._layout = None

    def buckets(self, param_groups: List[Dict[str, Any]], base_state: Dict, recheck: bool = True) -> List[Bucket]:
        """Buckets of the params that have a gradient now, with their gradients filled in.

        ``recheck=False`` (a step's second pass) reuses the first pass's fingerprint of the
        parameters (identity, storage, layout: ``_fingerprint``) and looks only at which
        parameters have a gradient, since nothing casts ``p.data`` between the two passes of
        one step.
        """
        flat = [p for g in param_groups for p in g["params"]]
        if recheck or self._layout is None or len(self._layout[0]) != len(flat):
            self._layout = _fingerprint(flat)
        grads = [p.grad for p in flat]
        mask = (tuple([g is None for g in grads]), self._layout, tuple(map(id, param_groups)))
        buckets = self._cache.get(mask)
        if buckets is None:
            buckets = self._build(param_groups)
            self._cache.clear()  # the grad pattern rarely changes; keep one entry
            self._cache[mask] = buckets
            _conform_state(buckets, base_state)
        for b in buckets:
            if b.shard is not None:  # DTensors: the kernels work on the local shards
                b.params = [p.to_local() for p in b.keys]
                b.grads = [p.grad.to_local() for p in b.keys]
            else:
                b.grads = [grads[i] for i in b.index]
        return buckets

    def _build(self, param_groups: List[Dict[str, Any]]) -> "Buckets":
        buckets = Buckets()
        flat_i = -1
        for gi, group in enumerate(param_groups):
            by_key: Dict[Tuple, Bucket] = {}
            for pi, p in enumerate(group["params"]):
                flat_i += 1
                if p.grad is None:
                    continue
                _check_param(p, gi, pi)
                shard = _shard_key(p, gi, pi)
                key = (p.device, p.dtype, shard)
                if key not in by_key:
                    by_key[key] = Bucket(group, [], backend_of(self._backend_for, p.device, p.dtype), shard=shard)
                by_key[key].params.append(p)
                by_key[key].keys.append(p)
                by_key[key].index.append(flat_i)
            buckets.extend(by_key.values())
        buckets.info = _pass_info(buckets) if buckets else None
        return buckets


def backend_of(backend_for: Callable[[torch.device], Any], device: torch.device, dtype: torch.dtype):
    """The backend for tensors of ``device`` and ``dtype``: ``backend_for(device)``, or foreach for a
    dtype that backend does not support."""
    mod = backend_for(device)
    return mod if mod.supports(dtype) else backends.get("foreach")


def copies_for(b: Bucket, sam_state: Dict) -> Tensors:
    """The bucket's restore copies (kept in FusedSAM's own state under "sam_copy")."""
    if b.copies is None:
        out = []
        for k, p in zip(b.keys, b.params):
            st = sam_state[k]
            c = st.get("sam_copy")
            if (c is None or c.shape != p.shape or c.dtype != p.dtype or c.device != p.device
                    or c.stride() != p.stride()):
                c = torch.empty_like(p, memory_format=torch.preserve_format)
                st["sam_copy"] = c
            out.append(c)
        b.copies = out
    return b.copies


# ---------------------------------------------------------------- the restore contract
def restore_slices(perturbed: List[Bucket], buckets: List[Bucket]) -> Dict[int, List[Slice]]:
    """For each second-pass bucket (by id), the slices of one kind: perturbed parameters with
    their copies, fresh ones without.  Perturbed parameters that got no second gradient are
    restored here (they take no base step).

    ``perturbed`` are first_step's buckets (their ``params``/``copies`` as perturbed);
    usually the very same list as ``buckets``, when one slice per bucket suffices.
    """
    if buckets is perturbed:
        return {id(b): [b.whole(b.copies)] for b in buckets}
    copy_of: Dict[int, torch.Tensor] = {}  # keyed by the parameters (DTensor views are renewed)
    for b in perturbed:
        for k, c in zip(b.keys, b.copies):
            copy_of[id(k)] = c
    stepped = {id(k) for b in buckets for k in b.keys}
    for b in perturbed:  # perturbed, no second gradient: restore only
        lone = [i for i, k in enumerate(b.keys) if id(k) not in stepped]
        if lone:
            b.backend.restore([b.params[i] for i in lone], [b.copies[i] for i in lone])
    out: Dict[int, List[Slice]] = {}
    for b in buckets:
        restored = [i for i, k in enumerate(b.keys) if id(k) in copy_of]
        if len(restored) == len(b.keys):
            out[id(b)] = [b.whole([copy_of[id(k)] for k in b.keys])]
            continue
        fresh = [i for i, k in enumerate(b.keys) if id(k) not in copy_of]
        whole = b.whole([])
        slices = [whole.take(fresh)] if fresh else []
        if restored:
            s = whole.take(restored)
            slices.append(s._replace(copies=[copy_of[id(k)] for k in s.keys]))
        out[id(b)] = slices
    return out


# ---------------------------------------------------------------- the norms and scalars
def pass_scalars(buckets: List[Bucket], mode: str, *, weighted: bool, eps: float = 1e-12,
                 max_norm: Optional[float] = None, prev: Optional[Dict[torch.device, torch.Tensor]] = None,
                 skip_hook: Optional[Callable[[torch.Tensor], None]] = None,
                 inv_scale: Optional[torch.Tensor] = None,
                 found_inf: Optional[torch.Tensor] = None) -> Dict[torch.device, torch.Tensor]:
    """The scalars of one pass (fastsam/backends/_common.py) on every device of ``buckets``.

    The usual case, one device and plain tensors, is one ``grad_sq_norm`` call per bucket,
    each adding its predecessor's total, the last one writing the epilogue: no scalar torch
    op in between (the triton backend: two launches per bucket).  Several devices or FSDP2
    shards combine the partial sums on the first bucket's device first.  A GradScaler's
    ``inv_scale``/``found_inf`` (second pass) are folded into the epilogue; it then runs in
    torch ops after the chained norms (a few scalar launches, no further pass over the
    gradients), since the triton kernel's in-kernel epilogue does not take them.
    """
    acc, main, chain = getattr(buckets, "info", None) or _pass_info(buckets)
    out = new_scalars(main, acc)
    prev_main = None if prev is None else _on(prev, main)
    ep = Epilogue(out, mode, eps, max_norm, prev_main, inv_scale, found_inf)
    scaled = inv_scale is not None or found_inf is not None
    if chain:
        total = None
        for i, b in enumerate(buckets):
            last = i == len(buckets) - 1 and not scaled
            total = b.backend.grad_sq_norm(b.grads, b.params if weighted and b.group["adaptive"] else None,
                                           accumulate=total, epilogue=ep if last else None)
        if scaled:
            sam_scalars(total, ep)
    else:
        partial: Dict[Optional[Tuple], torch.Tensor] = {}  # local sums, per kind of sharding
        for b in buckets:
            sq = b.backend.grad_sq_norm(b.grads, b.params if weighted and b.group["adaptive"] else None)
            sq = _to(sq, main, acc)
            partial[b.shard] = partial[b.shard] + sq if b.shard in partial else sq
        total = None
        for shard, sq in partial.items():  # bucket order: the same on every rank
            sq = _reduce_over_shards(sq, shard)
            total = sq if total is None else total + sq
        sam_scalars(total, ep)
    if skip_hook is not None:
        # A standalone flag: collectives get a tensor of their own, not a view into the scalars.
        flag = out[SKIP].clone()
        skip_hook(flag)
        out[SKIP] = flag
    scalars = {main: out}
    for b in buckets:
        if b.device not in scalars:
            scalars[b.device] = _to(out, b.device, out.dtype)
    return scalars


class Buckets(list):
    """The bucket list of one gradient pattern, with what ``pass_scalars`` decides from it."""

    __slots__ = ("info",)


def _pass_info(buckets: List[Bucket]) -> Tuple[torch.dtype, torch.device, bool]:
    """(accumulation dtype, main device, whether the norms can chain on one device)."""
    acc = torch.float64 if any(b.dtype == torch.float64 for b in buckets) else torch.float32
    main = buckets[0].device
    chain = (all(b.device == main and b.shard is None and b.backend is buckets[0].backend for b in buckets)
             and all((b.dtype == torch.float64) == (acc == torch.float64) for b in buckets))
    return acc, main, chain


def _on(scalars: Dict[torch.device, torch.Tensor], device: torch.device) -> torch.Tensor:
    s = scalars.get(device)
    if s is None:
        s = next(iter(scalars.values()))
        s = _to(s, device, s.dtype)
    return s


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``: asynchronous only where the destination is a device whose stream
    orders the copy before its readers.  A copy to the CPU blocks, since the CPU backends read
    such values on the host (a non-blocking CUDA->CPU copy may not have landed yet)."""
    return t.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def _reduce_over_shards(total: torch.Tensor, shard: Optional[Tuple]) -> torch.Tensor:
    """Plain tensors (``shard`` None, DDP included): the sum is already whole.  Sharded
    DTensors (FSDP2): all-reduced (SUM, on the device) over each mesh dim the parameters
    are sharded on, so every rank perturbs with the norm of the whole gradient and takes
    the same skip decision."""
    if shard is not None:
        mesh, dims = shard
        for d in dims:
            torch.distributed.all_reduce(total, group=mesh.get_group(d))
    return total


# ---------------------------------------------------------------- checks and state
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous


def _fingerprint(flat: List[torch.Tensor]) -> Tuple:
    """What makes cached buckets stale: a replaced parameter (its identity), or one moved, cast
    or re-laid-out through ``p.data`` (``model.double()``, ``.cuda()``, ``.to(memory_format=...)``
    all give the parameter new storage, so its data pointer changes).  Two tuples of ints built
    by C-level maps: a third of the cost of a (id, dtype, device, layout) tuple per parameter,
    which was a fifth of a SAM step's host time.  Tensors without storage of their own (DTensor
    parameters) are described by dtype, device and layout instead."""
    try:  # the layout too: p.data = p.data.t() keeps the storage but not the layout
        return tuple(map(id, flat)), tuple(map(_data_ptr, flat)), tuple(map(_is_contiguous, flat))
    except RuntimeError:
        return tuple(map(id, flat)), tuple([(p.dtype, p.device, p.is_contiguous()) for p in flat])



def _check_param(p: torch.Tensor, gi: int, pi: int) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(f"FusedSAM does not support sparse gradients (param group {gi}, parameter {pi}); "
                           "SAM needs a dense global gradient norm")
    if p.is_complex():
        raise RuntimeError(f"FusedSAM does not support complex parameters (param group {gi}, parameter {pi}); "
                           "pass torch.view_as_real(p) views or keep complex parameters out of FusedSAM")
    if p.grad.dtype != p.dtype or p.grad.device != p.device:
        raise RuntimeError(f"gradient of param group {gi}, parameter {pi} has dtype/device "
                           f"{p.grad.dtype}/{p.grad.device} but the parameter is {p.dtype}/{p.device}")


def _conform_state(buckets: List[Bucket], state: Dict) -> None:
    """Make the base optimizer's state follow parameters cast, moved or re-laid-out
    through ``p.data`` (``model.double()``, ``model.to(memory_format=...)``), as
    ``load_state_dict`` casts it, so that each fused call sees one dtype, device
    and layout.  Runs only when the buckets are rebuilt."""
    for b in buckets:
        if b.shard is not None:
            continue
        for p in b.keys:
            st = state.get(p)
            for name, v in (st or {}).items():
                if (torch.is_tensor(v) and name != "step" and v.shape == p.shape
                        and (v.dtype != p.dtype or v.device != p.device or v.stride() != p.stride())):
                    st[name] = torch.empty_like(p).copy_(v)


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
