"""What the core keeps and what every backend accepts: nothing held after a step, strided
parameters and gradients on every backend, complex parameters, the switches in the state dict."""

import copy
import gc
import weakref

import pytest
import torch

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM

from .conftest import CPU_BACKENDS

VARIANTS = [(FusedSAM, {}), (LookSAM, dict(k=2)), (GSAM, dict(alpha=0.2)), (FriendlySAM, {})]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _loss(model, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,kw", VARIANTS, ids=[c.__name__ for c, _ in VARIANTS])
def test_no_gradient_outlives_zero_grad(cls, kw, backend):
    """The cached buckets drop their gradient lists when a step ends: after zero_grad() no gradient of
    the last step is alive (weakrefs die)."""
    model = _model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **kw)
    refs = []
    for t in range(4):
        _loss(model, t).backward()
        refs += [weakref.ref(p.grad) for p in model.parameters()]
        opt.step(lambda t=t: _loss(model, t).backward())
        refs += [weakref.ref(p.grad) for p in model.parameters()]
        opt.zero_grad()
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} gradients kept alive"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_momentum_sam_holds_no_gradient_either(backend):
    model = _model()
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    refs = []
    for t in range(3):
        _loss(model, t).backward()
        refs += [weakref.ref(p.grad) for p in model.parameters()]
        opt.step()
        opt.zero_grad()
    gc.collect()
    assert all(r() is None for r in refs)


def _strided_params():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(6, 4).t())  # a transposed view: dense, not contiguous
    b = torch.nn.Parameter(torch.randn(3, 10)[:, ::2])  # a slice: not dense
    c = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    d = torch.nn.Parameter(torch.randn(7))
    return [a, b, c, d]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grads", ["contiguous", "like the parameter", "transposed"])
def test_strided_parameters_and_gradients_run_on_every_backend(backend, grads):
    """Views as parameters and gradients laid out unlike their parameter: every backend runs them
    (the compiled ones hand such tensors to foreach) and agrees with foreach."""
    runs = {}
    for be in ("foreach", backend):
        ps = _strided_params()
        opt = FusedSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=be)
        for t in range(3):
            for phase in (opt.first_step, opt.second_step):
                g = torch.Generator().manual_seed(10 * t + (phase == opt.second_step))
                for p in ps:
                    v = torch.randn(p.shape, generator=g)
                    if grads == "like the parameter":
                        v = torch.empty_like(p).copy_(v)
                    elif grads == "transposed" and v.dim() == 2:
                        v = v.t().contiguous().t()
                    p.grad = v
                phase()
        runs[be] = [p.detach().clone() for p in ps]
    for a, b in zip(runs["foreach"], runs[backend]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        (torch.optim.Adam, dict(lr=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-2)),
    ],
)
def test_complex_parameters_step_as_their_real_views(backend, base, kw):
    """torch's optimizers treat a complex parameter as its real view (view_as_real); so does the SAM
    step: the same run on the real view gives the same numbers (ASAM, too, works on the real and
    imaginary parts)."""
    torch.manual_seed(3)
    z0 = torch.randn(4, 3, dtype=torch.complex64)
    zc = torch.nn.Parameter(z0.clone())
    zr = torch.nn.Parameter(torch.view_as_real(z0).clone())
    oc = FusedSAM([zc], base, backend=backend, adaptive=True, rho=0.3, **kw)
    orr = FusedSAM([zr], base, backend=backend, adaptive=True, rho=0.3, **kw)
    for t in range(3):
        for phase in ("first_step", "second_step"):
            g = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(t * 2 + len(phase)))
            zc.grad, zr.grad = g.clone(), torch.view_as_real(g).clone()
            getattr(oc, phase)()
            getattr(orr, phase)()
    torch.testing.assert_close(torch.view_as_real(zc.detach()), zr.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("override", [True, False, None])
def test_the_state_dict_keeps_the_switches(override):
    model = _model()
    opt = FusedSAM(
        model.parameters(), torch.optim.SGD, lr=0.1, sam_start_step=10, max_grad_norm=2.0, perturbation="global"
    )
    opt.sam_active = override
    opt.num_steps = 7
    other = FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.sam_active_override is override
    assert (other.num_steps, other.sam_start_step, other.max_grad_norm, other.perturbation) == (7, 10, 2.0, "global")
    assert other.sam_active == opt.sam_active
