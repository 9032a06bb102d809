"""FusedSAM as frameworks and torch.optim users drive it: state shared with wrappers that
copy __dict__, torch's closure convention, argument types, first_step twice, step hooks,
checkpoints of other SAM classes, gradient accumulation in a plain loop."""

import numpy as np
import pytest
import torch

from fastsam import FusedSAM


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def _batch(seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _two_step(model, opt, x, y, steps):
    for _ in range(steps):
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)


class _Delegating:
    def __getattr__(self, item):
        return getattr(self._optimizer, item)


def _wrap(opt, style="copy"):
    """What Lightning's LightningOptimizer does: a dynamic subclass of the optimizer's class
    whose __dict__ is a copy of the optimizer's (Lightning < 2.x.y), or one that holds the
    optimizer and delegates missing attributes to it (lightning 2.6)."""
    if style == "copy":
        cls = type("Wrapped" + type(opt).__name__, (type(opt),), {})
        w = object.__new__(cls)
        w.__dict__ = {k: v for k, v in opt.__dict__.items() if k not in ("step", "__del__")}
        return w
    cls = type("Wrapped" + type(opt).__name__, (_Delegating, type(opt)), {})
    w = object.__new__(cls)
    w._optimizer = opt
    return w


# ------------------------------------------------------------------ wrapper-safe state
@pytest.mark.parametrize("style", ["copy", "delegate"])
def test_writes_through_a_wrapper_reach_the_optimizer(style):
    x, y = _batch()
    ref = _model()
    ref_opt = FusedSAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sam_start_step=2)
    _two_step(ref, ref_opt, x, y, 4)
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sam_start_step=2)
    w = _wrap(opt, style)
    _two_step(model, w, x, y, 4)
    assert opt.num_steps == w.num_steps == 4
    assert opt.state_dict()["fastsam"]["num_steps"] == 4
    assert opt.skip_flag is w.skip_flag is not None
    w.sam_active = False
    assert opt.sam_active is False
    w.num_steps = 7
    assert opt.num_steps == 7
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("style", ["copy", "delegate"])
def test_param_groups_stay_the_base_optimizers_after_load_through_a_wrapper(style):
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    w = _wrap(opt, style)
    sd = opt.state_dict()
    opt.load_state_dict(sd)  # torch's load_state_dict replaces base.param_groups with a new list
    assert w.param_groups is opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x, y = _batch()
    _two_step(model, w, x, y, 1)
    sched.step()
    assert w.param_groups[0]["lr"] == 0.05


# ------------------------------------------------------------------ closures
def _full_closure(model, opt, x, y, calls):
    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("convention", ["auto", "torch"])
def test_torch_closure_convention_runs_both_passes(convention):
    """optimizer.step(closure) with a whole forward+backward closure (LBFGS, Lightning
    automatic optimization): FusedSAM calls it at w and at w + e; equal to the two-step loop."""
    x, y = _batch()
    ref = _model()
    ref_opt = FusedSAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sam_start_step=1)
    _two_step(ref, ref_opt, x, y, 3)
    model = _model()
    opt = FusedSAM(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sam_start_step=1, closure_convention=convention
    )
    calls, losses = [], []
    for _ in range(3):
        losses.append(opt.step(_full_closure(model, opt, x, y, calls)))
    assert len(calls) == 1 + 2 + 2  # inactive step: one pass; SAM steps: two
    assert all(torch.is_tensor(v) for v in losses)  # the loss at w, also while inactive
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_sam_closure_contract_unchanged_and_inactive_returns_none():
    x, y = _batch()
    ref = _model()
    ref_opt = FusedSAM(ref.parameters(), torch.optim.SGD, lr=0.1, sam_start_step=1)
    _two_step(ref, ref_opt, x, y, 3)
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_start_step=1)
    calls, out = [], []
    for _ in range(3):
        _loss(model, x, y).backward()  # the caller's first pass
        out.append(opt.step(_full_closure(model, opt, x, y, calls)))
        opt.zero_grad()
    assert len(calls) == 2  # the second pass of the two SAM steps only
    assert out[0] is None and torch.is_tensor(out[1])
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_step_without_closure_finishes_a_first_step():
    x, y = _batch()
    ref = _model()
    _two_step(ref, FusedSAM(ref.parameters(), torch.optim.SGD, lr=0.1), x, y, 2)
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for _ in range(2):
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ arguments
def test_numpy_and_tensor_arguments_accepted():
    for rho in (np.float32(0.05), torch.tensor(0.05), np.float64(0.05), 1):
        opt = FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1, rho=rho, sam_start_step=np.int64(10))
        assert type(opt.param_groups[0]["rho"]) is float and opt.sam_start_step == 10
        assert type(opt.sam_start_step) is int
    opt = FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1, sam_start_step=torch.tensor(3))
    assert opt.sam_start_step == 3
    for bad in (np.float32(-1.0), torch.tensor([0.1, 0.2]), float("nan"), True, "0.05"):
        with pytest.raises(ValueError, match="rho"):
            FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1, rho=bad)
    for bad in (2.5, True, -1, torch.tensor(2.0), "3"):
        with pytest.raises(ValueError, match="sam_start_step"):
            FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1, sam_start_step=bad)
    with pytest.raises(ValueError, match="closure_convention"):
        FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1, closure_convention="lbfgs")


