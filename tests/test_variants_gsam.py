"""GSAM and FriendlySAM against per-parameter float64 references of the authors' code."""

import math

import pytest
import torch

from fastsam import GSAM, FriendlySAM
from fastsam.variants import ProportionalRho

from .conftest import CPU_BACKENDS
from .test_variants_common import RefBase, base_kwargs, close, drive, grads_at, groups, make_params, resume_check

BASES = [torch.optim.SGD, torch.optim.AdamW]


def _norm(ts):
    return math.sqrt(sum(float((x * x).sum()) for x in ts))


class RefGSAM(RefBase):
    """juntang-zhuang/GSAM gsam/gsam.py: perturb_weights, gradient_decompose, unperturb, base step."""

    def __init__(self, params, base, alpha, **kw):
        super().__init__(params, base, **kw)
        self.alpha = alpha

    def step(self, t):
        g = grads_at(self.params, t)
        old = self.perturb(g)
        gs = grads_at(self.params, t)
        for p, o in zip(self.params, old):
            p.copy_(o)
        inner = sum(float((a * b).sum()) for a, b in zip(g, gs))
        new_n, old_n = _norm(gs), _norm(g)
        cosine = inner / (new_n * old_n + 1e-12)
        d = [b - self.alpha * (a - cosine * old_n * b / (new_n + 1e-12)) for a, b in zip(g, gs)]
        self.base_step(d)


class RefFSAM(RefBase):
    """nblt/F-SAM utils.py FriendlySAM.first_step / second_step."""

    def __init__(self, params, base, sigma, lmbda, **kw):
        super().__init__(params, base, **kw)
        self.sigma, self.lmbda, self.m = sigma, lmbda, None

    def step(self, t):
        g = grads_at(self.params, t)
        if self.m is None:
            self.m, d = [x.clone() for x in g], g
        else:
            d = [x - self.sigma * m for x, m in zip(g, self.m)]
            self.m = [m * self.lmbda + x * (1 - self.lmbda) for m, x in zip(self.m, g)]
        old = self.perturb(d)
        gs = grads_at(self.params, t)
        for p, o in zip(self.params, old):
            p.copy_(o)
        self.base_step(gs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_gsam_matches_reference(base, backend):
    p = make_params()
    opt = GSAM(groups(p, base), base, rho=0.05, alpha=0.3, backend=backend, **base_kwargs(base))
    ref = RefGSAM(p, base, 0.3, rho=0.05, **base_kwargs(base))
    calls = []
    drive(opt, p, 11, counter=calls)
    for t in range(11):
        ref.step(t)
    assert calls == list(range(11))
    close(p, ref.params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_friendly_sam_matches_reference(base, backend):
    p = make_params()
    opt = FriendlySAM(groups(p, base), base, rho=0.05, sigma=1.0, lmbda=0.6, backend=backend, **base_kwargs(base))
    ref = RefFSAM(p, base, 1.0, 0.6, rho=0.05, **base_kwargs(base))
    drive(opt, p, 11)
    for t in range(11):
        ref.step(t)
    close(p, ref.params)


def test_gsam_alpha_zero_is_sam_and_rho_follows_lr():
    from fastsam import FusedSAM

    base = torch.optim.SGD
    p, q = make_params(), make_params()
    drive(GSAM(groups(p, base), base, alpha=0.0, **base_kwargs(base)), p, 6)
    drive(FusedSAM(groups(q, base), base, **base_kwargs(base)), q, 6)
    assert all(torch.equal(a, b) for a, b in zip(p, q))
    r = ProportionalRho(max_lr=0.1, min_lr=0.0, max_rho=0.04, min_rho=0.01)
    opt = GSAM(make_params(), base, rho_schedule=r, lr=0.05, momentum=0.9)
    drive(opt, opt.param_groups[0]["params"], 1)
    assert abs(opt.param_groups[0]["rho"] - 0.025) < 1e-12


@pytest.mark.parametrize("cls", [GSAM, FriendlySAM])
@pytest.mark.parametrize("base", BASES)
def test_resume_bitwise(cls, base):
    resume_check(lambda gs: cls(gs, base, **base_kwargs(base)), base, steps=12, cut=5)


@pytest.mark.parametrize("cls", [GSAM, FriendlySAM])
@pytest.mark.parametrize("where", ["first", "second"])
def test_nonfinite_leaves_params(cls, where):
    base = torch.optim.AdamW
    p = make_params()
    opt = cls(groups(p, base), base, max_grad_norm=5.0, **base_kwargs(base))
    drive(opt, p, 3)
    before = [x.detach().clone() for x in p]
    ms = [opt.core.sam_state[x]["fsam_m"].clone() for x in p] if cls is FriendlySAM else None
    drive(opt, p, 1, start=3, poison={3: (where, float("inf"))})
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    if cls is FriendlySAM:
        assert all(torch.equal(opt.core.sam_state[x]["fsam_m"], m) for x, m in zip(p, ms))
    drive(opt, p, 2, start=4)
    assert all(torch.isfinite(x).all() for x in p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [GSAM, FriendlySAM])
def test_float32_on_every_backend(cls, backend):
    """float32 buckets run on the backend itself (float64 falls back to foreach on triton)."""
    base = torch.optim.SGD
    p = make_params(dtype=torch.float32)
    opt = cls(groups(p, base), base, backend=backend, **base_kwargs(base))
    if cls is GSAM:
        ref = RefGSAM(p, base, 0.1, **base_kwargs(base))
    else:
        ref = RefFSAM(p, base, 1.0, 0.95, **base_kwargs(base))
    drive(opt, p, 10)
    for t in range(10):
        ref.step(t)
    close(p, ref.params, 1e-4)


@pytest.mark.parametrize("device_scalars", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [GSAM, FriendlySAM])
def test_device_scalars_match_reference(cls, backend, device_scalars, monkeypatch):
    """The coefficients by the device formulas (CUDA's path: no host read), run here on CPU tensors
    (fastsam/variants/_ops.py: HOST_SCALARS), against the same references."""
    from fastsam.variants import _ops

    monkeypatch.setattr(_ops, "HOST_SCALARS", not device_scalars)
    base = torch.optim.AdamW
    p = make_params()
    if cls is GSAM:
        opt = GSAM(groups(p, base), base, rho=0.05, alpha=0.3, backend=backend, **base_kwargs(base))
        ref = RefGSAM(p, base, 0.3, rho=0.05, **base_kwargs(base))
    else:
        opt = FriendlySAM(groups(p, base), base, rho=0.05, sigma=1.0, lmbda=0.6, backend=backend, **base_kwargs(base))
        ref = RefFSAM(p, base, 1.0, 0.6, rho=0.05, **base_kwargs(base))
    drive(opt, p, 10)
    for t in range(10):
        ref.step(t)
    close(p, ref.params)
