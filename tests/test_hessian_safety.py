"""fastsam.hessian's safety: no graph outlives a call, non-finite losses and products are clear
errors that leave the model as it was, arguments go through fastsam._checks, and the trace
estimators equal their definitions computed in float64."""

import gc
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastsam.hessian as hessian

from .test_hessian import Quadratic, dense_hessian, mean_loss, softmax_regression
from .test_hessian_api import assert_restored, net, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CE = nn.functional.cross_entropy
F64 = torch.float64


def _calls(loss_fn):
    """Every public entry point, on a given loss."""

    def vector(m):
        return [torch.ones_like(p) for p in m.parameters() if p.requires_grad]

    return {
        "eigenvalues_lanczos": lambda m, d, **kw: hessian.eigenvalues(m, loss_fn, d, k=2, max_iter=6, **kw),
        "eigenvalues_power": lambda m, d, **kw: hessian.eigenvalues(m, loss_fn, d, method="power", max_iter=4, **kw),
        "trace": lambda m, d, **kw: hessian.trace(m, loss_fn, d, num_samples=6, **kw),
        "density": lambda m, d, **kw: hessian.density(m, loss_fn, d, num_iter=4, **kw),
        "hvp": lambda m, d, **kw: hessian.hvp(m, loss_fn, d, vector(m), **kw),
    }


CALLS = list(_calls(CE))


# ---------------------------------------------------------------- nothing outlives a call
def _live_tensors():
    gc.collect()
    return [o for o in gc.get_objects() if torch.is_tensor(o)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # not converged in a few steps: irrelevant here
@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc's walk touches torch's deprecated objects
@pytest.mark.parametrize("call", CALLS + ["operator"])
@pytest.mark.parametrize("hvp_mode", hessian.HVP_MODES)
def test_no_tensor_outlives_a_call(seed, call, hvp_mode):
    """Kept first-order graphs save outputs (tanh, log_softmax) whose grad_fn owns the saved
    copy: a saved-tensor hook that kept the live tensor made a cycle through C++ that gc never
    frees, so every call left its graph behind."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g)) for _ in range(2)]
    n = sum(p.numel() for p in model.parameters())

    def run():
        if call == "operator":
            with hessian.HessianOperator(model, CE, data, hvp_mode=hvp_mode) as op:
                for _ in range(3):
                    op.matvec(torch.ones(n))
        else:
            _calls(CE)[call](model, data, hvp_mode=hvp_mode)

    run()  # whatever a first call creates once (lazy initialisation) is not a leak
    before = {id(t) for t in _live_tensors()}
    for _ in range(3):
        run()
    leaked = [(tuple(t.shape), type(t.grad_fn).__name__) for t in _live_tensors() if id(t) not in before]
    assert not leaked, f"seed={seed}: {len(leaked)} tensors outlive 3 calls: {leaked}"


# ---------------------------------------------------------------- non-finite losses and products
def _data_with_nan_in_batch_1(g):
    model, (x, y) = net(g)
    x = x.clone()
    x[8, 2] = float("nan")
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("model_mode", hessian.MODEL_MODES)
@pytest.mark.parametrize("hvp_mode", hessian.HVP_MODES)
def test_nan_loss_is_a_clear_error_and_changes_nothing(seed, call, model_mode, hvp_mode):
    """A NaN input makes one batch's loss NaN: a FloatingPointError naming that batch, not a
    LinAlgError or a NaN result; mode, buffers, parameters, .grad and the RNG as they were."""
    g = torch.Generator().manual_seed(seed)
    model, data = _data_with_nan_in_batch_1(g)
    model.train()
    model[3].eval()
    model[0].weight.grad = torch.randn(6, 4, generator=g)
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"loss_fn is not finite on data batch 1 \(loss nan\)"):
        _calls(CE)[call](model, data, model_mode=model_mode, hvp_mode=hvp_mode)
    assert_restored(model, snap)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("hvp_mode", hessian.HVP_MODES)
def test_infinite_loss_with_finite_curvature_is_an_error(seed, call, hvp_mode):
    """An infinite constant in the loss leaves every product finite: only the loss shows it."""
    g = torch.Generator().manual_seed(seed)
    model, data = net(g)
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"loss_fn is not finite on data batch 0 \(loss inf\)"):
        _calls(lambda o, y: CE(o, y) + math.inf)[call](model, data, hvp_mode=hvp_mode)
    assert_restored(model, snap)


class SqrtAtZero(nn.Module):
    """out = x * sqrt(w) at w = 0: a finite loss whose second derivative is infinite."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=F64))

    def forward(self, x):
        return x * self.w.sqrt()


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("hvp_mode", hessian.HVP_MODES)
def test_nonfinite_product_with_finite_loss_is_an_error(call, hvp_mode):
    model = SqrtAtZero()
    data = (torch.ones(3, 2, dtype=F64), torch.zeros(3, dtype=torch.long))
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match="Hessian-vector product is not finite although every loss is"):
        _calls(CE)[call](model, data, hvp_mode=hvp_mode)
    assert_restored(model, snap)


