"""Schedules' settings and rules: AE-SAM's statistics against a float64 reference of the paper's
recurrences, the step rules at their edges, sam_fraction, and settings checked wherever they
enter (constructor, assignment, load_state_dict: all or nothing)."""

import math

import numpy as np
import pytest
import torch

from fastsam.schedules import Adaptive, Interval, LatePhase, RandomSwitch


class FakeOpt:
    """What a schedule sees of an optimizer: ``num_steps`` and the parameters' ``.grad``."""

    def __init__(self, n=5):
        self.p = torch.zeros(n, dtype=torch.float64)
        self.param_groups = [{"params": [self.p]}]
        self.num_steps = 0

    def set_sq_norm(self, x, g):
        """A gradient with ||grad||^2 = x (a random direction)."""
        d = torch.randn(self.p.shape, generator=g, dtype=torch.float64)
        self.p.grad = d * math.sqrt(x) / d.norm() if math.isfinite(x) else torch.full_like(d, x)


def _drive(sched, norms, g):
    opt, out = FakeOpt(), []
    for t, x in enumerate(norms):
        opt.num_steps = t
        opt.set_sq_norm(x, g)
        out.append((sched.decide(opt), sched.mean, sched.var, sched.count, sched.sam_steps))
    return out


def _ae_sam_reference(norms, delta, c, c_end=None, total_steps=None, warmup=1):
    """Jiang et al. (ICLR 2023), in float64: mu <- delta mu + (1 - delta) x and
    s2 <- delta s2 + delta (1 - delta) (x - mu_old)^2 (the variance uses the mean before this
    step's update), initialised at the first finite x; SAM iff x >= mu + c_t sqrt(s2) after
    ``warmup`` finite steps; a non-finite x changes nothing and is no SAM step."""
    mu = s2 = 0.0
    count = sam_steps = 0
    out = []
    for t, x in enumerate(norms):
        sam = False
        if math.isfinite(x):
            if count == 0:
                mu, s2 = x, 0.0
            else:
                mu_old = mu
                mu = delta * mu_old + (1 - delta) * x
                s2 = delta * s2 + delta * (1 - delta) * (x - mu_old) ** 2
            count += 1
            ct = c if c_end is None else c + (c_end - c) * min(t / total_steps, 1.0)
            sam = count > warmup and x >= mu + ct * math.sqrt(s2)
            sam_steps += sam
        out.append((sam, mu, s2, count, sam_steps))
    return out


@pytest.mark.parametrize(
    "delta,c,c_end,total,warmup", [(0.9, 0.0, None, None, 1), (0.6, -0.5, 1.0, 20, 3), (0.0, 0.3, None, None, 0)]
)
def test_adaptive_statistics_equal_the_paper_recurrences(seed, delta, c, c_end, total, warmup):
    g = torch.Generator().manual_seed(seed)
    # log-normal norms with jumps and two non-finite steps: every branch of the update
    norms = torch.exp(torch.randn(40, generator=g, dtype=torch.float64) * 1.5).tolist()
    norms[7], norms[19] = float("nan"), float("inf")
    got = _drive(Adaptive(delta, c, c_end, total, warmup), norms, g)
    ref = _ae_sam_reference(norms, delta, c, c_end, total, warmup)
    # float64 on both sides, the norm read through foreach: 1e-14 relative at most over 40 seeds
    for t, (a, b) in enumerate(zip(got, ref)):
        assert a[0] == b[0] and a[3:] == b[3:], f"seed={seed} step {t}: got {a}, reference {b}"
        assert a[1] == pytest.approx(b[1], rel=1e-12) and a[2] == pytest.approx(b[2], rel=1e-12, abs=1e-300), (
            f"seed={seed} step {t}: got {a}, reference {b}"
        )
    assert 0 < ref[-1][4] < 40


def test_adaptive_ties_are_sam_steps():
    """x >= mu + c sqrt(s2): a constant norm (s2 = 0, x = mu) is a SAM step after the warmup."""
    sched, opt = Adaptive(delta=0.5, c=2.0, warmup=2), FakeOpt()
    opt.p.grad = torch.full_like(opt.p, 0.5)  # the same norm every step; delta = 0.5 keeps mu = x exact
    assert [sched.decide(opt) for _ in range(6)] == [False, False, True, True, True, True]
    assert sched.sam_steps == 4 and sched.var == 0.0


