"""Buckets: the tensors of one step grouped for the backends, and what is computed over them.

A *bucket* is the tensors of one param group on one (device, dtype, backend), in group
order: what one backend call sees.  This module

- builds the buckets of the parameters that have a gradient now (``Plan``), cached on
  the gradient pattern, checks the parameters and their gradients when it builds them,
  and makes the base optimizer's state follow parameters cast or moved through ``p.data``;
- keeps the restore copies of a bucket (``copies_for``);
- states the **restore contract** (``restore_slices``): after the first pass, every
  parameter of a second-pass bucket is either *perturbed* (it has a copy of w to restore
  from) or *fresh* (it had no first gradient: nothing to restore).  A backend call gets
  one kind only, ``copies`` either a distinct copy per parameter or empty;
- forms each pass's scalars (``pass_scalars``): the global (optionally ASAM weighted)
  squared norm over all buckets and the SAM epilogue (fastsam/backends/_common.py), on
  the device, across devices and FSDP2 shards.

Complex parameters are handled as torch's optimizers handle them: the kernels see
``torch.view_as_real`` views of the parameter, its gradient and its state.
"""

from __future__ import annotations

import collections
import functools
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import backends
from ..backends._common import SKIP, Epilogue, new_scalars, sam_scalars

Tensors = List[torch.Tensor]


@dataclass(eq=False)
class Bucket:
    """The tensors of one param group on one (device, dtype, backend), in group order.

    ``params``/``grads`` are what the kernels see, ``keys`` the parameters the optimizer
    state is keyed by: the same tensors, except for DTensor parameters (FSDP2, tensor
    parallel), whose kernels see the local shards, and complex parameters, whose kernels
    see real views.  ``shard`` is None for plain tensors, else (device mesh, mesh dims the
    parameters are sharded on): the dims over which sums of squares add up.
    """

    group: Dict[str, Any]
    params: Tensors
    backend: Any
    grads: Tensors = field(default_factory=list)
    keys: Tensors = field(default_factory=list)
    shard: Optional[Tuple] = None
    complex: bool = False
    copies: Optional[Tensors] = None  # the restore copies, looked up once per bucket
    index: List[int] = field(default_factory=list)  # positions of the parameters in the flat parameter list
    span: Optional[Tuple[int, int]] = None  # (start, stop) when ``index`` is one contiguous range
    states_cache: Optional[Tuple[Any, Optional[int], list]] = None  # (state mapping, its version, per-parameter dicts)
    scratch: Dict[str, Any] = field(default_factory=dict)  # per-bucket caches of the variants; die with the bucket

    def states(self, state: Dict) -> list:
        """The base optimizer's per-parameter state dicts of ``keys``, in order.

        Looked up again only when the mapping changed (a new mapping, or a TrackedState whose
        keys were cleared, deleted or replaced): hashing a tensor key runs Python code, which
        at a thousand parameters would be the largest host cost of a fused step.  The dicts
        themselves are the optimizer's, so values written into them are seen.
        """
        dicts = self.cached_states(state)
        if dicts is None:
            dicts = [state[k] for k in self.keys]  # may insert fresh dicts: read the version after
            self.states_cache = (state, getattr(state, "version", None), dicts)
        return dicts

    def cached_states(self, state: Dict) -> Optional[list]:
        """``states(state)`` where its lookup is cached and current, else None: never inserts a
        dict (a step that may still be skipped must leave the state as it was)."""
        hit = self.states_cache
        version = getattr(state, "version", None)
        if version is None or hit is None or hit[0] is not state or hit[1] != version:
            return None
        return hit[2]

    def states_of(self, state: Dict, s: Slice) -> list:
        """The state dicts of a slice's parameters: the cached list for the whole bucket."""
        return self.states(state) if s.keys is self.keys else [state[k] for k in s.keys]

    def view(self, tensors: Sequence[torch.Tensor]) -> Tensors:
        """State tensors (or gradients) of this bucket's parameters as the kernels see them: the local
        shards of DTensors, real views of complex tensors."""
        out = list(tensors)
        if self.shard is not None:
            out = [local_view(t) for t in out]
        if self.complex:
            out = [torch.view_as_real(t) if t.is_complex() else t for t in out]
        return out

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def whole(self, copies: Tensors) -> Slice:
        return Slice(self.params, self.grads, self.keys, copies)


