"""LookSAM against a per-parameter float64 reference of Algorithm 1 (Liu et al., CVPR 2022)."""

import math

import pytest
import torch

from fastsam import LookSAM
from fastsam.variants import _ops

from .conftest import CPU_BACKENDS
from .test_variants_common import (
    RefBase,
    base_kwargs,
    close,
    drive,
    grads_at,
    grads_without,
    groups,
    make_params,
    resume_check,
)

BASES = [torch.optim.SGD, torch.optim.AdamW]


class RefLookSAM(RefBase):
    """Algorithm 1 per parameter.  ``drop``: parameters without a gradient on a step (step(t, drop)):
    on a full step their g_v is 0 (the rule fastsam.LookSAM documents: g_v is the last full step's,
    nothing stale), the sums are over the parameters with a gradient; they take no base step."""

    def __init__(self, params, base, k, alpha, **kw):
        super().__init__(params, base, **kw)
        self.k, self.alpha, self.gv = k, alpha, None

    def step(self, t, drop=()):
        g = grads_without(self.params, t, drop)
        on = [i for i, x in enumerate(g) if x is not None]
        if t % self.k == 0:
            old = self.perturb(g)
            gs = grads_without(self.params, t, drop)
            for p, o in zip(self.params, old):
                p.copy_(o)
            inner = sum(float((g[i] * gs[i]).sum()) for i in on)
            gsq = sum(float((g[i] * g[i]).sum()) for i in on)
            gv = [
                torch.zeros_like(p) if x is None else b - inner / (gsq + 1e-12) * x
                for p, x, b in zip(self.params, g, gs)
            ]
            n = math.sqrt(sum(float((v * v).sum()) for v in gv))
            self.gv = [v / (n + 1e-12) for v in gv]
            self.base_step(gs)
            return True
        gn = math.sqrt(sum(float((g[i] * g[i]).sum()) for i in on))
        gv = self.gv or [torch.zeros_like(p) for p in self.params]
        self.base_step([None if a is None else a + self.alpha * gn * v for a, v in zip(g, gv)])
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
    gv = [opt.core.sam_state[x]["looksam_gv"].clone() for x in p]
    drive(opt, p, 1, start=t, poison={t: (where, float("nan"))})
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert all(torch.equal(opt.core.sam_state[x]["looksam_gv"], v) for x, v in zip(p, gv))
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
    # The projection is ill-conditioned here: ||g_v|| ~ ||g|| / 50, so the float32 rounding of
    # <g, g_s> (one ulp, which the backends' summation orders spend differently) moves g_v by
    # ~1e-5 relative, and ten momentum steps of this non-convex problem amplify it: measured up to
    # 3e-4 (triton), 1e-4 (cpp, foreach) after ten steps.  The float64 test above is the exact check.
    close(p, ref.params, 1e-3)


@pytest.fixture(params=["host", "device"])
def scalars(request, monkeypatch):
    """Coefficients formed on the host (the CPU path) or by the device formulas (CUDA's path, run here
    on CPU tensors): fastsam/variants/_ops.py, HOST_SCALARS."""
    monkeypatch.setattr(_ops, "HOST_SCALARS", request.param == "host")
    return request.param


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_looksam_device_scalars_match_reference(base, backend, scalars):
    p = make_params()
    opt = LookSAM(groups(p, base), base, rho=0.05, k=3, alpha=0.7, backend=backend, **base_kwargs(base))
    ref = RefLookSAM(p, base, 3, 0.7, rho=0.05, **base_kwargs(base))
    drive(opt, p, 10)
    for t in range(10):
        ref.step(t)
    close(p, ref.params)


