"""torch.optim's generic optimizer contract (the properties torch's test/test_optim.py checks
for its own optimizers, see torch/testing/_internal/common_optimizers.py), for FusedSAM and
every variant (LookSAM, GSAM, FriendlySAM, MomentumSAM), on every CPU backend where the
kernels are involved: the state dict's layout, round trips, hooks, param groups, zero_grad,
repr, steps without gradients, complex parameters, tensor lr, deepcopy and torch's
distributed-checkpoint helpers on a plain model.

Not here: mixed devices.  On the CPU there is nothing to refuse (torch itself refuses a gradient
on another device than its parameter); parameters on a CPU and a GPU in one optimizer are
tests/test_restore_contract.py's (GPU)."""

import copy
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from fastsam import FusedSAM

from .conftest import CPU_BACKENDS
from .contract_cases import BASE_KW, VARIANTS, build, clone_params, loss_at, make_params, same, saved, snapshot, step

SGD, ADAM, ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
TWO_STEP = [v for v in VARIANTS if v != "MomentumSAM"]  # MomentumSAM has one pass per step, no two-step form


def forms(name):
    return ["closure", "two_step"] if name in TWO_STEP else ["closure"]


def at_w(opt, params):
    """The parameters at w: MomentumSAM's weights sit at w~ between steps (its ``unperturbed()``)."""
    if hasattr(opt, "unperturbed"):
        with opt.unperturbed():
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


# ------------------------------------------------------------------ the state dict
@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_is_in_torchs_layout(name):
    params = make_params()
    opt = build(name, [{"params": params[:2]}, {"params": params[2:], "rho": 0.02, "lr": 0.05}])
    for t in range(3):
        step(opt, params, t)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "fastsam"}
    base = opt.base_optimizer.state_dict()
    same(sd["state"], base["state"])  # torch's own per-parameter state, keyed by int ids
    assert list(sd["state"]) == [0, 1, 2, 3] and all(type(k) is int for k in sd["state"])
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert [(g["rho"], g["adaptive"], g["lr"]) for g in sd["param_groups"]] == [(0.05, False, 0.1), (0.02, False, 0.05)]
    assert all(type(g["rho"]) is float and type(g["adaptive"]) is bool for g in sd["param_groups"])
    assert sd["param_groups"] == base["param_groups"]
    part = sd["fastsam"]
    assert part["class"] == name and part["num_steps"] == 3 and type(part["format"]) is int


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", [SGD, ADAMW])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_round_trip_is_bitwise(name, how, base, backend):
    """Save after 3 steps (weights_only load for torch.save), load into a fresh optimizer over equal
    (not identical) parameters: the next 3 steps are bitwise the same, the loaded dict is not
    modified, and both optimizers write equal state dicts (the sam_active override included)."""
    if how == "deepcopy" and backend != "foreach":
        pytest.skip("deepcopy and torch.save carry the same tensors: one backend suffices for deepcopy")
    params = make_params(dtype=torch.float32)
    opt = build(name, params, base, backend)
    opt.sam_active_override = True  # a switch the state dict carries (LookSAM: every step a full one)
    for t in range(3):
        step(opt, params, t)
    sd = opt.state_dict()
    given = copy.deepcopy(sd) if how == "deepcopy" else saved(sd)
    _, untouched = snapshot(opt, params)
    twin = clone_params(params)
    opt2 = build(name, twin, base, backend)
    opt2.load_state_dict(given)
    same(given, untouched)
    assert opt2.sam_active_override is True and opt2.num_steps == 3
    same(opt2.state_dict(), opt.state_dict())
    for t in range(3, 6):
        step(opt, params, t)
        step(opt2, twin, t)
        same(twin, params, f"params after step {t}")
    same(opt2.state_dict(), opt.state_dict())


