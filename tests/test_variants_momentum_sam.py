"""MomentumSAM against a per-parameter float64 reference (MarlonBecker/MSAM optimizer/msam.py, adamW_msam.py),
on every CPU backend: SGD (momentum, nesterov, dampening, weight decay), Adam and AdamW, two param groups
with their own rho, odd shapes, 12 steps, clipping, resume bitwise, non-finite skip bitwise."""

import math

import pytest
import torch

from fastsam import MomentumSAM
from fastsam.schedules import LatePhase

from .conftest import CPU_BACKENDS
from .test_variants_common import close, grads_at, loss_at, make_params, roundtrip

SGD, ADAM, ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
BASES = [SGD, ADAMW]
CONFIGS = {  # name -> (base, kwargs)
    "sgd": (SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov": (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd-dampening": (SGD, dict(lr=0.1, momentum=0.8, dampening=0.2)),
    "adam": (ADAM, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (ADAMW, dict(lr=1e-2, weight_decay=1e-2)),
}
# float32 on the backends themselves (triton runs float32 only; float64 falls back to foreach there):
# the gap to the float64 reference after 12 steps, measured at most 4.4e-6 absolute (sgd-nesterov; 1.2e-6 sgd,
# 0.9e-6 adamw), the same on foreach, triton and cpp to 1e-7: float32 rounding; 2e-5 leaves a 4x margin.
F32_TOL = 2e-5


def kwargs_of(name):
    return CONFIGS[name][1]


def _groups(params, base):
    lr2 = 0.05 if base is SGD else 3e-3
    return [{"params": params[:3]}, {"params": params[3:], "lr": lr2, "rho": 0.08}]


class RefMSAM:
    """Per parameter, float64, torch's single-tensor base optimizer; w (unperturbed) kept.  The gradient
    of step t is taken at w - rho_group * v / (||v|| + 1e-12), v = momentum_buffer (SGD) / exp_avg (Adam);
    clipped to max_grad_norm (coefficient min(max / (||g|| + 1e-6), 1)) before the base step."""

    def __init__(self, params, base, rho=0.05, max_grad_norm=None, **kw):
        self.params = [p.detach().double().clone() for p in params]
        gs = _groups(self.params, base)
        for g in gs:
            g.setdefault("rho", rho)
        self.base = base(gs, foreach=False, **kw)
        self.key = "momentum_buffer" if base is SGD else "exp_avg"
        self.max_grad_norm = max_grad_norm

    def point(self):
        vs = [self.base.state.get(p, {}).get(self.key) for p in self.params]
        if vs[0] is None:
            return [p.clone() for p in self.params]
        n = math.sqrt(sum(float((v * v).sum()) for v in vs))
        rhos = [g["rho"] for g in self.base.param_groups for _ in g["params"]]
        return [p - r * v / (n + 1e-12) for p, r, v in zip(self.params, rhos, vs)]

    def step(self, t):
        gs = grads_at(self.point(), t)
        if self.max_grad_norm is not None:
            n = math.sqrt(sum(float((g * g).sum()) for g in gs))
            c = min(self.max_grad_norm / (n + 1e-6), 1.0)
            gs = [g * c for g in gs]
        for p, g in zip(self.params, gs):
            p.grad = g
        self.base.step()


def drive(opt, params, ts, poison=None):
    """One opt.step() per t in ``ts`` (an int n means range(n)); ``poison``: {t: factor}."""
    poison = poison or {}
    for t in range(ts) if isinstance(ts, int) else ts:
        loss_at(params, t, poison.get(t)).backward()
        opt.step()
        opt.zero_grad()


def make(params, name, backend, **kw):
    base, bkw = CONFIGS[name]
    return MomentumSAM(_groups(params, base), base, rho=0.05, backend=backend, **kw, **bkw)


def state_tensors(opt):
    return [(k, v.clone()) for p in opt.base_optimizer.state for k, v in opt.base_optimizer.state[p].items()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_momentum_sam_matches_reference(name, backend):
    p = make_params()
    opt = make(p, name, backend)
    ref = RefMSAM(p, CONFIGS[name][0], rho=0.05, **kwargs_of(name))
    drive(opt, p, 12)
    for t in range(12):
        ref.step(t)
    close(p, ref.point())  # the weights sit at w~ between steps
    with opt.unperturbed():
        close(p, ref.params)  # and at w inside unperturbed()
    close(p, ref.point())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "sgd-nesterov", "adamw"])
def test_momentum_sam_float32_on_every_backend(name, backend):
    p = make_params(dtype=torch.float32)
    opt = make(p, name, backend)
    ref = RefMSAM(p, CONFIGS[name][0], rho=0.05, **kwargs_of(name))
    drive(opt, p, 12)
    for t in range(12):
        ref.step(t)
    close([x.double() for x in p], ref.point(), F32_TOL)
    with opt.unperturbed():
        close([x.double() for x in p], ref.params, F32_TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_momentum_sam_clipping_matches_reference(name, backend):
    p = make_params()
    opt = make(p, name, backend, max_grad_norm=0.5)  # the gradients' norm is ~5-10: every step clips
    ref = RefMSAM(p, CONFIGS[name][0], rho=0.05, max_grad_norm=0.5, **kwargs_of(name))
    grads_before = []
    for t in range(10):
        loss_at(p, t).backward()
        grads_before.append([x.grad.clone() for x in p])
        opt.step()
        assert all(torch.equal(x.grad, g) for x, g in zip(p, grads_before[-1])), "p.grad is left as it is"
        opt.zero_grad()
        ref.step(t)
    close(p, ref.point())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unperturbed_round_trip_is_bitwise(backend):
    p = make_params(dtype=torch.float32)
    opt = make(p, "sgd", backend)
    drive(opt, p, 4)
    at = [x.detach().clone() for x in p]
    for _ in range(2):
        with opt.unperturbed():
            w = [x.detach().clone() for x in p]
            assert not opt.perturbed
        assert opt.perturbed
        assert all(torch.equal(a, b) for a, b in zip(at, p))
    assert not all(torch.equal(a, b) for a, b in zip(at, w))


def test_step_inside_unperturbed_is_not_undone_on_exit():
    p = make_params()
    opt = make(p, "sgd", "foreach")
    drive(opt, p, 3)
    with opt.unperturbed():
        drive(opt, p, [3])  # a step whose gradient is taken at w; it perturbs again
        inside = [x.detach().clone() for x in p]
    assert opt.perturbed and all(torch.equal(a, b) for a, b in zip(inside, p))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["sgd-nesterov", "adamw"])
def test_momentum_sam_resume_bitwise(name, backend, dtype):
    pa = make_params(dtype=dtype)
    oa = make(pa, name, backend)
    drive(oa, pa, 11)
    pb = make_params(dtype=dtype)
    ob = make(pb, name, backend)
    drive(ob, pb, 5)
    sd = roundtrip(ob.state_dict())
    pc = [torch.zeros_like(x).requires_grad_() for x in pb]  # whatever the model holds: load puts w~ back
    oc = make(pc, name, backend)
    oc.load_state_dict(sd)
    assert all(torch.equal(x, y) for x, y in zip(pb, pc)), "load puts the saved w~ back bitwise"
    with oc.unperturbed(), ob.unperturbed():
        assert all(torch.equal(x, y) for x, y in zip(pb, pc))
    drive(oc, pc, range(5, 11))
    assert oc.num_steps == oa.num_steps == 11
    assert all(torch.equal(x, y) for x, y in zip(pa, pc))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_dict_inside_unperturbed_resumes_at_the_perturbed_point(backend):
    """A checkpoint written inside ``unperturbed()`` (the README's checkpointing block) saves the
    suspended perturbation: the resumed run equals the uninterrupted one bitwise."""
    pa = make_params()
    oa = make(pa, "sgd", backend)
    drive(oa, pa, 10)
    pb = make_params()
    ob = make(pb, "sgd", backend)
    drive(ob, pb, 5)
    with ob.unperturbed():
        sd = roundtrip(ob.state_dict())
    assert sd["fastsam"]["perturbed"]
    pc = [torch.zeros_like(x).requires_grad_() for x in pb]
    oc = make(pc, "sgd", backend)
    oc.load_state_dict(sd)
    assert all(torch.equal(x, y) for x, y in zip(pb, pc)), "load puts w~ back"
    drive(oc, pc, range(5, 10))
    assert all(torch.equal(x, y) for x, y in zip(pa, pc))
    with oa.unperturbed(), oc.unperturbed():
        assert all(torch.equal(x, y) for x, y in zip(pa, pc))


def test_momentum_sam_loads_a_dict_of_the_format_before_the_fused_core():
    """Before: 'msam' held num_steps, perturbed, inv_norm, w, schedule, sam_start_step, max_grad_norm,
    perturb_eps (no 'scalars', no 'rho'); it still loads, and puts w~ back."""
    p = make_params()
    opt = make(p, "sgd", "foreach")
    drive(opt, p, 5)
    f = roundtrip(opt.state_dict())
    sd = {
        "base": {"state": f["state"], "param_groups": f["param_groups"]},
        "msam": {
            "num_steps": f["fastsam"]["num_steps"],
            "perturbed": f["fastsam"]["perturbed"],
            "inv_norm": f["fastsam"]["scalars"][1],
            "w": f["fastsam"]["w"],
            **{k: f["fastsam"][k] for k in ("schedule", "sam_start_step", "max_grad_norm", "perturb_eps")},
        },
    }
    q = [torch.zeros_like(x).requires_grad_() for x in p]
    o2 = make(q, "sgd", "foreach")
    o2.load_state_dict(sd)
    assert o2.perturbed and all(torch.equal(x, y) for x, y in zip(p, q))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["sgd", "sgd-dampening", "adamw"])