# Parameters whose gradients come and go (k = 3: full steps 0, 3, 6, 9).  Parameter 1 has no
# gradient on the full step 3 but has one on the reuse steps 4 and 5: its g_v of step 0 is stale
# there and must not be applied (the rule: g_v = 0).  Parameter 4 has none on the full step 0 (no
# g_v at all on steps 1, 2); parameter 3 none on the reuse steps 1 and 7 (no base step).
DROPS = {0: {4}, 1: {3}, 3: {1}, 7: {3}, 9: {0, 2}}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_looksam_parameters_with_changing_gradients(base, backend, scalars):
    p = make_params()
    opt = LookSAM(groups(p, base), base, rho=0.05, k=3, alpha=0.7, backend=backend, **base_kwargs(base))
    ref = RefLookSAM(p, base, 3, 0.7, rho=0.05, **base_kwargs(base))
    drive(opt, p, 11, drop=DROPS)
    for t in range(11):
        ref.step(t, DROPS.get(t, ()))
    close(p, ref.params)
    p2 = make_params()
    opt2 = LookSAM(groups(p2, base), base, rho=0.05, k=3, alpha=0.7, backend=backend, **base_kwargs(base))
    drive(opt2, p2, 4, drop=DROPS)
    assert not opt2.core.sam_state[p2[1]]["looksam_gv"].any()  # zeroed on the full step it had no gradient
    assert opt2.core.sam_state[p2[0]]["looksam_gv"].any()


@pytest.mark.parametrize("where", ["first", "second"])
def test_looksam_skipped_full_step_with_a_changed_pattern_keeps_gv(where, scalars):
    """A skipped full step leaves every g_v and ||g_v||^2 bitwise as they were, also for a parameter
    without a gradient on that step (its g_v is not zeroed: the full step did not happen), and the
    reuse steps after it equal those of a run where that step's g_v was never computed."""
    base = torch.optim.SGD
    p = make_params()
    opt = LookSAM(groups(p, base), base, k=3, **base_kwargs(base))
    drive(opt, p, 3)
    gv = [opt.core.sam_state[x]["looksam_gv"].clone() for x in p]
    gv_sq = opt.core.ext.gv_sq.clone()
    before = [x.detach().clone() for x in p]
    drive(opt, p, 1, start=3, poison={3: (where, float("nan"))}, drop={3: {1}})
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert all(torch.equal(opt.core.sam_state[x]["looksam_gv"], v) for x, v in zip(p, gv))
    assert torch.equal(opt.core.ext.gv_sq, gv_sq)
    # the run where step 3's g_v was never computed: steps 0-2, then only the step count advances
    # (all a skipped step leaves behind: parameters, g_v, ||g_v||^2 and SGD's momentum unchanged)
    p_ref = make_params()
    ref = LookSAM(groups(p_ref, base), base, k=3, **base_kwargs(base))
    drive(ref, p_ref, 3)
    ref.num_steps += 1
    assert opt.num_steps == ref.num_steps == 4
    reuses = opt.reuse_steps
    drive(opt, p, 2, start=4)
    drive(ref, p_ref, 2, start=4)
    assert opt.reuse_steps == reuses + 2  # steps 4 and 5 are reuse steps, with the step-0 g_v
    assert all(torch.isfinite(x).all() for x in p)
    assert all(torch.equal(a, b) for a, b in zip(p, p_ref))


def test_looksam_finite_sums_that_overflow_float32_are_not_a_skip():
    """The device formula's finiteness check looks at the entries of [<g_s, g>, ||g_s||^2, ||g||^2],
    not their float32 sum: 1.1e19^2 + (1.1e19^2 + 3e18^2) + 1.1e19^2 is finite in float64 (the host
    path) but overflows float32, which flagged a finite full step as non-finite (g_v left at 0)."""
    got = {}
    for host in (True, False):
        old = _ops.HOST_SCALARS
        _ops.HOST_SCALARS = host
        try:
            p = torch.zeros(2, dtype=torch.float32, requires_grad=True)
            opt = LookSAM([p], torch.optim.SGD, rho=0.05, k=5, lr=1e-30, backend="foreach")
            p.grad = torch.tensor([1.1e19, 0.0])
            opt.first_step()
            p.grad = torch.tensor([1.1e19, 3.0e18])
            opt.second_step()
        finally:
            _ops.HOST_SCALARS = old
        assert not opt.last_step_skipped
        got[host] = (opt.core.sam_state[p]["looksam_gv"].clone(), float(opt.core.ext.gv_sq))
    for gv, gv_sq in got.values():
        assert gv[1] > 2.9e18 and math.isfinite(gv_sq) and gv_sq > 8.9e36
    assert torch.equal(got[True][0], got[False][0])
