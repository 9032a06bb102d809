"""Property-based tests (hypothesis): FusedSAM against a plain float64 SAM step, on every CPU backend.

For each backend and dtype (float32, float64, both in one optimizer, bfloat16, float16), each
example draws 1-3 param groups (own rho and adaptive), parameter shapes (0-d and zero-size
included), a base optimizer (SGD, momentum with dampening and weight
decay, nesterov, Adam, AdamW, and RMSprop through the generic path), max_grad_norm,
perturb_eps, and a sequence of calls: two-step SAM steps, step(closure), plain steps
while SAM is off, a state-dict reload into a new optimizer (torch.save/torch.load with
weights_only), first_step then undo_first_step, first_step then load_state_dict.  Each
step draws, per parameter and pass, a gradient, None or zeros, and possibly a non-finite
value in either pass.

The gradient of step t at weights v is ``A_t v + B_t`` per parameter (a quadratic loss),
so the second pass sees the perturbation: a wrong e gives a wrong update.  The reference
(``Reference``) is the algorithm written out: g, e = rho g / (||g|| + eps) (ASAM: rho w^2 g
over || |w| g ||, the norm global over all groups), g_sam at w + e, w restored, clip to
max_grad_norm, torch's own base optimizer (single-tensor) in float64; a non-finite gradient
in either pass skips the step, and then FusedSAM's weights and state must be bitwise what
they were.  The examples come from a fixed seed (``SEED``): the same ones every run, the failing
one printed.
"""

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsam import FusedSAM, backends

from .conftest import CPU_BACKENDS
from .contract_cases import same, saved, snapshot

