"""The SAM family on a CUDA device (run by benchmarks/gpu_check.sh; skipped without a GPU).

Each variant and schedule runs on the GPU in float32 on every CUDA backend and is compared with
the same class run on the CPU in float64 on the foreach backend, which the CPU tests compare with
the authors' algorithms (tests/test_variants_*.py, tests/test_schedules.py).  A second test runs
the steady-state steps under ``torch.cuda.set_sync_debug_mode("error")``: a variant that reads a
device value on the host (a synchronisation) fails there.  Host reads that are part of a method
(the adaptive schedule decides on the host whether to run the second pass) are excluded.
"""

import math

import pytest
import torch

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM, backends
from fastsam.schedules import Interval, RandomSwitch

from .test_variants_common import SHAPES, base_kwargs, groups

pytestmark = pytest.mark.gpu

BASES = [torch.optim.SGD, torch.optim.AdamW]
TWO_PASS = {
    "gsam": lambda gs, base, b: GSAM(gs, base, rho=0.05, alpha=0.3, backend=b, **base_kwargs(base)),
    "friendly": lambda gs, base, b: FriendlySAM(
        gs, base, rho=0.05, sigma=1.0, lmbda=0.6, backend=b, **base_kwargs(base)
    ),
    "looksam": lambda gs, base, b: LookSAM(gs, base, rho=0.05, k=3, alpha=0.7, backend=b, **base_kwargs(base)),
    "interval": lambda gs, base, b: FusedSAM(
        gs, base, rho=0.05, schedule=Interval(3, rho_multiplier=1.5), backend=b, **base_kwargs(base)
    ),
    "random": lambda gs, base, b: FusedSAM(
        gs, base, rho=0.05, schedule=RandomSwitch(0.3, 0.6, 12, seed=1), backend=b, **base_kwargs(base)
    ),
}


def _cuda_backends():
    if not torch.cuda.is_available():
        return ["foreach"]
    dev = torch.device("cuda")
    return [n for n in ("foreach", "triton", "cuda") if backends.get(n).is_available(dev, build=False)[0]]


def _coefs(t, device, dtype):
    g = torch.Generator().manual_seed(1000 + t)  # tests/test_variants_common.py: loss_at's coefficients
    out = []
    for s in SHAPES:
        a = torch.rand(s, generator=g, dtype=torch.float64) + 0.5
        b = torch.randn(s, generator=g, dtype=torch.float64) * 2
        out.append((a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)))
    return out


class Problem:
    """loss_at of test_variants_common with its coefficients placed on the parameters' device up front
    (so that no host-to-device copy happens inside the steps)."""

    def __init__(self, device, dtype, steps):
        self.c = [_coefs(t, device, dtype) for t in range(steps)]

    def loss(self, params, t, poison=None):
        total = 0.0
        for p, (a, b) in zip(params, self.c[t]):
            total = total + (0.5 * a * p * p + torch.sin(b * p) + 0.05 * p**4).sum()
        return total * poison if poison is not None else total


def _params(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES
    ]


def _drive(opt, params, prob, steps, one_pass=False, start=0):
    for t in range(start, start + steps):
        prob.loss(params, t).backward()
        if one_pass:
            opt.step()
        else:
            opt.step(lambda t=t: prob.loss(params, t).backward())
        opt.zero_grad()


def _run(make, base, backend, device, dtype, steps, one_pass):
    p = _params(device, dtype)
    opt = make(groups(p, base), base, backend)
    _drive(opt, p, Problem(device, dtype, steps), steps, one_pass)
    if one_pass:
        with opt.unperturbed():  # copies: .double().cpu() of a CPU float64 parameter would be the parameter
            return [x.detach().to("cpu", torch.float64, copy=True) for x in p]
    return [x.detach().to("cpu", torch.float64, copy=True) for x in p]