class TrackedState(collections.defaultdict):
    """The base optimizer's ``state`` mapping, counting changes to its keys.

    ``Bucket.states`` caches the per-parameter state dicts; this counter tells it when the
    mapping was cleared, an entry deleted or replaced (``state[p] = {}``), so that a reset
    state is seen.  Writes *into* a parameter's dict need no tracking: the cache holds the
    dicts themselves.  The core installs it in place of the base optimizer's defaultdict
    (again whenever something, e.g. ``load_state_dict``, replaces the mapping).
    """

    __slots__ = ("version",)

    version: int

    def __init__(self, *args: Any) -> None:
        super().__init__(dict, *args)
        self.version = 0

    def __reduce__(
        self,
    ) -> Tuple[
        Callable[[List[Tuple[Any, Any]]], TrackedState], Tuple[List[Tuple[Any, Any]]]
    ]:  # pickles/deep-copies as the plain defaultdict torch.optim expects
        return (_tracked_from_items, (list(self.items()),))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.version += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> Tuple[Any, Any]:
        self.version += 1
        return super().popitem()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.version += 1
        return super().setdefault(key, default)


def _tracked_from_items(items: Iterable[Tuple[Any, Any]]) -> TrackedState:
    return TrackedState(items)


def tracked(base: torch.optim.Optimizer) -> TrackedState:
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

    def take(self, ids: Sequence[int]) -> Slice:
        def pick(ts: Tensors) -> Tensors:
            return [ts[i] for i in ids]

        return Slice(pick(self.params), pick(self.grads), pick(self.keys), pick(self.copies) if self.copies else [])

    def with_grads(self, grads: Tensors) -> Slice:
        return self._replace(grads=grads)


class Buckets(list):
    """The bucket list of one gradient pattern, with what ``pass_scalars`` decides from it."""

    __slots__ = ("info",)
    info: Optional[Tuple[torch.dtype, torch.device, bool]]  # pass_info of the buckets (None when there are none)


_grad_of = operator.attrgetter("grad")
_is_none = functools.partial(operator.is_, None)


class Plan:
    """Buckets of the parameters with a gradient, cached on the gradient pattern."""

    def __init__(self, backend_for: Callable[[torch.device], Any]) -> None:
        self.backend_for = backend_for
        self._cache: Dict[Tuple, Buckets] = {}
        self._layout: Optional[Tuple] = None

    def clear(self) -> None:
        self._cache.clear()
        self._layout = None

    def release(self) -> None:
        """Drop the cached buckets' references to gradients (called when a step ends, so that
        ``zero_grad()`` frees them)."""
        for buckets in self._cache.values():
            for b in buckets:
                b.grads = []

    def buckets(self, param_groups: List[Dict[str, Any]], base_state: Dict, recheck: bool = True) -> Buckets:
        """Buckets of the params that have a gradient now, with their gradients filled in.

        ``recheck=False`` (a step's second pass) reuses the first pass's fingerprint of the
        parameters (identity, storage, layout: ``_fingerprint``) and looks only at which
        parameters have a gradient, since nothing casts ``p.data`` between the two passes of
        one step.  The gradients themselves are checked by the backends, before anything is
        written (the backend contract), and described parameter by parameter by
        ``describe_problem`` when a backend refuses them.
        """
        flat = [p for g in param_groups for p in g["params"]]
        if recheck or self._layout is None or len(self._layout[0]) != len(flat):
            self._layout = _fingerprint(flat)
        grads = list(map(_grad_of, flat))
        mask = (tuple(map(_is_none, grads)), self._layout, tuple(map(id, param_groups)))
        buckets = self._cache.get(mask)
        if buckets is None:
            buckets = self._build(param_groups)
            self._cache.clear()  # the grad pattern rarely changes; keep one entry
            self._cache[mask] = buckets
            _conform_state(buckets, base_state)
        for b in buckets:
            if b.shard is not None:  # DTensors: the kernels work on the local shards
                b.params = [p.to_local() for p in b.keys]
                b.grads = b.view([p.grad.to_local() for p in b.keys])
            elif b.complex:
                b.grads = b.view([grads[i] for i in b.index])
            elif b.span is not None:
                b.grads = grads[b.span[0] : b.span[1]]
            else:
                b.grads = [grads[i] for i in b.index]
        return buckets

    def _build(self, param_groups: List[Dict[str, Any]]) -> Buckets:
        buckets = Buckets()
        flat_i = -1
        foreach = backends.get("foreach")
        for gi, group in enumerate(param_groups):
            by_key: Dict[Tuple, Bucket] = {}
            for pi, p in enumerate(group["params"]):
                flat_i += 1
                if p.grad is None:
                    continue
                problem = param_problem(p)
                if problem:
                    raise ValueError(f"{param_label(group, gi, pi)} {problem}")
                shard = _shard_key(p, group, gi, pi)
                view = torch.view_as_real(p) if p.is_complex() else p
                backend = backend_of(self.backend_for, p.device, view.dtype)
                if backend.NAME != "foreach" and not _dense(view):
                    backend = foreach  # compiled kernels index a tensor as one flat array
                key = (p.device, view.dtype, shard, backend.NAME)
                b = by_key.get(key)
                if b is None:
                    b = by_key[key] = Bucket(group, [], backend, shard=shard)
                b.complex = b.complex or p.is_complex()
                b.params.append(view)
                b.keys.append(p)
                b.index.append(flat_i)
            buckets.extend(by_key.values())
        for b in buckets:
            if b.index == list(range(b.index[0], b.index[0] + len(b.index))):
                b.span = (b.index[0], b.index[0] + len(b.index))
        buckets.info = pass_info(buckets) if buckets else None
        return buckets