def test_threshold_and_probability_are_linear_then_constant():
    a = Adaptive(c=1.0, c_end=3.0, total_steps=10)
    assert [a.threshold_c(t) for t in (-1, 0, 5, 10, 25)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert Adaptive(c=1.5).threshold_c(100) == 1.5
    r = RandomSwitch(0.2, p_end=0.6, total_steps=8)
    assert [r.probability(t) for t in (-3, 0, 4, 8, 9)] == pytest.approx([0.2, 0.2, 0.4, 0.6, 0.6], abs=1e-15)
    assert RandomSwitch(0.3).probability(1000) == 0.3


@pytest.mark.parametrize("start", [0, 1, 4])
def test_interval_every_step_from_start(start):
    opt = FakeOpt()
    sched = Interval(1, start=start)
    decisions = []
    for t in range(8):
        opt.num_steps = t
        decisions.append(sched.decide(opt))
    assert decisions == [t >= start for t in range(8)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: LatePhase(5),
        lambda: LatePhase(0),
        lambda: Interval(3),
        lambda: Interval(4, start=3),
        lambda: Interval(2, start=30),
    ],
)
@pytest.mark.parametrize("total", [0, 1, 7, 12, 40])
def test_sam_fraction_is_the_fraction_of_sam_decisions(make, total):
    sched, opt = make(), FakeOpt()
    sam = 0
    for t in range(total):
        opt.num_steps = t
        sam += sched.decide(opt)
    assert sched.sam_fraction(total) == (sam / total if total else 0.0)


def test_random_switch_sam_fraction_is_the_mean_probability():
    r = RandomSwitch(0.1, p_end=0.5, total_steps=10)
    assert r.sam_fraction(20) == pytest.approx((sum(0.1 + 0.04 * t for t in range(10)) + 0.5 * 10) / 20)
    assert r.sam_fraction(0) == 0.0


# ---------------------------------------------------------------- settings enter checked
SCALARS = [(lambda v: v, "python"), (np.asarray, "numpy"), (torch.tensor, "tensor")]


@pytest.mark.parametrize("wrap", [w for w, _ in SCALARS], ids=[i for _, i in SCALARS])
def test_constructors_take_python_numpy_and_tensor_scalars(wrap):
    cases = [
        (Interval(wrap(3), wrap(1.5), wrap(2)), Interval(3, 1.5, 2)),
        (LatePhase(wrap(4)), LatePhase(4)),
        (RandomSwitch(wrap(0.25), wrap(0.75), wrap(10), wrap(3)), RandomSwitch(0.25, 0.75, 10, 3)),
        (Adaptive(wrap(0.5), wrap(-0.25), wrap(0.5), wrap(9), wrap(2)), Adaptive(0.5, -0.25, 0.5, 9, 2)),
    ]
    for got, want in cases:
        a, b = got.state_dict(), want.state_dict()
        a.pop("generator", None), b.pop("generator", None)
        assert a == b and [type(v) for v in a.values()] == [type(v) for v in b.values()], (a, b)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Interval(0), "k must be an integer >= 1"),
        (lambda: Interval(3.0), "k must be an integer"),
        (lambda: Interval(True), "k must be an integer"),
        (lambda: Interval(2, rho_multiplier=float("nan")), "rho_multiplier must be a finite real number"),
        (lambda: Interval(2, rho_multiplier=-1), "rho_multiplier must be >= 0"),
        (lambda: Interval(2, start=-1), "start must be an integer >= 0"),
        (lambda: LatePhase(2.5), "start must be an integer"),
        (lambda: LatePhase(-1), "start must be an integer >= 0"),
        (lambda: RandomSwitch(1.5), r"p must be in \[0, 1\]"),
        (lambda: RandomSwitch(float("nan")), "p must be a finite real number"),
        (lambda: RandomSwitch(torch.tensor([0.5, 0.5])), r"p must be .* got a tensor of shape \(2,\)"),
        (lambda: RandomSwitch(0.5, p_end=0.9), "p_end=0.9 needs total_steps"),
        (lambda: RandomSwitch(0.5, p_end="0.9", total_steps=3), "p_end must be a finite real number"),
        (lambda: RandomSwitch(seed=1.5), "seed must be an integer"),
        (lambda: Adaptive(delta=1.0), r"delta must be in \[0, 1\)"),
        (lambda: Adaptive(delta=np.float64(-0.1)), r"delta must be in \[0, 1\)"),
        (lambda: Adaptive(c=float("inf")), "c must be a finite real number"),
        (lambda: Adaptive(c_end=1.0), "c_end=1.0 needs total_steps"),
        (lambda: Adaptive(c_end=1.0, total_steps=0), "total_steps must be an integer >= 1"),
        (lambda: Adaptive(warmup=-1), "warmup must be an integer >= 0"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make,name,bad,good",
    [
        (lambda: Interval(3), "k", 0, np.int64(2)),
        (lambda: Interval(3), "rho_multiplier", float("inf"), torch.tensor(2.0)),
        (lambda: Interval(3), "start", -2, 5),
        (lambda: LatePhase(3), "start", "4", torch.tensor(6)),
        (lambda: RandomSwitch(0.5), "p", 2.0, np.float32(0.25)),
        (lambda: RandomSwitch(0.5), "p_end", 0.3, None),
        (lambda: RandomSwitch(0.5, 0.2, 10), "total_steps", None, 20),
        (lambda: Adaptive(), "delta", 1.0, 0.5),
        (lambda: Adaptive(), "c", float("nan"), -1.0),
        (lambda: Adaptive(c_end=1.0, total_steps=5), "total_steps", None, 8),
        (lambda: Adaptive(), "warmup", 1.5, 0),
    ],
)
def test_assigned_settings_are_checked(make, name, bad, good):
    """An in-place edit is checked like the constructor's argument: a bad one raises naming the
    setting and changes nothing; a good one is stored as a plain Python value."""
    sched = make()
    before = getattr(sched, name)
    with pytest.raises(ValueError, match=name):
        setattr(sched, name, bad)
    assert getattr(sched, name) == before
    setattr(sched, name, good)
    value = getattr(sched, name)
    assert value is None if good is None else (type(value) in (int, float) and value == float(good))