@pytest.mark.parametrize("name", VARIANTS)
def test_named_parameters(name):
    """Named parameters, as torch's optimizers take them: the names in the param groups and the state
    dict; the state dict loads into an optimizer given the same parameters unnamed, which then steps
    bitwise as the original."""
    params = make_params()
    names = [f"p{i}" for i in range(len(params))]
    opt = build(name, list(zip(names, params)))
    for t in range(2):
        step(opt, params, t)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == names == opt.param_groups[0]["param_names"]
    twin = clone_params(params)
    opt2 = build(name, twin)
    opt2.load_state_dict(copy.deepcopy(sd))
    for t in range(2, 4):
        step(opt, params, t)
        step(opt2, twin, t)
    same([p.detach() for p in twin], [p.detach() for p in params], "params")


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_and_load_state_dict_hooks(name):
    """Pre/post hooks of state_dict and load_state_dict fire once each, in order (prepend honoured);
    a state-dict post hook's returned dict is what state_dict returns, a load pre hook's returned dict
    is what is loaded (and the caller's dict is left as it was)."""
    params = make_params()
    opt = build(name, params)
    step(opt, params)
    events = []
    opt.register_state_dict_pre_hook(lambda o: events.append("sd pre"))
    opt.register_state_dict_pre_hook(lambda o: events.append("sd pre first"), prepend=True)

    def sd_post(o, sd):
        events.append("sd post")
        return dict(sd, note="from the hook")

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert events == ["sd pre first", "sd pre", "sd post"] and sd["note"] == "from the hook"

    events.clear()
    sd = opt.state_dict()
    del sd["note"]
    events.clear()

    def load_pre(o, given):
        events.append("load pre")
        out = copy.deepcopy(given)
        out["param_groups"][0]["lr"] = 0.0123
        return out

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_pre_hook(lambda o, given: events.append("load pre first"), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: events.append(("load post", o.param_groups[0]["lr"])))
    opt.load_state_dict(sd)
    assert events == ["load pre first", "load pre", ("load post", 0.0123)]
    assert opt.param_groups[0]["lr"] == opt.base_optimizer.param_groups[0]["lr"] == 0.0123
    assert sd["param_groups"][0]["lr"] == 0.1


# ------------------------------------------------------------------ step hooks
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("form", ["closure", "two_step"])
def test_step_hooks_fire_once_per_step(name, form):
    """Global and per-optimizer step pre/post hooks, once per optimizer step in torch's order (global
    pre, own pre, own post, global post), around the whole step: num_steps is t in the pre hooks of
    step t and t + 1 in its post hooks.  LookSAM (k=2) alternates full and reuse steps."""
    if form not in forms(name):
        pytest.skip(f"{name} has no two-step form")
    params = make_params()
    opt = build(name, params)
    events = []
    opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", o.num_steps)))
    opt.register_step_post_hook(lambda o, a, k: events.append(("post", o.num_steps)))
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: events.append(("global pre", o.num_steps))),
        register_optimizer_step_post_hook(lambda o, a, k: events.append(("global post", o.num_steps))),
    ]
    try:
        for t in range(4):
            step(opt, params, t, form)
    finally:
        for h in handles:
            h.remove()
    expected = []
    for t in range(4):
        expected += [("global pre", t), ("pre", t), ("post", t + 1), ("global post", t + 1)]
    assert events == expected


# ------------------------------------------------------------------ param groups
@pytest.mark.parametrize("name", VARIANTS)
def test_param_groups_are_the_base_optimizers_and_schedulers_drive_them(name):
    """One list shared with the base optimizer: an LR scheduler attached to the SAM optimizer sets the lr
    the fused step reads (lr 0: the weights at w stay bitwise where they were)."""
    params = make_params(dtype=torch.float32)
    opt = build(name, params)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 2 else 0.0)
    for t in range(2):
        step(opt, params, t)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.0
    before = at_w(opt, params)
    step(opt, params, 2)
    same(at_w(opt, params), before, "weights at w after a step with lr 0")


@pytest.mark.parametrize("name", VARIANTS)
def test_steps_descend_with_a_scheduler(name):
    params = make_params()
    opt = build(name, params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    start = float(loss_at(params))
    for _ in range(20):
        step(opt, params)
        sched.step()
    assert float(loss_at(at_w(opt, params))) < start


@pytest.mark.parametrize("name", VARIANTS)
def test_add_param_group(name):
    """The new group gets the defaults (base optimizer's and SAM's), reaches the base optimizer and
    steps; a parameter twice in a group, or already in another group, is refused with a message and
    changes nothing."""
    params = make_params()
    opt = build(name, params[:2])
    opt.add_param_group({"params": [params[2]], "rho": 0.0})
    group = opt.param_groups[-1]
    assert opt.base_optimizer.param_groups[-1] is group
    assert (group["lr"], group["momentum"], group["rho"], group["adaptive"]) == (0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [params[3], params[3]]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [params[3], params[0]]})
    assert len(opt.param_groups) == 2
    opt.add_param_group({"params": params[3]})  # a bare tensor, as torch accepts it
    before = at_w(opt, params)
    for t in range(2):
        step(opt, params, t)
    after = at_w(opt, params)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", VARIANTS)