def test_nan_loss_through_torch_func_fallback(seed):
    """forward_over_reverse's torch.func path (taken for ops without a forward-AD backward) also
    sees the loss: it leaves the transforms as jvp's auxiliary output."""
    g = torch.Generator().manual_seed(seed)
    model, data = _data_with_nan_in_batch_1(g)
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"data batch 1 \(loss nan\)"):
        with hessian.HessianOperator(model, CE, data, hvp_mode="forward_over_reverse") as op:
            op._use_torch_func = True
            op.matvec(torch.ones(op.n))
    assert_restored(model, snap)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 4 Lanczos steps need not converge
def test_gradients_written_by_loss_fn_are_put_back(seed):
    """.grad comes back bitwise even when user code writes it in place during the call (a loss
    that runs its own backward, a hook)."""
    g = torch.Generator().manual_seed(seed)
    model, data = net(g)
    model[0].weight.grad = torch.randn(6, 4, generator=g)
    snap = snapshot(model)

    def loss_fn(out, y):
        model[0].weight.grad.add_(1.0)
        return CE(out, y)

    hessian.eigenvalues(model, loss_fn, data, k=1, max_iter=4, cache_graph=False)
    assert_restored(model, snap)


def test_hvp_vector_must_be_finite():
    model, data = net(torch.Generator().manual_seed(0))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    v = torch.ones(n)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="vector must hold finite"):
        hessian.hvp(model, CE, data, v)
    with pytest.raises(ValueError, match="vector must hold finite floating-point numbers, got dtype torch.int64"):
        hessian.hvp(model, CE, data, torch.ones(n, dtype=torch.long))


# ---------------------------------------------------------------- arguments
def _tiny():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return m, (torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 2, (6,), generator=g))


@pytest.mark.parametrize("wrap", [np.asarray, torch.tensor], ids=["numpy", "tensor"])
def test_numpy_and_tensor_scalars_are_python_scalars(wrap):
    m, d = _tiny()
    a = hessian.eigenvalues(m, CE, d, k=2, tol=1e-6, max_iter=20, seed=5)
    b = hessian.eigenvalues(
        m, CE, d, k=wrap(2), tol=wrap(1e-6), max_iter=wrap(20), seed=wrap(5), cache_bytes=wrap(1 << 20)
    )
    assert torch.equal(a.eigenvalues, b.eigenvalues) and b.seed == 5 and type(b.seed) is int
    t1 = hessian.trace(m, CE, d, num_samples=9, seed=2)
    t2 = hessian.trace(m, CE, d, num_samples=wrap(9), seed=wrap(2))
    assert t1.trace == t2.trace
    d1 = hessian.density(m, CE, d, num_iter=wrap(5), num_runs=wrap(2), num_points=wrap(50), seed=1, sigma=wrap(0.1))
    assert d1.grid.numel() == 50 and d1.sigma == float(wrap(0.1)) and type(d1.sigma) is float


@pytest.mark.parametrize(
    "call,kwargs,match",
    [
        ("eigenvalues", dict(progress="False"), "progress must be a bool"),
        ("eigenvalues", dict(cache_graph=1), "cache_graph must be a bool or None"),
        ("eigenvalues", dict(distributed="no"), "distributed must be a bool or None"),
        ("eigenvalues", dict(tol=float("nan")), "tol must be a finite real number > 0"),
        ("eigenvalues", dict(tol=0.0), "tol must be > 0"),
        ("eigenvalues", dict(k=2.0), "k must be an integer >= 1"),
        ("eigenvalues", dict(seed=1.5), "seed must be an integer"),
        ("eigenvalues", dict(callback=3), "callback must be callable"),
        ("eigenvalues", dict(max_iter=1, k=2), "max_iter must be >= k"),
        ("eigenvalues", dict(k=99), r"k must be at most the number of trainable parameters \(26\)"),
        ("trace", dict(num_samples=torch.tensor(9.0)), "num_samples must be an integer"),
        ("trace", dict(progress=1), "progress must be a bool"),
        ("density", dict(sigma=float("inf")), "sigma must be a finite real number > 0"),
        ("density", dict(num_points=1), "num_points must be an integer >= 2"),
        ("density", dict(dtype=torch.int64), "dtype must be a floating torch.dtype"),
    ],
)
def test_bad_arguments_consume_no_data(call, kwargs, match):
    """Checked before the data (here a one-shot generator) is read or the model is touched."""
    m, (x, y) = _tiny()
    read = []

    def batches():
        read.append(1)
        yield x, y

    with pytest.raises(ValueError, match=match):
        getattr(hessian, call)(m, CE, batches(), **kwargs)
    assert not read


