"""The triton backend's ops against a float64 reference and against the foreach backend.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (the
conftest sets TRITON_INTERPRET=1); with CUDA the same tests run on the GPU.
Fresh random data each test (the ``seed`` fixture), sizes 1, 7, 1023, 65537,
zero and a few random ones in mixed shapes, all three dtypes.  Interpreter
time dominates: sizes stay small and each test makes one or two calls.
"""
import math

import pytest
import torch

from fastsam.backends import foreach
from fastsam.backends import triton as tb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tb.is_available(DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)

if _OK:
    from fastsam.kernels.triton import multi_tensor as mt

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against float64: float32 arithmetic then one rounding to the dtype (double rounding may cost one more ulp).
RTOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Against foreach, which also rounds its intermediate results to the dtype.
RTOL_FOREACH = {torch.float32: 4e-6, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}


def _shapes():
    """Mixed shapes: sizes 1, 7, 0, 1023 (as 3x11x31), 65537, and three random sizes."""
    r = torch.randint(2, 5000, (3,)).tolist()
    return [(1,), (7,), (0,), (3, 11, 31), (65537,), (r[0],), (r[1] // 50 + 1, 50), (2, r[2] // 2 + 1)]


def _randn(shapes, dtype, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE) for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def _round(x, dtype):
    return x.to(dtype).double()


def _close(outs, refs, rtol, what, per_tensor=True):
    """Each out within rtol of its reference, relative to the reference's largest entry (or, with
    ``per_tensor=False``, the largest entry of all the references: for comparisons with foreach,
    whose 16-bit rounding of intermediates shows as absolute error in tensors that cancel out)."""
    top = max((r.double().abs().max().item() for r in refs if r.numel()), default=0.0)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape
        if r.numel() == 0:
            continue
        scale = max(r.double().abs().max().item() if per_tensor else top, 1e-30)
        err = (o.double() - r.double()).abs().max().item()
        assert err <= rtol * scale, f"{what} tensor {i} {tuple(r.shape)}: max err {err:.3g} > {rtol:g} x {scale:.3g}"


def _bitwise_equal(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.numel() == 0 or torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _scalar(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------ norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_grad_sq_norm(dtype, weighted, seed):
    shapes = _shapes()
    grads, params = _randn(shapes, dtype), _randn(shapes, dtype)
    got = tb.grad_sq_norm(grads, params if weighted else None)
    assert got.shape == () and got.dtype == torch.float32 and got.device.type == DEVICE.type
    ref = sum((((p.double().abs() if weighted else 1) * g.double()) ** 2).sum() for g, p in zip(grads, params))
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item(), f"seed {seed}"
    other = foreach.grad_sq_norm(grads, params if weighted else None)  # rounds |w|*g to the dtype
    tol = RTOL[dtype] if weighted and dtype != torch.float32 else 1e-5
    assert abs(got.item() - other.item()) <= tol * ref.item(), f"seed {seed}"


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("weighted", [False, True])
def test_grad_sq_norm_nonfinite(bad, weighted, seed):
    shapes = _shapes()
    grads, params = _randn(shapes, torch.float16), _randn(shapes, torch.float16)
    grads[4][12345] = bad  # inside a full chunk of the 65537-element tensor
    assert not torch.isfinite(tb.grad_sq_norm(grads, params if weighted else None))
    grads[4][12345] = 0
    grads[1][6] = bad  # in a tail chunk
    assert not torch.isfinite(tb.grad_sq_norm(grads, params if weighted else None))


def test_grad_sq_norm_of_zero_size_tensors_is_zero():
    grads = [torch.empty(0, device=DEVICE), torch.empty(3, 0, device=DEVICE)]
    assert tb.grad_sq_norm(grads).item() == 0.0


# ------------------------------------------------------------------ perturb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb(dtype, adaptive, seed):
    shapes = _shapes()
    params, grads = _randn(shapes, dtype), _randn(shapes, dtype)
    original = _clone(params)
    copies = [torch.full_like(p, 7) for p in params]
    scale = _scalar(0.37)
    tb.perturb(params, grads, copies, scale, _scalar(0.0), adaptive)
    for c, p in zip(copies, original):
        assert _bitwise_equal(c, p), "the copy must be exact"
    s = scale.double()
    refs = [p.double() + s * (p.double() ** 2 if adaptive else 1) * g.double() for p, g in zip(original, grads)]
    _close(params, refs, RTOL[dtype], f"seed {seed} perturb vs float64")
    others, other_copies = _clone(original), [torch.empty_like(p) for p in params]
    foreach.perturb(others, grads, other_copies, scale, _scalar(0.0), adaptive)
    _close(params, others, RTOL_FOREACH[dtype], f"seed {seed} perturb vs foreach", per_tensor=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_skip_leaves_params_bitwise(dtype, seed):
    shapes = _shapes()
    params, grads = _randn(shapes, dtype), _randn(shapes, dtype)
    grads[3][1, 2, 3] = float("nan")
    original = _clone(params)
    copies = [torch.empty_like(p) for p in params]
    tb.perturb(params, grads, copies, _scalar(float("nan")), _scalar(1.0), True)
    for p, c, o in zip(params, copies, original):
        assert _bitwise_equal(p, o) and _bitwise_equal(c, o)


def test_perturb_reads_float64_scalars(seed):
    """A bucket next to a float64 bucket gets float64 scale/skip tensors from FusedSAM."""
    shapes = _shapes()
    params, grads = _randn(shapes, torch.float32), _randn(shapes, torch.float32)
    original = _clone(params)
    tb.perturb(params, grads, [torch.empty_like(p) for p in params], _scalar(0.5, torch.float64),
               _scalar(0.0, torch.float64), False)
    _close(params, [p.double() + 0.5 * g.double() for p, g in zip(original, grads)], RTOL[torch.float32],
           f"seed {seed}")


def test_restore_is_exact(seed):
    shapes = _shapes()
    for dtype in DTYPES:
        params, copies = _randn(shapes, dtype), _randn(shapes, dtype)
        tb.restore(params, copies)
        assert all(_bitwise_equal(p, c) for p, c in zip(params, copies))


# ------------------------------------------------------------------ restore + SGD
def _ref_sgd(p, g, buf, *, lr, momentum, dampening, nesterov, weight_decay, maximize, first, grad_scale, dtype):
    d = g.double() * grad_scale
    if maximize:
        d = -d
    p = p.double()
    d = d + weight_decay * p
    if momentum:
        buf = d if first else momentum * buf.double() + (1 - dampening) * d
        buf = _round(buf, dtype)  # used as stored, as torch does
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


SGD_CASES = {  # (options, first, clip)
    "plain_clip": (dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
                   False, True),
    "momentum_first": (dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                            maximize=False), True, False),
    "momentum_wd_dampening_clip": (dict(lr=0.05, momentum=0.8, dampening=0.3, nesterov=False, weight_decay=1e-2,
                                        maximize=False), False, True),
    "nesterov_maximize": (dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-3,
                               maximize=True), False, False),
    "nesterov_first_clip": (dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-3,
                                 maximize=False), True, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_restore_sgd_step(dtype, case, seed):
    kw, first, clip = SGD_CASES[case]
    shapes = _shapes()
    params, grads, copies = _randn(shapes, dtype), _randn(shapes, dtype), _randn(shapes, dtype)
    bufs = [torch.zeros_like(p) for p in params] if first else _randn(shapes, dtype)
    bufs = bufs if kw["momentum"] else []
    grad_scale = _scalar(0.3) if clip else None
    inputs = (_clone(copies), _clone(bufs))
    tb.restore_sgd_step(params, grads, copies, bufs, first=first, grad_scale=grad_scale, skip=_scalar(0.0), **kw)
    refs = [_ref_sgd(c, g, b, first=first, grad_scale=0.3 if clip else 1.0, dtype=dtype, **kw)
            for c, g, b in zip(inputs[0], grads, inputs[1] or [None] * len(grads))]
    _close(params, [r[0] for r in refs], RTOL[dtype], f"seed {seed} params vs float64")
    if kw["momentum"]:
        _close(bufs, [r[1] for r in refs], RTOL[dtype], f"seed {seed} momentum vs float64")
    p2, b2 = [torch.empty_like(p) for p in params], _clone(inputs[1])
    foreach.restore_sgd_step(p2, grads, inputs[0], b2, first=first, grad_scale=grad_scale, skip=_scalar(0.0), **kw)
    _close(params, p2, RTOL_FOREACH[dtype], f"seed {seed} params vs foreach", per_tensor=False)
    _close(bufs, b2, RTOL_FOREACH[dtype], f"seed {seed} momentum vs foreach", per_tensor=False)


def test_restore_sgd_step_without_copies_steps_in_place(seed):
    """``copies is params`` (nothing perturbed): the step reads the params themselves."""
    shapes = _shapes()
    params, grads, bufs = _randn(shapes, torch.float32), _randn(shapes, torch.float32), _randn(shapes, torch.float32)
    kw = SGD_CASES["momentum_wd_dampening_clip"][0]
    refs = [_ref_sgd(p, g, b, first=False, grad_scale=1.0, dtype=torch.float32, **kw)
            for p, g, b in zip(params, grads, bufs)]
    tb.restore_sgd_step(params, grads, params, bufs, first=False, grad_scale=None, skip=_scalar(0.0), **kw)
    _close(params, [r[0] for r in refs], RTOL[torch.float32], f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [False, True])
def test_restore_sgd_step_skip_is_restore_only(dtype, first, seed):
    shapes = _shapes()
    params, grads, copies, bufs = (_randn(shapes, dtype) for _ in range(4))
    grads[4][0] = float("inf")
    copies_before, bufs_before = _clone(copies), _clone(bufs)
    tb.restore_sgd_step(params, grads, copies, bufs, first=first, grad_scale=_scalar(float("nan")),
                        skip=_scalar(1.0), **SGD_CASES["nesterov_maximize"][0])
    for p, c, b, b0 in zip(params, copies_before, bufs, bufs_before):
        assert _bitwise_equal(p, c) and _bitwise_equal(b, b0)


# ------------------------------------------------------------------ restore + Adam
def _ref_adam(p, g, m, v, step, *, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale, dtype):
    g = g.double() * grad_scale
    if maximize:
        g = -g
    p = p.double()
    if weight_decay:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    t = step + 1
    m = _round(m.double() + (1 - beta1) * (g - m.double()), dtype)  # used as stored, as torch does
    v = _round(beta2 * v.double() + (1 - beta2) * g * g, dtype)
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    return p - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps), m, v


ADAM_CASES = {  # (options, clip)
    "adam": (dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, decoupled=False, maximize=False), False),
    "adam_wd_maximize_clip": (dict(lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=1e-2, decoupled=False,
                                   maximize=True), True),
    "adamw_clip": (dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=5e-2, decoupled=True, maximize=False), True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_restore_adam_step(dtype, case, seed):
    kw, clip = ADAM_CASES[case]
    kw = dict(kw, eps=1e-8 if dtype == torch.float32 else 1e-3)
    shapes = _shapes()
    params, grads, copies, exp_avgs = (_randn(shapes, dtype) for _ in range(4))
    exp_avg_sqs = [v.abs() for v in _randn(shapes, dtype)]
    start = [float(torch.randint(0, 1000, ()).item()) for _ in shapes]
    start[0] = 0.0  # the first step: the largest bias corrections
    steps = [_scalar(s) for s in start]
    grad_scale = _scalar(0.3) if clip else None
    inputs = (_clone(copies), _clone(exp_avgs), _clone(exp_avg_sqs))
    tb.restore_adam_step(params, grads, copies, exp_avgs, exp_avg_sqs, steps, grad_scale=grad_scale,
                         skip=_scalar(0.0), **kw)
    assert [s.item() for s in steps] == [s + 1 for s in start], "each step counter counts once"
    refs = [_ref_adam(c, g, m, v, s, grad_scale=0.3 if clip else 1.0, dtype=dtype, **kw)
            for c, g, m, v, s in zip(inputs[0], grads, inputs[1], inputs[2], start)]
    _close(params, [r[0] for r in refs], RTOL[dtype], f"seed {seed} params vs float64")
    _close(exp_avgs, [r[1] for r in refs], RTOL[dtype], f"seed {seed} exp_avg vs float64")
    _close(exp_avg_sqs, [r[2] for r in refs], RTOL[dtype], f"seed {seed} exp_avg_sq vs float64")
    p2, m2, v2, s2 = [torch.empty_like(p) for p in params], _clone(inputs[1]), _clone(inputs[2]), \
        [_scalar(s) for s in start]
    foreach.restore_adam_step(p2, grads, inputs[0], m2, v2, s2, grad_scale=grad_scale, skip=_scalar(0.0), **kw)
    _close(params, p2, RTOL_FOREACH[dtype], f"seed {seed} params vs foreach", per_tensor=False)
    _close(exp_avgs, m2, RTOL_FOREACH[dtype], f"seed {seed} exp_avg vs foreach", per_tensor=False)


def test_restore_adam_step_counts_every_call(seed):
    """Two calls, 17-program tensors: every program reads the old count, the count moves once per call."""
    shapes = [(65537,), (0,), (5,)]
    params, grads = _randn(shapes, torch.float32), _randn(shapes, torch.float32)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [_scalar(0.0) for _ in shapes]
    ref = [p.double() for p in params]
    m_ref, v_ref = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    kw = ADAM_CASES["adamw_clip"][0]
    for call in range(2):
        tb.restore_adam_step(params, grads, params, *state, steps, eps=1e-8, grad_scale=None,
                             skip=_scalar(0.0), **kw)
        for i in range(len(ref)):
            ref[i], m_ref[i], v_ref[i] = _ref_adam(ref[i], grads[i], m_ref[i], v_ref[i], call, eps=1e-8,
                                                   grad_scale=1.0, dtype=torch.float32, **kw)
        assert [s.item() for s in steps] == [call + 1.0] * len(shapes)
        _close(params, ref, 1e-5, f"seed {seed} call {call}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_adam_step_skip_is_restore_only(dtype, seed):
    shapes = _shapes()
    params, grads, copies, exp_avgs, exp_avg_sqs = (_randn(shapes, dtype) for _ in range(5))
    exp_avg_sqs = [v.abs() for v in exp_avg_sqs]
    grads[0][0] = float("nan")
    steps = [_scalar(3.0) for _ in shapes]
    before = [_clone(ts) for ts in (copies, exp_avgs, exp_avg_sqs)]
    tb.restore_adam_step(params, grads, copies, exp_avgs, exp_avg_sqs, steps, grad_scale=None, skip=_scalar(1.0),
                         eps=1e-8, **ADAM_CASES["adam"][0])
    for now, then in zip((params, exp_avgs, exp_avg_sqs), before):
        assert all(_bitwise_equal(a, b) for a, b in zip(now, then))
    assert all(s.item() == 3.0 for s in steps)


def test_restore_adam_step_float64_step_counters(seed):
    shapes = [(7,), (4100,)]
    params, grads = _randn(shapes, torch.float32), _randn(shapes, torch.float32)
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [_scalar(5.0, torch.float64) for _ in shapes]
    ref = [_ref_adam(p, g, m, v, 5.0, eps=1e-8, grad_scale=1.0, dtype=torch.float32, **ADAM_CASES["adam"][0])
           for p, g, m, v in zip(params, grads, ms, vs)]
    tb.restore_adam_step(params, grads, params, ms, vs, steps, grad_scale=None, skip=_scalar(0.0), eps=1e-8,
                         **ADAM_CASES["adam"][0])
    assert [s.item() for s in steps] == [6.0, 6.0] and steps[0].dtype == torch.float64
    _close(params, [r[0] for r in ref], RTOL[torch.float32], f"seed {seed}")


# ------------------------------------------------------------------ many tensors, layouts
def test_many_tensors_one_launch_each(seed, monkeypatch):
    """300 tensors of mixed shapes (zero-size among them) in one launch per op: the table has no cap."""
    launches = []
    real = mt.launch
    monkeypatch.setattr(mt, "launch", lambda k, n, *a, **kw: (launches.append(n), real(k, n, *a, **kw)))
    shapes = [tuple(torch.randint(0, 4, (int(torch.randint(1, 4, ())),)).tolist()) for _ in range(300)]
    params, grads, copies, bufs = (_randn(shapes, torch.float32) for _ in range(4))
    inputs = (_clone(copies), _clone(bufs))
    kw = SGD_CASES["momentum_wd_dampening_clip"][0]
    tb.restore_sgd_step(params, grads, copies, bufs, first=False, grad_scale=None, skip=_scalar(0.0), **kw)
    assert len(launches) == 1 and launches[0] == 300  # one program per tensor (all smaller than a block)
    refs = [_ref_sgd(c, g, b, first=False, grad_scale=1.0, dtype=torch.float32, **kw)
            for c, g, b in zip(*inputs[:1], grads, inputs[1])]
    _close(params, [r[0] for r in refs], RTOL[torch.float32], f"seed {seed}")
    ref_norm = sum((g.double() ** 2).sum() for g in grads).item()
    assert abs(tb.grad_sq_norm(grads).item() - ref_norm) <= 1e-5 * ref_norm
    assert len(launches) == 3


def test_channels_last_and_strided_layouts(seed):
    """Dense tensors with matching strides use the kernels; anything else falls back to foreach."""
    p = torch.randn(2, 3, 5, 4, device=DEVICE).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 4, device=DEVICE).to(memory_format=torch.channels_last)
    t = torch.randn(6, 5, device=DEVICE).t()  # transposed: dense, strides differ from its grad's
    tg = torch.randn(5, 6, device=DEVICE)
    params, grads = [p, t], [g, tg]
    original = _clone(params)
    copies = [torch.empty_like(x) for x in params]
    assert mt.table([params, grads, copies]) is None
    assert mt.table([[p], [g]]) is not None
    tb.perturb(params, grads, copies, _scalar(0.5), _scalar(0.0), False)
    _close(params, [o.double() + 0.5 * gg.double() for o, gg in zip(original, grads)], RTOL[torch.float32],
           f"seed {seed}")
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
    tb.perturb(params, grads, [torch.empty_like(p) for p in params], _scalar(2.0), _scalar(0.0), False)
    assert flat[0] == before[0]
    _close([flat[1:]], [before[1:].double() + 2 * gflat[1:].double()], RTOL[torch.float32], f"seed {seed}")


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


# ------------------------------------------------------------------ torch.library custom ops
def test_custom_ops_match_launchers(seed):
    shapes = _shapes()
    params, grads = _randn(shapes, torch.bfloat16), _randn(shapes, torch.bfloat16)
    sq = torch.ops.fastsam.triton_sq_norm(grads, params)
    assert sq.item() == tb.grad_sq_norm(grads, params).item()
    p1, p2 = _clone(params), _clone(params)
    c1, c2 = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    torch.ops.fastsam.triton_perturb(p1, grads, c1, _scalar(0.1), _scalar(0.0), True)
    tb.perturb(p2, grads, c2, _scalar(0.1), _scalar(0.0), True)
    assert all(_bitwise_equal(a, b) for a, b in zip(p1 + c1, p2 + c2))
    torch.ops.fastsam.triton_restore(p1, c1)
    assert all(_bitwise_equal(a, b) for a, b in zip(p1, params))


def test_custom_op_schemas():
    from fastsam.kernels.triton import restore_sgd_step
    shapes = [(7,), (3, 5)]
    args = ([t.clone() for t in _randn(shapes, torch.float32)], _randn(shapes, torch.float32),
            _randn(shapes, torch.float32), _randn(shapes, torch.float32), None, _scalar(0.0),
            0.1, 0.9, 0.0, False, 1e-4, False, False)
    torch.library.opcheck(restore_sgd_step.restore_sgd_step_op, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_goes_through_the_custom_ops(seed):
    """Under torch.compile the backend calls the custom ops (opaque to the compiler): same results."""
    shapes = [(7,), (3, 5)]
    kw = SGD_CASES["momentum_wd_dampening_clip"][0]

    def sam_update(params, grads, copies, bufs, scale, skip):
        tb.perturb(params, grads, copies, scale, skip, False)
        tb.restore_sgd_step(params, grads, copies, bufs, first=False, grad_scale=None, skip=skip, **kw)
        return tb.grad_sq_norm(grads)

    data = [_randn(shapes, torch.float32) for _ in range(3)]
    eager = [_clone(ts) for ts in data] + [[torch.empty_like(p) for p in data[0]]]
    compiled = [_clone(ts) for ts in data] + [[torch.empty_like(p) for p in data[0]]]
    e = sam_update(eager[0], eager[1], eager[3], eager[2], _scalar(0.2), _scalar(0.0))
    torch._dynamo.reset()
    c = torch.compile(sam_update, backend="aot_eager", fullgraph=True)(
        compiled[0], compiled[1], compiled[3], compiled[2], _scalar(0.2), _scalar(0.0))
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
    _close(list(model.parameters()), list(ref_model.parameters()), 1e-6, f"seed {seed}")


def test_bad_buckets_are_rejected_when_the_table_is_built():
    a = [torch.randn(3, device=DEVICE), torch.randn(4, device=DEVICE, dtype=torch.float16)]
    with pytest.raises(ValueError, match="dtypes"):
        tb.grad_sq_norm(a)
    with pytest.raises(ValueError, match="equal lengths"):
        tb.restore([torch.randn(3, device=DEVICE)], [])
