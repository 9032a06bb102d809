"""MomentumSAM against a per-parameter float64 reference (MarlonBecker/MSAM optimizer/msam.py, adamW_msam.py)."""
import math

import pytest
import torch

from fastsam import MomentumSAM
from fastsam.schedules import LatePhase

from .test_variants_common import (RefBase, base_kwargs, close, grads_at, groups, loss_at, make_params, roundtrip)

BASES = [torch.optim.SGD, torch.optim.AdamW]


class RefMSAM(RefBase):
    """w (unperturbed) kept; the gradient of step t is taken at w - rho_group * v / (||v|| + 1e-12)."""

    def __init__(self, params, base, **kw):
        super().__init__(params, base, **kw)
        self.key = "momentum_buffer" if base is torch.optim.SGD else "exp_avg"

    def point(self):
        vs = [self.base.state.get(p, {}).get(self.key) for p in self.params]
        if vs[0] is None:
            return [p.clone() for p in self.params]
        n = math.sqrt(sum(float((v * v).sum()) for v in vs))
        return [p - g["rho"] * v / (n + 1e-12) for (g, p), v in zip(self.items(), vs)]

    def step(self, t):
        self.base_step(grads_at(self.point(), t))


def drive(opt, params, steps, start=0, poison=None):
    poison = poison or {}
    for t in range(start, start + steps):
        loss_at(params, t, poison.get(t)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("base", BASES)
def test_momentum_sam_matches_reference(base):
    p = make_params()
    opt = MomentumSAM(groups(p, base), base, rho=0.05, **base_kwargs(base))
    ref = RefMSAM(p, base, rho=0.05, **base_kwargs(base))
    drive(opt, p, 12)
    for t in range(12):
        ref.step(t)
    close(p, ref.point())              # the weights sit at w~ between steps
    with opt.unperturbed():
        close(p, ref.params)           # and at w inside unperturbed()
    close(p, ref.point())


def test_unperturbed_round_trip_is_bitwise():
    base = torch.optim.SGD
    p = make_params()
    opt = MomentumSAM(groups(p, base), base, **base_kwargs(base))
    drive(opt, p, 4)
    at = [x.detach().clone() for x in p]
    with opt.unperturbed():
        w = [x.detach().clone() for x in p]
    assert all(torch.equal(a, b) for a, b in zip(at, p))
    assert not all(torch.equal(a, b) for a, b in zip(at, w))


@pytest.mark.parametrize("base", BASES)
def test_momentum_sam_resume_bitwise(base):
    pa = make_params()
    oa = MomentumSAM(groups(pa, base), base, **base_kwargs(base))
    drive(oa, pa, 11)
    pb = make_params()
    ob = MomentumSAM(groups(pb, base), base, **base_kwargs(base))
    drive(ob, pb, 5)
    sd = roundtrip(ob.state_dict())
    pc = [torch.zeros_like(x).requires_grad_() for x in pb]  # whatever the model holds: load puts w~ back
    oc = MomentumSAM(groups(pc, base), base, **base_kwargs(base))
    oc.load_state_dict(sd)
    drive(oc, pc, 6, start=5)
    assert all(torch.equal(x, y) for x, y in zip(pa, pc))


def test_momentum_sam_nonfinite_leaves_params_and_late_phase():
    base = torch.optim.SGD
    p = make_params()
    opt = MomentumSAM(groups(p, base), base, schedule=LatePhase(3), **base_kwargs(base))
    drive(opt, p, 2)
    assert not opt.perturbed
    drive(opt, p, 2, start=2)
    assert opt.perturbed
    before = [x.detach().clone() for x in p]
    bufs = [opt.base_optimizer.state[x]["momentum_buffer"].clone() for x in p]
    drive(opt, p, 1, start=4, poison={4: float("nan")})
    assert opt.last_step_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert all(torch.equal(opt.base_optimizer.state[x]["momentum_buffer"], b) for x, b in zip(p, bufs))
    drive(opt, p, 2, start=5)
    assert all(torch.isfinite(x).all() for x in p)


def test_momentum_sam_rejects_what_it_cannot_do():
    with pytest.raises(ValueError):
        MomentumSAM(make_params(), torch.optim.SGD, lr=0.1)  # no momentum
    with pytest.raises(TypeError):
        MomentumSAM(make_params(), torch.optim.RMSprop, lr=0.1)
