"""FusedSAM behaviour: skipping, late phase, closure, state_dict, schedulers, BN, AMP, bad input."""

import copy
import io

import pytest
import torch

from fastsam import FusedSAM, frozen_bn_stats
from fastsam.backends import BackendUnavailable
from fastsam.backends._common import check_bucket

from .conftest import CPU_BACKENDS
from .reference import ReferenceSAM


def _mlp(dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.Linear(11, 9, dtype=dtype), torch.nn.GELU(), torch.nn.Linear(9, 2, dtype=dtype))


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _data(dtype=torch.float32, n=12):
    return torch.randn(n, 11, dtype=dtype), torch.randn(n, 2, dtype=dtype)


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        i: {k: v.clone() for k, v in opt.base_optimizer.state[p].items() if torch.is_tensor(v)}
        for i, p in enumerate(model.parameters())
    }
    return params, state


def _assert_bitwise_same(model, opt, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q), "parameters changed"
    for i, p in enumerate(model.parameters()):
        for k, v in state[i].items():
            assert torch.equal(opt.base_optimizer.state[p][k], v), f"optimizer state {k} changed"


def _take_steps(opt, model, x, y, n):
    for _ in range(n):
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)


# --------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "base_cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (torch.optim.AdamW, dict(lr=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-2)),
    ],
)
@pytest.mark.parametrize("which", ["first", "second"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_skips_step(backend, base_cls, kw, which, bad, seed):
    model = _mlp()
    opt = FusedSAM(model.parameters(), base_cls, rho=0.05, backend=backend, **kw)
    x, y = _data()
    _take_steps(opt, model, x, y, 2)  # the state exists, so it must survive the skip too
    snap = _snapshot(model, opt)
    _loss(model, x, y).backward()
    if which == "first":
        model[0].weight.grad[3, 4] = bad
    opt.first_step(zero_grad=True)
    if which == "first":
        for p, q in zip(model.parameters(), snap[0]):
            assert torch.equal(p, q), "a non-finite first gradient must not perturb"
    _loss(model, x, y).backward()
    if which == "second":
        model[2].bias.grad[1] = bad
    opt.second_step(zero_grad=True)
    _assert_bitwise_same(model, opt, snap)
    assert opt.last_step_skipped and float(opt.found_inf) == 1.0
    _take_steps(opt, model, x, y, 1)  # and training goes on
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_on_first_ever_step_leaves_no_momentum(backend):
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.5, backend=backend)
    ref_model = copy.deepcopy(model)
    ref = ReferenceSAM(ref_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.5)
    x, y = _data()
    for m, o in ((model, opt), (ref_model, ref)):
        _loss(m, x, y).backward()
        m[0].weight.grad[0, 0] = float("nan")
        o.first_step(zero_grad=True)
        _loss(m, x, y).backward()
        o.second_step(zero_grad=True)
        _take_steps(o, m, x, y, 3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_nan(backend, adaptive):
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=adaptive, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.first_step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    opt.second_step()
    assert not opt.last_step_skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # zero gradient: SGD moves nothing


# --------------------------------------------------------------------------- late phase
def test_late_phase_is_plain_sgd_then_sam_with_momentum_carried_over(seed):
    model = _mlp(torch.float64)
    plain = copy.deepcopy(model)
    sam_model = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, sam_start_step=4, **kw)
    sgd = torch.optim.SGD(plain.parameters(), **kw)
    x, y = _data(torch.float64)
    calls = []

    def closure():
        calls.append(1)
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    for step in range(4):
        assert not opt.sam_active
        _loss(model, x, y).backward()
        assert opt.step(closure) is None
        opt.zero_grad()
        _loss(plain, x, y).backward()
        sgd.step()
        sgd.zero_grad()
        for p, q in zip(model.parameters(), plain.parameters()):
            # the fused SGD update (FMA or not, per backend), not torch's kernels: equal to rounding
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15, msg=f"inactive step {step} is not the base step")
    assert calls == []  # the closure is never called while inactive
    assert opt.sam_active
    # from here on: SAM, continuing from the SGD momentum buffers (not fresh ones)
    ref = ReferenceSAM(sam_model.parameters(), torch.optim.SGD, rho=0.1, **kw)
    with torch.no_grad():
        for p, q in zip(sam_model.parameters(), model.parameters()):
            p.copy_(q)
    for p, q in zip(sam_model.parameters(), model.parameters()):
        ref.base.state[p]["momentum_buffer"] = opt.base_optimizer.state[q]["momentum_buffer"].clone()
    for _ in range(3):
        loss = _loss(model, x, y)
        loss.backward()
        opt.step(closure)
        opt.zero_grad()
        _loss(sam_model, x, y).backward()
        ref.first_step(zero_grad=True)
        _loss(sam_model, x, y).backward()
        ref.second_step(zero_grad=True)
    assert len(calls) == 3
    for p, q in zip(model.parameters(), sam_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_sam_active_setter_overrides_schedule():
    opt = FusedSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, sam_start_step=100)
    assert not opt.sam_active
    opt.sam_active = True
    assert opt.sam_active
    opt.sam_active = None  # back to the schedule
    assert not opt.sam_active