def test_momentum_sam_nonfinite_step_leaves_everything_bitwise(name, dtype, backend):
    """A non-finite gradient at step 4: weights (at w~), w, and every tensor of the base optimizer's
    state bitwise unchanged; the run then continues exactly as one that never saw step 4."""
    pa, pb = make_params(dtype=dtype), make_params(dtype=dtype)
    oa, ob = make(pa, name, backend), make(pb, name, backend)
    drive(oa, pa, 4)
    drive(ob, pb, 4)
    before = [x.detach().clone() for x in pa]
    with oa.unperturbed():
        w_before = [x.detach().clone() for x in pa]
    st = state_tensors(oa)
    for poison in (float("nan"), float("inf")):
        drive(oa, pa, [4], poison={4: poison})
        assert oa.last_step_skipped and oa.perturbed
        assert all(torch.equal(a, b) for a, b in zip(before, pa))
        assert all(k == k2 and torch.equal(a, b) for (k, a), (k2, b) in zip(st, state_tensors(oa)))
        with oa.unperturbed():
            assert all(torch.equal(a, b) for a, b in zip(w_before, pa))
    drive(oa, pa, [5, 6])
    drive(ob, pb, [5, 6])
    assert not oa.last_step_skipped
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_momentum_sam_nonfinite_first_step(name, backend):
    """Skipped before any buffer exists: the weights stay at w; later steps are those of a clean run."""
    pa, pb = make_params(), make_params()
    oa, ob = make(pa, name, backend), make(pb, name, backend)
    w0 = [x.detach().clone() for x in pa]
    drive(oa, pa, [0], poison={0: float("nan")})
    assert oa.last_step_skipped and all(torch.equal(a, b) for a, b in zip(w0, pa))
    drive(oa, pa, [1, 2, 3])
    drive(ob, pb, [1, 2, 3])
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


