"""All or nothing: a public call that raises leaves parameters, gradients and optimizer state as
they were (fastsam/core/txn.py).

Failures are injected in place of every backend call of a call (the backend contract: an op
that raises has written nothing), in the user's closure (``KeyboardInterrupt`` included), and
as malformed gradients; after each, everything is compared bitwise with what it was before the
call, and a retry without the failure must give exactly what an undisturbed run gives.
"""

import copy
import io

import pytest
import torch

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM, backends
from fastsam.core.txn import Transaction

from .conftest import CPU_BACKENDS

OPS = (
    "grad_sq_norm",
    "perturb",
    "restore",
    "restore_sgd_step",
    "restore_adam_step",
    "norm_perturb",
    "norm_restore_sgd_step",
    "dot_sq_norms",
    "axpby",
)


class Boom(Exception):
    pass


class Inject:
    """Counts the top-level backend calls (calls a backend makes to another do not count), keeps
    their names in order (``names``) and raises ``exc`` in place of the ``at``-th (0-based),
    writing nothing."""

    def __init__(self, monkeypatch, at=None, exc=Boom):
        self.at, self.exc, self.count, self.depth, self.names = at, exc, 0, 0, []
        for name in backends.BACKENDS:
            try:
                mod = backends.get(name)
            except backends.BackendUnavailable:
                continue
            for op in OPS:
                if hasattr(mod, op):
                    monkeypatch.setattr(mod, op, self._wrap(getattr(mod, op)))

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            if self.depth == 0:
                n = self.count
                self.count += 1
                self.names.append(fn.__name__)
                if n == self.at:
                    raise self.exc(f"injected in place of backend call {n} ({fn.__name__})")
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return wrapped


# ---------------------------------------------------------------- the problem
def _params(dtype2=torch.float64):
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 3), (4,), (2, 3, 2), (6,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ps[3] = torch.nn.Parameter(ps[3].detach().to(dtype2))  # a second dtype: a second bucket
    return ps


def _grads(params, t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


KINDS = {
    "sgd": (FusedSAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3), {}),
    # one param group of one dtype: one bucket, whose passes take their norms inside the writes
    # (norm_perturb, norm_restore_sgd_step)
    "sgd_one_bucket": (FusedSAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(adaptive=True, rho=0.3)),
    "adamw_asam_clip": (FusedSAM, torch.optim.AdamW, dict(lr=1e-2), dict(adaptive=True, rho=0.5, max_grad_norm=1.0)),
    "rmsprop_generic": (FusedSAM, torch.optim.RMSprop, dict(lr=1e-2), dict(max_grad_norm=0.5)),
    "gsam": (GSAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(alpha=0.3)),
    "friendly": (FriendlySAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9), {}),
    "looksam": (LookSAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(k=2)),
}


_WARM = {}


def _make(kind, backend, warm=2):
    """The optimizer after ``warm`` steps (momentum buffers, EMAs, g_v exist: the steady state), as a
    fresh deep copy of one built once (a copy holds no pending perturbation)."""
    key = (kind, backend, warm)
    if key not in _WARM:
        cls, base, kw, sam_kw = KINDS[kind]
        if kind.endswith("one_bucket"):
            ps = _params(torch.float32)
            opt = cls(ps, base, backend=backend, **sam_kw, **kw)
        else:
            ps = _params()
            opt = cls([{"params": ps[:2]}, {"params": ps[2:], "rho": 0.08}], base, backend=backend, **sam_kw, **kw)
        for t in range(warm):
            _two_step(opt, ps, t)
        _WARM[key] = (opt, ps)
    return copy.deepcopy(_WARM[key])


def _two_step(opt, ps, t):
    for p, g in zip(ps, _grads(ps, 2 * t)):
        p.grad = g
    opt.first_step(zero_grad=True)
    for p, g in zip(ps, _grads(ps, 2 * t + 1)):
        p.grad = g
    opt.second_step(zero_grad=True)


def _clone_sd(sd):
    return copy.deepcopy(sd)


