"""torch.amp.GradScaler with FusedSAM: scaler.step(opt) folds the unscale and the inf check
into the second pass's fused scalars; equal to the manual-unscale recipe; skipped steps bitwise."""

import copy

import pytest
import torch

from fastsam import FusedSAM

BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    (torch.optim.RMSprop, dict(lr=1e-2)),  # the generic path
]


DEVICE = {"device": "cpu", "backend": "foreach"}  # switched by the CUDA test below


def _setup(base, kw, seed=0, **sam):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(DEVICE["device"])
    opt = FusedSAM(model.parameters(), base, rho=0.05, backend=DEVICE["backend"], **sam, **kw)
    return model, opt


def _data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 6, generator=g).to(DEVICE["device"]),
            torch.randint(0, 3, (8,), generator=g).to(DEVICE["device"]),
        )
        for _ in range(n)
    ]


def _loss(model, x, y, poison=False):
    with torch.autocast(DEVICE["device"], dtype=torch.float16):
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), y)
    return loss * float("inf") if poison else loss


def _run(form, base, kw, data, poison_at=None, **sam):
    model, opt = _setup(base, kw, **sam)
    scaler = torch.amp.GradScaler(DEVICE["device"], init_scale=2.0**10)
    scales = []
    for i, (x, y) in enumerate(data):
        poison = i == poison_at
        scaler.scale(_loss(model, x, y)).backward()
        if form == "closure":

            def closure():
                loss = _loss(model, x, y, poison)
                scaler.scale(loss).backward()
                return loss

            scaler.step(opt, closure)
            opt.zero_grad()
        else:
            opt.first_step(zero_grad=True)
            scaler.scale(_loss(model, x, y, poison)).backward()
            if form == "manual":
                scaler.unscale_(opt)
                opt.second_step(zero_grad=True)
            elif form == "unscale_then_step":
                scaler.unscale_(opt)
                scaler.step(opt)
                opt.zero_grad()
            else:
                scaler.step(opt)
                opt.zero_grad()
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("base,kw", BASES, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("form", ["step", "closure", "unscale_then_step"])
def test_scaler_step_equals_manual_unscale(form, base, kw, clip):
    data = _data()
    ref, ref_opt, _ = _run("manual", base, kw, data, max_grad_norm=clip)
    got, opt, _ = _run(form, base, kw, data, max_grad_norm=clip)
    for p, q in zip(ref.parameters(), got.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()
    assert opt.num_steps == ref_opt.num_steps == len(data)
    assert not hasattr(opt, "grad_scale")  # the scaler's attributes are gone after the step
    assert opt.skip_flag is not None and not opt.last_step_skipped


@pytest.mark.parametrize("base,kw", BASES, ids=lambda v: getattr(v, "__name__", ""))
def test_scaler_skips_bitwise_and_backs_off(base, kw):
    data = _data(3)
    model, opt, _ = _run("step", base, kw, data[:2])
    before_p = [p.detach().clone() for p in model.parameters()]
    before_s = copy.deepcopy(opt.base_optimizer.state_dict())
    # one more step whose second pass overflows: the scaler sees it (it checks the SAM gradient)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = data[2]
    scaler.scale(_loss(model, x, y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(_loss(model, x, y, poison=True)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped and float(opt.skip_flag) == 1.0
    assert scaler.get_scale() == 2.0**9
    for p, q in zip(before_p, model.parameters()):
        assert torch.equal(p, q)
    after = opt.base_optimizer.state_dict()
    for k, st in before_s["state"].items():
        for n, v in st.items():
            assert torch.equal(v, after["state"][k][n]), n


def test_scaler_found_inf_folds_into_skip():
    """The scaler's found_inf alone (finite gradients) skips the step, inside the fused scalars."""
    model, opt = _setup(torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    x, y = _data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    opt.grad_scale = torch.tensor(4.0)
    opt.found_inf = torch.tensor(1.0)
    assert float(opt.found_inf) == 1.0  # while a scaler sets it, found_inf is the scaler's
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert opt.last_step_skipped
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert float(opt.found_inf) == 1.0  # afterwards: the last step's skip flag (legacy name)


def test_inactive_steps_unscale_too():
    data = _data(3)
    ref, _, _ = _run("manual", torch.optim.SGD, dict(lr=0.1), data, sam_start_step=2)
    got, opt, _ = _run("step", torch.optim.SGD, dict(lr=0.1), data, sam_start_step=2)
    assert opt.num_steps == 3
    for p, q in zip(ref.parameters(), got.parameters()):
        assert torch.equal(p, q)


def test_scaler_without_first_step_names_the_recipe():
    model, opt = _setup(torch.optim.SGD, dict(lr=0.1))
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data(1)[0]
    scaler.scale(_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="16-mixed.*manual optimization"):
        scaler.step(opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["foreach", "triton", "cuda"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_cuda_scaler_step_equals_manual_unscale(backend, clip, monkeypatch):
    from fastsam import backends

    if not backends.get(backend).is_available(torch.device("cuda"))[0]:
        pytest.skip(f"{backend} unavailable")
    monkeypatch.setitem(DEVICE, "device", "cuda")
    monkeypatch.setitem(DEVICE, "backend", backend)
    for base, kw in BASES[:2]:
        data = _data()
        ref, _, _ = _run("manual", base, kw, data, max_grad_norm=clip)
        got, opt, _ = _run("step", base, kw, data, max_grad_norm=clip)
        for p, q in zip(ref.parameters(), got.parameters()):
            assert torch.equal(p, q), (base, (p - q).abs().max())
        got, opt, _ = _run("step", base, kw, data, poison_at=2, max_grad_norm=clip)
        assert opt.num_steps == len(data)