def test_an_edited_setting_drives_decide():
    opt, sched = FakeOpt(), Interval(3)
    sched.k = np.int64(2)
    decisions = []
    for t in range(6):
        opt.num_steps = t
        decisions.append(sched.decide(opt))
    assert decisions == [False, True, False, True, False, True]


def test_setting_the_seed_reseeds_the_generator():
    a, b = RandomSwitch(0.5, seed=1), RandomSwitch(0.5, seed=7)
    opt = FakeOpt()
    [a.decide(opt) for _ in range(5)]
    a.seed = np.int64(7)
    assert a.seed == 7 and [a.decide(opt) for _ in range(30)] == [b.decide(opt) for _ in range(30)]


# ---------------------------------------------------------------- load_state_dict: checked, all or nothing
def _used(make, steps=9):
    """A schedule after some decisions, so its state differs from a fresh one's."""
    sched, opt, g = make(), FakeOpt(), torch.Generator().manual_seed(0)
    for t in range(steps):
        opt.num_steps = t
        opt.set_sq_norm(float(torch.rand((), generator=g)) + 0.1, g)
        sched.decide(opt)
    return sched


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    ga, gb = sa.pop("generator", None), sb.pop("generator", None)
    return sa == sb and (ga is None or torch.equal(ga, gb))


MAKES = {
    "LatePhase": (lambda: LatePhase(3), lambda: LatePhase(8)),
    "Interval": (lambda: Interval(3, 1.5, 2), lambda: Interval(5, 0.5, 0)),
    "RandomSwitch": (lambda: RandomSwitch(0.3, 0.7, 12, seed=5), lambda: RandomSwitch(0.9, seed=1)),
    "Adaptive": (lambda: Adaptive(0.7, 0.2, 1.0, 30, 2), lambda: Adaptive()),
}


@pytest.mark.parametrize("kind", list(MAKES))
def test_load_state_dict_restores_every_field(kind):
    """Into a schedule built with other settings: the same state and the same next decisions."""
    make_a, make_b = MAKES[kind]
    a, b = _used(make_a), make_b()
    b.load_state_dict(a.state_dict())
    assert _same_state(a, b)
    opt, g = FakeOpt(), torch.Generator().manual_seed(1)
    for t in range(9, 30):
        opt.num_steps = t
        opt.set_sq_norm(float(torch.rand((), generator=g)) + 0.1, g)
        assert a.decide(opt) == b.decide(opt), f"{kind} step {t}"


BAD_STATES = [
    ("LatePhase", {"start": -1}, r"LatePhase state_dict\['start'\] must be an integer >= 0"),
    ("LatePhase", {}, r"LatePhase state_dict has no 'start'"),
    ("Interval", {"k": 0}, r"Interval state_dict\['k'\] must be an integer >= 1"),
    ("Interval", {"rho_multiplier": float("nan")}, r"state_dict\['rho_multiplier'\] must be a finite"),
    ("RandomSwitch", {"p": 1.5}, r"state_dict\['p'\] must be in \[0, 1\]"),
    ("RandomSwitch", {"total_steps": None}, "p_end=0.7 needs total_steps"),
    ("RandomSwitch", {"seed": "5"}, r"state_dict\['seed'\] must be an integer"),
    ("RandomSwitch", {"generator": torch.zeros(3, dtype=torch.uint8)}, r"state_dict\['generator'\] must be"),
    ("Adaptive", {"var": -1.0}, r"Adaptive state_dict\['var'\] must be >= 0"),
    ("Adaptive", {"mean": float("nan")}, r"state_dict\['mean'\] must be a finite real number"),
    ("Adaptive", {"sam_steps": 100}, r"state_dict\['sam_steps'\] \(100\) cannot exceed"),
    ("Adaptive", {"delta": 1.0}, r"state_dict\['delta'\] must be in \[0, 1\)"),
    ("Adaptive", {"count": None}, r"state_dict\['count'\] must be an integer"),
]


@pytest.mark.parametrize("kind,change,match", BAD_STATES)
def test_a_bad_state_dict_changes_nothing(kind, change, match):
    make_a, make_b = MAKES[kind]
    d = _used(make_a).state_dict()
    if change:
        d.update(change)
    else:
        d.clear()
    target, twin = _used(make_b, 4), _used(make_b, 4)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(d)
    assert _same_state(target, twin)
    opt = FakeOpt()
    opt.set_sq_norm(1.0, torch.Generator().manual_seed(2))
    assert [target.decide(opt) for _ in range(10)] == [twin.decide(opt) for _ in range(10)]