def _equal(a, b, path="state_dict"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all(), path
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            _equal(a[k], b[k], f"{path}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
        return
    assert a == b, (path, a, b)


class Picture:
    """Everything a failed call must leave as it was."""

    def __init__(self, opt, ps):
        self.params = [p.detach().clone() for p in ps]
        self.grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in ps]
        self.sd = _clone_sd(opt.state_dict())
        self.pending = opt.core.run.pending is not None
        self.flag = opt.skip_flag

    def check(self, opt, ps):
        for i, (p, w) in enumerate(zip(ps, self.params)):
            assert torch.equal(p.detach(), w), f"parameter {i} changed"
        for i, (p, (g, v)) in enumerate(zip(ps, self.grads)):
            assert p.grad is g, f"gradient {i} was replaced"
            if g is not None:
                assert torch.equal(_dense(g), _dense(v)), f"gradient {i} was written"
        _equal(self.sd, opt.state_dict())
        assert (opt.core.run.pending is not None) == self.pending
        assert opt.skip_flag is self.flag


def _dense(t):
    return t.to_dense() if t.layout != torch.strided else t


def _calls(setup, call, monkeypatch):
    """How many backend calls ``call`` makes from the state ``setup()`` builds."""
    opt, ps = setup()
    with monkeypatch.context() as m:
        inj = Inject(m)
        call(opt, ps)
    return inj.count


def _every_failure(setup, call, monkeypatch, released_grads=False):
    """Inject a failure in place of each backend call of ``call`` in turn; each must leave the state
    of ``setup()`` as it was, and a retry must give what an undisturbed call gives.
    ``released_grads``: a failure after the call took the gradients over may release them (p.grad
    None) instead of keeping them; they are handed back before the check.  Returns (calls, releases)."""
    n = _calls(setup, call, monkeypatch)
    assert n > 0
    clean_opt, clean_ps = setup()
    call(clean_opt, clean_ps)
    released = 0
    for at in range(n):
        opt, ps = setup()
        before = Picture(opt, ps)
        with monkeypatch.context() as m:
            Inject(m, at)
            with pytest.raises(Boom):
                call(opt, ps)
        if released_grads and all(p.grad is None for p in ps):
            released += 1
            for p, (g, _) in zip(ps, before.grads):
                p.grad = g
        before.check(opt, ps)
        call(opt, ps)  # the retry
        assert all(torch.equal(a, b) for a, b in zip(ps, clean_ps)), f"retry after a failure at call {at}"
        _equal(clean_opt.state_dict(), opt.state_dict(), f"state after the retry (failure at call {at})")
    return n, released


def _set(ps, t):
    for p, g in zip(ps, _grads(ps, t)):
        p.grad = g


# The machinery is the core's; every backend runs it for the fused SGD/Adam steps, and the variants
# (which add only calls of the same ops) on the fast CPU backends (the Triton interpreter is slow).
COMBOS = [(k, b) for k in sorted(KINDS) for b in CPU_BACKENDS if b != "triton"] + [
    (k, "triton") for k in ("sgd", "sgd_one_bucket", "adamw_asam_clip") if "triton" in CPU_BACKENDS
]


@pytest.mark.parametrize("kind,backend", COMBOS)
def test_first_step_is_all_or_nothing(kind, backend, monkeypatch):
    def setup():
        opt, ps = _make(kind, backend)
        _set(ps, 50)
        return opt, ps

    _every_failure(setup, lambda opt, ps: opt.first_step(), monkeypatch)


@pytest.mark.parametrize("kind,backend", COMBOS)
def test_second_step_is_all_or_nothing(kind, backend, monkeypatch):
    """A failed second_step leaves the perturbation pending (the weights at w + e): a retry finishes
    the step, or undo_first_step() returns to w."""

    def setup():
        opt, ps = _make(kind, backend)
        _set(ps, 50)
        opt.first_step(zero_grad=True)
        _set(ps, 51)
        return opt, ps

    _every_failure(setup, lambda opt, ps: opt.second_step(), monkeypatch)


@pytest.mark.parametrize(
    "kind,backend", [c for c in COMBOS if c[0] in ("sgd", "sgd_one_bucket", "looksam", "rmsprop_generic")]
)
def test_plain_step_is_all_or_nothing(kind, backend, monkeypatch):
    """A step while SAM is inactive (LookSAM: a reuse step of g_v)."""

    def setup():
        opt, ps = _make(kind, backend, warm=1 if kind == "looksam" else 2)
        if kind != "looksam":
            opt.sam_active = False
        _set(ps, 50)
        return opt, ps

    _every_failure(setup, lambda opt, ps: opt.step(lambda: None), monkeypatch)


@pytest.mark.parametrize("kind,backend", [c for c in COMBOS if c[0] in ("sgd", "sgd_one_bucket", "friendly", "gsam")])
def test_step_with_closure_is_all_or_nothing(kind, backend, monkeypatch):
    """Weights and state as before whatever fails; the gradients as before if the failure came before
    the step took them over (its first pass), else released (p.grad None)."""

    def setup():
        opt, ps = _make(kind, backend)
        _set(ps, 50)
        return opt, ps

    def call(opt, ps):
        opt.step(lambda: _set(ps, 51))

    n, released = _every_failure(setup, call, monkeypatch, released_grads=True)
    assert 0 < released < n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_undo_first_step_is_all_or_nothing(backend, monkeypatch):
    def setup():
        opt, ps = _make("sgd", backend)
        _set(ps, 50)
        opt.first_step()
        return opt, ps

    _every_failure(setup, lambda opt, ps: opt.undo_first_step(), monkeypatch)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_load_state_dict_is_all_or_nothing(backend, monkeypatch):
    """Between the two steps, loading undoes the perturbation: a backend failure there leaves the
    state as it was (and the perturbation pending)."""
    saved = _make("looksam", backend, warm=3)[0].state_dict()

    def setup():
        opt, ps = _make("looksam", backend)
        _set(ps, 50)
        opt.first_step()
        return opt, ps

    _every_failure(setup, lambda opt, ps: opt.load_state_dict(saved), monkeypatch)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_momentum_sam_update_is_all_or_nothing(backend, monkeypatch):
    """MomentumSAM's step is two transactions: the update (restore + base step), then the next
    perturbation.  Failures in the first leave everything as it was."""

    def make():
        ps = _params()
        opt = MomentumSAM(
            [{"params": ps[:2]}, {"params": ps[2:]}], torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend
        )
        for t in range(3):
            _set(ps, t)
            opt.step()
        _set(ps, 50)
        return opt, ps

    opt, ps = make()
    with monkeypatch.context() as m:
        inj = Inject(m)
        opt.step()
    clean, clean_ps = make()
    clean.step()
    failed_in_update = 0
    for at in range(inj.count):
        opt, ps = make()
        before = Picture(opt, ps)
        perturbed_before = opt.perturbed
        with monkeypatch.context() as m:
            Inject(m, at)
            with pytest.raises(Boom):
                opt.step()
        if opt.num_steps == before.sd["fastsam"]["num_steps"]:  # the update failed: nothing changed
            failed_in_update += 1
            before.check(opt, ps)
            assert opt.perturbed == perturbed_before
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(ps, clean_ps))
        else:  # the next perturbation failed: the step stands, the weights are at w, not perturbed
            assert not opt.perturbed
            with clean.unperturbed():
                assert all(torch.equal(a, b) for a, b in zip(ps, clean_ps))
    assert failed_in_update > 0