def test_tracker_arguments_and_state():
    m, d = _tiny()
    t = hessian.SharpnessTracker(m, CE, d, every=np.int64(2), k=torch.tensor(1))
    assert t.every == 2 and type(t.every) is int and t.k == 1
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        hessian.SharpnessTracker(m, CE, d, every=True)
    with pytest.raises(ValueError, match=r"state\['count'\] must be an integer >= 0"):
        t.load_state_dict({"count": -1, "history": []})
    with pytest.raises(ValueError, match="state must be a SharpnessTracker state_dict"):
        t.load_state_dict({"count": 1})
    assert t.count == 0 and t.history == []


# ---------------------------------------------------------------- estimators against their definitions
def _rademacher(shape, gen):
    return torch.randint(0, 2, shape, generator=gen).to(F64) * 2 - 1


@pytest.mark.parametrize("method,num_samples", [("hutch++", 31), ("hutch++", 10), ("hutchinson", 12)])
def test_trace_estimator_equals_its_definition(seed, method, num_samples):
    """The estimate, its quadratic forms and its standard error, from the same Rademacher draws,
    in float64 with the dense Hessian: Hutch++ (Meyer et al. 2021, Alg. 1) with s = m // 3
    sketch vectors, Q = orth(H S), tr(Q^T H Q) + mean of the residual forms (P z)^T H (P z),
    P = I - Q Q^T; the standard error is the sample standard deviation (n - 1) over sqrt(n)."""
    g = torch.Generator().manual_seed(seed)
    model, data = softmax_regression(g)
    H = dense_hessian(model, data)
    n = H.shape[0]
    got = hessian.trace(model, CE, data, num_samples=num_samples, method=method, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    if method == "hutch++":
        s = num_samples // 3
        Q = torch.linalg.qr(H @ _rademacher((s, n), gen).T).Q
        exact = float(torch.trace(Q.T @ H @ Q))
        P = torch.eye(n, dtype=F64) - Q @ Q.T
        probes = [P @ _rademacher((n,), gen) for _ in range(num_samples - 2 * s)]
    else:
        exact, probes = 0.0, [_rademacher((n,), gen) for _ in range(num_samples)]
    forms = torch.stack([z @ H @ z for z in probes])
    k = forms.numel()
    mean = float(forms.sum()) / k
    se = math.sqrt(float(((forms - mean) ** 2).sum()) / (k - 1)) / math.sqrt(k)
    # same draws, same arithmetic up to summation order: rounding-level differences (1e-15
    # relative at most over 40 seeds); the smallest plausible slip (n for n - 1) moves se by 5%
    scale = float(H.abs().sum())
    msg = f"seed={seed} got (trace, se)=({got.trace}, {got.std_error}), definition ({exact + mean}, {se})"
    assert torch.allclose(got.samples, forms, rtol=1e-9, atol=1e-12 * scale), msg
    assert got.trace == pytest.approx(exact + mean, rel=1e-9, abs=1e-12 * scale), msg
    assert got.std_error == pytest.approx(se, rel=1e-7, abs=1e-12 * scale), msg


def test_slq_weights_are_the_quadrature_of_the_start_vector(seed):
    """Lanczos quadrature with k nodes is exact for polynomials of degree <= 2k - 1: per run,
    sum_j w_j theta_j^p = v0^T A^p v0 / v0^T v0 for p = 0..2k-1, with v0 that run's Rademacher
    start vector (drawn in order from the seeded generator) and w_j the squared first components."""
    g = torch.Generator().manual_seed(seed)
    eigs = torch.linspace(-1.0, 2.0, 12, dtype=F64) + 0.05 * torch.rand(12, generator=g, dtype=F64)
    model = Quadratic(eigs.tolist(), g)
    A = model.A
    k, runs = 4, 3
    d = hessian.density(model, mean_loss, (torch.zeros(2, 1), torch.zeros(2)), num_iter=k, num_runs=runs, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for r, (nodes, weights) in enumerate(zip(d.nodes, d.weights)):
        v0 = _rademacher((12,), gen)
        for p in range(2 * k):
            want = float(v0 @ torch.linalg.matrix_power(A, p) @ v0) / float(v0 @ v0)
            got = float((weights * nodes**p).sum())
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12 * 2.1**p), f"seed={seed} run {r} moment {p}"