def backend_of(backend_for: Callable[[torch.device], Any], device: torch.device, dtype: torch.dtype) -> Any:
    """The backend for tensors of ``device`` and ``dtype``: ``backend_for(device)``, or foreach for a
    dtype that backend does not support."""
    mod = backend_for(device)
    return mod if mod.supports(dtype) else backends.get("foreach")


def _dense(t: torch.Tensor) -> bool:
    """Dense in one of the layouts torch makes (contiguous, channels-last): one flat array."""
    return (
        t.numel() <= 1
        or t.is_contiguous()
        or t.is_contiguous(memory_format=torch.channels_last)
        or t.is_contiguous(memory_format=torch.channels_last_3d)
    )


def copies_for(b: Bucket, sam_state: Dict) -> Tensors:
    """The bucket's restore copies (kept in the core's own per-parameter state under "sam_copy")."""
    if b.copies is None:
        out: Tensors = []
        for k, p in zip(b.keys, b.params):
            st = sam_state.setdefault(k, {})
            c = st.get("sam_copy")
            if (
                c is None
                or c.shape != p.shape
                or c.dtype != p.dtype
                or c.device != p.device
                or c.stride() != p.stride()
            ):
                c = torch.empty_like(p, memory_format=torch.preserve_format)
                st["sam_copy"] = c
            out.append(c)
        b.copies = out
    return b.copies


# ---------------------------------------------------------------- the restore contract
class Lone(NamedTuple):
    """Perturbed parameters without a second gradient: restored, and not stepped."""

    backend: Any
    params: Tensors
    copies: Tensors


def restore_slices(perturbed: List[Bucket], buckets: List[Bucket]) -> Tuple[Dict[int, List[Slice]], List[Lone]]:
    """For each second-pass bucket (by id), the slices of one kind: perturbed parameters with
    their copies, fresh ones without; and the perturbed parameters that got no second
    gradient (to be restored only).  Writes nothing.

    ``perturbed`` are first_step's buckets (their ``params``/``copies`` as perturbed);
    usually the very same list as ``buckets``, when one slice per bucket suffices.
    """
    if buckets is perturbed:
        return {id(b): [b.whole(perturbed_copies(b))] for b in buckets}, []
    copy_of: Dict[int, torch.Tensor] = {}  # keyed by the parameters (DTensor views are renewed)
    for b in perturbed:
        for k, c in zip(b.keys, perturbed_copies(b)):
            copy_of[id(k)] = c
    stepped = {id(k) for b in buckets for k in b.keys}
    lone: List[Lone] = []
    for b in perturbed:
        ids = [i for i, k in enumerate(b.keys) if id(k) not in stepped]
        if ids:
            lone.append(Lone(b.backend, [b.params[i] for i in ids], [perturbed_copies(b)[i] for i in ids]))
    out: Dict[int, List[Slice]] = {}
    for b in buckets:
        restored = [i for i, k in enumerate(b.keys) if id(k) in copy_of]
        if len(restored) == len(b.keys):
            out[id(b)] = [b.whole([copy_of[id(k)] for k in b.keys])]
            continue
        fresh = [i for i, k in enumerate(b.keys) if id(k) not in copy_of]
        whole = b.whole([])
        if len(fresh) == len(b.keys):  # nothing perturbed (a plain step): the bucket as it is
            out[id(b)] = [whole]
            continue
        slices = [whole.take(fresh)] if fresh else []
        if restored:
            s = whole.take(restored)
            slices.append(s._replace(copies=[copy_of[id(k)] for k in s.keys]))
        out[id(b)] = slices
    return out, lone


