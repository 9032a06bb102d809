"""FriendlySAM's per-parameter EMA rule and its device-side commit (the reference of the whole
algorithm is tests/test_variants_gsam.py: RefFSAM).

nblt/F-SAM utils.py decides per parameter: one without ``momentum`` state starts it with m = g and
perturbs with its plain g; the others of the same step use g - sigma m and update m.  Parameters
without a gradient are left alone.  fastsam.FriendlySAM follows that rule inside a bucket (a
bucket mixing both kinds used to re-initialise all of its parameters), commits the new EMA with a
masked axpby on the second pass's skip flag, and reads the flag on the host only on a step where a
parameter gets its first EMA.
"""

import pytest
import torch

from fastsam import FriendlySAM
from fastsam.variants import _ops

from .conftest import CPU_BACKENDS
from .test_variants_common import RefBase, base_kwargs, close, drive, grads_without, groups, make_params

BASES = [torch.optim.SGD, torch.optim.AdamW]


class RefFSAMPerParam(RefBase):
    """nblt/F-SAM utils.py FriendlySAM, per parameter, with parameters that lack a gradient."""

    def __init__(self, params, base, sigma, lmbda, **kw):
        super().__init__(params, base, **kw)
        self.sigma, self.lmbda, self.m = sigma, lmbda, {}

    def step(self, t, drop=()):
        g = grads_without(self.params, t, drop)
        d = []
        for i, x in enumerate(g):
            if x is None:
                d.append(None)
            elif i not in self.m:
                self.m[i] = x.clone()
                d.append(x)
            else:
                d.append(x - self.m[i] * self.sigma)
                self.m[i] = self.m[i] * self.lmbda + x * (1 - self.lmbda)
        old = self.perturb(d)
        gs = grads_without(self.params, t, drop)
        for p, o in zip(self.params, old):
            p.copy_(o)
        self.base_step(gs)


@pytest.fixture(params=["host", "device"])
def scalars(request, monkeypatch):
    """Coefficients on the host (the CPU path) or by the device formulas (CUDA's path, on CPU tensors)."""
    monkeypatch.setattr(_ops, "HOST_SCALARS", request.param == "host")
    return request.param


# Parameter 2 (in the first group's bucket with 0 and 1) has no gradient on step 0: on step 1 it
# starts its EMA while 0 and 1 use theirs (a mixed bucket).  Parameter 4 skips step 3 (its EMA is
# left alone), 0 and 1 skip step 5.
DROPS = {0: {2}, 3: {4}, 5: {0, 1}}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_mixed_initialised_parameters_match_the_per_parameter_rule(base, backend, scalars):
    p = make_params()
    opt = FriendlySAM(groups(p, base), base, rho=0.05, sigma=1.0, lmbda=0.6, backend=backend, **base_kwargs(base))
    ref = RefFSAMPerParam(p, base, 1.0, 0.6, rho=0.05, **base_kwargs(base))
    for t in range(8):
        drive(opt, p, 1, start=t, drop=DROPS)
        ref.step(t, DROPS.get(t, ()))
        close(p, ref.params)
        for i, x in enumerate(p):
            assert ("fsam_m" in opt.core.sam_state[x]) == (i in ref.m), (t, i)
            if i in ref.m:
                close([opt.core.sam_state[x]["fsam_m"]], [ref.m[i]])


def test_first_ema_of_a_parameter_is_its_gradient():
    base = torch.optim.SGD
    p = make_params()
    opt = FriendlySAM(groups(p, base), base, **base_kwargs(base))
    drive(opt, p, 1, drop={0: {2}})
    assert "fsam_m" not in opt.core.sam_state[p[2]] and "fsam_m" in opt.core.sam_state[p[0]]
    g = grads_without([x.detach() for x in p], 1)[2]
    drive(opt, p, 1, start=1)
    assert torch.equal(opt.core.sam_state[p[2]]["fsam_m"], g)


@pytest.mark.parametrize("where", ["first", "second"])
def test_skipped_step_commits_nothing(where, scalars):
    """A non-finite step: every existing EMA bitwise unchanged (the masked commit), no EMA created for a
    parameter that would have got its first one, and the next step creates it."""
    base = torch.optim.SGD
    p = make_params()
    opt = FriendlySAM(groups(p, base), base, max_grad_norm=5.0, **base_kwargs(base))
    drive(opt, p, 2, drop={0: {2}, 1: {2}})
    ms = {i: opt.core.sam_state[x]["fsam_m"].clone() for i, x in enumerate(p) if "fsam_m" in opt.core.sam_state[x]}
    assert set(ms) == {0, 1, 3, 4}
    before = [x.detach().clone() for x in p]
    drive(opt, p, 1, start=2, poison={2: (where, float("inf"))})
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert "fsam_m" not in opt.core.sam_state[p[2]]
    assert all(torch.equal(opt.core.sam_state[p[i]]["fsam_m"], m) for i, m in ms.items())
    drive(opt, p, 1, start=3)
    assert "fsam_m" in opt.core.sam_state[p[2]]
    assert all(torch.isfinite(x).all() for x in p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_device_scalars_match_host_scalars(backend, monkeypatch):
    """The device path of the commit (flag concatenated on the device) gives the host path's bits."""
    base = torch.optim.AdamW
    out = []
    for host in (True, False):
        monkeypatch.setattr(_ops, "HOST_SCALARS", host)
        p = make_params(dtype=torch.float32)
        opt = FriendlySAM(groups(p, base), base, backend=backend, **base_kwargs(base))
        drive(opt, p, 6, drop={0: {2}}, poison={3: ("second", float("nan"))})
        out.append([x.detach().clone() for x in p] + [opt.core.sam_state[x]["fsam_m"].clone() for x in p])
    assert all(torch.equal(a, b) for a, b in zip(*out))