def test_momentum_sam_late_phase_and_skip():
    p = make_params()
    opt = make(p, "sgd", "foreach", schedule=LatePhase(3))
    drive(opt, p, 2)
    assert not opt.perturbed
    drive(opt, p, [2, 3])
    assert opt.perturbed
    before = [x.detach().clone() for x in p]
    bufs = [opt.base_optimizer.state[x]["momentum_buffer"].clone() for x in p]
    drive(opt, p, [4], poison={4: float("nan")})
    assert opt.last_step_skipped and opt.num_steps == 5  # a skipped step counts, as in FusedSAM
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert all(torch.equal(opt.base_optimizer.state[x]["momentum_buffer"], b) for x, b in zip(p, bufs))
    drive(opt, p, [5, 6])
    assert all(torch.isfinite(x).all() for x in p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_momentum_sam_sees_a_replaced_base_state(backend):
    """The direction buffers are cached per bucket: a base state replaced by load_state_dict (new tensors,
    same values) must be followed, and the run stays bitwise that of an uninterrupted one."""
    pa, pb = make_params(), make_params()
    oa, ob = make(pa, "sgd", backend), make(pb, "sgd", backend)
    drive(oa, pa, 4)
    drive(ob, pb, 4)
    ob.base_optimizer.load_state_dict(roundtrip(ob.base_optimizer.state_dict()))
    drive(oa, pa, range(4, 9))
    drive(ob, pb, range(4, 9))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


def test_momentum_sam_steady_state_reuses_its_cached_lists():
    p = make_params()
    opt = make(p, "sgd", "foreach")
    drive(opt, p, 3)
    cached = opt.core.ext.dir_cache[3]
    drive(opt, p, range(3, 6))
    assert (
        opt.core.ext.dir_cache[3] is cached and opt.core.ext.applied.source is opt.core.ext.dir_cache[0]
    )  # the Plan's bucket list


def test_momentum_sam_parameters_without_a_gradient():
    """A parameter perturbed at step t but without a gradient at t + 1 is restored to w and not moved;
    the norm of v covers the parameters with a gradient (the authors' params_with_grad)."""
    p = make_params()
    opt = make(p, "sgd", "foreach")
    drive(opt, p, 3)
    with opt.unperturbed():
        w = [x.detach().clone() for x in p]
    loss = loss_at(p, 3)
    loss.backward()
    p[1].grad = None
    opt.step()
    opt.zero_grad()
    with opt.unperturbed():
        assert torch.equal(p[1], w[1])
    assert torch.equal(p[1], w[1]), "not perturbed: it had no gradient"
    drive(opt, p, [4, 5])
    assert all(torch.isfinite(x).all() for x in p)


def test_momentum_sam_rejects_what_it_cannot_do():
    with pytest.raises(ValueError):
        MomentumSAM(make_params(), torch.optim.SGD, lr=0.1)  # no momentum
    with pytest.raises(TypeError):
        MomentumSAM(make_params(), torch.optim.RMSprop, lr=0.1)
    with pytest.raises(ValueError):
        MomentumSAM(make_params(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="nope")
