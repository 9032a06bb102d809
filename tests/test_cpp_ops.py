"""The compiled CPU twin (backend "cpp", csrc/sam_cpu.cpp), op by op.

Every op against a float64 reference written from the backend contract and
against the foreach backend, on fresh random data: sizes 1, 7, 1023, 65537
(two CPU chunks) and a random one, mixed shapes, zero-size tensors;
fp32/fp16/bf16 (fp32 math inside) and fp64 (double math).  Also: skip leaves
params and state bitwise unchanged, copies are bit-exact, empty lists are
no-ops, malformed calls raise before writing, the ops trace under
torch.compile, and the norm does not depend on the thread count.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastsam.backends import cpp, foreach

from .reference import train_mlp_with_fused_sam

CPU = torch.device("cpu")
AVAILABLE, WHY = cpp.is_available(CPU)
needs_ext = pytest.mark.skipif(not AVAILABLE, reason=f"cpp backend unavailable: {WHY}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (rtol, atol) against the float64 reference: a few units in the last place of
# the storage dtype, since the kernels round once on store.
TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.float64: (1e-12, 1e-14),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
# fp16/bf16 foreach rounds every intermediate to the storage dtype: looser.
FOREACH_TOL = {**TOL, torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}


def test_extension_builds():
    """CI must build the CPU twin: a build failure fails here instead of skipping everything."""
    assert AVAILABLE, WHY


def _shapes():
    rand = int(torch.randint(2, 40000, ()))
    return [(1,), (7,), (1023,), (65537,), (0,), (3, 5, 7), (rand,), (2, 0, 3), (33, 31)]


def _like(shapes, dtype, scale=1.0, positive=False):
    out = []
    for s in shapes:
        t = torch.randn(s, dtype=torch.float64) * scale
        out.append((t.abs() + 0.1 if positive else t).to(dtype))
    return out


def _clone(ts):
    return [t.clone() for t in ts]


def _f64(ts):
    return [t.double() for t in ts]


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise(a_list, b_list):
    for a, b in zip(a_list, b_list):
        assert torch.equal(_bits(a), _bits(b))


def _assert_close(actual, expected, tol, what=""):
    rtol, atol = tol
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


def _flag(v):
    return torch.tensor(float(v))


# ------------------------------------------------------------------ grad norm
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_norm(seed, dtype, adaptive):
    shapes = _shapes()
    g, w = _like(shapes, dtype), _like(shapes, dtype)
    got = cpp.grad_sq_norm(g, w if adaptive else None)
    assert got.dim() == 0 and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = sum(((wi.double().abs() * gi.double()) if adaptive else gi.double()).square().sum() for gi, wi in zip(g, w))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=0)
    fe = foreach.grad_sq_norm(g, w if adaptive else None)
    torch.testing.assert_close(got.double(), fe.double(), rtol=max(rtol, FOREACH_TOL[dtype][0] / 2), atol=0)


@needs_ext
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_grad_sq_norm_non_finite(seed, bad):
    g = _like([(1023,), (65537,)], torch.float32)
    g[1][40000] = bad
    got = cpp.grad_sq_norm(g)
    assert not torch.isfinite(got)
    if math.isnan(bad):
        assert torch.isnan(got)


@needs_ext
def test_grad_sq_norm_independent_of_thread_count(seed):
    g = _like([(300000,), (77777,)], torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.grad_sq_norm(g)
        torch.set_num_threads(max(2, threads))
        many = cpp.grad_sq_norm(g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ------------------------------------------------------------------ perturb / restore
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_perturb(seed, dtype, adaptive, skip):
    shapes = _shapes()
    p, g = _like(shapes, dtype), _like(shapes, dtype)
    p0 = _clone(p)
    copies = [torch.full_like(t, 7.0) for t in p]
    scale = torch.tensor(0.05 / 3.7)
    cpp.perturb(p, g, copies, scale, _flag(skip), adaptive)
    _assert_bitwise(copies, p0)  # the exact copy, whatever happens next
    if skip:
        _assert_bitwise(p, p0)
        return
    s = scale.double()
    ref = [w + s * (w * w if adaptive else 1) * gi for w, gi in zip(_f64(p0), _f64(g))]
    _assert_close(p, ref, TOL[dtype], "params")
    fp, fc = _clone(p0), [torch.empty_like(t) for t in p0]
    foreach.perturb(fp, g, fc, scale, _flag(False), adaptive)
    _assert_close(p, fp, FOREACH_TOL[dtype], "params vs foreach")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore(seed, dtype):
    shapes = _shapes()
    p, c = _like(shapes, dtype), _like(shapes, dtype)
    cpp.restore(p, c)
    _assert_bitwise(p, c)


# ------------------------------------------------------------------ restore + SGD
def _ref_sgd(p, g, bufs, *, lr, momentum, dampening, nesterov, weight_decay, maximize, first, gs):
    """torch.optim.SGD in float64; the buffer is used as stored (rounded to the dtype), as torch does."""
    dtype = p[0].dtype
    p, g = _f64(p), _f64(g)
    bufs = _f64(bufs)
    out_p, out_b = [], []
    for i, (w, gi) in enumerate(zip(p, g)):
        d = gi * gs
        if maximize:
            d = -d
        if weight_decay:
            d = d + weight_decay * w
        if momentum:
            b = (d.clone() if first else bufs[i] * momentum + (1 - dampening) * d).to(dtype).double()
            d = d + momentum * b if nesterov else b
            out_b.append(b)
        out_p.append(w - lr * d)
    return out_p, out_b


SGD_CASES = [
    # momentum, dampening, nesterov, weight_decay, maximize, first
    (0.0, 0.0, False, 0.0, False, False),
    (0.0, 0.0, False, 5e-4, True, False),
    (0.9, 0.0, False, 5e-4, False, False),
    (0.9, 0.0, False, 5e-4, False, True),
    (0.9, 0.0, True, 1e-2, False, False),
    (0.9, 0.1, False, 0.0, True, False),
    (0.5, 0.3, False, 1e-3, True, True),
]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: "m{}_d{}_n{}_wd{}_max{}_first{}".format(*c))
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("restore_from", ["copies", "params"])
def test_restore_sgd_step(seed, dtype, case, clip, restore_from):
    momentum, dampening, nesterov, wd, maximize, first = case
    shapes = _shapes()
    p, g, c = _like(shapes, dtype), _like(shapes, dtype), _like(shapes, dtype)
    bufs = _like(shapes, dtype) if momentum else []
    if restore_from == "params":
        c = p
    src = _clone(c)
    kw = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd,
              maximize=maximize, first=first)
    gs = torch.tensor(0.37) if clip else None
    fe = (_clone(p), _clone(bufs))
    fe_src = fe[0] if restore_from == "params" else src
    b0 = _clone(bufs)
    cpp.restore_sgd_step(p, g, c, bufs, grad_scale=gs, skip=_flag(False), **kw)
    ref_p, ref_b = _ref_sgd(src, g, b0, gs=float(gs) if clip else 1.0, **kw)
    _assert_close(p, ref_p, TOL[dtype], "params")
    _assert_close(bufs, ref_b, TOL[dtype], "momentum_buffers")
    foreach.restore_sgd_step(fe[0], g, fe_src, fe[1], grad_scale=gs, skip=_flag(False), **kw)
    _assert_close(p, fe[0], FOREACH_TOL[dtype], "params vs foreach")
    _assert_close(bufs, fe[1], FOREACH_TOL[dtype], "buffers vs foreach")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_restore_sgd_step_skip(seed, dtype, momentum):
    shapes = _shapes()
    p, g, c = _like(shapes, dtype), _like(shapes, dtype), _like(shapes, dtype)
    bufs = _like(shapes, dtype) if momentum else []
    b0 = _clone(bufs)
    cpp.restore_sgd_step(p, g, c, bufs, lr=0.1, momentum=momentum, dampening=0.0, nesterov=False,
                         weight_decay=1e-4, maximize=False, first=False, grad_scale=None, skip=_flag(True))
    _assert_bitwise(p, c)  # restored, not stepped
    _assert_bitwise(bufs, b0)


# ------------------------------------------------------------------ restore + Adam
def _ref_adam(p, g, m, v, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, gs):
    """torch.optim.Adam/AdamW in float64; the moments are used as stored (rounded to the dtype)."""
    dtype = p[0].dtype
    out = ([], [], [])
    for w, gi, mi, vi, s in zip(_f64(p), _f64(g), _f64(m), _f64(v), steps):
        t = float(s) + 1
        gi = gi * gs
        if maximize:
            gi = -gi
        if weight_decay:
            if decoupled:
                w = w * (1 - lr * weight_decay)
            else:
                gi = gi + weight_decay * w
        mi = (mi + (1 - beta1) * (gi - mi)).to(dtype).double()
        vi = (vi * beta2 + (1 - beta2) * gi * gi).to(dtype).double()
        denom = vi.sqrt() / math.sqrt(1 - beta2 ** t) + eps
        w = w - lr / (1 - beta1 ** t) * mi / denom
        for o, x in zip(out, (w, mi, vi)):
            o.append(x)
    return out


ADAM_CASES = [
    # weight_decay, decoupled, maximize
    (0.0, False, False),
    (1e-2, False, True),
    (1e-2, True, False),
]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: "wd{}_decoupled{}_max{}".format(*c))
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("restore_from,step_dtype", [("copies", torch.float32), ("params", torch.float64)])
def test_restore_adam_step(seed, dtype, case, clip, restore_from, step_dtype):
    wd, decoupled, maximize = case
    shapes = _shapes()
    p, g, c = _like(shapes, dtype), _like(shapes, dtype), _like(shapes, dtype)
    m, v = _like(shapes, dtype, 0.1), _like(shapes, dtype, 0.01, positive=True)
    steps = [torch.tensor(float(int(torch.randint(0, 20, ()))), dtype=step_dtype) for _ in shapes]
    if restore_from == "params":
        c = p
    src = _clone(c)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, decoupled=decoupled, maximize=maximize)
    gs = torch.tensor(0.37) if clip else None
    fe = [_clone(x) for x in (p, m, v, steps)]
    fe_src = fe[0] if restore_from == "params" else src
    ref = _ref_adam(src, g, m, v, steps, gs=float(gs) if clip else 1.0, **kw)
    old_steps = [float(s) for s in steps]
    cpp.restore_adam_step(p, g, c, m, v, steps, grad_scale=gs, skip=_flag(False), **kw)
    for what, got, exp in zip(("params", "exp_avgs", "exp_avg_sqs"), (p, m, v), ref):
        _assert_close(got, exp, TOL[dtype], what)
    assert [float(s) for s in steps] == [s + 1 for s in old_steps]
    assert all(s.dtype == step_dtype for s in steps)
    if dtype in (torch.float32, torch.float64):
        # fp16/bf16 foreach rounds exp_avg_sq before the sqrt (tiny v underflow
        # to 0 there, not here): compared with the reference only.
        foreach.restore_adam_step(fe[0], g, fe_src, fe[1], fe[2], fe[3], grad_scale=gs, skip=_flag(False), **kw)
        for what, got, exp in zip(("params", "exp_avgs", "exp_avg_sqs"), (p, m, v), fe[:3]):
            _assert_close(got, exp, FOREACH_TOL[dtype], what + " vs foreach")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_adam_step_skip(seed, dtype):
    shapes = _shapes()
    p, g, c = _like(shapes, dtype), _like(shapes, dtype), _like(shapes, dtype)
    m, v = _like(shapes, dtype), _like(shapes, dtype, positive=True)
    steps = [torch.tensor(3.0) for _ in shapes]
    state0 = [_clone(x) for x in (m, v, steps)]
    cpp.restore_adam_step(p, g, c, m, v, steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          decoupled=True, maximize=False, grad_scale=None, skip=_flag(True))
    _assert_bitwise(p, c)
    for now, before in zip((m, v, steps), state0):
        _assert_bitwise(now, before)


# ------------------------------------------------------------------ edge cases and errors
@needs_ext
def test_empty_lists_and_zero_size_are_noops():
    z = torch.tensor(0.0)
    cpp.perturb([], [], [], z, z, False)
    cpp.restore([], [])
    cpp.restore_sgd_step([], [], [], [], lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                         maximize=False, first=False, grad_scale=None, skip=z)
    cpp.restore_adam_step([], [], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          decoupled=False, maximize=False, grad_scale=None, skip=z)
    assert float(cpp.grad_sq_norm([])) == 0.0
    e = [torch.empty(0), torch.empty(3, 0)]
    assert float(cpp.grad_sq_norm(e)) == 0.0
    cpp.perturb(e, _clone(e), _clone(e), z, z, True)
    steps = [torch.tensor(1.0), torch.tensor(1.0)]
    cpp.restore_adam_step(e, _clone(e), _clone(e), _clone(e), _clone(e), steps, lr=0.1, beta1=0.9, beta2=0.999,
                          eps=1e-8, weight_decay=0.0, decoupled=False, maximize=False, grad_scale=None, skip=z)
    assert [float(s) for s in steps] == [2.0, 2.0]  # a step was taken, on no elements


@needs_ext
def test_channels_last_tensors(seed):
    p = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    g = [torch.randn_like(p[0])]
    c = [torch.empty_like(p[0])]
    p0 = _clone(p)
    cpp.perturb(p, g, c, torch.tensor(0.5), _flag(False), False)
    torch.testing.assert_close(p[0], p0[0] + 0.5 * g[0])
    _assert_bitwise(c, p0)


@needs_ext
def test_malformed_calls_raise_before_writing():
    p = [torch.zeros(4), torch.zeros(5)]
    z = torch.tensor(0.0)
    before = _clone(p)
    with pytest.raises(ValueError, match="different dtypes"):
        cpp.perturb(p, [torch.ones(4), torch.ones(5, dtype=torch.float64)], _clone(p), z, z, False)
    with pytest.raises(ValueError, match="equal lengths"):
        cpp.restore(p, [torch.ones(4)])
    with pytest.raises(ValueError, match="shape"):
        cpp.restore(p, [torch.ones(4), torch.ones(6)])
    with pytest.raises(ValueError, match="strides"):
        cpp.restore([torch.zeros(3, 4)], [torch.ones(4, 3).t()])
    with pytest.raises(ValueError, match="different devices"):
        cpp.restore(p, [torch.ones(4), torch.ones(5, device="meta")])
    with pytest.raises(ValueError, match="one-element"):
        cpp.perturb(p, _clone(p), _clone(p), torch.ones(2), z, False)
    with pytest.raises(ValueError, match="not supported"):
        ints = [torch.zeros(3, dtype=torch.int32)]
        cpp.perturb(ints, ints, _clone(ints), z, z, False)
    _assert_bitwise(p, before)
    assert cpp.supports(torch.float64) and not cpp.supports(torch.int32)


@needs_ext
def test_meta_kernels_give_fake_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = [torch.randn(5), torch.randn(3, dtype=torch.float32)]
        out = torch.ops.fastsam.grad_sq_norm(g, [])
        assert out.shape == () and out.dtype == torch.float32
        torch.ops.fastsam.perturb(g, g, [torch.empty(5), torch.empty(3)], torch.tensor(1.0), torch.tensor(0.0), True)


@needs_ext
def test_ops_trace_under_torch_compile(seed):
    """Graph capture with the fake kernels and functionalized mutation (aot_eager: no C++ codegen here)."""
    torch._dynamo.reset()

    def sam_step(p, g, c, bufs):
        sq = torch.ops.fastsam.grad_sq_norm(g, [])
        skip = (~torch.isfinite(sq)).float()
        torch.ops.fastsam.perturb(p, g, c, 0.05 / (sq.sqrt() + 1e-12), skip, False)
        torch.ops.fastsam.restore_sgd_step(p, g, c, bufs, 0.1, 0.9, 0.0, False, 0.0, False, False, None, skip)

    shapes = [(33,), (4, 5)]
    args = [_like(shapes, torch.float32) for _ in range(4)]
    expect = [_clone(a) for a in args]
    sam_step(*expect)
    compiled = torch.compile(sam_step, backend="aot_eager", fullgraph=True)
    compiled(*args)
    for got, exp in zip(args, expect):
        _assert_close(got, exp, (1e-6, 1e-6))


@needs_ext
@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
                                     (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2))])
def test_fused_sam_cpp_matches_foreach(seed, base, kw):
    """A few FusedSAM steps: backend cpp against backend foreach, same data."""
    def run(backend):
        return train_mlp_with_fused_sam(backend, base, kw, seed)

    name, got = run("cpp")
    assert name == "cpp"
    _, exp = run("foreach")
    _assert_close(got, exp, (1e-5, 1e-6))