def _msam(gs, base, b):
    import inspect

    kw = {"backend": b} if "backend" in inspect.signature(MomentumSAM).parameters else {}
    return MomentumSAM(gs, base, rho=0.05, **kw, **base_kwargs(base))


CASES = [(n, m, False) for n, m in TWO_PASS.items()] + [("momentum", _msam, True)]


@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name,make,one_pass", CASES, ids=[c[0] for c in CASES])
def test_variant_on_cuda_matches_cpu_float64(name, make, one_pass, base, backend):
    steps = 12
    got = _run(make, base, backend, torch.device("cuda"), torch.float32, steps, one_pass)
    want = _run(make, base, "foreach", torch.device("cpu"), torch.float64, steps, one_pass)
    # LookSAM's reuse direction g_v / ||g_v|| comes out of a cancellation (g_s minus its projection on
    # g): float32 rounding there is amplified (CPU float32 foreach vs float64: 7e-4 with SGD)
    tol = 5e-3 if name == "looksam" else 2e-4
    for g, w in zip(got, want):
        err = float((g - w).abs().max()) / (float(w.abs().max()) + 1e-12)
        assert err < tol, (name, backend, err)


@pytest.mark.parametrize("backend", [b for b in _cuda_backends() if b != "foreach"])
@pytest.mark.parametrize("name,make,one_pass", CASES, ids=[c[0] for c in CASES])
def test_variant_steps_do_not_synchronise(name, make, one_pass, backend):
    """Steady-state steps (after three warm-up steps) under sync debug mode 'error'."""
    base = torch.optim.SGD
    device = torch.device("cuda")
    p = _params(device, torch.float32)
    opt = make(groups(p, base), base, backend)
    prob = Problem(device, torch.float32, 12)
    _drive(opt, p, prob, 3, one_pass)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _drive(opt, p, prob, 6, one_pass, start=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(math.isfinite(float(x.detach().abs().max())) for x in p)


# (step, pass) poisoned with a NaN: step 4 is a LookSAM reuse step (k=3: one pass, no closure),
# step 3 a full LookSAM step, poisoned in its first pass or in the closure's second pass.
POISONS = [(4, "first"), (3, "first"), (3, "second")]


@pytest.mark.parametrize("step,where", POISONS, ids=[f"step{t}-{w}" for t, w in POISONS])
@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("name,make,one_pass", CASES, ids=[c[0] for c in CASES])
def test_variant_nonfinite_on_cuda_leaves_params(name, make, one_pass, backend, step, where):
    _nonfinite_leaves_params(name, make, one_pass, backend, step, where, torch.device("cuda"))


def _nonfinite_leaves_params(name, make, one_pass, backend, step, where, device):
    """A NaN in one pass of ``step`` skips it (parameters bitwise unchanged) and the steps after it are
    finite.  Separate from the test so that its logic can be run on the CPU."""
    if one_pass and where == "second":
        pytest.skip("a one-pass method has no second pass")
    base = torch.optim.AdamW
    p = _params(device, torch.float32)
    opt = make(groups(p, base), base, backend)
    prob = Problem(device, torch.float32, 8)
    _drive(opt, p, prob, step, one_pass)
    before = [x.detach().clone() for x in p]
    nan = float("nan")
    prob.loss(p, step, nan if where == "first" else None).backward()
    calls = []

    def closure():
        calls.append(step)
        prob.loss(p, step, nan if where == "second" else None).backward()

    if one_pass:
        opt.step()
    else:
        opt.step(closure)
    opt.zero_grad()
    if name == "looksam":  # k=3: step 3 is a full step (the closure runs), step 4 a reuse step
        assert bool(calls) == (step % 3 == 0), (step, calls)
    if where == "second" and not calls:
        pytest.skip(f"step {step} is a one-pass step of {name}'s schedule: the closure did not run")
    assert all(torch.equal(a, b) for a, b in zip(before, p)), name
    _drive(opt, p, prob, 2, one_pass, start=step + 1)
    assert all(torch.isfinite(x).all() for x in p)