def test_empty_parameter_list_refused(name):
    for empty in ([], iter([])):
        with pytest.raises(ValueError, match="empty parameter list"):
            build(name, empty)


@pytest.mark.parametrize("name", VARIANTS)
def test_repr_names_the_class_and_the_settings(name):
    params = make_params()
    text = repr(build(name, [{"params": params[:2]}, {"params": params[2:], "rho": 0.02}]))
    assert text.startswith(f"{name} (") and "Parameter Group 1" in text
    assert "rho: 0.05" in text and "rho: 0.02" in text and "lr: 0.1" in text


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(name, set_to_none):
    params = make_params()
    opt = build(name, params)
    step(opt, params)
    loss_at(params).backward()
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert all(p.grad is None for p in params)
    else:
        assert all(p.grad is g and not g.any() for p, g in zip(params, grads))


# ------------------------------------------------------------------ steps without gradients
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_step_without_gradients_changes_nothing(name, backend):
    """After two steps, a step where no parameter has a gradient leaves the weights and the whole state
    (the base optimizer's, the variants' buffers, MomentumSAM's perturbation) bitwise as they were (the
    two-step form; MomentumSAM's step()); it counts as a step (num_steps, which LR schedulers and
    schedules follow).  ``step(closure)`` whose closure makes
    no gradient is refused (a SAM step needs one from each pass) and changes nothing at all."""
    params = make_params(dtype=torch.float32)
    opt = build(name, params, backend=backend)
    for t in range(2):
        step(opt, params, t)
    opt.zero_grad()
    weights, sd = snapshot(opt, params)
    if name == "MomentumSAM":
        opt.step()
    else:
        opt.first_step()
        opt.second_step()
    same([p.detach() for p in params], weights, "params")
    after = opt.state_dict()
    assert after["fastsam"]["num_steps"] == sd["fastsam"]["num_steps"] + 1
    for part in (after, sd):  # the step counters (LookSAM counts its full steps too)
        part["fastsam"]["num_steps"] = 0
        part["fastsam"]["variant"].pop("full_steps", None)
    same(after, sd)
    if name == "MomentumSAM":
        return
    weights, sd = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="left no gradient"):
        opt.step(lambda: torch.ones(()))
    same([p.detach() for p in params], weights, "params")
    same(opt.state_dict(), sd)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_parameters_without_gradient_are_untouched(name, backend):
    """Parameters that never get a gradient keep their values bitwise and get no state, while the
    others step (torch's optimizers skip them the same way)."""
    params = make_params(dtype=torch.float32)
    frozen = [params[1], params[2]]
    for p in frozen:
        p.requires_grad_(False)
    kept = [p.detach().clone() for p in frozen]
    opt = build(name, params, backend=backend)
    before = [p.detach().clone() for p in params]
    for t in range(4):
        step(opt, params, t)
    same([p.detach() for p in frozen], kept, "frozen params")
    assert all(len(opt.state.get(p, {})) == 0 for p in frozen)
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[3], before[3])


# ------------------------------------------------------------------ complex parameters
def _complex_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 3, generator=g, dtype=torch.complex64).requires_grad_(),
        torch.randn(5, generator=g, dtype=torch.float32).requires_grad_(),
        torch.randn((), generator=g, dtype=torch.complex64).requires_grad_(),
    ]