# ---------------------------------------------------------------- the closure
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("convention", ["sam", "torch"])
@pytest.mark.parametrize("which", [0, 1])
def test_an_exception_in_the_closure_puts_w_back(exc, convention, which):
    """The weights and the optimizer state as before; the gradients, taken over by the step, are
    released (not held through the second backward: one copy of the gradients less at the peak)."""
    opt, ps = _make("sgd", "foreach")
    opt.closure_convention = convention
    _set(ps, 50)
    before = Picture(opt, ps)
    calls = []

    def closure():
        calls.append(1)
        _set(ps, 60 + len(calls))
        if convention == "sam" or len(calls) - 1 == which:
            raise exc("in the closure")
        return torch.zeros(())

    with pytest.raises(exc):
        opt.step(closure)
    assert all(p.grad is None for p in ps)
    for p, (g, _) in zip(ps, before.grads):
        p.grad = g  # what Picture compares besides the gradients
    before.check(opt, ps)
    assert opt.core.run.pending is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_refused_step_with_closure_keeps_the_gradients(backend):
    """A failure before the step takes the gradients over (a malformed one) leaves them as they were."""
    opt, ps = _make("sgd", backend)
    _set(ps, 50)
    ps[1].grad.data = torch.zeros(9)
    before = Picture(opt, ps)
    with pytest.raises(ValueError, match="parameter 1"):
        opt.step(lambda: _set(ps, 51))
    before.check(opt, ps)


def test_a_step_after_a_failed_closure_is_a_fresh_step():
    """The stale perturbation is gone: the next step equals a step on an optimizer that never saw
    the failure."""
    a, pa = _make("sgd", "foreach")
    b, pb = _make("sgd", "foreach")
    _set(pa, 50)
    with pytest.raises(Boom):
        a.step(lambda: (_ for _ in ()).throw(Boom()))
    for opt, ps in ((a, pa), (b, pb)):
        _set(ps, 50)
        opt.step(lambda ps=ps: _set(ps, 51))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    _equal(a.state_dict(), b.state_dict())


# ---------------------------------------------------------------- malformed gradients
def _malform(kind, p):
    if kind == "shape":
        p.grad.data = torch.zeros(p.numel() + 1, dtype=p.dtype)
    elif kind == "dtype":
        p.grad.data = p.grad.data.to(torch.float16)
    elif kind == "sparse":
        p.grad = torch.zeros_like(p).to_sparse()


