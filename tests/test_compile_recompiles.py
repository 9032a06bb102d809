"""``torch.compile(model)`` under FusedSAM and its variants compiles once per kind of forward and
never again: no recompile after warm-up.

A training loop with a compiled model runs the model in two modes: the first pass with BatchNorm
updating its statistics, the second under ``frozen_bn_stats`` (``track_running_stats`` off), so
dynamo compiles two graphs, each at its first use.  Warm-up here runs every kind of step the
optimizer takes (SAM and plain, the closure form and the two-step form); after it, a long stretch of
steps (schedules switching SAM on and off, the late-phase switch) must compile nothing.  Counted
with dynamo's compile counter (the eager backend: recompiles are dynamo's decision, the backend's
compile time is irrelevant here); one case goes through AOT autograd (forward and backward graphs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM, frozen_bn_stats
from fastsam.schedules import Adaptive, Interval, RandomSwitch

from .conftest import CPU_BACKENDS

SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
MAKERS = {
    "FusedSAM": lambda ps, b: FusedSAM(ps, torch.optim.SGD, backend=b, **SGD),
    "FusedSAM-AdamW": lambda ps, b: FusedSAM(ps, torch.optim.AdamW, backend=b, lr=1e-3),
    "late-phase": lambda ps, b: FusedSAM(ps, torch.optim.SGD, backend=b, sam_start_step=9, **SGD),
    "Interval": lambda ps, b: FusedSAM(ps, torch.optim.SGD, backend=b, schedule=Interval(3), **SGD),
    "RandomSwitch": lambda ps, b: FusedSAM(ps, torch.optim.SGD, backend=b, schedule=RandomSwitch(0.5, seed=1), **SGD),
    "Adaptive": lambda ps, b: FusedSAM(ps, torch.optim.SGD, backend=b, schedule=Adaptive(c=-1.0), **SGD),
    "LookSAM": lambda ps, b: LookSAM(ps, torch.optim.SGD, backend=b, k=3, **SGD),
    "GSAM": lambda ps, b: GSAM(ps, torch.optim.SGD, backend=b, **SGD),
    "FriendlySAM": lambda ps, b: FriendlySAM(ps, torch.optim.SGD, backend=b, **SGD),
    "MomentumSAM": lambda ps, b: MomentumSAM(ps, torch.optim.SGD, backend=b, **SGD),
}
# Every variant on the default backend; FusedSAM on each backend that runs here outside the triton
# interpreter (too slow for a compile test's many steps).  The optimizer steps are opaque to dynamo
# (torch.compiler.disable), so the backend cannot change what is compiled: one case each suffices.
CASES = [(name, "auto") for name in MAKERS] + [("FusedSAM", b) for b in CPU_BACKENDS if b not in ("triton", "auto")]


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 5),
    )


def _train(name, backend, counter, warmup_steps=4, steps=12):
    """(compiles after warm-up, compiles in all, second passes after warm-up)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _model()
    compiled = torch.compile(model, backend=counter)
    opt = MAKERS[name](model.parameters(), backend)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    second_passes = [0]

    def loss_fn():
        return F.cross_entropy(compiled(x), y)

    def closure():
        second_passes[0] += 1
        with frozen_bn_stats(model):
            loss = loss_fn()
            loss.backward()
        return loss

    def step(two_step_form):
        opt.zero_grad()
        loss_fn().backward()
        if name == "MomentumSAM":  # one pass, at the perturbed weights: step() without a closure
            opt.step()
        elif two_step_form and opt.sam_active:
            opt.first_step(zero_grad=True)
            closure()
            opt.second_step()
        else:
            opt.step(closure)

    override = None if name == "MomentumSAM" else "sam_active"
    for i in range(warmup_steps):  # every kind of step: SAM and plain, closure and two-step forms
        if override:
            opt.sam_active = i % 2 == 0
        step(two_step_form=i >= 2)
    if override:
        opt.sam_active = None  # from here the schedule (or sam_start_step) decides
    warm, warm_passes = counter.frame_count, second_passes[0]
    for i in range(steps):
        step(two_step_form=i % 2 == 1)
    return counter.frame_count - warm, counter.frame_count, second_passes[0] - warm_passes


@pytest.mark.parametrize("name,backend", CASES)
def test_compiled_model_does_not_recompile_after_warmup(name, backend):
    new, total, second_passes = _train(name, backend, CompileCounter())
    assert new == 0, f"{name} on {backend}: {new} compiles after warm-up ({total} in all)"
    # one graph per BatchNorm mode; MomentumSAM runs one pass per step, in the first mode only
    assert total == (1 if name == "MomentumSAM" else 2), total
    if name != "MomentumSAM":
        assert second_passes >= 2  # the stretch after warm-up did run SAM steps (the schedules' too)


def test_aot_autograd_graphs_do_not_recompile_either():
    """The same loop through AOT autograd (forward and backward graphs), FusedSAM across its
    late-phase switch, on the default backend."""
    new, total, _ = _train("late-phase", "auto", CompileCounterWithBackend("aot_eager"))
    assert new == 0 and total == 2, (new, total)