def test_explicit_backend_wins_over_env(monkeypatch):
    monkeypatch.setenv("FASTSAM_BACKEND", "cpp")
    opt = FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1, backend="foreach")
    assert opt.backend == "foreach"
    monkeypatch.setenv("FASTSAM_BACKEND", "foreach")
    assert FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1).backend == "foreach"


def test_first_step_twice_raises_and_keeps_w():
    x, y = _batch()
    model = _model()
    w = [p.detach().clone() for p in model.parameters()]
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    _loss(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    opt.undo_first_step()
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
    opt.first_step()  # allowed again after the undo
    opt.second_step()
    assert opt.num_steps == 1


@pytest.mark.parametrize("form", ["two_step", "closure", "inactive"])
def test_step_hooks_fire_once_per_step(form):
    x, y = _batch()
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_start_step=0 if form != "inactive" else 9)
    events = []
    opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", o.num_steps)))
    opt.register_step_post_hook(lambda o, a, k: events.append(("post", o.num_steps)))
    for _ in range(2):
        _loss(model, x, y).backward()
        if form == "closure":
            opt.step(lambda: _loss(model, x, y).backward())
        elif form == "inactive":
            opt.second_step()
        else:
            opt.first_step(zero_grad=True)
            _loss(model, x, y).backward()
            opt.second_step()
        opt.zero_grad()
    assert events == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]


# ------------------------------------------------------------------ checkpoints of other SAM classes
class _DavdaSAM(torch.optim.Optimizer):
    """The widely used SAM class (davda54/sam), as far as its state_dict goes."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(torch.stack([p.grad.norm(2) for g in self.param_groups for p in g["params"]]), 2)
        for g in self.param_groups:
            for p in g["params"]:
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * (g["rho"] / (norm + 1e-12)))

    @torch.no_grad()
    def second_step(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()


def test_legacy_sam_checkpoint_loads_with_a_warning():
    x, y = _batch()
    model = _model()
    old = _DavdaSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.07)
    for _ in range(2):
        _loss(model, x, y).backward()
        old.first_step()
        old.zero_grad()
        _loss(model, x, y).backward()
        old.second_step()
        old.zero_grad()
    sd = old.state_dict()
    assert set(sd) == {"state", "param_groups"}
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.3, momentum=0.9)
    with pytest.warns(UserWarning, match="lacks fastsam's step count.*does not save them"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["rho"] == 0.07 and opt.param_groups[0]["lr"] == 0.1
    assert not any("old_p" in st for st in opt.base_optimizer.state.values())
    _two_step(model, opt, x, y, 1)  # and it trains on


def test_plain_base_optimizer_checkpoint_keeps_momentum():
    x, y = _batch()
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _loss(model, x, y).backward()
    sgd.step()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.02)
    with pytest.warns(UserWarning, match="lacks fastsam's step count") as rec:
        opt.load_state_dict(sgd.state_dict())
    assert "does not save them" not in str(rec[0].message)
    assert opt.param_groups[0]["rho"] == 0.02  # the SAM options default to the constructor's
    buf = opt.base_optimizer.state[next(model.parameters())]["momentum_buffer"]
    assert torch.equal(buf, sgd.state[next(model.parameters())]["momentum_buffer"])


# ------------------------------------------------------------------ gradient accumulation (plain loop)
def test_gradient_accumulation_recipe_equals_the_full_batch():
    """Both passes accumulate over the micro-batches: first pass over all of them,
    first_step, second pass over all of them, second_step (README recipe)."""
    x, y = _batch(n=12)
    ref = _model()
    ref_opt = FusedSAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    _two_step(ref, ref_opt, x, y, 3)
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    micro = list(zip(x.split(4), y.split(4)))
    for _ in range(3):
        for xb, yb in micro:
            (_loss(model, xb, yb) / len(micro)).backward()
        opt.first_step(zero_grad=True)
        for xb, yb in micro:
            (_loss(model, xb, yb) / len(micro)).backward()
        opt.second_step(zero_grad=True)
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
