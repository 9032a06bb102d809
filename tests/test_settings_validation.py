"""Every setting is checked wherever it enters (constructor, setters, add_param_group, param groups
edited in place, the environment), with one set of checks (fastsam/_checks.py): bools must be
bools, numbers may be Python, NumPy or 0-d tensor scalars, and must be finite and in range.
A refused value changes nothing."""

import math

import numpy as np
import pytest
import torch

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM, backends


def _p(n=3):
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    return p


BAD_CONSTRUCTOR = [
    ("rho", float("nan")),
    ("rho", -0.1),
    ("rho", "0.05"),
    ("rho", True),
    ("rho", torch.tensor([0.1, 0.2])),
    ("adaptive", "False"),
    ("adaptive", 1),
    ("adaptive", None),
    ("perturb_eps", 0.0),
    ("perturb_eps", float("nan")),
    ("max_grad_norm", float("nan")),
    ("max_grad_norm", float("inf")),
    ("max_grad_norm", 0),
    ("max_grad_norm", -1.0),
    ("sam_start_step", -1),
    ("sam_start_step", 2.5),
    ("sam_start_step", True),
    ("perturbation", "both"),
    ("closure_convention", "lbfgs"),
    ("backend", "gpu"),
    ("capturable", "yes"),
    ("schedule", object()),
]


# ids stable across processes (pytest-xdist's workers must collect the same names): no object address
@pytest.mark.parametrize(
    "name,value",
    BAD_CONSTRUCTOR,
    ids=[f"{n}={type(v).__name__ if type(v) is object else repr(v)}" for n, v in BAD_CONSTRUCTOR],
)
def test_bad_constructor_arguments_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        FusedSAM([_p()], torch.optim.SGD, lr=0.1, **{name: value})


GOOD_SCALARS = [
    ("rho", np.float32(0.1)),
    ("rho", torch.tensor(0.1)),
    ("rho", np.int64(1)),
    ("adaptive", np.bool_(True)),
    ("adaptive", torch.tensor(False)),
    ("max_grad_norm", np.float64(1.0)),
    ("max_grad_norm", torch.tensor(2.0)),
    ("sam_start_step", np.int32(3)),
    ("sam_start_step", torch.tensor(3)),
    ("perturb_eps", np.float32(1e-8)),
]


@pytest.mark.parametrize("name,value", GOOD_SCALARS, ids=[f"{n}:{type(v).__name__}" for n, v in GOOD_SCALARS])
@pytest.mark.parametrize("cls", [FusedSAM, LookSAM, GSAM, FriendlySAM])
def test_numpy_and_tensor_scalars_are_accepted_and_stored_as_python_values(cls, name, value):
    opt = cls([_p()], torch.optim.SGD, lr=0.1, **{name: value})
    stored = opt.param_groups[0][name] if name in ("rho", "adaptive") else getattr(opt, name)
    assert type(stored) in (float, bool, int)
    expected = value.item() if hasattr(value, "item") else value
    assert stored == pytest.approx(expected)


VARIANT_BAD = [
    (LookSAM, "k", 0),
    (LookSAM, "k", 2.0),
    (LookSAM, "alpha", float("nan")),
    (LookSAM, "alpha", -1.0),
    (GSAM, "alpha", -0.1),
    (GSAM, "alpha", float("inf")),
    (GSAM, "rho_schedule", "linear"),
    (FriendlySAM, "lmbda", 1.5),
    (FriendlySAM, "sigma", float("nan")),
    (FriendlySAM, "sigma", "1"),
]


@pytest.mark.parametrize("cls,name,value", VARIANT_BAD, ids=[f"{c.__name__}-{n}={v!r}" for c, n, v in VARIANT_BAD])
def test_variant_settings_are_checked_in_the_constructor(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls([_p()], torch.optim.SGD, lr=0.1, **{name: value})


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rho=float("nan")), "rho"),
        (dict(adaptive="False"), "adaptive"),
        (dict(adaptive=True), "adaptive"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    ],
)
def test_momentum_sam_checks_its_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        MomentumSAM([_p()], torch.optim.SGD, lr=0.1, momentum=0.9, **kw)


SETTERS = [
    ("max_grad_norm", float("nan")),
    ("max_grad_norm", 0.0),
    ("perturb_eps", -1.0),
    ("sam_start_step", 1.5),
    ("num_steps", -1),
    ("num_steps", 2.0),
    ("sam_active", "yes"),
    ("sam_active", 1),
    ("perturbation", "x"),
    ("closure_convention", "x"),
    ("schedule", 3),
]


@pytest.mark.parametrize("name,value", SETTERS, ids=[f"{n}={v!r}" for n, v in SETTERS])
def test_setters_check_and_keep_the_old_value(name, value):
    opt = FusedSAM([_p()], torch.optim.SGD, lr=0.1, max_grad_norm=1.0, sam_start_step=2)
    before = getattr(opt, name)
    with pytest.raises(ValueError, match=name):
        setattr(opt, name, value)
    assert getattr(opt, name) == before


