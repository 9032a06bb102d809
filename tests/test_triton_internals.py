"""The triton backend's own machinery (the op results are tests/test_backend_ops.py's).

Pointer tables and their cache, flat indexing and the fallback to foreach,
one launch per op whatever the number of tensors, the block map of huge
tensors, the ``torch.library`` custom ops and torch.compile.  Without CUDA the
kernels run in the Triton interpreter on CPU tensors (the conftest sets
TRITON_INTERPRET=1); with CUDA the same tests run on the GPU.
"""

import pytest
import torch

from fastsam.backends import triton as tb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tb.is_available(DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)

if _OK:
    from fastsam.kernels.triton import multi_tensor as mt

SGD = dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-4, maximize=False)


def _randn(shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=torch.float64).to(dtype=dtype, device=DEVICE) for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def _bitwise_equal(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.numel() == 0 or torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _scalars(factor, skip=0.0):
    return torch.tensor([skip, factor], device=DEVICE)


def _scalar(v):
    return torch.tensor(v, device=DEVICE)


def test_many_tensors_one_launch_each(seed, monkeypatch):
    """300 tensors of mixed shapes (zero-size among them) in one launch per op: the table has no cap."""
    from fastsam.backends import foreach

    launches = []
    real = mt.launch
    monkeypatch.setattr(mt, "launch", lambda k, n, *a, **kw: (launches.append(n), real(k, n, *a, **kw)))
    shapes = [tuple(torch.randint(0, 4, (int(torch.randint(1, 4, ())),)).tolist()) for _ in range(300)]
    params, grads, copies, bufs = (_randn(shapes) for _ in range(4))
    ref_p, ref_b = _clone(params), _clone(bufs)
    foreach.restore_sgd_step(
        ref_p, grads, _clone(copies), ref_b, first=False, grad_scale=None, skip=_scalar(0.0), **SGD
    )
    tb.restore_sgd_step(params, grads, copies, bufs, first=False, grad_scale=None, skip=_scalar(0.0), **SGD)
    assert len(launches) == 1 and launches[0] == 300  # one program per tensor (all smaller than a block)
    for a, b in zip(params + bufs, ref_p + ref_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref_norm = sum((g.double() ** 2).sum() for g in grads).item()
    assert abs(tb.grad_sq_norm(grads).item() - ref_norm) <= 1e-5 * ref_norm
    assert len(launches) == 3


def test_channels_last_and_strided_layouts_fall_back(seed):
    """Dense tensors with matching strides use the kernels; anything else: the backend runs foreach."""
    p = torch.randn(2, 3, 5, 4, device=DEVICE).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 4, device=DEVICE).to(memory_format=torch.channels_last)
    t = torch.randn(6, 5, device=DEVICE).t()  # transposed: dense, strides differ from its grad's
    tg = torch.randn(5, 6, device=DEVICE)
    params, grads = [p, t], [g, tg]
    original = _clone(params)
    copies = [torch.empty_like(x) for x in params]
    assert mt.table([params, grads, copies]) is None
    assert mt.table([[p], [g]]) is not None
    tb.perturb(params, grads, copies, _scalars(1.0), 0.5, False)
    for x, o, gg in zip(params, original, grads):
        torch.testing.assert_close(x, o + 0.5 * gg)
    assert all(_bitwise_equal(c, o) for c, o in zip(copies, original))


def test_unaligned_views(seed):
    """Views at odd offsets into one flat buffer: no vector-alignment assumption, still correct."""
    flat, gflat = torch.randn(1 + 4097 + 9, device=DEVICE), torch.randn(1 + 4097 + 9, device=DEVICE)
    params, grads = [flat[1:4098], flat[4098:]], [gflat[1:4098], gflat[4098:]]
    tab = mt.table([params, grads])
    assert tab is not None and [p.aligned for p in tab.meta.parts] == [False]
    expect = sum((g.double() ** 2).sum() for g in grads).item()
    assert abs(tb.grad_sq_norm(grads).item() - expect) <= 1e-5 * expect
    before = flat.clone()
    tb.perturb(params, grads, [torch.empty_like(p) for p in params], _scalars(1.0), 2.0, False)
    assert flat[0] == before[0]
    torch.testing.assert_close(flat[1:], before[1:] + 2 * gflat[1:])


def _views(flat, sizes, offset):
    """Consecutive views of ``flat`` from element ``offset`` on, one per size."""
    out, at = [], offset
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out


def test_a_mixed_bucket_keeps_vector_accesses_for_its_aligned_tensors(seed, monkeypatch):
    """One unaligned view (a DDP gradient bucket's, say) among aligned tensors: the aligned tensors run
    in a launch with ALIGNED=True, the view in its own launch without; every op gives foreach's
    results (the reductions' partials of the two parts land in one ordered sum; Adam's step
    counters are per tensor, whichever part a tensor is in)."""
    from fastsam.backends import foreach

    sizes = [5000, 3, 2 * mt.BLOCK + 17, 700]  # tensor 2 (three programs) is the unaligned one

    def bucket():
        lists = [[torch.randn(n, device=DEVICE) for n in sizes] for _ in range(5)]
        for ls in lists:  # the same values, tensor 2 as a view at an odd offset into a flat buffer
            flat = torch.empty(1 + sizes[2], device=DEVICE)
            flat[1:].copy_(ls[2])
            ls[2] = flat[1:]
        return lists

    params, grads, copies, m, v = bucket()
    v = [t.abs() for t in v]
    seen = []
    real = mt.launch
    monkeypatch.setattr(
        mt, "launch", lambda k, n, *a, **kw: (seen.append((n, kw.get("ALIGNED"), a[1])), real(k, n, *a, **kw))
    )
    tab = mt.table([params, grads])
    assert [(p.n_blocks, p.aligned) for p in tab.meta.parts] == [(3 + 1 + 1, True), (3, False)]
    assert set(tab.meta.parts[0].blk_tensor[:5].tolist()) == {0, 1, 3}
    assert set(tab.meta.parts[1].blk_tensor[:3].tolist()) == {2}
    got_sq, want_sq = tb.grad_sq_norm(grads, params), foreach.grad_sq_norm(grads, params)
    assert [(n, al) for n, al, _ in seen] == [(5, True), (3, False), (1, None)]
    assert abs(got_sq.item() - want_sq.item()) <= 1e-5 * want_sq.item()
    torch.testing.assert_close(tb.dot_sq_norms(params, grads), foreach.dot_sq_norms(params, grads), rtol=1e-5, atol=0)
    runs = []
    for mod in (tb, foreach):
        p, c, mm, vv = _clone(params), _clone(copies), _clone(m), _clone(v)
        steps = [torch.tensor(3.0, device=DEVICE) for _ in p]
        mod.perturb(p, grads, c, _scalars(0.3), 0.5, True)
        mod.restore_adam_step(
            p,
            grads,
            c,
            mm,
            vv,
            steps,
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            decoupled=True,
            maximize=False,
            grad_scale=None,
            skip=_scalar(0.0),
        )
        mod.axpby(p, grads, torch.tensor([0.5, -2.0, 0.0], device=DEVICE))
        runs.append(p + c + mm + vv + steps)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    seen.clear()
    tb.restore(params, copies)
    assert [(n, al) for n, al, _ in seen] == [(5, True), (3, False)]


def test_axpby_is_launched_without_fp_fusion(monkeypatch):
    """The contract's separately rounded a x + b y: the launcher asks for a kernel compiled without
    FMA contraction (tests/test_triton_compile.py checks the PTX of such a kernel)."""
    seen = []
    real = mt.launch
    monkeypatch.setattr(mt, "launch", lambda k, n, *a, **kw: (seen.append(kw), real(k, n, *a, **kw)))
    xs = [torch.randn(7, device=DEVICE)]
    tb.axpby(xs, _clone(xs), torch.tensor([1.0, 2.0, 0.0], device=DEVICE))
    assert seen and all(kw.get("enable_fp_fusion") is False for kw in seen)


def test_block_map_parts_list_each_tensor_once():
    """Meta with an alignment mask: the aligned tensors' programs first, then the others', each tensor's
    chunks in order, and the counters are per tensor (the original index)."""
    sizes = [5, 3 * mt.BLOCK, 0, mt.BLOCK + 1, 7]
    aligned = (True, False, True, False, True)
    meta = mt.Meta(sizes, torch.device("cpu"), aligned)
    rows = [
        (p.aligned, list(zip(p.blk_tensor[: p.n_blocks].tolist(), p.blk_chunk[: p.n_blocks].tolist())))
        for p in meta.parts
    ]
    assert rows == [(True, [(0, 0), (2, 0), (4, 0)]), (False, [(1, 0), (1, 1), (1, 2), (3, 0), (3, 1)])]
    assert [p.start for p in meta.parts] == [0, 3] and meta.n_blocks == 8 and meta.counters().numel() == 5


def test_table_cache_key_holds_every_lists_dtype():
    """The same addresses seen with another dtype in a later list are a new call to validate, not a hit:
    the kernel would read the memory as the first list's type."""
    a, b = [torch.randn(5, device=DEVICE)], [torch.randn(5, device=DEVICE)]
    assert mt.table([a, b]) is not None
    with pytest.raises(ValueError, match="dtypes"):
        mt.table([a, [b[0].view(torch.int32)]])


BUCKETS = [(4, 3000), (8, 1500), (16, 700)]


@pytest.mark.parametrize("n_buckets,n_tensors", BUCKETS, ids=[f"{b}x{t}" for b, t in BUCKETS])
def test_capture_arena_holds_a_whole_step(n_buckets, n_tensors, monkeypatch):
    """The capture arena simulated on the CPU: tables are 'uploaded' from plain memory standing for
    pinned memory, and a flag stands for the stream's capture state.  An eager SAM step with SGD
    momentum over several buckets of many tensors, then the same step 'captured' with gradients
    at new addresses (the graph pool's): every table holding gradients is rebuilt from the arena
    at once.  The arena must hold them all."""
    capturing = [False]
    monkeypatch.setattr(mt, "UPLOAD_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(mt, "is_capturing", lambda: capturing[0])
    monkeypatch.setattr(mt, "pin", lambda host: host.clone())
    monkeypatch.setattr(mt, "arena", mt.CaptureArena(alloc=lambda n: torch.empty(n, dtype=torch.int64)))
    cpu = torch.device("cpu")
    buckets = [
        [[torch.empty(1 + (j + b) % 3, device=cpu) for j in range(n_tensors)] for _ in range(3)]
        for b in range(n_buckets)
    ]  # params, copies, momentum buffers

    alive = []  # every gradient stays allocated, so that the captured step's are at new addresses

    def step():
        for params, copies, bufs in buckets:
            grads = [torch.empty_like(p) for p in params]  # the first pass's gradients
            grads2 = [torch.empty_like(p) for p in params]  # the second pass's
            alive.append((grads, grads2))
            for lists in ([grads], [params, grads, copies], [grads2]):  # norm, perturb, norm
                mt.table(lists)
            mt.table([params, grads2, copies, bufs], distinct_copies=True)  # restore + SGD

    step()
    taken = []
    monkeypatch.setattr(mt.arena, "take", lambda n, real=mt.arena.take: taken.append(n) or real(n))
    capturing[0] = True
    step()  # raises RuntimeError("... run one eager optimizer step ...") if the arena cannot hold them all
    assert len(taken) == 4 * n_buckets, "every table of the captured step is new (its block maps are not)"


def test_table_cache_hits_and_misses():
    a, b = [torch.randn(5, device=DEVICE)], [torch.randn(5, device=DEVICE)]
    t1 = mt.table([a, b])
    assert mt.table([a, b]) is t1, "same addresses and sizes: the cached table"
    assert mt.table([a, [torch.randn(5, device=DEVICE)]]) is not t1, "a new gradient address: a new table"
    assert mt.table([a, b]).meta is t1.meta


def test_block_map_of_huge_tensor_uses_int64_chunks():
    """A 2**31 + 5 element tensor: 524289 programs, the last chunk starts past 2**31 (host side only)."""
    n = 2**31 + 5
    meta = mt.Meta([3, n, 0], torch.device("cpu"))
    chunks = -(-n // mt.BLOCK)
    assert meta.n_blocks == 1 + chunks + 1
    assert meta.blk_tensor[: meta.n_blocks].tolist()[-3:] == [1, 1, 2]
    last = int(meta.blk_chunk[meta.n_blocks - 2])
    assert last == chunks - 1 and last * mt.BLOCK < n <= (last + 1) * mt.BLOCK and last * mt.BLOCK > 2**31 - 1


def test_restore_contract_is_checked_when_the_table_is_built():
    p = [torch.randn(3, device=DEVICE), torch.randn(4, device=DEVICE)]
    with pytest.raises(ValueError, match="parameter itself"):
        tb.restore_sgd_step(
            p,
            _clone(p),
            [torch.randn(3, device=DEVICE), p[1]],
            [],
            first=False,
            grad_scale=None,
            skip=_scalar(0.0),
            **dict(SGD, momentum=0.0),
        )


def test_bad_buckets_are_rejected_when_the_table_is_built():
    a = [torch.randn(3, device=DEVICE), torch.randn(4, device=DEVICE, dtype=torch.float16)]
    with pytest.raises(ValueError, match="dtypes"):
        tb.grad_sq_norm(a)
    with pytest.raises(ValueError, match="equal lengths"):
        tb.restore([torch.randn(3, device=DEVICE)], [])


# ------------------------------------------------------------------ torch.library custom ops
def test_custom_ops_match_launchers(seed):
    shapes = [(1,), (7,), (0,), (3, 11, 31), (4097,)]
    params, grads = _randn(shapes, torch.bfloat16), _randn(shapes, torch.bfloat16)
    sq = torch.ops.fastsam.triton_sq_norm(grads, params, None, None, 0, 0.0, None, None)
    assert sq.item() == tb.grad_sq_norm(grads, params).item()
    p1, p2 = _clone(params), _clone(params)
    c1, c2 = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    torch.ops.fastsam.triton_perturb(p1, grads, c1, _scalars(0.5), 0.2, True)
    tb.perturb(p2, grads, c2, _scalars(0.5), 0.2, True)
    assert all(_bitwise_equal(a, b) for a, b in zip(p1 + c1, p2 + c2))
    torch.ops.fastsam.triton_restore(p1, c1)
    assert all(_bitwise_equal(a, b) for a, b in zip(p1, params))


def test_custom_op_schemas():
    shapes = [(7,), (3, 5)]
    args = (
        [t.clone() for t in _randn(shapes)],
        _randn(shapes),
        _randn(shapes),
        _randn(shapes),
        None,
        _scalar(0.0),
        0.1,
        0.9,
        0.0,
        False,
        1e-4,
        False,
        False,
    )
    torch.library.opcheck(
        torch.ops.fastsam.triton_restore_sgd_step.default, args, test_utils=("test_schema", "test_faketensor")
    )


def test_torch_compile_goes_through_the_custom_ops(seed):
    """Under torch.compile the backend calls the custom ops (opaque to the compiler): same results."""
    from fastsam.backends._common import Epilogue

    shapes = [(7,), (3, 5)]

    def sam_update(params, grads, copies, bufs, scalars):
        tb.grad_sq_norm(grads, epilogue=Epilogue(scalars, "perturb"))
        tb.perturb(params, grads, copies, scalars, 0.05, False)
        tb.restore_sgd_step(params, grads, copies, bufs, first=False, grad_scale=None, skip=scalars[0], **SGD)
        return tb.grad_sq_norm(grads)

    data = [_randn(shapes) for _ in range(3)]
    eager = [_clone(ts) for ts in data] + [[torch.empty_like(p) for p in data[0]]]
    compiled = [_clone(ts) for ts in data] + [[torch.empty_like(p) for p in data[0]]]
    e = sam_update(eager[0], eager[1], eager[3], eager[2], _scalars(0.0))
    torch._dynamo.reset()
    c = torch.compile(sam_update, backend="aot_eager", fullgraph=True)(
        compiled[0], compiled[1], compiled[3], compiled[2], _scalars(0.0)
    )
    assert e.item() == c.item()
    for a, b in zip(eager[0] + eager[2], compiled[0] + compiled[2]):
        assert _bitwise_equal(a, b)


def test_torch_compile_of_a_fused_sam_training_step(seed):
    import copy

    from fastsam import FusedSAM

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(DEVICE)
    ref_model = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, backend="triton", **kw)
    ref_opt = FusedSAM(ref_model.parameters(), torch.optim.SGD, backend="triton", **kw)
    x, y = torch.randn(16, 8, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)

    def step(model, opt):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    for _ in range(2):
        compiled(model, opt)
        step(ref_model, ref_opt)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