BAD = ["shape", "dtype", "sparse"]  # (a gradient on another device: only between GPUs, tests/*_gpu.py)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("where", ["first", "second", "plain"])
def test_a_malformed_gradient_is_refused_naming_the_parameter(backend, kind, where):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = FusedSAM(model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    ps = list(model.parameters())
    for t in range(2):
        _two_step(opt, ps, t)
    if where == "plain":
        opt.sam_active = False
    _set(ps, 50)
    if where == "second":
        opt.first_step(zero_grad=True)
        _set(ps, 51)
    _malform(kind, ps[3])
    before = Picture(opt, ps)
    with pytest.raises(ValueError, match=r"param group 0, parameter 3 \('1.bias'\)"):
        opt.second_step() if where != "first" else opt.first_step()
    before.check(opt, ps)


def test_an_integer_parameter_with_a_gradient_is_refused():
    w = torch.nn.Parameter(torch.randn(3))
    n = torch.zeros(2, dtype=torch.int64)
    opt = FusedSAM([w, n], torch.optim.SGD, lr=0.1)
    w.grad, n.grad = torch.randn(3), torch.ones(2, dtype=torch.int64)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="parameter 1: has dtype torch.int64 and a gradient"):
        opt.first_step()
    assert torch.equal(w, before)


# ---------------------------------------------------------------- state dicts that do not fit
def _corrupt(sd, how):
    sd = copy.deepcopy(sd)
    if how == "buffer_shape":
        sd["state"][3]["momentum_buffer"] = torch.zeros(7)
    elif how == "rho":
        sd["param_groups"][1]["rho"] = float("nan")
    elif how == "adaptive":
        sd["param_groups"][0]["adaptive"] = "False"
    elif how == "num_steps":
        sd["fastsam"]["num_steps"] = -1
    elif how == "max_grad_norm":
        sd["fastsam"]["max_grad_norm"] = float("nan")
    elif how == "variant_buffer":
        sd["fastsam"]["buffers"]["looksam_gv"][1] = torch.zeros(9)
    elif how == "schedule":
        sd["fastsam"]["schedule"] = {"k": 0, "start": 0}
    elif how == "layout":
        sd["param_groups"][0]["params"].append(99)
    return sd


@pytest.mark.parametrize(
    "how", ["buffer_shape", "rho", "adaptive", "num_steps", "max_grad_norm", "variant_buffer", "schedule", "layout"]
)
def test_a_corrupted_state_dict_loads_nothing(how):
    saved = _make("looksam", "foreach", warm=3)[0].state_dict()
    opt, ps = _make("looksam", "foreach")
    _set(ps, 50)
    opt.first_step()
    before = Picture(opt, ps)
    with pytest.raises(ValueError):
        opt.load_state_dict(_corrupt(saved, how))
    before.check(opt, ps)


def test_weights_only_load_of_a_state_dict():
    opt, _ = _make("looksam", "foreach", warm=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    _equal(opt.state_dict(), sd)


# ---------------------------------------------------------------- grad mode
@pytest.mark.parametrize("grad_on", [True, False])
def test_passes_run_without_grad_and_leave_the_callers_mode(grad_on):
    """Each pass runs with grad mode off (a step pre-hook fired by the pass sees it) and puts the
    caller's mode back, also when it raises.  (``step()``'s hooks fire in torch's wrapper, outside
    the step, as for torch's own optimizers.)"""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend="foreach")
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(torch.is_grad_enabled()))

    def backward():
        with torch.enable_grad():
            model(torch.randn(4, 3)).square().sum().backward()

    with torch.set_grad_enabled(grad_on):
        backward()
        opt.first_step()
        assert torch.is_grad_enabled() is grad_on
        with pytest.raises(RuntimeError, match="first_step"):
            opt.first_step()  # refused: already perturbed
        assert torch.is_grad_enabled() is grad_on
        opt.undo_first_step()
        assert torch.is_grad_enabled() is grad_on
        opt.first_step(zero_grad=True)
        backward()
        opt.second_step()
        assert torch.is_grad_enabled() is grad_on
        assert len(seen) == 2 and not any(seen)
        opt.zero_grad()
        backward()

        def closure():
            assert torch.is_grad_enabled()  # the closure's backward needs it
            opt.zero_grad()
            backward()

        opt.step(closure)
        assert torch.is_grad_enabled() is grad_on


def test_a_transaction_writes_and_undoes_leaves_that_require_grad_with_grad_on():
    """Outside a pass (grad mode on), the commit and the rollback still write in place into
    parameters, which autograd refuses for leaves that require grad unless grad mode is off."""
    p = torch.nn.Parameter(torch.arange(4.0))
    tx = Transaction()
    tx.write(lambda: p.add_(1.0), [p])
    tx.commit()
    assert torch.equal(p.detach(), torch.arange(4.0) + 1)

    def fail() -> None:
        raise ValueError("refused")

    tx = Transaction()
    tx.write(lambda: p.mul_(2.0), [p], size=0)
    tx.write(fail, [p], size=1)
    with pytest.raises(ValueError, match="refused"):
        tx.commit()
    assert torch.equal(p.detach(), torch.arange(4.0) + 1)  # the first write, undone in place
