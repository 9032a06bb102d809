"""Finite means finite (issue 24): a finite gradient is never skipped as non-finite.

The global norms (SAM's ||g||, ASAM's || |w| g ||, the clip norm, the variants' dot products)
are accumulated in float64 on every backend, so a float32 gradient with elements of 1e20
(whose squares, 1e40, overflow float32) or 3e38 (float32's largest values) is a gradient like
any other: not skipped, perturbed by rho g / ||g|| (ASAM: rho w^2 g / || |w| g ||) to within
float32 rounding of the float64 reference, restored exactly, and stepped as the float64
reference SAM step steps.  The perturbation scale rho / ||g|| is then far below float32's
normal range (~1e-40); the kernels apply it as two float32 factors (``_common.split_scale``)
so that e stays correctly rounded.  Non-finite gradients are still skipped, bitwise.

Checked on every CPU backend (foreach, cpp, triton under the interpreter), fp32 and bf16
(fp16 cannot hold such values), several tensors of odd sizes in two param groups; the
variants that take a norm (GSAM, LookSAM, FriendlySAM, MomentumSAM) through scale
invariance: their steps on g * 2^66 with lr * 2^-66 equal their steps on g.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastsam import FusedSAM
from fastsam.variants import GSAM, FriendlySAM, LookSAM, MomentumSAM

from .conftest import CPU_BACKENDS

SHAPES = [(7,), (1023,), (3, 5, 7), (2049,), (33, 31), (1,)]
RHOS = (0.05, 0.1)  # group 0 holds the first three tensors, group 1 the rest
LR = 0.1
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
KINDS = ["1e20", "3e38", "mixed"]


def _need(backend, dtype):
    from fastsam import backends

    if not backends.get(backend).supports(dtype):
        pytest.skip(f"{backend} does not take {dtype}")


def _grads(kind, dtype, gen, shapes=SHAPES):
    out = []
    for s in shapes:
        base = torch.randn(s, dtype=torch.float64, generator=gen)
        if kind == "1e20":
            g = base * 1e20
        elif kind == "3e38":  # float32's (and bfloat16's) largest values, every square an overflow
            g = base.clamp(-1, 1) * 3e38
        else:  # 1e20 next to values whose squares underflow
            tiny = torch.rand(s, dtype=torch.float64, generator=gen) < 0.5
            g = torch.where(tiny, base * 1e-30, base * 1e20)
        out.append(g.to(dtype))
    return out


def _params(dtype, gen, shapes=SHAPES, zero_first=False):
    ps = [torch.randn(s, dtype=torch.float64, generator=gen).to(dtype) for s in shapes]
    if zero_first:
        ps[0].zero_()  # w = 0: the perturbed value is e itself, compared relative to e
    return [p.requires_grad_() for p in ps]


def _groups(params, adaptive):
    return [
        {"params": params[:3], "rho": RHOS[0], "adaptive": adaptive},
        {"params": params[3:], "rho": RHOS[1], "adaptive": adaptive},
    ]


def _rhos():
    return [RHOS[0]] * 3 + [RHOS[1]] * (len(SHAPES) - 3)


def _ref_perturbed(w, g, adaptive, eps=1e-12):
    """float64 w + e per tensor, and e."""
    w64, g64 = [t.double() for t in w], [t.double() for t in g]
    t = [(wi.abs() * gi) if adaptive else gi for wi, gi in zip(w64, g64)]
    norm = math.sqrt(sum(float((x * x).sum()) for x in t))
    es = [rho * (wi * wi if adaptive else 1.0) * gi / (norm + eps) for rho, wi, gi in zip(_rhos(), w64, g64)]
    return [wi + e for wi, e in zip(w64, es)], es


def _norm_rtol(backend):
    """The relative error of the squared norm's sum: foreach, triton and cuda sum in float64; the
    CPU twin (cpp) in float lanes, rescaled where they overflow (csrc/sam_cpu_loops.h: sq_norm)."""
    return 1e-5 if backend == "cpp" else 0.0


def _assert_within(got, ref, scale, dtype, ulps, what):
    """|got - ref| <= ulps * eps(dtype) * scale (+ the smallest float32 normal, for values near 0)."""
    for i, (x, r, s) in enumerate(zip(got, ref, scale)):
        err = (x.double() - r).abs()
        bound = ulps * EPS[dtype] * s + 1.2e-38
        assert torch.isfinite(x).all(), f"{what}[{i}]: non-finite values"
        bad = err > bound
        assert not bad.any(), (
            f"{what}[{i}]: {int(bad.sum())} elements off, worst {float((err / bound).max()):.3g}x "
            f"the bound (got {x.double()[bad][:3].tolist()}, want {r[bad][:3].tolist()})"
        )


def _skipped(opt):
    return opt.skip_flag is not None and float(opt.skip_flag) != 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_huge_finite_gradients_are_not_skipped(backend, dtype, adaptive, kind, clip, seed):
    _need(backend, dtype)
    gen = torch.Generator().manual_seed(seed)
    params = _params(dtype, gen, zero_first=not adaptive)
    w0 = [p.detach().clone() for p in params]
    opt = FusedSAM(_groups(params, adaptive), torch.optim.SGD, lr=LR, momentum=0.9, backend=backend, max_grad_norm=clip)
    g1 = _grads(kind, dtype, gen)
    for p, g in zip(params, g1):
        p.grad = g.clone()
    opt.first_step()
    ref, es = _ref_perturbed(w0, g1, adaptive)
    # w + e rounds once to the storage dtype, after e's float32 rounding: a few ulps of |w| + |e|,
    # plus the norm's relative error times |e| (cpp sums in float: up to a few ulps of float32)
    e_weight = 1 + _norm_rtol(backend) / (4 * EPS[dtype])
    _assert_within(
        [p.detach() for p in params],
        ref,
        [w.double().abs() + e_weight * e.abs() for w, e in zip(w0, es)],
        dtype,
        4,
        "w + e",
    )
    if not adaptive:  # w = 0: the perturbation itself, to float32 rounding of e
        _assert_within([params[0].detach()], [es[0]], [e_weight * es[0].abs()], dtype, 4, "e")
    g2 = _grads(kind, dtype, gen)
    for p, g in zip(params, g2):
        p.grad = g.clone()
    opt.second_step()
    assert not _skipped(opt), f"a finite {kind} gradient was skipped"
    g64 = [g.double() for g in g2]
    coef = 1.0
    if clip is not None:
        norm = math.sqrt(sum(float((g * g).sum()) for g in g64))
        coef = min(clip / (norm + 1e-6), 1.0)
    # SGD's first momentum step: buf = g * coef, w <- w - lr * buf (buf rounded to the dtype, as torch does)
    bufs = [(g * coef).to(dtype).double() for g in g64]
    ref = [w.double() - LR * b for w, b in zip(w0, bufs)]
    _assert_within(
        [p.detach() for p in params],
        ref,
        [w.double().abs() + (1 if clip is None else e_weight) * LR * b.abs() for w, b in zip(w0, bufs)],
        dtype,
        4,
        "w - lr g",
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("kind", KINDS)
def test_restore_after_a_huge_perturbation_is_exact(backend, dtype, adaptive, kind, seed):
    _need(backend, dtype)
    gen = torch.Generator().manual_seed(seed)
    params = _params(dtype, gen)
    w0 = [p.detach().clone() for p in params]
    opt = FusedSAM(_groups(params, adaptive), torch.optim.SGD, lr=LR, backend=backend)
    for p, g in zip(params, _grads(kind, dtype, gen)):
        p.grad = g
    opt.first_step()
    assert any(not torch.equal(p, w) for p, w in zip(params, w0)), "nothing was perturbed"
    opt.undo_first_step()
    for p, w in zip(params, w0):
        assert torch.equal(
            p.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            w.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["first", "second"])
def test_non_finite_gradients_are_still_skipped_bitwise(backend, adaptive, bad, where, seed):
    gen = torch.Generator().manual_seed(seed)
    params = _params(torch.float32, gen)
    w0 = [p.detach().clone() for p in params]
    opt = FusedSAM(_groups(params, adaptive), torch.optim.SGD, lr=LR, momentum=0.9, backend=backend)
    g1 = _grads("1e20", torch.float32, gen)
    if where == "first":
        g1[3][17] = bad
    for p, g in zip(params, g1):
        p.grad = g
    opt.first_step()
    if where == "first":
        for p, w in zip(params, w0):
            assert torch.equal(p.detach().view(torch.int32), w.view(torch.int32))
    g2 = _grads("1e20", torch.float32, gen)
    if where == "second":
        g2[1][5] = bad
    for p, g in zip(params, g2):
        p.grad = g
    opt.second_step()
    assert _skipped(opt)
    for p, w in zip(params, w0):
        assert torch.equal(p.detach().view(torch.int32), w.view(torch.int32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_sq_norm_is_float64(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    params = _params(torch.float32, gen)
    opt = FusedSAM(_groups(params, False), torch.optim.SGD, lr=LR, backend=backend)
    g = _grads("3e38", torch.float32, gen)
    for p, gi in zip(params, g):
        p.grad = gi
    want = sum(float((t.double() ** 2).sum()) for t in g)
    got = opt.grad_sq_norm()
    # cpp sums each chunk in float32 (rescaled where that overflows): float32's accumulation error
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-5 if backend == "cpp" else 1e-12)
    be = opt.backend_for(torch.device("cpu"))
    for out in (be.grad_sq_norm(g), be.grad_sq_norm(g, params)):
        assert out.dtype == torch.float64 and torch.isfinite(out)
    r = be.dot_sq_norms(g, g)
    assert r.dtype == torch.float64 and torch.isfinite(r).all()
    torch.testing.assert_close(r, torch.tensor([want] * 3, dtype=torch.float64), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the variants: scale invariance
SCALE = 2.0**66  # g * 2^66: elements ~7e19, squares ~5e39 (float32 overflows at 3.4e38)


def _variant(name, groups, backend, lr):
    if name == "gsam":
        return GSAM(
            groups, torch.optim.SGD, lr=lr, momentum=0.9, alpha=0.3, backend=backend, closure_convention="torch"
        )
    if name == "looksam":
        return LookSAM(
            groups, torch.optim.SGD, lr=lr, momentum=0.9, k=2, alpha=0.7, backend=backend, closure_convention="torch"
        )
    if name == "friendly":
        return FriendlySAM(groups, torch.optim.SGD, lr=lr, momentum=0.9, backend=backend, closure_convention="torch")
    return MomentumSAM(groups, torch.optim.SGD, lr=lr, momentum=0.9, backend=backend)


def _run_variant(name, backend, adaptive, scale, seed, steps=4):
    gen = torch.Generator().manual_seed(seed)
    params = _params(torch.float32, gen)
    a = [torch.rand(s, generator=gen) + 0.5 for s in SHAPES]
    b = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = _variant(name, _groups(params, adaptive), backend, LR / scale)

    def closure():
        for p, ai, bi in zip(params, a, b):  # the gradient of a quadratic, times `scale` (a power of two: exact)
            p.grad = ((ai * p.detach() + bi) * scale).to(p.dtype)
        return torch.zeros(())

    history = []
    for _ in range(steps):
        opt.step(closure)
        assert not _skipped(opt), f"{name}: a finite gradient (scale {scale:g}) was skipped"
        history.append([p.detach().clone() for p in params])
    return history


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("name", ["gsam", "looksam", "friendly", "momentum"])
def test_variants_are_scale_invariant_beyond_float32s_squares(name, backend, adaptive, seed):
    if name == "momentum" and adaptive:
        pytest.skip("MomentumSAM has no ASAM form")
    small = _run_variant(name, backend, adaptive, 1.0, seed)
    huge = _run_variant(name, backend, adaptive, SCALE, seed)
    for t, (x, y) in enumerate(zip(small, huge)):
        for i, (u, v) in enumerate(zip(x, y)):
            assert torch.isfinite(v).all(), f"step {t}, tensor {i}: non-finite"
            torch.testing.assert_close(v, u, rtol=2e-5, atol=2e-6, msg=lambda m, t=t, i=i: f"step {t}, tensor {i}: {m}")


# ------------------------------------------------------------------ the ops: a float64 scale below float32's range
@pytest.mark.parametrize("s", [1e-42, -3e-39, 1.1754943508222875e-38, 1e-3, 1.0, 5e-60, 3.5e38, -1e39])
def test_split_scale(s):
    from fastsam.backends._common import F32_TINY, split_scale

    hi, lo = split_scale(s)
    assert hi * lo == pytest.approx(s, rel=1e-15)
    assert math.log2(lo) == int(math.log2(lo))  # a power of two: exact
    assert F32_TINY <= abs(hi) <= torch.finfo(torch.float32).max
    if F32_TINY <= abs(s) <= torch.finfo(torch.float32).max:
        assert (hi, lo) == (s, 1.0)


def _op_case(backend, host_reads, monkeypatch):
    from fastsam import backends
    from fastsam.backends import _common

    if not host_reads and backend != "foreach":
        pytest.skip("the device path without host reads is foreach's")
    monkeypatch.setattr(_common, "HOST_READS", host_reads)
    return backends.get(backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "devicepath"])
@pytest.mark.parametrize("factor", [1e-42, 3e-39, 2e-30])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_perturb_applies_a_float64_factor_below_float32s_range(
    backend, host_reads, factor, adaptive, dtype, monkeypatch, seed
):
    _need(backend, dtype)
    be = _op_case(backend, host_reads, monkeypatch)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (1023,), (33, 31)]
    g = _grads("3e38", dtype, gen, shapes)
    w = [torch.zeros(s, dtype=dtype) for s in shapes] if not adaptive else _params(dtype, gen, shapes)
    w = [t.detach() for t in w]
    w0 = [t.clone() for t in w]
    copies = [torch.empty_like(t) for t in w]
    rho = 0.05
    be.perturb(w, g, copies, torch.tensor([0.0, factor], dtype=torch.float64), rho, adaptive)
    for c, t in zip(copies, w0):
        assert torch.equal(c, t)
    es = [rho * factor * gi.double() * (wi.double() ** 2 if adaptive else 1.0) for gi, wi in zip(g, w0)]
    _assert_within(
        w,
        [wi.double() + e for wi, e in zip(w0, es)],
        [wi.double().abs() + e.abs() for wi, e in zip(w0, es)],
        dtype,
        4,
        "w + e",
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "devicepath"])
@pytest.mark.parametrize("factor", [1e-42, 3e-39, 0.25])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_steps_apply_a_float64_clip_factor_below_float32s_range(
    backend, host_reads, factor, maximize, base, monkeypatch, seed
):
    be = _op_case(backend, host_reads, monkeypatch)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (1023,), (33, 31)]
    g = _grads("3e38", torch.float32, gen, shapes)
    p = [torch.zeros(s) for s in shapes]
    gs, skip = torch.tensor(factor, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    d = [(-1.0 if maximize else 1.0) * factor * gi.double() for gi in g]  # the gradient the step sees
    if base == "sgd":
        be.restore_sgd_step(
            p,
            g,
            [],
            [],
            lr=1.0,
            momentum=0.0,
            dampening=0.0,
            nesterov=False,
            weight_decay=0.0,
            maximize=maximize,
            first=True,
            grad_scale=gs,
            skip=skip,
        )
        _assert_within(p, [-x for x in d], [x.abs() for x in d], torch.float32, 4, "w - lr d")
        return
    m, v = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    steps = [torch.zeros(()) for _ in shapes]
    be.restore_adam_step(
        p,
        g,
        [],
        m,
        v,
        steps,
        lr=1.0,
        beta1=0.5,
        beta2=0.75,
        eps=0.0,
        weight_decay=0.0,
        decoupled=False,
        maximize=maximize,
        grad_scale=gs,
        skip=skip,
    )
    # the first Adam step: m = (1 - beta1) d, v = (1 - beta2) d^2, bias-corrected to d and d^2
    _assert_within(m, [0.5 * x for x in d], [0.5 * x.abs() for x in d], torch.float32, 4, "exp_avg")
