"""Schedules: the closure runs exactly on the steps a schedule names; state_dict resume is bitwise."""

import math

import pytest
import torch

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM
from fastsam.schedules import Adaptive, Interval, LatePhase, RandomSwitch

from .conftest import CPU_BACKENDS
from .test_variants_common import drive, groups, loss_at, make_params, resume_check, roundtrip

BASE = torch.optim.SGD
KW = dict(lr=0.1, momentum=0.9)


def _count(schedule, steps=20, cls=FusedSAM, **kw):
    p = make_params()
    opt = cls(groups(p, BASE), BASE, rho=0.05, schedule=schedule, **KW, **kw)
    calls = []
    drive(opt, p, steps, counter=calls)
    return calls, opt


def test_interval_steps_and_rho_multiplier():
    calls, _ = _count(Interval(4), steps=18)
    assert calls == [3, 7, 11, 15]
    calls, _ = _count(Interval(3, start=5), steps=15)
    assert calls == [7, 10, 13]
    # rho multiplier: Interval(1, m) with rho equals every-step SAM with rho * m
    p1, p2 = make_params(), make_params()
    o1 = FusedSAM(p1, BASE, rho=0.05, schedule=Interval(1, rho_multiplier=2.0), **KW)
    o2 = FusedSAM(p2, BASE, rho=0.10, **KW)
    drive(o1, p1, 6)
    drive(o2, p2, 6)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_late_phase_equals_sam_start_step():
    calls, _ = _count(LatePhase(12), steps=16)
    assert calls == [12, 13, 14, 15]
    p1, p2 = make_params(), make_params()
    o1 = FusedSAM(p1, BASE, schedule=LatePhase(4), **KW)
    o2 = FusedSAM(p2, BASE, sam_start_step=4, **KW)
    drive(o1, p1, 9)
    drive(o2, p2, 9)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_random_switch_draws_from_its_seeded_generator():
    sched = RandomSwitch(p=0.2, p_end=0.8, total_steps=30, seed=7)
    calls, _ = _count(sched, steps=30)
    g = torch.Generator().manual_seed(7)
    expect = [t for t in range(30) if torch.rand((), generator=g, dtype=torch.float64).item() < 0.2 + 0.6 * t / 30]
    assert calls == expect and 0 < len(calls) < 30


def test_adaptive_follows_ae_sam_statistics():
    p = make_params()
    sched = Adaptive(delta=0.7, c=-0.3)
    opt = FusedSAM(groups(p, BASE), BASE, schedule=sched, **KW)
    calls, norms = [], []
    for t in range(25):
        loss_at(p, t).backward()
        norms.append(sum(float(x.grad.double().pow(2).sum()) for x in p))

        def closure(t=t):
            calls.append(t)
            loss_at(p, t).backward()

        opt.step(closure)
        opt.zero_grad()
    mu, var, expect = norms[0], 0.0, []
    for t, x in enumerate(norms):
        if t:
            old = mu
            mu = 0.7 * old + 0.3 * x
            var = 0.7 * var + 0.7 * 0.3 * (x - old) ** 2
        if t >= 1 and x >= mu - 0.3 * math.sqrt(var):
            expect.append(t)
    assert calls == expect and 0 < len(calls) < 25 and sched.sam_steps == len(calls)


def _ae_sam(norms, delta, c, warmup=1):
    """AE-SAM's decisions from the float64 squared norms, written from the paper's update (reference)."""
    mu, var, out, margin = norms[0], 0.0, [], math.inf
    for i, x in enumerate(norms):
        if i:
            old = mu
            mu = delta * old + (1 - delta) * x
            var = delta * var + delta * (1 - delta) * (x - old) ** 2
        thr = mu + c * math.sqrt(var)
        out.append(i + 1 > warmup and x >= thr)
        if i + 1 > warmup:
            margin = min(margin, abs(x - thr) / x)
    return out, margin


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls", ["FusedSAM", "MomentumSAM"])
def test_adaptive_decisions_equal_the_reference_on_every_backend(cls, dtype, backend):
    """The norm now comes from the optimizer's buckets (the backend's fused norm on cpp/triton): the
    decisions are the reference's, from float64 norms of the same gradients, step for step."""
    p = make_params(dtype=dtype)
    sched = Adaptive(delta=0.8, c=0.0)
    if cls == "FusedSAM":
        opt = FusedSAM(groups(p, BASE), BASE, rho=0.05, schedule=sched, backend=backend, **KW)
    else:
        opt = MomentumSAM(groups(p, BASE), BASE, rho=0.05, schedule=sched, backend=backend, **KW)
    norms, got = [], []
    for t in range(30):
        loss_at(p, t).backward()
        norms.append(sum(float(x.grad.double().pow(2).sum()) for x in p))
        if cls == "FusedSAM":
            calls = []
            opt.step(lambda t=t: (calls.append(t), loss_at(p, t).backward()))
            got.append(bool(calls))
        else:
            opt.step()  # decides, after step t, whether step t + 1's gradient is taken at w~
            got.append(opt.perturbed)
        opt.zero_grad()
    expect, margin = _ae_sam(norms, 0.8, 0.0)
    assert got == expect and 3 < sum(got) < 27 and sched.sam_steps == sum(got)
    assert margin > 1e-5, "no decision is a near-tie that rounding could flip (the test means what it says)"


@pytest.mark.parametrize(
    "make",
    [lambda: Interval(3, 1.5), lambda: RandomSwitch(0.5, seed=3), lambda: Adaptive(0.8, c=0.0), lambda: LatePhase(6)],
)
def test_resume_bitwise_with_schedule(make):
    resume_check(lambda gs: FusedSAM(gs, BASE, rho=0.05, schedule=make(), **KW), BASE, steps=14, cut=7)


def test_schedule_state_travels_through_weights_only_load():
    s = RandomSwitch(0.5, seed=1)
    for _ in range(5):
        s.decide(type("O", (), {"num_steps": 0})())
    s2 = RandomSwitch(0.5, seed=99)
    s2.load_state_dict(roundtrip(s.state_dict()))
    o = type("O", (), {"num_steps": 0})()
    assert [s.decide(o) for _ in range(20)] == [s2.decide(o) for _ in range(20)]


@pytest.mark.parametrize("cls,kw", [(LookSAM, dict(k=1)), (GSAM, {}), (FriendlySAM, {})])
def test_variants_take_schedules(cls, kw):
    calls, _ = _count(Interval(3), steps=12, cls=cls, **kw)
    assert calls == [2, 5, 8, 11]


def test_momentum_sam_schedule_decides_perturbation():
    p = make_params()
    opt = MomentumSAM(groups(p, BASE), BASE, rho=0.1, schedule=Interval(2), **KW)
    states = []
    for t in range(8):
        loss_at(p, t).backward()
        opt.step()
        opt.zero_grad()
        states.append(opt.perturbed)
    # decision for step t+1 is asked with num_steps = t+1: Interval(2) says yes for odd t+1
    assert states == [(t + 2) % 2 == 0 for t in range(8)]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Interval(0)
    with pytest.raises(ValueError):
        RandomSwitch(1.5)
    with pytest.raises(ValueError):
        Adaptive(delta=1.0)
    with pytest.raises(ValueError):
        LatePhase(-1)
