"""The one launcher behind every Triton op: pointer tables, block maps, caches.

Every op processes all tensors of one (device, dtype) bucket in ONE launch,
whatever their number.  As in apex's ``multi_tensor_apply``, each program
handles one chunk of one tensor; unlike apex, the tensor list lives in device
memory instead of the kernel's parameter space, so there is no per-launch cap
on the number of tensors:

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
vector accesses each in fp32.  Compiled for sm_90 (ptxas, no GPU needed) the
heaviest kernel (Adam, 7 streams) takes 64 registers, so 4 programs (32
warps) fit on an SM, each with 32 KB of loads in flight: ample for HBM
latency, and the chain of dependent loads that starts every program (block
map -> table row -> data) is hidden by the other resident programs.  With
BLOCK = 4096 Adam needed 135 registers (one program per SM).  ResNet-50 (161
tensors, 25.6M elements) gives ~12.6k programs (~95 per SM of an H200); the
partly filled last chunk of each tensor is ~1% of them.  Not timed on a GPU
yet: sweep BLOCK 1024..4096 x 4/8 warps there.

Caches.  A table's content is a function of its key (device, every
``data_ptr()``, every ``numel()``), so a cache hit is correct by construction;
the block map depends on the sizes only.  Gradients freed by
``zero_grad(set_to_none=True)`` usually come back at the same addresses (the
caching allocator hands out the same blocks), so a steady training loop hits
the cache and uploads nothing.  A miss uploads the table with one
non-blocking copy from pinned memory: no host synchronisation.

CUDA graphs.  Tables used while a stream is capturing are kept for the life
of the process (the graph reads them at every replay).  A miss during capture
(gradients allocated inside the capture come from the graph's pool, at new
addresses) copies from a pinned arena reserved by earlier eager calls, since
pinned memory cannot be allocated while capturing: run at least one eager
step before capturing, as torch's capturable optimizers require too.

Layout.  The kernels address element i of tensor j as ``data_ptr + i``: right
for dense non-overlapping tensors whose lists agree on strides (contiguous,
channels_last, ...).  ``table`` returns None otherwise and the op falls back
to the foreach backend for that call.  Checked on a cache miss only: the key
holds addresses and sizes, not strides.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..checks import check_bucket, check_copies

BLOCK = 2048
NUM_WARPS = 8
CACHE_SIZE = 256  # tables (and block maps) kept per process, least recently used first out: a bucket
# uses 4-6 tables a step (two sets of gradient addresses at most), so ~40 buckets stay cached

# Element types of the tables' pointer columns (a constexpr of every kernel).
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


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

    ALIGNED (every address of the table is a multiple of 16 bytes, checked on the host)
    lets the compiler emit 16-byte vector loads and stores.
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
def load_restored_and_sam_grad(row, offs, mask, grad_scale, HAS_GRAD_SCALE: tl.constexpr,
                               MAXIMIZE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The common head of the fused base steps: the restored parameter (column 2, as
    stored and in float32) and the SAM gradient (column 1) in float32, clipped and
    negated as asked."""
    p0 = tl.load(column(row, 2, DTYPE, ALIGNED) + offs, mask=mask)
    g = tl.load(column(row, 1, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g * grad_scale
    if MAXIMIZE:
        g = -g
    return p0, p0.to(tl.float32), g


# Each kernel calls its chunk body in two versions: ``mask=None`` for the full
# chunks (all but the last chunk of each tensor) and a bounds mask for the
# tail.  With a bounds mask on every access the compiler could not vectorise:
# the size is loaded from memory, so nothing is known about its alignment.
# ``kept`` is the store mask of state that a skipped step must leave alone.

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


class Meta:
    """What depends on the sizes only: the block map and Adam's per-tensor program counters."""

    __slots__ = ("n_tensors", "n_blocks", "blk_tensor", "blk_chunk", "_counters", "_keep")

    def __init__(self, numels: Sequence[int], device: torch.device):
        counts = torch.tensor([max(1, -(-n // BLOCK)) for n in numels], dtype=torch.int64)
        n_blocks = int(counts.sum())
        starts = torch.cumsum(counts, 0) - counts
        tensor_of = torch.repeat_interleave(torch.arange(len(numels)), counts)
        padded = -(-n_blocks // 4) * 4  # keeps the second row 16-byte aligned (one kernel specialisation)
        host = torch.zeros(2, padded, dtype=torch.int32)
        host[0, :n_blocks] = tensor_of
        host[1, :n_blocks] = torch.arange(n_blocks) - starts[tensor_of]
        dev, self._keep = _upload(host, device)
        self.n_tensors = len(numels)
        self.n_blocks = n_blocks
        self.blk_tensor, self.blk_chunk = dev[0], dev[1]
        self._counters: Optional[torch.Tensor] = None

    def counters(self) -> torch.Tensor:
        """int32 [T], zero between launches: how many programs of each tensor have finished."""
        if self._counters is None:
            self._counters = torch.zeros(self.n_tensors, dtype=torch.int32, device=self.blk_tensor.device)
        return self._counters


class Table:
    """The pointer table of one call's lists, with the block map of their sizes."""

    __slots__ = ("ptrs", "meta", "aligned", "_keep")

    def __init__(self, cols: List[List[int]], n_vector_cols: int, meta: Meta, device: torch.device):
        host = torch.tensor(cols, dtype=torch.int64).t().contiguous()
        self.ptrs, self._keep = _upload(host, device)
        self.meta = meta
        self.aligned = all(a % 16 == 0 for col in cols[:n_vector_cols] for a in col)

    @property
    def n_blocks(self) -> int:
        return self.meta.n_blocks

    def args(self):
        """The three leading arguments of every multi-tensor kernel."""
        return self.ptrs, self.meta.blk_tensor, self.meta.blk_chunk


_tables: "OrderedDict[tuple, Table]" = OrderedDict()
_metas: "OrderedDict[tuple, Meta]" = OrderedDict()
_held: dict = {}  # id -> object used while capturing a CUDA graph: never freed


def table(lists: Sequence[Sequence[torch.Tensor]], extra_ptrs: Sequence[Sequence[torch.Tensor]] = (),
          distinct_copies: bool = False) -> Optional[Table]:
    """The (cached) table for ``lists`` (element-wise lists of equal length) and ``extra_ptrs``
    (lists of one-element tensors whose addresses only are needed, e.g. Adam's step counters).

    Columns: one per list, then one per extra list, then the numels.  None when the layouts
    do not allow flat indexing (see the module docstring).

    The lists are validated (``check_bucket``: one device, one dtype, equal lengths, dense)
    when their table is built.  A hit means the same addresses and sizes on the same device
    and dtype as a validated call, so the per-tensor checks, which cost more host time than
    the rest of the call, are not repeated.  ``distinct_copies``: ``lists[2]`` holds restore
    copies, none of which may be its parameter (the restore contract), checked on a miss too.
    """
    first = lists[0]
    head = first[0]
    device = head.device
    # The layout is part of the key: the same storage seen contiguous in one step and
    # channels_last in the next (a grad re-viewed by the user) must not reuse the table.
    key = (device, head.dtype, *[tuple(map(_data_ptr, ls)) for ls in lists],
           *[(ls[0].dtype, tuple(map(_data_ptr, ls))) for ls in extra_ptrs],
           tuple(t.is_contiguous() for ls in lists for t in ls), tuple(map(_numel, first)), distinct_copies)
    tab = _tables.get(key)
    if tab is None:
        check_bucket(*lists)
        if distinct_copies:
            check_copies(lists[0], lists[2])
        if not _flat_indexable(lists) or not all(_scalars_on(ls, device) for ls in extra_ptrs):
            return None
        numels = key[-2]
        meta = _cached(_metas, (device, numels), lambda: Meta(numels, device))
        cols = [list(c) for c in key[2:2 + len(lists)]] + [list(c) for _, c in key[2 + len(lists):-3]]
        tab = Table(cols + [list(numels)], len(lists), meta, device)
        _remember(_tables, key, tab)
    else:
        _tables.move_to_end(key)
    if device.type == "cuda":
        _note_use(tab, (len(lists) + len(extra_ptrs) + 1) * len(first))
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


def _remember(cache: OrderedDict, key, val) -> None:
    cache[key] = val
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def _note_use(tab: Table, n_slots: int) -> None:
    if torch.cuda.is_current_stream_capturing():
        _held[id(tab)] = tab  # the graph will read this table (and its meta) at every replay
    else:
        _arena.reserve(8 * n_slots)  # room for the tables a later capture may have to build


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


class _CaptureArena:
    """Pinned host memory reserved outside capture, for tables first needed during capture."""

    MIN_SLOTS = 1 << 17  # 1 MiB

    def __init__(self):
        self._bufs: List[torch.Tensor] = []  # handed-out slices are read by graph replays: never freed
        self._free: Optional[torch.Tensor] = None

    def reserve(self, n: int) -> None:
        if self._free is None or self._free.numel() < n:
            buf = torch.empty(max(n, self.MIN_SLOTS), dtype=torch.int64, pin_memory=True)
            self._bufs.append(buf)
            self._free = buf

    def take(self, n: int) -> torch.Tensor:
        if self._free is None or self._free.numel() < n:
            raise RuntimeError(
                "fastsam's triton backend needs a new pointer table while capturing a CUDA graph but has no "
                "pinned memory reserved for it; run one eager optimizer step before capturing (as torch's "
                "capturable optimizers require)")
        out, self._free = self._free[:n], self._free[n:]
        return out


_arena = _CaptureArena()


def _upload(host: torch.Tensor, device: torch.device):
    """``host`` on ``device`` without a host synchronisation; returns (tensor, host buffer to keep)."""
    if device.type == "cpu":
        return host, None
    if torch.cuda.is_current_stream_capturing():
        slots = _arena.take(-(-host.numel() * host.element_size() // 8))
        staging = slots.view(host.dtype)[:host.numel()].view(host.shape)
        staging.copy_(host)
    else:
        staging = host.pin_memory()
    dev = torch.empty(host.shape, dtype=host.dtype, device=device)
    dev.copy_(staging, non_blocking=True)
    return dev, staging
