"""Capturable FusedSAM: the lr read on the device, so that a replayed CUDA graph follows schedulers.

On the CPU: the kernels (triton under the interpreter, foreach, cpp) take a 0-d lr tensor and give
what a float lr gives; a run whose lr lives in a tensor that an LR scheduler updates in place
equals the float-lr run step for step, across the late-phase switch.  On a GPU (the GPU check):
a whole SAM training step captured in CUDA graphs and replayed (fastsam.cuda_graphs.CapturedSAMStep)
equals the eager loop with a scheduler stepping and across ``sam_start_step``.
"""

import copy

import pytest
import torch

from fastsam import FusedSAM
from fastsam.backends import _common
from fastsam.cuda_graphs import CapturedSAMStep, make_capturable

from .conftest import CPU_BACKENDS

# Powers of two for the lr and the decay: a float32 lr tensor then holds exactly the float lr, and
# lr * d is exact, so the tensor-lr run equals the float-lr run (Adam amplifies any rounding
# difference in elements whose second moment is near eps).
BASES = [
    (torch.optim.SGD, dict(lr=2**-4, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    (torch.optim.AdamW, dict(lr=2**-7, weight_decay=1e-2)),
]


def _model(device="cpu"):
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).to(device)


def _eager_step(model, opt, x, y):
    from fastsam import frozen_bn_stats

    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if opt.sam_active:
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


# foreach a second time through the path of CUDA tensors (the lr, skip flags and Adam's bias
# corrections read on the device: fastsam/backends/_common.py, HOST_READS), which a capturable
# FusedSAM on a GPU takes
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["foreach-devicepath"])
@pytest.mark.parametrize("base,kw", BASES, ids=["SGD", "AdamW"])
def test_tensor_lr_with_a_scheduler_equals_float_lr(seed, backend, base, kw, monkeypatch):
    if backend == "foreach-devicepath":
        monkeypatch.setattr(_common, "HOST_READS", False)
        backend = "foreach"
    model = _model()
    twin = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), base, rho=0.05, backend=backend, sam_start_step=3, capturable=True, **kw)
    ref = FusedSAM(twin.parameters(), base, rho=0.05, backend=backend, sam_start_step=3, **kw)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.dtype == torch.float32
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for step in range(7):
        _eager_step(model, opt, x, y)
        _eager_step(twin, ref, x, y)
        for s in scheds:
            s.step()
        assert opt.param_groups[0]["lr"] is lr, "the scheduler updates the lr tensor in place"
        assert float(lr) == pytest.approx(ref.param_groups[0]["lr"])
        for a, b in zip(model.parameters(), twin.parameters()):
            # the lr rounded to float32 against a float64 lr: a few float32 ulps apart
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
    assert opt.num_steps == 7


def test_capturable_refuses_what_it_cannot_honour():
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    expected = "not capturable" if next(model.parameters()).is_cuda else "CUDA device"
    with pytest.raises(ValueError, match=expected):
        CapturedSAMStep(model, opt, torch.nn.functional.cross_entropy)
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="0-d"):
        make_capturable(opt)


def test_capturable_refuses_a_group_spanning_devices():
    """One lr tensor cannot be on two devices: a group with parameters on two devices is refused,
    naming both, and no group's lr has moved (meta stands in for the second device here)."""
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))]
    opt = FusedSAM(
        [{"params": [torch.nn.Parameter(torch.randn(2))]}, {"params": params}],
        torch.optim.SGD,
        lr=0.1,
        backend="foreach",
    )
    with pytest.raises(ValueError, match=r"param group 1 spans cpu and meta"):
        make_capturable(opt)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1], "nothing moved"


@pytest.mark.gpu
@pytest.mark.parametrize("base,kw", BASES, ids=["SGD", "AdamW"])
def test_captured_training_step_equals_eager(seed, base, kw):
    """Graphs of the plain and the SAM step, replayed with a cosine schedule and a switch at step 6."""
    model = _model("cuda")
    twin = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), base, rho=0.05, backend="triton", sam_start_step=6, **kw)
    ref = FusedSAM(twin.parameters(), base, rho=0.05, backend="triton", sam_start_step=6, **kw)
    make_capturable(opt)
    make_capturable(ref)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20) for o in (opt, ref)]
    step = CapturedSAMStep(model, opt, torch.nn.functional.cross_entropy, warmup=2)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for i in range(14):
        x = torch.randn(32, 6, device="cuda", generator=g)
        y = torch.randint(0, 3, (32,), device="cuda", generator=g)
        a = step(x, y)
        b = _eager_step(twin, ref, x, y)
        for s in scheds:
            s.step()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"loss at step {i}: {m}")
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}")
    assert opt.num_steps == ref.num_steps == 14
    assert len(step._graphs) == 2, "one graph per kind of step"