def test_the_step_count_stays_checked_after_steps_end():
    """A step ends without the run state's per-write checks (``RunState.count_step``): the count
    it leaves is the int the steps make, and a later write is still checked."""
    p = _p()
    p.grad = torch.randn_like(p)
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1, sam_start_step=2)
    for _ in range(3):
        opt.first_step()
        opt.second_step()
    assert type(opt.num_steps) is int and opt.num_steps == 3 and opt.sam_active
    assert opt.skip_flag is not None and float(opt.skip_flag) == 0.0
    with pytest.raises(ValueError, match="num_steps"):
        opt.num_steps = -1
    assert opt.num_steps == 3
    with pytest.raises(AttributeError, match="no setting 'num_step'"):
        opt.core.run.num_step = 4


@pytest.mark.parametrize(
    "cls,name,value",
    [
        (GSAM, "alpha", -1.0),
        (LookSAM, "alpha", float("nan")),
        (FriendlySAM, "lmbda", 2.0),
        (FriendlySAM, "sigma", float("inf")),
    ],
)
def test_variant_setters_check(cls, name, value):
    opt = cls([_p()], torch.optim.SGD, lr=0.1)
    before = getattr(opt, name)
    with pytest.raises(ValueError, match=name):
        setattr(opt, name, value)
    assert getattr(opt, name) == before


def test_a_nan_max_grad_norm_can_no_longer_reach_the_weights():
    p = _p()
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError):
        opt.max_grad_norm = float("nan")
    opt.first_step()
    p.grad = torch.randn(3)
    opt.second_step()
    assert torch.isfinite(p).all() and not opt.last_step_skipped


@pytest.mark.parametrize("key,value", [("rho", float("nan")), ("rho", -1.0), ("adaptive", "False"), ("rho", "0.1")])
def test_add_param_group_checks_and_adds_nothing_when_refused(key, value):
    opt = FusedSAM([_p()], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [_p()], key: value})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1


@pytest.mark.parametrize(
    "key,value", [("rho", float("nan")), ("rho", float("inf")), ("rho", -0.5), ("adaptive", "False"), ("adaptive", 0)]
)
@pytest.mark.parametrize("where", ["first_step", "plain"])
def test_a_group_edited_in_place_is_checked_at_the_next_step(key, value, where):
    p = _p()
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9)
    if where == "plain":
        opt.sam_active = False
    w = p.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"{key} of param group 0"):
        opt.first_step() if where == "first_step" else opt.step()
    assert torch.equal(p.detach(), w) and opt.num_steps == 0 and not opt.state
    opt.param_groups[0][key] = 0.05 if key == "rho" else False
    opt.first_step() if where == "first_step" else opt.step()


def test_a_numpy_rho_edited_in_place_is_used_as_its_value():
    """A scheduler writing NumPy values into a group: accepted, stored as a float."""
    p = _p()
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["rho"] = np.float32(0.25)
    w = p.detach().clone()
    opt.first_step()
    e = p.detach() - w
    assert e.norm().item() == pytest.approx(0.25, rel=1e-5)
    assert type(opt.param_groups[0]["rho"]) is float


def test_the_environment_variable_is_named_when_wrong(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        FusedSAM([_p()], torch.optim.SGD, lr=0.1)


def test_an_explicit_backend_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fastest")  # not even consulted
    opt = FusedSAM([_p()], torch.optim.SGD, lr=0.1, backend="foreach")
    assert opt.backend == "foreach"


def test_duplicate_parameters_in_one_group_are_refused():
    p = _p()
    with pytest.raises(ValueError, match="twice"):
        FusedSAM([p, _p(), p], torch.optim.SGD, lr=0.1)
    opt = FusedSAM([_p()], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- step(closure) conventions
def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, x, y


def test_a_torch_style_closure_after_zero_grad_in_place_still_runs_two_passes():
    """torch's convention with zero_grad(set_to_none=False): the gradients are the same tensors,
    zeroed in place, so "auto" looks at their values (all zero: nobody ran a first pass)."""
    runs = {}
    for convention in ("auto", "torch"):
        model, x, y = _problem()
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, closure_convention=convention)
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad(set_to_none=False)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            opt.step(closure)
        assert len(calls) == 6, convention
        runs[convention] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs["auto"], runs["torch"]))


def test_the_sam_convention_with_gradients_zeroed_in_place_is_still_sam():
    model, x, y = _problem()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    calls = []
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()

        def closure():
            calls.append(1)
            torch.nn.functional.mse_loss(model(x), y).backward()

        opt.step(closure)
    assert len(calls) == 3


@pytest.mark.parametrize("convention", ["torch", "sam"])
def test_a_closure_that_computes_no_gradient_is_an_error(convention):
    model, x, y = _problem()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, closure_convention=convention)
    if convention == "sam":
        torch.nn.functional.mse_loss(model(x), y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))  # forgot backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert opt.num_steps == 0 and not math.isnan(float(w[0].sum()))