def test_two_step_loop_while_inactive_is_base_step():
    model = _mlp(torch.float64)
    plain = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.Adam, lr=1e-2, sam_start_step=10)
    adam = torch.optim.Adam(plain.parameters(), lr=1e-2)
    x, y = _data(torch.float64)
    for _ in range(3):
        _take_steps(opt, model, x, y, 1)
        _loss(plain, x, y).backward()
        adam.step()
        adam.zero_grad()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- closure API
def test_step_with_closure_equals_two_step_loop():
    model = _mlp(torch.float64)
    other = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, **kw)
    opt2 = FusedSAM(other.parameters(), torch.optim.SGD, **kw)
    x, y = _data(torch.float64)
    for _ in range(3):
        loss = _loss(model, x, y)
        loss.backward()
        second = opt.step(lambda: _loss(model, x, y).backward() or _loss(model, x, y))
        assert torch.is_tensor(second)
        opt.zero_grad()
        _take_steps(opt2, other, x, y, 1)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_step_without_closure_while_active_raises():
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    model(torch.randn(4, model[0].in_features)).sum().backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_step_without_closure_on_zero_gradients_is_a_whole_sam_step():
    """e = 0 on a zero gradient, so no second pass is needed: the step is SAM's and SGD's alike."""
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.num_steps == 1 and all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_second_step_without_first_step_raises():
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    _loss(model, *_data()).backward()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


# --------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "base_cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),
    ],
)
def test_state_dict_resume_is_bitwise(backend, base_cls, kw):
    torch.manual_seed(0)
    model = _mlp()
    init = copy.deepcopy(model)
    x, y = _data()
    mk = lambda m: FusedSAM(
        m.parameters(), base_cls, rho=0.05, backend=backend, sam_start_step=3, max_grad_norm=1.0, **kw
    )
    opt = mk(model)
    _take_steps(opt, model, x, y, 20)

    resumed = copy.deepcopy(init)
    opt_a = mk(resumed)
    _take_steps(opt_a, resumed, x, y, 10)
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = _mlp()
    fresh.load_state_dict(ckpt["model"])
    opt_b = FusedSAM(fresh.parameters(), base_cls, rho=0.05, backend=backend, **kw)
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.num_steps == 10 and opt_b.sam_start_step == 3 and opt_b.max_grad_norm == 1.0
    _take_steps(opt_b, fresh, x, y, 10)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_with_other_layout_raises():
    a = FusedSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    b = FusedSAM(torch.nn.Linear(3, 3).parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="layout"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a state dict of this optimizer"):
        b.load_state_dict({"params": [], "momentum": 0.9})
    # a plain optimizer state dict (another SAM class's, a base optimizer's) loads, with a warning
    # (tests/test_integrations_optim.py tests the migration)
    with pytest.warns(UserWarning, match="lacks fastsam's step count"):
        b.load_state_dict(torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1).state_dict())


# --------------------------------------------------------------------------- ecosystem
def test_lr_scheduler_drives_base_optimizer(recwarn):
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    for _ in range(3):
        _take_steps(opt, model, x, y, 1)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_add_param_group_reaches_base_optimizer():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    opt = FusedSAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.add_param_group({"params": b.parameters(), "rho": 0.2})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["adaptive"] is False


class _BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.bn_cumulative = torch.nn.BatchNorm2d(4, momentum=None)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn_cumulative(self.bn(self.conv(x))).relu()
        return self.fc(h.mean((2, 3)))


def test_frozen_bn_stats_keeps_first_pass_statistics():
    model = _BNNet().train()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 3, 7, 7), torch.randn(6, 2)
    _loss(model, x, y).backward()
    after_first = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        out = model(x)
        _loss(model, x, y).backward()
    opt.second_step(zero_grad=True)
    for k, v in after_first.items():
        assert torch.equal(model.state_dict()[k], v), f"{k} changed in the second pass"
    assert model.bn.track_running_stats and model.bn_cumulative.track_running_stats
    # inside the context the perturbed pass still normalises with batch statistics (train mode)
    model.eval()
    assert not torch.allclose(model(x), out)
    # and outside it the statistics update again
    model.train()
    model(x)
    assert not torch.equal(model.bn.running_mean, after_first["bn.running_mean"])


