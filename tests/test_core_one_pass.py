"""The passes of a one-bucket step take their norms inside the writes (``norm_perturb``,
``norm_restore_sgd_step``: fastsam/core/engine.py, ``_one_pass``), and give the bits of the
general route (a norm, its scalars, then the write).

Which route a step takes is seen from the backend calls it makes; the general route is forced
through public settings that leave the arithmetic unchanged: a skip reducer that reduces nothing
(first pass) and a clipping threshold no norm reaches, whose coefficient is exactly 1 (second
pass).
"""

import math

import pytest
import torch

from fastsam import FusedSAM, LookSAM, backends

from .conftest import CPU_BACKENDS
from .test_core_transactions import Inject

KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)


def _calls(monkeypatch):
    """The names of the top-level backend calls, in order (a list the wrapped ops append to)."""
    return Inject(monkeypatch).names


def _params(dtype, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (1023,), (2, 3, 2), (7,)][:n]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _set_grads(ps, t, bad=False):
    g = torch.Generator().manual_seed(100 + t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    if bad:
        ps[1].grad[3] = math.nan


def _step(opt, ps, t, bad_first=False, bad_second=False):
    _set_grads(ps, 2 * t, bad_first)
    opt.first_step(zero_grad=True)
    _set_grads(ps, 2 * t + 1, bad_second)
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_one_bucket_step_is_one_call_per_pass(backend, monkeypatch):
    ps = _params(torch.float32)
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.05, backend=backend, **KW)
    calls = _calls(monkeypatch)
    _step(opt, ps, 0)  # fresh momentum buffers: the second pass's general route
    assert calls == ["norm_perturb", "grad_sq_norm", "restore_sgd_step"]
    calls.clear()
    _step(opt, ps, 1)
    assert calls == ["norm_perturb", "norm_restore_sgd_step"]
    calls.clear()
    opt.sam_active = False  # a plain step: the second pass alone
    _step(opt, ps, 2)
    assert calls == ["norm_restore_sgd_step"]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, b: FusedSAM([{"params": ps[:2]}, {"params": ps[2:]}], torch.optim.SGD, backend=b, **KW),
        lambda ps, b: FusedSAM(ps, torch.optim.SGD, backend=b, max_grad_norm=1.0, **KW),
        lambda ps, b: LookSAM(ps, torch.optim.SGD, backend=b, k=1, **KW),
    ],
    ids=["two_groups", "clipping", "variant"],
)
def test_the_general_route_where_a_pass_needs_its_scalars_apart(make, monkeypatch):
    """Two buckets (one norm over both), clipping (not in the fused op), a variant (its hooks may
    read the scalars before the commit): no fused pass, or only the first where it stands alone."""
    ps = _params(torch.float32)
    opt = make(ps, "foreach")
    _step(opt, ps, 0)
    calls = _calls(monkeypatch)
    _step(opt, ps, 1)
    if isinstance(opt, LookSAM) or len(opt.param_groups) == 2:
        assert "norm_perturb" not in calls and "norm_restore_sgd_step" not in calls
    else:
        assert calls[0] == "norm_perturb" and "norm_restore_sgd_step" not in calls


def test_a_skip_reducer_keeps_the_first_pass_apart_only(monkeypatch):
    """The reducer acts on the first pass's flag between its norm and its write; the second pass
    has none to reduce and keeps its one call."""
    ps = _params(torch.float32)
    opt = FusedSAM(ps, torch.optim.SGD, backend="foreach", **KW)
    opt.skip_reducer = lambda flag: None
    _step(opt, ps, 0)
    calls = _calls(monkeypatch)
    _step(opt, ps, 1)
    assert calls == ["grad_sq_norm", "perturb", "norm_restore_sgd_step"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
def test_the_one_call_route_gives_the_bits_of_the_general_route(backend, dtype, adaptive, monkeypatch):
    """Six steps, one with a non-finite first gradient and one with a non-finite second gradient
    (both skipped), then two plain steps: parameters, state and skip flags bitwise equal."""
    if not backends.get(backend).supports(dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    ps, ps_ref = _params(dtype), _params(dtype)
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.3, adaptive=adaptive, backend=backend, **KW)
    ref = FusedSAM(ps_ref, torch.optim.SGD, rho=0.3, adaptive=adaptive, backend=backend, max_grad_norm=1e300, **KW)
    ref.skip_reducer = lambda flag: None
    calls = _calls(monkeypatch)
    for t in range(8):
        calls.clear()
        if t == 6:
            opt.sam_active = ref.sam_active = False
        for o, params in ((opt, ps), (ref, ps_ref)):
            _set_grads(params, 2 * t, t == 2)
            o.first_step(zero_grad=True)
        _assert_bitwise(ps, ps_ref, f"step {t}, at w + e")
        fused = calls[:]
        for o, params in ((opt, ps), (ref, ps_ref)):
            _set_grads(params, 2 * t + 1, t == 4)
            o.second_step(zero_grad=True)
        if t > 0:
            assert "norm_restore_sgd_step" in calls and calls.count("norm_restore_sgd_step") == 1
        assert ("norm_perturb" in fused) == (t < 6)
        _assert_bitwise(ps, ps_ref, f"step {t}")
        assert bool(opt.skip_flag) == bool(ref.skip_flag) == (t in (2, 4)), f"step {t}"
        _assert_bitwise(
            [opt.state[p]["momentum_buffer"] for p in ps],
            [ref.state[q]["momentum_buffer"] for q in ps_ref],
            f"step {t}",
        )


def _assert_bitwise(xs, ys, msg):
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()), f"{msg}: tensor {i}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_gradients_laid_out_unlike_their_parameters_take_the_same_route_bit_for_bit(backend, layout):
    """A compiled backend refuses a gradient whose strides differ from its parameter's; the pass then
    falls back op by op, as the general route does, so the norm (and w + e) keep the general
    route's bits: e.g. cpp's norm of the gradient, foreach's perturbation."""
    g = torch.Generator().manual_seed(3)
    shapes = [(300, 257), (8, 3, 5, 5)]

    def make(general):
        ps = [
            torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)
        ]
        kw = dict(max_grad_norm=1e300) if general else {}
        opt = FusedSAM(ps, torch.optim.SGD, rho=0.05, backend=backend, **kw, **KW)
        if general:
            opt.skip_reducer = lambda flag: None
        return opt, ps

    (opt, ps), (ref, ps_ref) = make(False), make(True)
    for t in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        if layout == "transposed":
            grads[0] = grads[0].t().contiguous().t()
        else:
            grads[1] = grads[1].contiguous(memory_format=torch.channels_last)
        for o, params in ((opt, ps), (ref, ps_ref)):
            for p, gr in zip(params, grads):
                p.grad = gr.clone(memory_format=torch.preserve_format)
            o.first_step()
        _assert_bitwise(ps, ps_ref, f"step {t}, at w + e")
        for o, params in ((opt, ps), (ref, ps_ref)):
            for p, gr in zip(params, grads):
                p.grad = (gr * 0.5).clone(memory_format=torch.preserve_format)
            o.second_step()
        _assert_bitwise(ps, ps_ref, f"step {t}")
