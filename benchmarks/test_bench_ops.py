"""Microbenchmarks of the optimizer side of a SAM step: first_step and second_step, per backend.

    pytest benchmarks/ --benchmark-only                    # all backends that run here
    pytest benchmarks/ --benchmark-only -k cuda --benchmark-columns=median,iqr,ops

Not part of the normal test run (pyproject's testpaths = tests). The parameters are those of the
CIFAR ResNet-18 (11.2M, 62 tensors) on CUDA, and of its width/4 version (0.7M) on the CPU; the
gradients are random. "reference" is benchmarks/reference_sam.py (Python loop over parameters).
On CUDA every timed call ends with a synchronize, so the number is the op's real duration.
"""

import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models
from _common import available_backends
from reference_sam import ReferenceSAM

from fastsam import FusedSAM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ["reference"] + available_backends(DEVICE)


def _setup(provider):
    torch.manual_seed(0)
    model, _, _ = models.build("resnet18", width_div=1 if DEVICE.type == "cuda" else 4)
    params = [p.to(DEVICE).detach().requires_grad_() for p in model.parameters()]
    kw = dict(rho=0.05, lr=0.01, momentum=0.9, weight_decay=5e-4)
    if provider == "reference":
        opt = ReferenceSAM(params, torch.optim.SGD, **kw)
    else:
        opt = FusedSAM(params, torch.optim.SGD, backend=provider, **kw)
    grads = [torch.randn_like(p) * 1e-2 for p in params]

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    set_grads()
    opt.first_step()  # creates the restore copies and (after second_step) the momentum buffers
    set_grads()
    opt.second_step()
    return opt, set_grads


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_first_step(benchmark, provider):
    opt, set_grads = _setup(provider)
    perturbed = [False]

    def run():
        opt.first_step()
        _sync()
        perturbed[0] = True

    def restore():  # untimed: undo the previous perturbation, fresh gradients
        if perturbed[0]:
            opt.second_step()
            perturbed[0] = False
        set_grads()
        _sync()

    benchmark.group = f"first_step ({DEVICE.type})"
    benchmark.pedantic(run, setup=restore, rounds=30 if DEVICE.type == "cpu" else 200, warmup_rounds=2)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_second_step(benchmark, provider):
    opt, set_grads = _setup(provider)

    def perturb():  # untimed: every second_step needs a preceding first_step
        set_grads()
        opt.first_step()
        _sync()

    def run():
        opt.second_step()
        _sync()

    benchmark.group = f"second_step ({DEVICE.type})"
    benchmark.pedantic(run, setup=perturb, rounds=30 if DEVICE.type == "cpu" else 200, warmup_rounds=2)