def test_bf16_autocast_runs_unchanged():
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref = ReferenceSAM(ref_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = _data()
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _loss(m, x, y).backward()
            o.first_step(zero_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _loss(m, x, y).backward()
            o.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _fp16_loss(model, x, y):
    with torch.autocast("cpu", dtype=torch.float16):
        return _loss(model, x, y)


def test_grad_scaler_recipe():
    """fp16 recipe (autocast fp16 + GradScaler): first_step on scaled gradients, unscale_
    before second_step, update after; equal to SAM on the unscaled fp16-autocast losses."""
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref = ReferenceSAM(ref_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _data()

    def scaled_step(inject_inf=False):
        scaler.scale(_fp16_loss(model, x, y)).backward()
        if inject_inf:
            model[0].bias.grad[0] = float("inf")
        opt.first_step(zero_grad=True)  # the direction g/||g|| does not depend on the scale
        scaler.scale(_fp16_loss(model, x, y)).backward()
        scaler.unscale_(opt)
        opt.second_step(zero_grad=True)
        scaler.update()

    for _ in range(2):
        scaled_step()
        for _ in range(2):  # the same two passes, unscaled
            _fp16_loss(ref_model, x, y).backward()
            (ref.first_step if _ == 0 else ref.second_step)(zero_grad=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    scale_before = scaler.get_scale()
    scaled_step(inject_inf=True)
    assert opt.last_step_skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    # the second pass was finite, so the scaler saw no inf; the skip is FusedSAM's own
    assert scaler.get_scale() == scale_before


# --------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments_name_the_problem():
    params = list(_mlp().parameters())
    with pytest.raises(ValueError, match="rho"):
        FusedSAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        FusedSAM([{"params": params, "rho": float("nan")}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        FusedSAM(params, torch.optim.SGD(params, lr=0.1), lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        FusedSAM(params, torch.nn.Linear, lr=0.1)
    with pytest.raises(ValueError, match="backend"):
        FusedSAM(params, torch.optim.SGD, lr=0.1, backend="gpu")
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedSAM(params, torch.optim.SGD, lr=0.1, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="perturbation"):
        FusedSAM(params, torch.optim.SGD, lr=0.1, perturbation="sync")
    with pytest.raises(ValueError, match="sam_start_step"):
        FusedSAM(params, torch.optim.SGD, lr=0.1, sam_start_step=-1)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("FASTSAM_BACKEND", raising=False)
    with pytest.raises(BackendUnavailable, match="cuda"):
        FusedSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, backend="cuda")


def test_env_var_overrides_backend(monkeypatch):
    monkeypatch.setenv("FASTSAM_BACKEND", "foreach")
    opt = FusedSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, backend="auto")
    assert opt.backend == "foreach"


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = FusedSAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="param group 0, parameter 0: has a torch.sparse_coo gradient"):
        opt.first_step()


def test_mixed_devices_in_one_fused_call_raise():
    a = torch.randn(3)
    b = torch.randn(3, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        check_bucket([a, b])
    with pytest.raises(ValueError, match="dtypes"):
        check_bucket([a, a.double()])
    with pytest.raises(ValueError, match="lengths"):
        check_bucket([a, a], [a])


# --------------------------------------------------------------------------- gradient pattern changes
class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 3, dtype=torch.float64)
        self.b = torch.nn.Linear(5, 3, dtype=torch.float64)

    def forward(self, x, use_b):
        return self.a(x) + (self.b(x) if use_b else 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("first_uses_b,second_uses_b", [(True, False), (False, True)])
@pytest.mark.parametrize(
    "base_cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (torch.optim.Adam, dict(lr=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-2)),
    ],
)
def test_parameters_with_a_gradient_in_only_one_pass(backend, first_uses_b, second_uses_b, base_cls, kw):
    """Perturbed but no second gradient: restored, not stepped. Second gradient only: stepped unperturbed."""
    model = _TwoHeads()
    ref_model = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), base_cls, rho=0.2, backend=backend, **kw)
    ref = ReferenceSAM(ref_model.parameters(), base_cls, rho=0.2, **kw)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(3):
            torch.nn.functional.mse_loss(m(x, first_uses_b), y).backward()
            o.first_step(zero_grad=True)
            torch.nn.functional.mse_loss(m(x, second_uses_b), y).backward()
            o.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    if not second_uses_b:
        assert torch.equal(model.b.weight, ref_model.b.weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_of_a_training_step_matches_eager(backend):
    """A compiled step graph-breaks around first_step/second_step and gives eager's result."""
    torch.manual_seed(0)
    model = _mlp()
    eager_model = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, backend=backend, **kw)
    eager_opt = FusedSAM(eager_model.parameters(), torch.optim.SGD, backend=backend, **kw)
    x, y = _data()

    def step(m, o):
        _loss(m, x, y).backward()
        o.first_step(zero_grad=True)
        _loss(m, x, y).backward()
        o.second_step(zero_grad=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    for _ in range(3):
        compiled(model, opt)
        step(eager_model, eager_opt)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- review findings
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "base_cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (torch.optim.Adam, dict(lr=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-2)),
    ],
)
def test_inactive_step_skips_nonfinite_gradients_and_reports_each_step(backend, base_cls, kw):
    model = _mlp()
    opt = FusedSAM(model.parameters(), base_cls, backend=backend, sam_start_step=100, **kw)
    x, y = _data()
    _take_steps(opt, model, x, y, 2)
    assert not opt.last_step_skipped
    snap = _snapshot(model, opt)
    _loss(model, x, y).backward()
    model[0].weight.grad[1, 1] = float("inf")
    opt.step(lambda: pytest.fail("closure called while inactive"))
    _assert_bitwise_same(model, opt, snap)
    assert opt.last_step_skipped
    opt.zero_grad()
    _take_steps(opt, model, x, y, 1)
    assert not opt.last_step_skipped  # the flag describes the last step, not an earlier one


def test_replaced_parameter_is_stepped():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = FusedSAM([a], torch.optim.SGD, lr=0.1)
    for step in range(2):
        p = opt.param_groups[0]["params"][0]
        p.grad = torch.ones(4)
        before = p.detach().clone()
        opt.first_step()
        opt.second_step(zero_grad=True)
        assert not torch.equal(p, before), f"step {step}: the parameter in param_groups was not stepped"
        opt.param_groups[0]["params"][0] = b


def test_parameters_cast_and_moved_to_channels_last_after_construction():
    model = torch.nn.Conv2d(3, 5, 3)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 6, 6)
    for prep in (lambda m: m, lambda m: m.double(), lambda m: m.to(memory_format=torch.channels_last)):
        prep(model)
        xx = x.to(model.weight.dtype)
        model(xx).square().mean().backward()
        opt.first_step(zero_grad=True)
        model(xx).square().mean().backward()
        opt.second_step(zero_grad=True)
        assert torch.isfinite(model.weight).all()