def _as_real(params):
    return [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", [SGD, ADAM])
@pytest.mark.parametrize("name", VARIANTS)
def test_complex_parameters_step_as_their_real_views(name, base, backend):
    """The same optimizer on complex parameters and on real parameters holding their view_as_real
    (as torch's optimizers treat complex parameters): bitwise the same weights and state."""
    cplx = _complex_params()
    real = _as_real(cplx)
    a, b = build(name, cplx, base, backend), build(name, real, base, backend)
    for t in range(4):
        step(a, cplx, t)
        step(b, real, t)
    same(_as_real(cplx), [p.detach() for p in real], "weights")
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    same({i: {k: torch.view_as_real(v) if v.is_complex() else v for k, v in s.items()} for i, s in sa.items()}, sb)


# rho = 0 makes every variant its base optimizer: the perturbation is zero, so g_s = g.  LookSAM runs
# with alpha = 0 (with rho = 0 its g_v is rounding noise, which the reuse step normalises) and GSAM
# with a tiny perturb_eps (its d carries a relative alpha * eps / ||g|| otherwise, ~2000 ulps in float64).
# The gap, max |diff| over a tensor in ulps of its scale (_ulps), 4 steps: over 5 seeds on
# foreach/triton/cpp at most 5.3 (SGD, float64: the fused kernels order the momentum products
# differently; Adam/AdamW at most 0.9), GSAM at most 16.1 (its d = (1 - alpha c) g_s - alpha g, with
# c = -1 up to rounding, is g to a few ulps, which SGD's momentum carries); over 191 seeds on
# foreach/cpp, every variant, base and dtype, at most 4.7, GSAM 5.0.  Bounds about 4x the first.
RHO0_ULPS = {"GSAM": 64}
RHO0_DEFAULT_ULPS = 24
RHO0_OPTIONS = {"LookSAM": dict(alpha=0.0), "GSAM": dict(perturb_eps=1e-30)}


def _ulps(a, b, start):
    """max |a - b| in units of the last place of the tensor's scale (real views): the largest
    element of ``b``, of the weights it started from (``start``) or of how far it moved.  A weight
    that ends near 0 by cancelling carries the rounding of the terms that cancelled, which its own
    last place would magnify (a 0-d weight ending at 0.012 from a start near 1 read ~100 ulps)."""
    return _relative(a, b, start) / torch.finfo(a.dtype).eps


def _relative(a, b, start):
    """max |a - b| relative to the tensor's scale (_ulps), real views."""
    a, b, start = [torch.view_as_real(t) if t.is_complex() else t for t in (a, b, start)]
    if not a.numel():
        return 0.0
    scale = torch.stack([b.abs().max(), start.abs().max(), (b - start).abs().max()]).max()
    return float((a - b).abs().max() / scale.clamp_min(1e-30))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("base", [SGD, ADAM, ADAMW])
@pytest.mark.parametrize("name", VARIANTS)
def test_rho_zero_is_torchs_own_optimizer(name, base, dtype, backend, seed):
    if dtype.is_complex:
        params = _complex_params(seed)
    else:
        params = make_params(seed, dtype)
    twin, start = clone_params(params), [p.detach().clone() for p in params]
    opt = build(name, params, base, backend, rho=0.0, **RHO0_OPTIONS.get(name, {}))
    ref = base(twin, foreach=False, **BASE_KW[base])
    for t in range(4):
        step(opt, params, t)
        ref.zero_grad()
        loss_at(twin, t).backward()
        ref.step()
    worst = max(_ulps(p.detach(), q.detach(), s) for p, q, s in zip(at_w(opt, params), twin, start))
    assert worst <= RHO0_ULPS.get(name, RHO0_DEFAULT_ULPS), f"{worst} ulps"


# ------------------------------------------------------------------ tensor lr
def _lr_start(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in [(5, 3), (7,), ()]]


def _lr_run(make, dtype, lr, seed, steps=4):
    params = [p.requires_grad_() for p in _lr_start(dtype, seed)]
    opt = make(params, lr)
    for t in range(steps):
        opt.zero_grad()
        loss_at(params, t).backward()
        if isinstance(opt, FusedSAM):
            opt.first_step()
            opt.zero_grad()
            loss_at(params, t).backward()
            opt.second_step()
        else:
            opt.step()
    return [p.detach() for p in params]


TENSOR_LR_BASES = {
    "sgd": (SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    "adam": (ADAM, dict(weight_decay=0.1)),
    "adamw": (ADAMW, dict(weight_decay=0.1)),
}
# FusedSAM (rho = 0) with a 0-d tensor lr against torch's optimizer with the same tensor lr, 4 steps:
# max |diff| in ulps of the tensor's scale (_ulps), measured over 10 seeds on foreach/triton/cpp,
# float32 and float64, at most 1.7 (the fused kernels order some products differently), over 151 seeds
# on foreach/cpp at most 2.6; the bound is 8.
TENSOR_LR_ULPS = 8


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", TENSOR_LR_BASES)
def test_tensor_lr_gives_torchs_results(which, dtype, lr_dtype, backend, seed):
    """A 0-d tensor lr gives torch's results for SGD, Adam and AdamW.

    The one place they differ, measured: float64 parameters with a float32 tensor lr under Adam and
    AdamW.  torch's single-tensor Adam forms ``lr / bias_correction1`` and AdamW's ``1 - lr * weight_decay``
    as 0-d tensors of the lr's dtype, i.e. rounded to float32 (relative error up to 2^-24 each step);
    FusedSAM forms them in float64 from the lr's value, which is what torch itself computes for the
    float lr ``float(lr)``.  There the test checks equality with torch at ``lr=float(lr)`` and that the
    gap to torch's tensor-lr result stays within that float32 rounding, relative to each tensor's scale
    (_ulps; relative to each element, a weight near 0 read 9.8e-7 for seed 364411953).  Measured over
    151 seeds on foreach and cpp: at most 5.2e-8 after 4 steps with AdamW, 2.1e-9 with Adam (and at
    most 2.6 ulps where the results should agree); the bound is 2 roundings a step.
    """
    base, kw = TENSOR_LR_BASES[which]
    lr = torch.tensor(0.01, dtype=lr_dtype)
    fused = _lr_run(lambda ps, lr: FusedSAM(ps, base, rho=0.0, backend=backend, lr=lr, **kw), dtype, lr.clone(), seed)
    theirs = _lr_run(lambda ps, lr: base(ps, lr=lr, foreach=False, **kw), dtype, lr.clone(), seed)
    rounded_by_torch = base is not SGD and dtype == torch.float64 and lr_dtype == torch.float32
    start = _lr_start(dtype, seed)
    if not rounded_by_torch:
        worst = max(_ulps(a, b, s) for a, b, s in zip(fused, theirs, start))
        assert worst <= TENSOR_LR_ULPS, f"{worst} ulps from torch's tensor-lr result"
        return
    as_float = _lr_run(lambda ps, lr: base(ps, lr=lr, foreach=False, **kw), dtype, float(lr), seed)
    worst = max(_ulps(a, b, s) for a, b, s in zip(fused, as_float, start))
    assert worst <= TENSOR_LR_ULPS, f"{worst} ulps from torch's result at lr=float(lr)"
    gap = max(_relative(a, b, s) for a, b, s in zip(fused, theirs, start))
    assert gap <= 4 * 2 * 2.0**-24, gap  # 4 steps, two float32 roundings each, of the tensor's scale


# ------------------------------------------------------------------ copies
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", VARIANTS)
def test_copy_keeps_a_working_optimizer(name, how, backend):
    """deepcopy (and torch.save/torch.load, weights_only=False) of the parameters with their optimizer
    after 3 steps: the copy continues bitwise as the original, on its own parameters.  MomentumSAM's
    copy sits at the same w~ and finishes its step from the same w.  (The closure convention is
    explicit here; "auto" after a deepcopy: test_deepcopy_keeps_the_closure_convention.)"""
    params = make_params(dtype=torch.float32)
    opt = build(name, params, backend=backend, **({} if name == "MomentumSAM" else dict(closure_convention="torch")))
    for t in range(3):
        step(opt, params, t)
    twin, opt2 = copy.deepcopy((params, opt)) if how == "deepcopy" else saved((params, opt), weights_only=False)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert all(a is b for a, b in zip(opt2.param_groups[0]["params"], twin))
    same(opt2.state_dict(), opt.state_dict())
    for t in range(3, 6):
        step(opt, params, t)
        step(opt2, twin, t)
        same([p.detach() for p in twin], [p.detach() for p in params], f"params after step {t}")
    same(opt2.state_dict(), opt.state_dict())


def test_deepcopy_keeps_the_closure_convention():
    """closure_convention='auto' tells the conventions apart by the gradients the last step ended with
    (weak references, not copied): the copy marks its own copies of them, so its first step(closure)
    is a whole SAM step, not one that takes the copied SAM gradient for its first pass."""
    params = make_params(dtype=torch.float32)
    opt = build("FusedSAM", params)
    for t in range(3):
        step(opt, params, t)
    twin, opt2 = copy.deepcopy((params, opt))
    step(opt, params, 3)
    step(opt2, twin, 3)
    same([p.detach() for p in twin], [p.detach() for p in params])


# ------------------------------------------------------------------ torch.distributed.checkpoint
def _dcp():
    from torch.distributed.checkpoint import state_dict as dcp

    return dcp


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _train(net, opt, steps=3):
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)


def test_distributed_checkpoint_helpers_on_a_plain_model():
    """get_optimizer_state_dict/set_optimizer_state_dict need no process group on a plain model (one
    process): the state comes out keyed by parameter names with rho/adaptive in the param groups, and
    loads back into an optimizer whose state exists, as torch's optimizers do."""
    dcp = _dcp()
    assert not torch.distributed.is_initialized()
    net = _net()
    opt = FusedSAM(net.parameters(), ADAM, lr=1e-2, rho=0.1)
    _train(net, opt)
    osd = dcp.get_optimizer_state_dict(net, opt)
    names = [n for n, _ in net.named_parameters()]
    assert list(osd["state"]) == names and osd["param_groups"][0]["params"] == names
    assert (osd["param_groups"][0]["rho"], osd["param_groups"][0]["adaptive"]) == (0.1, False)
    other = _net(1)
    opt2 = FusedSAM(other.parameters(), ADAM, lr=5e-2, rho=0.2)
    _train(other, opt2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the layout without fastsam's entry
        dcp.set_optimizer_state_dict(other, opt2, osd)
    same(opt2.state_dict()["state"], opt.state_dict()["state"])
    assert opt2.param_groups[0]["rho"] == 0.1 and opt2.param_groups[0]["lr"] == 1e-2


def test_distributed_checkpoint_on_an_optimizer_without_state():
    """get_optimizer_state_dict of an optimizer that keeps no state (SGD without momentum, after
    zero_grad), and set_optimizer_state_dict into a fresh one (resuming): torch's helper creates the
    state with step() on zero gradients at lr 0, a whole SAM step since e = 0."""
    dcp = _dcp()
    net = _net()
    opt = FusedSAM(net.parameters(), SGD, lr=0.1)
    _train(net, opt)
    opt.zero_grad()
    try:
        dcp.get_optimizer_state_dict(net, opt)
    finally:
        assert opt.param_groups[0]["lr"] == 0.1
    net = _net()
    opt = FusedSAM(net.parameters(), ADAM, lr=1e-2)
    _train(net, opt)
    osd = dcp.get_optimizer_state_dict(net, opt)
    fresh = _net(1)
    opt2 = FusedSAM(fresh.parameters(), ADAM, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.set_optimizer_state_dict(fresh, opt2, osd)
    same(opt2.state_dict()["state"], opt.state_dict()["state"])


def test_distributed_checkpoint_round_trip_with_fastsams_entry_beside_it():
    """torch's distributed checkpoint keeps only 'state' and 'param_groups' (a load of that alone warns
    that the step count and settings are missing); fastsam's entry travels beside it and loads after
    (the recipe in the docs)."""
    dcp = _dcp()
    net = _net()
    opt = FusedSAM(net.parameters(), ADAM, lr=1e-2, sam_start_step=5)
    _train(net, opt)
    osd, part = dcp.get_optimizer_state_dict(net, opt), opt.state_dict()["fastsam"]
    other = _net(1)
    opt2 = FusedSAM(other.parameters(), ADAM, lr=1e-2, sam_start_step=5)
    _train(other, opt2, 1)
    with pytest.warns(UserWarning, match="lacks fastsam's step count"):
        dcp.set_optimizer_state_dict(other, opt2, osd)
    assert opt2.num_steps == 1
    opt2.load_state_dict({**opt2.state_dict(), "fastsam": part})
    assert opt2.num_steps == opt.num_steps == 3
    same(opt2.state_dict(), opt.state_dict())