SGD, ADAM, ADAMW, RMSPROP = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop
BASES = {
    "sgd": (SGD, dict(lr=0.1)),
    "momentum": (SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "nesterov": (SGD, dict(lr=0.05, momentum=0.8, nesterov=True)),
    "adam": (ADAM, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (ADAMW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop": (RMSPROP, dict(lr=1e-2, momentum=0.5)),  # no fused step: restore, then torch's own step
}
SHAPES = [(), (3,), (2, 3), (0,), (2, 0, 3), (5,), (1, 4)]
OPS = ["two_step", "two_step", "closure", "inactive", "reload", "undo", "load_pending"]
PATTERNS = ["grad", "grad", "grad", "none", "zero"]
SIXTEEN = (torch.bfloat16, torch.float16)

# Tolerances, in units of the dtype's eps times max(1, max |reference|) per tensor (weights and the
# base optimizer's parameter-shaped state), after up to four calls.  Measured over about 14000 random
# examples (foreach 7600, cpp 4900, triton 1700): median 0 for every dtype; 99.9th
# percentile / max: float64 0.9 / 1.6, float32 2.8 / 2.9 (1.1 / 1.2 in "mixed" examples, float32 and
# float64 parameters together, both held to float32's bound), bfloat16 1.4 / 3.2, float16 2.1 / 3.0.
# Each bound is about 4x the largest.
TOL = {torch.float64: 8, torch.float32: 12, torch.bfloat16: 16, torch.float16: 12}


# ------------------------------------------------------------------ the examples
@dataclass
class Case:
    groups: List[Tuple[List[tuple], float, bool]]  # (shapes, rho, adaptive) per group
    dtype: object  # a torch dtype, or "mixed" (float32 and float64)
    base: str
    max_grad_norm: Optional[float]
    perturb_eps: float
    ops: List[tuple]  # (op, first-pass patterns, second-pass patterns, bad)
    seed: int

    def dtypes(self):
        n = sum(len(s) for s, _, _ in self.groups)
        if self.dtype == "mixed":
            return [torch.float32 if i % 2 == 0 else torch.float64 for i in range(n)]
        return [self.dtype] * n


@st.composite
def cases(draw, dtype):
    groups = [
        (
            draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3)),
            draw(st.sampled_from([0.0, 0.05, 0.3])),
            draw(st.booleans()),
        )
        for _ in range(draw(st.integers(1, 3)))
    ]
    n = sum(len(s) for s, _, _ in groups)
    patterns = st.lists(st.sampled_from(PATTERNS), min_size=n, max_size=n)
    bad = st.sampled_from(
        [None, None, None, ("first", math.inf), ("second", math.nan), ("first", -math.inf), ("second", math.inf)]
    )
    ops = draw(st.lists(st.tuples(st.sampled_from(OPS), patterns, patterns, bad), min_size=1, max_size=4))
    # eps = 1e-8 is 0 in fp16: torch's own fp16 Adam and RMSprop divide by zero
    bases = sorted(b for b in BASES if dtype != torch.float16 or BASES[b][0] is SGD)
    return Case(
        groups,
        dtype,
        draw(st.sampled_from(bases)),
        draw(st.sampled_from([0.5, 50.0, None])),
        draw(st.sampled_from([1e-2, 1e-12])),
        ops,
        draw(st.integers(0, 2**31 - 1)),
    )


class Problem:
    """Step t's gradient at weights v: A_t v + B_t (per parameter, computed in v's dtype), with
    A in [0.1, 0.3], |B| >= 1 and |w| <= 2 at the start: gradients stay away from zero, where the
    normalising optimizers (Adam, RMSprop: g / sqrt(v)) would turn a rounding of g in the parameters'
    dtype into a flipped sign against the float64 reference."""

    def __init__(self, case: Case):
        g = torch.Generator().manual_seed(case.seed)
        self.shapes = [s for shapes, _, _ in case.groups for s in shapes]
        self.w0 = [torch.randn(s, generator=g, dtype=torch.float64).clamp(-2, 2) for s in self.shapes]
        self.coef = [
            [
                (
                    torch.rand(s, generator=g, dtype=torch.float64) * 0.2 + 0.1,
                    _away_from_zero(torch.randn(s, generator=g, dtype=torch.float64)),
                )
                for s in self.shapes
            ]
            for _ in case.ops
        ]

    def grads(self, t, weights, patterns, bad):
        """The gradients at ``weights`` (None or zeros where ``patterns`` say so), with ``bad`` (a value)
        written into the first gradient that has an element."""
        out = []
        for (a, b), w, pat in zip(self.coef[t], weights, patterns):
            if pat == "none":
                out.append(None)
                continue
            v = torch.zeros_like(w) if pat == "zero" else (a.to(w.dtype) * w.detach() + b.to(w.dtype))
            if bad is not None and v.numel():
                v.view(-1)[0] = bad
                bad = None
            out.append(v)
        return out


def _away_from_zero(x):
    return torch.where(x < 0, x - 1, x + 1)


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def _groups(case: Case, params, sam: bool):
    out, i = [], 0
    for shapes, rho, adaptive in case.groups:
        group = {"params": params[i : i + len(shapes)]}
        if sam:
            group.update(rho=rho, adaptive=adaptive)
        out.append(group)
        i += len(shapes)
    return out


def build(case: Case, params, backend):
    cls, kw = BASES[case.base]
    return FusedSAM(
        _groups(case, params, True),
        cls,
        backend=backend,
        max_grad_norm=case.max_grad_norm,
        perturb_eps=case.perturb_eps,
        closure_convention="sam",
        **kw,
    )


# ------------------------------------------------------------------ the reference
class Reference:
    """The SAM step as published, in float64, per parameter, with torch's single-tensor base optimizer."""

    def __init__(self, case: Case, params):
        self.case = case
        self.w = [p.detach().double().clone().requires_grad_() for p in params]
        cls, kw = BASES[case.base]
        self.base = cls(_groups(case, self.w, False), foreach=False, **kw)
        self.rhos = [(rho, adaptive) for shapes, rho, adaptive in case.groups for _ in shapes]

    @torch.no_grad()
    def step(self, g1: Optional[list], g2_at) -> bool:
        """One step (``g1`` None: a plain step with ``g2_at(w)``); returns whether it was skipped."""
        if g1 is not None:
            sq = sum(
                float(((w.abs() * g) if ad else g).pow(2).sum())
                for w, g, (_, ad) in zip(self.w, g1, self.rhos)
                if g is not None
            )
            if not math.isfinite(sq):
                return True
            scale = 1.0 / (math.sqrt(sq) + self.case.perturb_eps)
            at = [
                w if g is None else w + rho * (w * w if ad else 1.0) * g * scale
                for w, g, (rho, ad) in zip(self.w, g1, self.rhos)
            ]
        else:
            at = self.w
        g2 = g2_at(at)
        sq2 = sum(float(g.pow(2).sum()) for g in g2 if g is not None)
        if not math.isfinite(sq2):
            return True
        coef = 1.0
        if self.case.max_grad_norm is not None:
            coef = min(self.case.max_grad_norm / (math.sqrt(sq2) + 1e-6), 1.0)
        set_grads(self.w, [None if g is None else g * coef for g in g2])
        self.base.step()
        return False


def assert_close_to(params, opt, ref: Reference, dtypes, where):
    """The weights and the base optimizer's parameter-shaped state against the reference's."""
    for i, (p, r, dt) in enumerate(zip(params, ref.w, dtypes)):
        pairs = [("weight", p.detach(), r.detach())]
        mine, theirs = opt.state.get(p, {}), ref.base.state.get(r, {})
        assert set(mine) == set(theirs), f"{where}: param {i} state keys {sorted(mine)} vs {sorted(theirs)}"
        pairs += [(k, mine[k], theirs[k]) for k in mine if torch.is_tensor(mine[k]) and mine[k].shape == p.shape]
        if "step" in mine:
            assert float(mine["step"]) == float(theirs["step"]), f"{where}: param {i} step count"
        for name, a, b in pairs:
            if not a.numel():
                continue
            unit = torch.finfo(dt).eps * max(1.0, float(b.abs().max()))
            err = float((a.double() - b).abs().max()) / unit
            MEASURED[dt] = max(MEASURED.get(dt, 0.0), err)
            assert err <= TOL[dt], f"{where}: param {i} {name}: {err:.1f} eps (bound {TOL[dt]})"


# ------------------------------------------------------------------ the property
def run_case(case: Case, backend: str):
    problem = Problem(case)
    dtypes = case.dtypes()
    tol_dtypes = [torch.float32] * len(dtypes) if case.dtype == "mixed" else dtypes
    params = [w.to(dt).requires_grad_() for w, dt in zip(problem.w0, dtypes)]
    opt = build(case, params, backend)
    ref = Reference(case, params)
    steps = 0
    for t, (op, pat1, pat2, bad) in enumerate(case.ops):
        where = f"op {t} ({op}, bad={bad})"
        bad1, bad2 = (bad[1] if bad is not None and bad[0] == k else None for k in ("first", "second"))

        def first(ws):
            return problem.grads(t, ws, pat1, bad1)

        def second(ws):
            return problem.grads(t, ws, pat2, bad2)

        def closure():
            set_grads(params, second(params))

        opt.zero_grad()
        weights, sd = snapshot(opt, params)
        if op == "closure" and (all(p == "none" for p in pat1) or all(p == "none" for p in pat2)):
            set_grads(params, first(params))
            with pytest.raises(RuntimeError, match="left no gradient"):
                opt.step(closure)
            same([p.detach() for p in params], weights, f"{where}: params after a refused step")
            same(opt.state_dict(), sd, f"{where}: state after a refused step")
        elif op in ("two_step", "closure", "inactive"):
            if op == "inactive":  # SAM off: a plain base step with the gradient at w
                set_grads(params, second(params))
                opt.sam_active = False
                opt.second_step()
                opt.sam_active = None
                skipped = ref.step(None, second)
            else:
                set_grads(params, first(params))
                if op == "closure":
                    opt.step(closure)
                else:
                    opt.first_step(zero_grad=True)
                    closure()
                    opt.second_step()
                skipped = ref.step(first(ref.w), second)
            steps += 1
            assert opt.num_steps == steps
            assert opt.last_step_skipped == skipped, f"{where}: skipped is {opt.last_step_skipped}, not {skipped}"
            if skipped:
                same([p.detach() for p in params], weights, f"{where}: params after a skipped step")
                after = opt.state_dict()
                same(
                    {k: after[k] for k in ("state", "param_groups")},
                    {k: sd[k] for k in ("state", "param_groups")},
                    f"{where}: state after a skipped step",
                )
        elif op == "reload":
            given_sd = saved(opt.state_dict())
            opt = build(case, params, backend)
            opt.load_state_dict(given_sd)
            same(opt.state_dict(), sd, f"{where}: state dict after the reload")
        else:  # a perturbation taken back: by undo_first_step, or by loading the state dict of before
            set_grads(params, first(params))
            opt.first_step()
            if op == "undo":
                opt.undo_first_step()
            else:
                opt.load_state_dict(saved(sd))
            same([p.detach() for p in params], weights, f"{where}: params")
            same(opt.state_dict(), sd, f"{where}: state dict")
        assert_close_to(params, opt, ref, tol_dtypes, where)


MEASURED: dict = {}  # the largest error seen per dtype (printed, to set TOL from)
# The examples are drawn from a fixed seed: the same ones every run (never flaky); a failure prints its
# example.  FASTSAM_PROPERTY_SEED=n FASTSAM_PROPERTY_EXAMPLES=m explore others.
SEED = int(os.environ.get("FASTSAM_PROPERTY_SEED", 20240))
SETTINGS = dict(
    max_examples=int(os.environ.get("FASTSAM_PROPERTY_EXAMPLES", 20)),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, "mixed", torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_sam_is_the_reference_sam_step(backend, dtype):
    if dtype in SIXTEEN and not backends.get(backend).supports(dtype):
        pytest.skip(f"{backend} does not take {dtype} (FusedSAM runs it on foreach)")
    MEASURED.clear()

    @hypothesis.seed(SEED)
    @settings(**SETTINGS)
    @given(cases(dtype))
    def check(case):
        ran.append(case)
        run_case(case, backend)

    ran: list = []
    check()
    worst = {str(k): round(v, 1) for k, v in MEASURED.items()}
    print(f"{len(ran)} examples (seed {SEED}); largest errors in eps: {worst}")


def test_skip_of_the_first_pass_is_reported():
    """A step whose first pass is non-finite and whose second pass has no gradient is skipped, and
    says so."""
    p = torch.randn(3, requires_grad=True)
    opt = FusedSAM([p], SGD, lr=0.1)
    p.grad = torch.full_like(p, math.inf)
    opt.first_step()
    p.grad = None
    opt.second_step()
    assert opt.last_step_skipped


# ------------------------------------------------------------------ examples this suite found, kept
def _case(shapes, dtype, base, ops, max_grad_norm=None, rho=0.05):
    return Case([(shapes, rho, False)], dtype, base, max_grad_norm, 1e-12, ops, 0)


FOUND = {
    # foreach: a 0-d float32 gradient times the float64 clip factor became float64 (0-d operands promote
    # each other) and Adam's lerp refused it; the generic path's p.grad refused a promoted bf16 one.
    "0-d clipped, adam, mixed": _case(
        [(), (3,)], "mixed", "adam", [("two_step", ["grad"] * 2, ["grad"] * 2, None)], max_grad_norm=0.5
    ),
    "0-d clipped, rmsprop, bf16": _case(
        [()], torch.bfloat16, "rmsprop", [("two_step", ["grad"], ["grad"], None)], max_grad_norm=0.5
    ),
    # A step skipped on the first pass created Adam's moments (and SGD's empty per-parameter entries).
    "skipped first step, adam": _case(
        [(3,), (2, 2)], torch.float32, "adam", [("two_step", ["grad"] * 2, ["grad"] * 2, ("first", math.inf))]
    ),
    "skipped first step, momentum": _case(
        [(3,)], torch.float32, "momentum", [("closure", ["grad"], ["grad"], ("second", math.nan))]
    ),
    # load_state_dict between first_step and second_step wrote into the parameters with autograd on.
    "load between the passes": _case([(3,)], torch.float64, "sgd", [("load_pending", ["grad"], ["grad"], None)]),
    # foreach, fp16: rho / (||g|| + eps) beyond fp16's range (a zero gradient) as the add's alpha raised.
    "fp16 zero gradient": _case(
        [(3,), ()], torch.float16, "momentum", [("two_step", ["zero"] * 2, ["grad"] * 2, None)] * 2
    ),
}


@pytest.mark.parametrize("name", FOUND)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_found_examples(backend, name):
    run_case(FOUND[name], backend)