def test_deepcopy_and_pickle_keep_a_working_optimizer():
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sam_start_step=1)
    x, y = _data()
    _take_steps(opt, model, x, y, 2)
    for clone in (copy.deepcopy(opt), torch.load(_saved(opt), weights_only=False)):
        assert clone.num_steps == 2 and clone.sam_start_step == 1
        assert clone.param_groups is clone.base_optimizer.param_groups
        params = [p for g in clone.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p)
        clone.first_step()
        clone.second_step()


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_16bit_perturbation_of_loss_scaled_gradients_matches_fp32(backend, adaptive, seed):
    """rho/||g|| of loss-scaled gradients (~1e-8) is below fp16's range: the scale must stay fp32."""
    w = torch.randn(10_000) * (3 if adaptive else 1)
    g = torch.randn(10_000) * 2.0**12
    rho = 0.5 if adaptive else 0.05
    p16 = torch.nn.Parameter(w.half())
    p16.grad = g.half()
    FusedSAM([p16], torch.optim.SGD, lr=0.1, rho=rho, adaptive=adaptive, backend=backend).first_step()
    w16 = w.half().float()
    t = w16.abs() * g.half().float() if adaptive else g.half().float()
    e = rho * (w16**2 if adaptive else 1) * g.half().float() / t.norm()
    expected = (w16 + e).half()
    moved = (p16.detach() != w.half()).float().mean().item()
    assert moved > 0.3, f"seed {seed}: only {moved:.1%} of the elements moved"
    assert (p16.detach().float() - expected.float()).abs().max() <= 2 * (expected.float().abs().max() * 2**-10)


def test_auto_never_starts_a_compile(tmp_path):
    """backend='auto' uses only a prebuilt or cached extension (a fresh cache: foreach)."""
    import subprocess
    import sys

    code = (
        "import torch, fastsam; from fastsam import _build;"
        "_build._prebuilt_path = lambda: None;"
        "opt = fastsam.FusedSAM([torch.nn.Parameter(torch.randn(2))], torch.optim.SGD, lr=0.1);"
        "print(opt.backend, _build.load(build=False)[0])"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "FASTSAM_BACKEND"}
    env["FASTSAM_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["foreach", "False"], out.stdout + out.stderr
    assert not any(tmp_path.iterdir()), "a build was started"


def test_load_state_dict_between_the_two_steps_undoes_the_perturbation():
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = _data()
    _take_steps(opt, model, x, y, 1)
    sd = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.load_state_dict(sd)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
