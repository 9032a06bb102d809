"""The one launcher behind every Triton op: pointer tables, block maps, caches.

Every op processes all tensors of one (device, dtype) bucket in ONE launch,
whatever their number (two when the bucket mixes aligned and unaligned tensors,
see Alignment).  As in apex's ``multi_tensor_apply``, each program handles one
chunk of one tensor; unlike apex, the tensor list lives in device memory instead
of the kernel's parameter space, so there is no per-launch cap on the number of
tensors:

``table``   int64 [T, C]: row j holds ``data_ptr()`` of tensor j in each of the
            op's lists (params, grads, copies, ...) and, in the last column,
            its ``numel()``.
``blocks``  int32 [2, NB]: program b works on chunk ``blocks[1, b]`` of tensor
            ``blocks[0, b]``.  Tensor j owns ``max(1, cdiv(numel_j, BLOCK))``
            consecutive programs: a zero-size tensor gets one fully masked
            program, so per-tensor work (Adam's step count) still happens.
grid        ``(NB,)``: one program per BLOCK-element chunk.

Element offsets are int64 (``chunk * BLOCK`` is computed in int64), so
tensors over 2**31 elements work; the grid's x limit (2**31 - 1 programs)
caps one bucket at 8.8e12 elements.

BLOCK = 2048 with 8 warps: 8 elements per thread and stream, two 16-byte
vector accesses each in fp32.  The registers and spills of every kernel
variant, as ptxas reports them for sm_90, are printed by
tests/test_triton_compile.py, which fails on any spill or stack use (an SM
holds 65536 registers: 256 / registers-per-thread programs of 8 warps fit on
it).  Not timed on a GPU yet: sweep BLOCK 1024..4096 x 4/8 warps there.

Alignment.  16-byte vector loads and stores need every address of a tensor's
lists to be a multiple of 16 bytes; a view at an odd offset (DDP's gradient
bucket views often are) does not allow them, and the kernel variant without
them needs more registers.  The block map therefore lists the programs of the
aligned tensors first and those of the others after them, and each op
launches the two parts separately (``Meta.parts``), the first with
``ALIGNED=True``: one unaligned view costs one more launch, not the vector
accesses of the whole bucket.

Caches.  A table's content is a function of its key (device, every list's
dtype, every ``data_ptr()``, the first list's ``numel()``s, the layouts), so a
cache hit is correct by construction; the block map depends on the sizes and
the alignment of each tensor only.  Gradients freed by
``zero_grad(set_to_none=True)`` usually come back at the same addresses (the
caching allocator hands out the same blocks), so a steady training loop hits
the cache and uploads nothing.  A miss uploads the table with one
non-blocking copy from pinned memory: no host synchronisation.  Every host
buffer is created on the CPU explicitly, whatever ``torch.set_default_device``
says (a model built under ``with torch.device("cuda"):``).

CUDA graphs.  Tables used while a stream is capturing are kept for the life
of the process (the graph reads them at every replay).  A miss during capture
(gradients allocated inside the capture come from the graph's pool, at new
addresses, so every table holding gradients is new) copies from a pinned arena,
since pinned memory cannot be allocated while capturing.  Outside capture the
arena is kept at least as large as all cached tables and block maps together:
a capture can rebuild every table of a step whose tables were cached by an
eager step before it (a step of up to CACHE_SIZE tables).  Run at least one
eager step before capturing, as torch's capturable optimizers require too.

Layout.  The kernels address element i of tensor j as ``data_ptr + i``: right
for dense non-overlapping tensors whose lists agree on strides (contiguous,
channels_last, ...).  ``table`` returns None otherwise and the op falls back
to the foreach backend for that call.  Checked on a cache miss only: the key
holds addresses and sizes, not strides.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..checks import check_bucket, check_copies

BLOCK = 2048
NUM_WARPS = 8
CACHE_SIZE = 256  # tables (and block maps) kept per process, least recently used first out: a bucket
# uses 4-6 tables a step (two sets of gradient addresses at most), so ~40 buckets stay cached
VECTOR_BYTES = 16  # the alignment that vector loads and stores need

# Element types of the tables' pointer columns (a constexpr of every kernel).
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# Device types whose tables are uploaded from host memory (tests/test_triton_internals.py
# simulates the upload and the capture arena on the CPU by adding "cpu").
UPLOAD_DEVICE_TYPES = ("cuda",)
CPU = torch.device("cpu")


@triton.jit
def locate(table, blk_tensor, blk_chunk, N_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor index, table row, chunk index, tensor size and element offsets."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid).to(tl.int64)
    c = tl.load(blk_chunk + pid).to(tl.int64)
    row = table + t * N_COLS
    numel = tl.load(row + (N_COLS - 1))
    offs = c * BLOCK + tl.arange(0, BLOCK)
    return t, row, c, numel, offs


@triton.jit
def column(row, COL: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer held in column COL of a table row.

    ALIGNED (every address of this launch's tensors is a multiple of 16 bytes, checked on the
    host) lets the compiler emit 16-byte vector loads and stores.
    """
    addr = tl.load(row + COL)
    if DTYPE == 1:
        ptr = addr.to(tl.pointer_type(tl.float16))
    elif DTYPE == 2:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
    elif DTYPE == 3:
        ptr = addr.to(tl.pointer_type(tl.float64))
    else:
        ptr = addr.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load_restored_and_sam_grad(
    row,
    offs,
    mask,
    grad_scale,
    grad_scale_lo,
    HAS_GRAD_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The common head of the fused base steps: the restored parameter (column 2, as
    stored and in float32) and the SAM gradient (column 1) in float32, clipped and
    negated as asked (``grad_scale, grad_scale_lo``: ``split_scale`` of the clip factor)."""
    p0 = tl.load(column(row, 2, DTYPE, ALIGNED) + offs, mask=mask)
    g = tl.load(column(row, 1, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = (g * grad_scale) * grad_scale_lo
    if MAXIMIZE:
        g = -g
    return p0, p0.to(tl.float32), g


# Each kernel calls its chunk body in two versions: ``mask=None`` for the full
# chunks (all but the last chunk of each tensor) and a bounds mask for the
# tail.  With a bounds mask on every access the compiler could not vectorise:
# the size is loaded from memory, so nothing is known about its alignment.
# ``kept`` is the store mask of state that a skipped step must leave alone.


@triton.jit
def split_scale(s):
    """A float64 scale as float32 ``(hi, lo)`` with ``g * s == (g * hi) * lo`` rounded once:
    fastsam/backends/_common.py ``split_scale`` (lo = 1 within float32's normal range, else an
    exact power of two; a float32 ``s`` would be subnormal or 0 for a gradient whose norm
    exceeds float32's range).  Scalar work, once per program."""
    a = tl.abs(s)
    tiny = (a < 1.1754943508222875e-38) & (a > 0.0)  # below float32's normal range
    big = (a > 3.4028234663852886e38) & (a < float("inf"))
    lo = tl.where(tiny, 7.888609052210118e-31, tl.where(big, 1.2676506002282294e30, 1.0)).to(
        tl.float64
    )  # 2^-100, 2^100
    return (s / lo).to(tl.float32), lo.to(tl.float32)


@triton.jit
def keep_mask(skip_ptr, offs):
    """Block of ``skip == 0``.  Built from a vector compare: the interpreter mishandles
    masks made from scalar compares."""
    skip = tl.load(skip_ptr).to(tl.float32)
    return (tl.zeros(offs.shape, dtype=tl.float32) + skip) == 0


def launch(kernel, n_programs: int, *args, num_warps: int = NUM_WARPS, **constexprs) -> None:
    """Launch ``kernel`` on a 1-D grid: the only place the triton backend launches anything
    (tests wrap this function to count launches).

    Triton launches on the current device; the tables hold addresses on the device of the
    first argument, so a bucket on another GPU is launched under that device's guard.
    """
    device = args[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[(n_programs,)](*args, num_warps=num_warps, **constexprs)
        return
    kernel[(n_programs,)](*args, num_warps=num_warps, **constexprs)


def launch_parts(kernel, tab: Table, *args, partials: Optional[torch.Tensor] = None, **constexprs) -> None:
    """``kernel`` over every program of ``tab``: one launch per part of its block map (the
    aligned tensors with ``ALIGNED=True``, then the others), ``args`` after the table's.
    ``partials``: a reduction's per-program output, its first argument after the table; each
    part gets it from the part's first program on."""
    for part in tab.meta.parts:
        head = () if partials is None else (partials[part.start :] if part.start else partials,)
        launch(
            kernel,
            part.n_blocks,
            tab.ptrs,
            part.blk_tensor,
            part.blk_chunk,
            *head,
            *args,
            ALIGNED=part.aligned,
            **constexprs,
        )


class Part(NamedTuple):
    """The programs ``[start, start + n_blocks)`` of a block map, launched together."""

    start: int
    n_blocks: int
    blk_tensor: torch.Tensor  # views of the block map from ``start``
    blk_chunk: torch.Tensor
    aligned: bool


class Meta:
    """What depends on the sizes and the alignment of each tensor only: the block map, its
    parts, and Adam's per-tensor program counters.

    ``aligned[j]`` (None: all True): tensor j's programs may use vector accesses.  The
    programs of the aligned tensors come first (part 0), those of the others after them.
    """

    __slots__ = ("n_tensors", "n_blocks", "blk_tensor", "blk_chunk", "parts", "slots", "_counters", "_keep")

    def __init__(self, numels: Sequence[int], device: torch.device, aligned: Optional[Sequence[bool]] = None):
        flags = [True] * len(numels) if aligned is None else list(aligned)
        order = [j for j, a in enumerate(flags) if a] + [j for j, a in enumerate(flags) if not a]
        counts = torch.tensor([max(1, -(-numels[j] // BLOCK)) for j in order], dtype=torch.int64, device=CPU)
        n_blocks = int(counts.sum())
        starts = torch.cumsum(counts, 0) - counts
        slot_of = torch.repeat_interleave(torch.arange(len(order), device=CPU), counts)  # position in `order`
        padded = -(-n_blocks // 4) * 4  # keeps the second row 16-byte aligned (one kernel specialisation)
        host = torch.zeros(2, padded, dtype=torch.int32, device=CPU)
        host[0, :n_blocks] = torch.tensor(order, dtype=torch.int64, device=CPU)[slot_of]
        host[1, :n_blocks] = torch.arange(n_blocks, device=CPU) - starts[slot_of]
        dev, self._keep = _upload(host, device)
        self.n_tensors = len(numels)
        self.n_blocks = n_blocks
        self.blk_tensor, self.blk_chunk = dev[0], dev[1]
        self.slots = host.numel() // 2  # int64 slots of the upload (the capture arena's unit)
        n_aligned = int(counts[: sum(flags)].sum())
        bounds = [(0, n_aligned, True), (n_aligned, n_blocks - n_aligned, False)]
        self.parts = tuple(Part(s, n, self.blk_tensor[s:], self.blk_chunk[s:], a) for s, n, a in bounds if n)
        self._counters: Optional[torch.Tensor] = None

    def counters(self) -> torch.Tensor:
        """int32 [T], zero between launches: how many programs of each tensor have finished."""
        if self._counters is None:
            self._counters = torch.zeros(self.n_tensors, dtype=torch.int32, device=self.blk_tensor.device)
        return self._counters


class Table:
    """The pointer table of one call's lists, with the block map of their sizes."""

    __slots__ = ("ptrs", "meta", "slots", "_keep")

    def __init__(self, cols: List[List[int]], meta: Meta, device: torch.device):
        host = torch.tensor(cols, dtype=torch.int64, device=CPU).t().contiguous()
        self.ptrs, self._keep = _upload(host, device)
        self.meta = meta
        self.slots = host.numel()

    @property
    def n_blocks(self) -> int:
        return self.meta.n_blocks


_tables: OrderedDict[tuple, Table] = OrderedDict()
_metas: OrderedDict[tuple, Meta] = OrderedDict()
_held: dict = {}  # id -> object used while capturing a CUDA graph: never freed


def table(
    lists: Sequence[Sequence[torch.Tensor]],
    extra_ptrs: Sequence[Sequence[torch.Tensor]] = (),
    distinct_copies: bool = False,
) -> Optional[Table]:
    """The (cached) table for ``lists`` (element-wise lists of equal length) and ``extra_ptrs``
    (lists of one-element tensors whose addresses only are needed, e.g. Adam's step counters).

    Columns: one per list, then one per extra list, then the numels.  None when the layouts
    do not allow flat indexing (see the module docstring).

    The lists are validated (``check_bucket``: one device, one dtype, equal lengths, dense)
    when their table is built.  A hit means the same addresses, sizes and dtypes on the same
    device as a validated call, so the per-tensor checks, which cost more host time than the
    rest of the call, are not repeated.  ``distinct_copies``: ``lists[2]`` holds restore
    copies, none of which may be its parameter (the restore contract), checked on a miss too.
    """
    first = lists[0]
    head = first[0]
    device = head.device
    # The layout is part of the key: the same storage seen contiguous in one step and
    # channels_last in the next (a grad re-viewed by the user) must not reuse the table.
    key: tuple = (
        device,
        tuple(ls[0].dtype if ls else None for ls in lists),
        *[tuple(map(_data_ptr, ls)) for ls in lists],
        *[(ls[0].dtype, tuple(map(_data_ptr, ls))) for ls in extra_ptrs],
        tuple(t.is_contiguous() for ls in lists for t in ls),
        tuple(map(_numel, first)),
        distinct_copies,
    )
    tab = _tables.get(key)
    if tab is None:
        check_bucket(*lists)
        if distinct_copies:
            check_copies(lists[0], lists[2])
        if not _flat_indexable(lists) or not all(_scalars_on(ls, device) for ls in extra_ptrs):
            return None
        numels = key[-2]
        vector_cols = [list(c) for c in key[2 : 2 + len(lists)]]
        aligned = tuple(all(c[j] % VECTOR_BYTES == 0 for c in vector_cols) for j in range(len(first)))
        if all(aligned):
            aligned = None  # type: ignore[assignment]  # None: every tensor aligned (Meta's shortcut)
        meta = _cached(_metas, (device, numels, aligned), lambda: Meta(numels, device, aligned))
        cols = vector_cols + [list(c) for _, c in key[2 + len(lists) : -3]]
        tab = Table(cols + [list(numels)], meta, device)
        _remember(_tables, key, tab)
    else:
        _tables.move_to_end(key)
    if device.type in UPLOAD_DEVICE_TYPES:
        _note_use(tab)
    return tab


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def _scalars_on(ts: Sequence[torch.Tensor], device: torch.device) -> bool:
    """One-element tensors of one dtype on ``device`` (what an extra pointer column may hold)."""
    return len(ts) == 0 or all(t.numel() == 1 and t.device == device and t.dtype == ts[0].dtype for t in ts)


def _cached(cache: OrderedDict, key, build):
    val = cache.get(key)
    if val is None:
        val = build()
        _remember(cache, key, val)
    else:
        cache.move_to_end(key)
    return val


_cached_slots = [0]  # int64 slots of every table and block map in the caches (the arena's floor)


def _remember(cache: OrderedDict, key, val) -> None:
    cache[key] = val
    _cached_slots[0] += val.slots
    if len(cache) > CACHE_SIZE:
        _cached_slots[0] -= cache.popitem(last=False)[1].slots


def _note_use(tab: Table) -> None:
    if is_capturing():
        _held[id(tab)] = tab  # the graph will read this table (and its meta) at every replay
    else:
        # Room for a capture to rebuild every cached table and block map (see the module docstring).
        arena.reserve(_cached_slots[0])


def _flat_indexable(lists: Sequence[Sequence[torch.Tensor]]) -> bool:
    for j, ref in enumerate(lists[0]):
        if any(ls[j].numel() != ref.numel() for ls in lists):
            return False
        if all(ls[j].is_contiguous() for ls in lists):
            continue
        layout = _dense_layout(ref)
        if layout is None or any(_dense_layout(ls[j]) != layout for ls in lists):
            return False
    return True


def _dense_layout(t: torch.Tensor):
    """(size, stride) of the dims of size > 1 if ``t`` is dense and non-overlapping, else None."""
    dims = tuple((sz, st) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    expected = 1
    for st, sz in sorted((st, sz) for sz, st in dims):
        if st != expected:
            return None
        expected *= sz
    return dims


def pinned_slots(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int64, device=CPU, pin_memory=True)


class CaptureArena:
    """Host memory reserved outside capture, for tables first needed during capture.

    ``alloc(n)``: n int64 slots of host memory (pinned on a GPU machine; plain memory in
    the CPU simulation of the tests).  A reservation that does not fit in what is left
    allocates twice what it asks for, so a growing model costs a few allocations, not
    one per new table.
    """

    MIN_SLOTS = 1 << 17  # 1 MiB

    def __init__(self, alloc: Callable[[int], torch.Tensor] = pinned_slots):
        self._alloc = alloc
        self._bufs: List[torch.Tensor] = []  # handed-out slices are read by graph replays: never freed
        self._free: Optional[torch.Tensor] = None

    @property
    def free(self) -> int:
        return 0 if self._free is None else self._free.numel()

    def reserve(self, n: int) -> None:
        if self.free < n:
            buf = self._alloc(max(2 * n, self.MIN_SLOTS))
            self._bufs.append(buf)
            self._free = buf

    def take(self, n: int) -> torch.Tensor:
        if self.free < n:
            raise RuntimeError(
                f"fastsam's triton backend needs a new pointer table ({n} slots) while capturing a CUDA graph "
                f"but only {self.free} slots of pinned memory are reserved: run one eager optimizer step before "
                "capturing (as torch's capturable optimizers require); the reservation covers a step of up to "
                f"{CACHE_SIZE} tables (fastsam/kernels/triton/multi_tensor.py: CACHE_SIZE)"
            )
        out, self._free = self._free[:n], self._free[n:]  # type: ignore[index]  # free >= n >= 1: a buffer is there
        return out


arena = CaptureArena()


def is_capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def pin(host: torch.Tensor) -> torch.Tensor:
    return host.pin_memory()


def _upload(host: torch.Tensor, device: torch.device):
    """``host`` on ``device`` without a host synchronisation; returns (tensor, host buffer to keep)."""
    if device.type not in UPLOAD_DEVICE_TYPES:
        return host, None
    if is_capturing():
        slots = arena.take(-(-host.numel() * host.element_size() // 8))
        staging = slots.view(host.dtype)[: host.numel()].view(host.shape)
        staging.copy_(host)
    else:
        staging = pin(host)
    dev = torch.empty(host.shape, dtype=host.dtype, device=device)
    dev.copy_(staging, non_blocking=True)
    return dev, staging
