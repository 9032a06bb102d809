"""All or nothing: the writes of one public call, undone together when one of them raises.

A call first *prepares* (checks every setting, plans the buckets, reads the gradients'
norms, creates missing state) and then *commits*: a list of writes, each a few backend
calls over tensors it names.  Whatever raises, the transaction puts back what was
written before it, so the call leaves parameters, gradients and optimizer state as they
were.

What an undo needs, and what it costs:

- a write with a cheap exact inverse says so (``undo=``: the perturbation is undone by
  restoring from the copies it made first);
- any other write is undone from a snapshot of the tensors it overwrites, taken just
  before it runs, except for the **last** write: every backend op checks all of its
  arguments before its first write (the backend contract, fastsam/backends/__init__.py),
  so when the last write raises nothing has been written, and nothing else remains to be
  undone but what came before it.  The writes of a commit are independent (disjoint
  tensors), so ``commit`` runs the largest last: a SAM step over one bucket snapshots
  nothing, and a model with a small second param group (biases, norms) snapshots that
  group only.
- Python-level changes (a new state entry, a replaced value) are undone by callbacks
  registered with ``on_undo``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

Tensors = List[torch.Tensor]


class Write:
    """One write of a commit: ``run()`` overwrites ``tensors`` (and nothing else); ``backend``,
    where given, is the backend whose ``restore`` op copies them for a snapshot."""

    __slots__ = ("run", "tensors", "undo", "single", "backend", "_size")

    def __init__(
        self,
        run: Callable[[], None],
        tensors: Sequence[torch.Tensor],
        *,
        undo: Optional[Callable[[], None]] = None,
        single: bool = True,
        backend: Any = None,
        size: Optional[int] = None,
    ):
        self.run = run
        self.tensors = tensors
        self.undo = undo  # exact inverse, replaces the snapshot
        self.single = single  # one backend call: when it raises, it wrote nothing
        self.backend = backend
        self._size = size

    @property
    def size(self) -> int:
        """Bytes written (what orders the commit): given by the caller, or counted when first needed."""
        if self._size is None:
            self._size = sum(t.numel() * t.element_size() for t in self.tensors)
        return self._size


class Snapshots:
    """The buffers that hold undo copies, kept from call to call: a step snapshots the same
    tensors every time, so the buffers are allocated once (memory: the tensors of every write
    but the largest, usually a small second param group)."""

    LIMIT = 64  # distinct tensor lists kept; beyond it (the parameters keep changing) start afresh

    def __init__(self) -> None:
        self._by: Dict[tuple, Tensors] = {}

    def take(self, tensors: Sequence[torch.Tensor], backend: Any = None) -> Callable[[], None]:
        """Copy ``tensors`` now; return the function that writes the copy back."""
        key = tuple(map(id, tensors))
        bufs = self._by.get(key)
        if bufs is None or any(
            b.shape != t.shape or b.dtype != t.dtype or b.device != t.device or b.stride() != t.stride()
            for b, t in zip(bufs, tensors)
        ):
            if len(self._by) >= self.LIMIT:
                self._by.clear()
            bufs = self._by[key] = [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors]
        _copy(bufs, tensors, backend)
        return lambda: _copy(list(tensors), bufs, backend)

    def __getstate__(self) -> Dict[str, Any]:
        return {"_by": {}}


def _without_grad(fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` under ``torch.no_grad()``, entered only where grad mode is on: a SAM pass
    switches it off itself (other callers may not), and a context built and entered for nothing
    is a cost every pass pays with cold caches."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            fn(*args)
    else:
        fn(*args)


def _call_all(fns: Iterable[Callable[[], object]]) -> None:
    for fn in fns:
        fn()


def _copy(dst: Tensors, src: Sequence[torch.Tensor], backend: Any) -> None:
    """dst <- src, one multi-tensor copy per (device, dtype): the backend's restore op where it
    takes that dtype, foreach's copy otherwise."""
    groups: Dict[tuple, list] = {}
    for d, s in zip(dst, src):
        groups.setdefault((s.device, s.dtype), []).append((d, s))
    _without_grad(_copy_groups, groups, backend)


def _copy_groups(groups: Dict[tuple, list], backend: Any) -> None:
    for (_, dtype), pairs in groups.items():
        ds, ss = [d for d, _ in pairs], [s for _, s in pairs]
        if backend is not None and backend.supports(dtype):
            backend.restore(ds, ss)
        else:
            torch._foreach_copy_(ds, ss)


class Transaction:
    """Collects the writes and Python-level undo steps of one call; ``commit`` runs them."""

    def __init__(self, snapshots: Optional[Snapshots] = None) -> None:
        self.snapshots = snapshots if snapshots is not None else Snapshots()
        self.writes: List[Write] = []
        self.ordered = False  # set when the writes depend on their order (run as registered)
        self._undo: List[Callable[[], object]] = []  # Python-level changes made while preparing or committing
        self._done: List[Callable[[], None]] = []  # the undo of each write that ran, in order

    def write(
        self,
        run: Callable[[], None],
        tensors: Sequence[torch.Tensor],
        *,
        undo: Optional[Callable[[], None]] = None,
        single: bool = True,
        backend: Any = None,
        size: Optional[int] = None,
    ) -> None:
        """Register a write; ``tensors`` are what it overwrites (snapshotted unless it runs last or
        has an exact ``undo``), ``size`` their bytes where the caller knows them."""
        self.writes.append(Write(run, tensors, undo=undo, single=single, backend=backend, size=size))

    def on_undo(self, fn: Callable[[], object]) -> None:
        """Register the inverse of a Python-level change just made (run in reverse order on failure)."""
        self._undo.append(fn)

    def commit(self) -> None:
        """Run the writes (the largest last, unless ``ordered``); on any exception, undo what
        ran, then the Python-level changes, and re-raise."""
        writes = self.writes
        if not self.ordered and len(writes) > 1 and any(w.undo is None for w in writes):
            writes = sorted(writes, key=lambda w: w.size)
        self.writes = []
        try:
            _without_grad(self._run, writes)
        except BaseException:
            self.rollback()
            raise

    def _run(self, writes: List[Write]) -> None:
        for i, w in enumerate(writes):
            if w.undo is None and not (i == len(writes) - 1 and w.single):
                self._done.append(self.snapshots.take(w.tensors, w.backend))
            w.run()
            if w.undo is not None:  # registered once it ran: a write that raises wrote nothing
                self._done.append(w.undo)

    def rollback(self) -> None:
        """Undo every write that ran and every Python-level change, newest first."""
        done, self._done = self._done, []
        undo, self._undo = self._undo, []
        _without_grad(_call_all, reversed(done))
        _call_all(reversed(undo))
