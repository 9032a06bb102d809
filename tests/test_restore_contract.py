"""The restore contract end to end: parameters whose gradient appears in one pass only.

Stochastic depth, unused branches and mixture-of-experts routing make the set
of parameters with a gradient differ between SAM's two passes.  A parameter
perturbed in the first pass is restored from its copy; one without a first
gradient has nothing to restore; one without a second gradient is restored and
takes no step.  FusedSAM splits each bucket into those kinds, so no backend
infers it (csrc's CUDA kernel once decided for a whole call from its first
tensor).  Every backend here (and the CUDA ones on a GPU machine), SGD with
momentum and AdamW, against the per-parameter reference.  Also: parameters on
two devices (the CPU and a GPU) in one optimizer.
"""

import pytest
import torch

from fastsam import FusedSAM, backends
from fastsam.core.buckets import to_device as _to

from .conftest import CPU_BACKENDS
from .reference import ReferenceSAM

CASES = [(name, "cpu") for name in CPU_BACKENDS]
if torch.cuda.is_available():
    CASES += [(name, "cuda") for name in backends.available(torch.device("cuda"), build=True)]
BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
]


def _params(device, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5,), (7, 3), (4097,), (2, 3, 4), (1,)]
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=torch.float32).requires_grad_()
        for s in shapes
    ]


def _loss(params, used, target):
    return sum(((params[i] - target[i]) ** 2).sum() * (i + 1) + params[i].sin().sum() for i in used)


@pytest.mark.parametrize("backend,device", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("base,kw", BASES, ids=["SGD", "AdamW"])
def test_first_parameter_without_first_gradient(seed, backend, device, base, kw):
    """Pass 1 leaves the first parameter of the bucket without a gradient (and pass 2 another one);
    the patterns change from step to step."""
    params = _params(device, seed)
    ref_params = [p.detach().clone().double().requires_grad_() for p in params]
    target = [torch.randn_like(p.detach()) for p in params]
    opt = FusedSAM(params, base, rho=0.1, backend=backend, **kw)
    assert opt.backend == backend
    ref = ReferenceSAM(ref_params, base, rho=0.1, **kw)
    patterns = [
        ([1, 2, 3, 4], [0, 1, 2, 3, 4]),  # the first parameter gets a gradient in pass 2 only
        ([0, 1, 2, 3, 4], [1, 2, 3, 4]),  # the first parameter gets one in pass 1 only
        ([1, 3], [0, 2, 3]),  # both differ
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),
    ]
    for first, second in patterns * 2:
        for ps, o in ((params, opt), (ref_params, ref)):
            tg = [t.to(ps[0].dtype) for t in target]
            _loss(ps, first, tg).backward()
            o.first_step(zero_grad=True)
            _loss(ps, second, tg).backward()
            o.second_step(zero_grad=True)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(
            p.detach().double(), r.detach(), rtol=2e-5, atol=2e-6, msg=lambda m: f"parameter {i}: {m}"
        )


def test_copies_to_the_cpu_block(monkeypatch):
    """A device value read on the host must have landed: copies to the CPU are never non-blocking."""
    seen = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    _to(torch.ones(()), torch.device("cpu"), torch.float32)
    _to(torch.ones(()), torch.device("meta"), torch.float32)
    assert seen == [False, True]


@pytest.mark.gpu
@pytest.mark.parametrize("base,kw", BASES, ids=["SGD", "AdamW"])
def test_parameters_on_the_cpu_and_a_gpu(seed, base, kw):
    """One optimizer over CPU and CUDA parameters: the global norm crosses devices; equal to the reference."""
    params = _params("cpu", seed)
    for i in (0, 2, 4):
        params[i] = params[i].detach().cuda().requires_grad_()
    ref_params = [p.detach().cpu().double().requires_grad_() for p in params]
    target = [torch.randn(p.shape) for p in params]
    opt = FusedSAM(params, base, rho=0.1, **kw)
    ref = ReferenceSAM(ref_params, base, rho=0.1, **kw)
    for _ in range(4):
        for ps, o in ((params, opt), (ref_params, ref)):
            tg = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(target, ps)]
            sum(((p - t) ** 2).sum() for p, t in zip(ps, tg)).backward()
            o.first_step(zero_grad=True)
            sum(((p - t) ** 2).sum() + p.sin().sum() for p, t in zip(ps, tg)).backward()
            o.second_step(zero_grad=True)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach().cpu().double(), r.detach(), rtol=2e-5, atol=2e-6)
