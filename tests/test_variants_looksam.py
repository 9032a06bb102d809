"""LookSAM against a per-parameter float64 reference of Algorithm 1 (Liu et al., CVPR 2022)."""
import math

import pytest
import torch

from fastsam import LookSAM

from .conftest import CPU_BACKENDS
from .test_variants_common import (RefBase, close, drive, grads_at, groups, base_kwargs, make_params, resume_check)

BASES = [torch.optim.SGD, torch.optim.AdamW]


class RefLookSAM(RefBase):
    def __init__(self, params, base, k, alpha, **kw):
        super().__init__(params, base, **kw)
        self.k, self.alpha, self.gv = k, alpha, None

    def step(self, t):
        g = grads_at(self.params, t)
        if t % self.k == 0:
            old = self.perturb(g)
            gs = grads_at(self.params, t)
            for p, o in zip(self.params, old):
                p.copy_(o)
            inner = sum(float((a * b).sum()) for a, b in zip(g, gs))
            gsq = sum(float((a * a).sum()) for a in g)
            gv = [b - inner / (gsq + 1e-12) * a for a, b in zip(g, gs)]
            n = math.sqrt(sum(float((v * v).sum()) for v in gv))
            self.gv = [v / (n + 1e-12) for v in gv]
            self.base_step(gs)
            return True
        gn = math.sqrt(sum(float((a * a).sum()) for a in g))
        self.base_step([a + self.alpha * gn * v for a, v in zip(g, self.gv)])
        return False


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_looksam_matches_reference(base, backend):
    p = make_params()
    opt = LookSAM(groups(p, base), base, rho=0.05, k=3, alpha=0.7, backend=backend, **base_kwargs(base))
    ref = RefLookSAM(p, base, 3, 0.7, rho=0.05, **base_kwargs(base))
    calls = []
    drive(opt, p, 13, counter=calls)
    full = [t for t in range(13) if ref.step(t)]
    assert calls == full == [0, 3, 6, 9, 12]
    assert opt.full_steps == 5 and opt.reuse_steps == 8
    close(p, ref.params)


def test_looksam_late_phase_plain_before_start():
    base = torch.optim.SGD
    p, q = make_params(), make_params()
    opt = LookSAM(groups(p, base), base, k=2, sam_start_step=5, **base_kwargs(base))
    plain = torch.optim.SGD(groups(q, base), foreach=False, **base_kwargs(base))
    calls = []
    drive(opt, p, 5, counter=calls)
    for t in range(5):
        for x, g in zip(q, grads_at(q, t)):
            x.grad = g
        plain.step()
    close(p, q, 1e-12)
    drive(opt, p, 5, start=5, counter=calls)
    assert calls == [5, 7, 9]


@pytest.mark.parametrize("base", BASES)
def test_looksam_resume_bitwise(base):
    resume_check(lambda gs: LookSAM(gs, base, k=4, **base_kwargs(base)), base, steps=13, cut=6)


@pytest.mark.parametrize("where,t", [("first", 3), ("second", 3), ("first", 4)])
def test_looksam_nonfinite_leaves_params(where, t):
    base = torch.optim.SGD
    p = make_params()
    opt = LookSAM(groups(p, base), base, k=3, **base_kwargs(base))
    drive(opt, p, t)
    before = [x.detach().clone() for x in p]
    gv = [opt.state[x]["looksam_gv"].clone() for x in p]
    drive(opt, p, 1, start=t, poison={t: (where, float("nan"))})
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert all(torch.equal(opt.state[x]["looksam_gv"], v) for x, v in zip(p, gv))
    drive(opt, p, 2, start=t + 1)
    assert all(torch.isfinite(x).all() for x in p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_looksam_float32_on_every_backend(backend):
    base = torch.optim.SGD
    p = make_params(dtype=torch.float32)
    opt = LookSAM(groups(p, base), base, k=3, backend=backend, **base_kwargs(base))
    ref = RefLookSAM(p, base, 3, 0.7, **base_kwargs(base))
    drive(opt, p, 10)
    for t in range(10):
        ref.step(t)
    close(p, ref.params, 1e-4)
