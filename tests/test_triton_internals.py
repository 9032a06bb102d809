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
    foreach.restore_sgd_step(ref_p, grads, _clone(copies), ref_b, first=False, grad_scale=None,
                             skip=_scalar(0.0), **SGD)
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
    assert tab is not None and not tab.aligned
    expect = sum((g.double() ** 2).sum() for g in grads).item()
    assert abs(tb.grad_sq_norm(grads).item() - expect) <= 1e-5 * expect
    before = flat.clone()
    tb.perturb(params, grads, [torch.empty_like(p) for p in params], _scalars(1.0), 2.0, False)
    assert flat[0] == before[0]
    torch.testing.assert_close(flat[1:], before[1:] + 2 * gflat[1:])


def test_table_cache_hits_and_misses():
    a, b = [torch.randn(5, device=DEVICE)], [torch.randn(5, device=DEVICE)]
    t1 = mt.table([a, b])
    assert mt.table([a, b]) is t1, "same addresses and sizes: the cached table"
    assert mt.table([a, [torch.randn(5, device=DEVICE)]]) is not t1, "a new gradient address: a new table"
    assert mt.table([a, b]).meta is t1.meta


def test_block_map_of_huge_tensor_uses_int64_chunks():
    """A 2**31 + 5 element tensor: 524289 programs, the last chunk starts past 2**31 (host side only)."""
    n = 2 ** 31 + 5
    meta = mt.Meta([3, n, 0], torch.device("cpu"))
    chunks = -(-n // mt.BLOCK)
    assert meta.n_blocks == 1 + chunks + 1
    assert meta.blk_tensor[:meta.n_blocks].tolist()[-3:] == [1, 1, 2]
    last = int(meta.blk_chunk[meta.n_blocks - 2])
    assert last == chunks - 1 and last * mt.BLOCK < n <= (last + 1) * mt.BLOCK and last * mt.BLOCK > 2 ** 31 - 1


def test_restore_contract_is_checked_when_the_table_is_built():
    p = [torch.randn(3, device=DEVICE), torch.randn(4, device=DEVICE)]
    with pytest.raises(ValueError, match="parameter itself"):
        tb.restore_sgd_step(p, _clone(p), [torch.randn(3, device=DEVICE), p[1]], [], first=False, grad_scale=None,
                            skip=_scalar(0.0), **dict(SGD, momentum=0.0))


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
    args = ([t.clone() for t in _randn(shapes)], _randn(shapes), _randn(shapes), _randn(shapes), None,
            _scalar(0.0), 0.1, 0.9, 0.0, False, 1e-4, False, False)
    torch.library.opcheck(torch.ops.fastsam.triton_restore_sgd_step.default, args,
                          test_utils=("test_schema", "test_faketensor"))


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
        compiled[0], compiled[1], compiled[3], compiled[2], _scalars(0.0))
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