def perturbed_copies(b: Bucket) -> Tensors:
    """A perturbed bucket's restore copies (``perturb`` made them through ``copies_for``)."""
    assert b.copies is not None, "a perturbed bucket has its restore copies"
    return b.copies


# ---------------------------------------------------------------- the norms and scalars
def pass_scalars(
    buckets: List[Bucket],
    mode: str,
    *,
    weighted: bool,
    grads: Optional[List[Tensors]] = None,
    eps: float = 1e-12,
    max_norm: Optional[float] = None,
    prev: Optional[Dict[torch.device, torch.Tensor]] = None,
    skip_hook: Optional[Callable[[torch.Tensor], None]] = None,
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> Dict[torch.device, torch.Tensor]:
    """The scalars of one pass (fastsam/backends/_common.py) on every device of ``buckets``.

    ``grads[i]`` (default: bucket i's gradients) are the tensors whose norm is taken: a
    variant's direction or update gradient where it replaces the gradient.  The usual case,
    one device and plain tensors, is one ``grad_sq_norm`` call per bucket, each adding its
    predecessor's total, the last one writing the epilogue: no scalar torch op in between.
    Several devices or FSDP2 shards combine the partial sums on the first bucket's device
    first.  A GradScaler's ``inv_scale``/``found_inf`` (second pass) are folded into the
    epilogue, which then runs in torch ops after the chained norms, since the triton kernel's
    in-kernel epilogue does not take them.  Reads only: nothing is written but the scalars.
    """
    acc, main, chain = getattr(buckets, "info", None) or pass_info(buckets)
    lists = grads if grads is not None else [b.grads for b in buckets]
    out = new_scalars(main, acc)
    prev_main = None if prev is None else scalars_on(prev, main)
    ep = Epilogue(out, mode, eps, max_norm, prev_main, inv_scale, found_inf)
    scaled = inv_scale is not None or found_inf is not None
    if chain:
        total = None
        for i, (b, gs) in enumerate(zip(buckets, lists)):
            last = i == len(buckets) - 1 and not scaled
            total = b.backend.grad_sq_norm(
                gs,
                b.params if weighted and b.group["adaptive"] else None,
                accumulate=total,
                epilogue=ep if last else None,
            )
        if scaled:
            assert total is not None  # buckets is never empty here (pass_info reads buckets[0])
            sam_scalars(total, ep)
    else:
        partial: Dict[Optional[Tuple], torch.Tensor] = {}  # local sums, per kind of sharding
        for b, gs in zip(buckets, lists):
            sq = b.backend.grad_sq_norm(gs, b.params if weighted and b.group["adaptive"] else None)
            sq = to_device(sq, main, acc)
            partial[b.shard] = partial[b.shard] + sq if b.shard in partial else sq
        total = None
        for shard, sq in partial.items():  # bucket order: the same on every rank
            sq = reduce_over_shards(sq, shard)
            total = sq if total is None else total + sq
        assert total is not None  # buckets is never empty here (pass_info reads buckets[0])
        sam_scalars(total, ep)
    if skip_hook is not None:
        # A standalone flag: collectives get a tensor of their own, not a view into the scalars.
        flag = out[SKIP].clone()
        skip_hook(flag)
        out[SKIP] = flag
    scalars = {main: out}
    for b in buckets:
        if b.device not in scalars:
            scalars[b.device] = to_device(out, b.device, out.dtype)
    return scalars


def new_scalars_like(buckets: List[Bucket], saved: torch.Tensor) -> torch.Tensor:
    """A pass's scalars on the first bucket's device (float64), holding ``saved``."""
    acc, main, _ = pass_info(buckets)
    out = new_scalars(main, acc)
    out.copy_(saved)
    return out


def pass_info(buckets: Sequence[Bucket]) -> Tuple[torch.dtype, torch.device, bool]:
    """(accumulation dtype, main device, whether the norms can chain on one device).  The norms and
    the pass's scalars are float64 for every dtype (fastsam/backends/_common.py), so buckets of any
    dtypes chain where they share device and backend."""
    main = buckets[0].device
    chain = all(b.device == main and b.shard is None and b.backend is buckets[0].backend for b in buckets)
    return torch.float64, main, chain


def scalars_on(scalars: Dict[torch.device, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A pass's scalars on ``device`` (copied from another device if they are not there)."""
    s = scalars.get(device)
    if s is None:
        s = next(iter(scalars.values()))
        s = to_device(s, device, s.dtype)
    return s


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``: asynchronous only where the destination is a device whose stream
    orders the copy before its readers.  A copy to the CPU blocks, since the CPU backends read
    such values on the host (a non-blocking CUDA->CPU copy may not have landed yet)."""
    return t.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def reduce_over_shards(total: torch.Tensor, shard: Optional[Tuple]) -> torch.Tensor:
    """Plain tensors (``shard`` None, DDP included): the sum is already whole.  Sharded
    DTensors (FSDP2): all-reduced (SUM, on the device) over each mesh dim the parameters
    are sharded on, so every rank uses the norm of the whole gradient and takes the same
    skip decision."""
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
    all give the parameter new storage, so its data pointer changes).  Tuples of ints built by
    C-level maps, the cheapest description found.  Tensors without storage of their own
    (DTensor parameters) are described by dtype, device and layout instead."""
    try:  # the layout too: p.data = p.data.t() keeps the storage but not the layout
        return tuple(map(id, flat)), tuple(map(_data_ptr, flat)), tuple(map(_is_contiguous, flat))
    except RuntimeError:
        return tuple(map(id, flat)), tuple([(p.dtype, p.device, p.is_contiguous()) for p in flat])


def param_label(group: Dict[str, Any], gi: int, pi: int) -> str:
    """How error messages name a parameter: its group and index, and its name where the optimizer
    was given named parameters."""
    names = group.get("param_names")
    name = f" ({names[pi]!r})" if names is not None and pi < len(names) else ""
    return f"param group {gi}, parameter {pi}{name}:"


def param_problem(p: torch.Tensor) -> str:
    """Why ``p`` and its gradient cannot take a SAM step, or "" if they can."""
    g = p.grad
    if g is None:
        return ""
    if not (p.is_floating_point() or p.is_complex()):
        return f"has dtype {p.dtype} and a gradient; SAM perturbs and steps floating-point (or complex) parameters only"
    if g.layout != torch.strided:
        return (
            f"has a {g.layout} gradient; SAM needs a dense gradient (its global norm and the "
            "perturbation read every element)"
        )
    if g.dtype != p.dtype or g.device != p.device:
        return f"has a gradient of dtype/device {g.dtype}/{g.device}, the parameter is {p.dtype}/{p.device}"
    if g.shape != p.shape:
        return f"has a gradient of shape {tuple(g.shape)}, the parameter's is {tuple(p.shape)}"
    return ""


def describe_problem(param_groups: List[Dict[str, Any]]) -> Optional[str]:
    """The first parameter whose gradient no backend can take, named, or None."""
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            problem = param_problem(p)
            if problem:
                return f"{param_label(group, gi, pi)} {problem}"
    return None


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
            if not st:
                continue
            for name, v in st.items():
                if (
                    torch.is_tensor(v)
                    and name != "step"
                    and v.shape == p.shape
                    and (v.dtype != p.dtype or v.device != p.device or v.stride() != p.stride())
                ):
                    st[name] = torch.empty_like(p).copy_(v)


def _dtensor_type() -> Any:  # Any: what isinstance narrows to has the DTensor attributes torch.Tensor lacks
    """DTensor's class once torch.distributed.tensor is imported, else None (no DTensor
    exists before; importing it here would make ``import fastsam`` much slower)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor as it is."""
    dt = _dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def _shard_key(p: torch.Tensor, group: Dict[str, Any], gi: int, pi: int) -> Optional[Tuple]:
    """None for a plain tensor; (mesh, sharded mesh dims) for a DTensor parameter."""
    dt = _dtensor_type()
    if dt is None or not isinstance(p, dt):
        return None
    label = param_label(group, gi, pi)
    if not isinstance(p.grad, dt) or p.grad.placements != p.placements:
        raise ValueError(
            f"{label} a DTensor parameter placed {p.placements} has a gradient placed "
            f"{getattr(p.grad, 'placements', 'as a plain tensor')}; SAM needs the gradient sharded like its "
            "parameter (as FSDP2 leaves it)"
        )
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"{label} a DTensor parameter with a Partial placement")
    return (p.device_mesh, tuple(d for d, pl in enumerate(p.placements) if pl.is_shard()))
