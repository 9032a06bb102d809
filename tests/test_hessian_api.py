"""fastsam.hessian: argument errors, exact state restoration, data forms, tracker, progress."""

import pytest
import torch
from torch import nn

import fastsam.hessian as hessian

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CE = nn.functional.cross_entropy


def net(g):
    """BatchNorm, dropout and a frozen parameter; mixed per-module modes set by the caller."""
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        m[1].running_mean.copy_(torch.randn(6, generator=g))
    m[0].bias.requires_grad_(False)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    return m, (x, y)


def snapshot(model):
    return {
        "training": [mod.training for mod in model.modules()],
        "buffers": [b.clone() for b in model.buffers()],
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def assert_restored(model, snap):
    assert [mod.training for mod in model.modules()] == snap["training"]
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), snap["buffers"]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snap["params"]))
    for p, (obj, val) in zip(model.parameters(), snap["grads"]):
        if obj is None:
            assert p.grad is None
        else:
            assert p.grad is obj and torch.equal(p.grad, val)
    assert torch.equal(torch.get_rng_state(), snap["rng"])


CALLS = {
    "eigenvalues_lanczos": lambda m, d, **kw: hessian.eigenvalues(m, CE, d, k=2, tol=1e-6, **kw),
    "eigenvalues_power": lambda m, d, **kw: hessian.eigenvalues(m, CE, d, k=2, method="power", max_iter=30, **kw),
    "trace": lambda m, d, **kw: hessian.trace(m, CE, d, num_samples=9, **kw),
    "density": lambda m, d, **kw: hessian.density(m, CE, d, num_iter=10, **kw),
    "hvp": lambda m, d, **kw: hessian.hvp(
        m, CE, d, [torch.ones_like(p) for p in m.parameters() if p.requires_grad], **kw
    ),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("model_mode", hessian.MODEL_MODES)
@pytest.mark.parametrize("hvp_mode", hessian.HVP_MODES)
def test_state_restored_exactly(seed, call, model_mode, hvp_mode):
    g = torch.Generator().manual_seed(seed)
    model, data = net(g)
    model.train()
    model[3].eval()  # mixed per-module modes must come back as they were
    model[0].weight.grad = torch.randn(6, 4, generator=g)  # a grad tensor; the others stay None
    snap = snapshot(model)
    CALLS[call](model, data, model_mode=model_mode, hvp_mode=hvp_mode)
    assert_restored(model, snap)


@pytest.mark.parametrize("cache_graph", [False, None])
def test_state_restored_after_exception(seed, cache_graph):
    g = torch.Generator().manual_seed(seed)
    model, data = net(g)
    model.eval()
    snap = snapshot(model)
    calls = []
    if cache_graph is None:  # graphs are kept: loss_fn runs once per batch, so fail on the 2nd batch
        (x, y), fail_at = data, 2
        data = [(x[:6], y[:6]), (x[6:], y[6:])]
    else:
        fail_at = 3

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return CE(out, y)

    with pytest.raises(KeyboardInterrupt):
        hessian.eigenvalues(model, failing_loss, data, model_mode="train", cache_graph=cache_graph)
    assert_restored(model, snap)


def test_train_and_eval_mode_differ(seed):
    """model_mode is honoured: BatchNorm batch statistics vs running statistics."""
    g = torch.Generator().manual_seed(seed)
    model, data = net(g)
    model[3].p = 0.0
    v = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad), generator=g)
    tr = torch.cat([t.reshape(-1) for t in hessian.hvp(model, CE, data, v, model_mode="train")])
    ev = torch.cat([t.reshape(-1) for t in hessian.hvp(model, CE, data, v, model_mode="eval")])
    assert (tr - ev).norm() > 1e-3 * ev.norm()


def test_data_forms_agree(seed):
    """A list, a generator and a DataLoader of the same batches give the same operator."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    ref = torch.cat([t.reshape(-1) for t in hessian.hvp(model, CE, (x, y), v)])  # one batch of 12
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    for data in (batches, (b for b in batches), loader):
        out = torch.cat([t.reshape(-1) for t in hessian.hvp(model, CE, data, v)])
        assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


def tiny():
    m = nn.Linear(3, 2)
    return m, (torch.randn(4, 3), torch.randint(0, 2, (4,)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must"),
        (dict(k=9), "k must"),
        (dict(k=1.5), "k must"),
        (dict(method="arnoldi"), "method"),
        (dict(hvp_mode="fwd"), "hvp_mode"),
        (dict(model_mode="training"), "model_mode"),
        (dict(tol=0), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(seed="x"), "seed"),
        (dict(dtype=torch.int32), "dtype"),
    ],
)
def test_eigenvalues_bad_arguments(kwargs, match):
    m, d = tiny()
    with pytest.raises(ValueError, match=match):
        hessian.eigenvalues(m, CE, d, **kwargs)


def test_other_bad_arguments():
    m, d = tiny()
    with pytest.raises(ValueError, match="data is empty"):
        hessian.eigenvalues(m, CE, [])
    with pytest.raises(ValueError, match="data"):
        hessian.eigenvalues(m, CE, None)
    with pytest.raises(TypeError, match="data batch 0"):
        hessian.eigenvalues(m, CE, [torch.randn(4, 3)])
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        hessian.eigenvalues(m, lambda o, y: CE(o, y, reduction="none"), d)
    with pytest.raises(ValueError, match=r"vector\[1\] must have shape \(2,\)"):
        hessian.hvp(m, CE, d, [torch.ones(2, 3), torch.ones(3)])
    with pytest.raises(ValueError, match="vector must be a list of 2"):
        hessian.hvp(m, CE, d, [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="vector must be a flat tensor with 8"):
        hessian.hvp(m, CE, d, torch.ones(7))
    with pytest.raises(ValueError, match="method"):
        hessian.trace(m, CE, d, method="hutch")
    with pytest.raises(ValueError, match="num_samples"):
        hessian.trace(m, CE, d, num_samples=2)  # hutch++ needs >= 3
    with pytest.raises(ValueError, match="num_iter"):
        hessian.density(m, CE, d, num_iter=0)
    with pytest.raises(ValueError, match="num_runs"):
        hessian.density(m, CE, d, num_runs=0)
    with pytest.raises(ValueError, match="sigma"):
        hessian.density(m, CE, d, sigma=-1.0)
    with pytest.raises(ValueError, match="every"):
        hessian.SharpnessTracker(m, CE, d, every=0)
    with pytest.raises(ValueError, match="requires_grad"):
        hessian.eigenvalues(m.requires_grad_(False), CE, d)
    with pytest.raises(TypeError, match="model"):
        hessian.eigenvalues(lambda x: x, CE, d)


def test_hutchpp_small_budget():
    m, d = tiny()
    t = hessian.trace(m, CE, d, num_samples=4)  # 1 sketch vector, 1 product on it, 2 probes left
    assert t.num_hvps == 4 and t.samples.numel() == 2 and t.std_error >= 0
    t = hessian.trace(m, CE, d, num_samples=3)  # one residual probe: no error estimate
    assert t.num_hvps == 3 and t.std_error != t.std_error  # nan


def test_tracker_history(seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    data = (torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (10,), generator=g))
    tr = hessian.SharpnessTracker(model, CE, data, every=2, tol=1e-8)
    out = [tr.step() for _ in range(5)]
    assert [o is None for o in out] == [True, False, True, False, True]
    assert tr.steps() == [2, 4]
    ref = hessian.eigenvalues(model, CE, data, tol=1e-8).eigenvalues[0].item()
    assert tr.lambda_max() == pytest.approx([ref, ref], rel=1e-6)
    assert tr.history[0]["num_hvps"] > 0 and tr.history[0]["converged"]
    tr2 = hessian.SharpnessTracker(model, CE, lambda: data, every=2, k=2)  # callable data
    tr2.load_state_dict(tr.state_dict())
    assert tr2.steps() == [2, 4]
    e = tr2.step(step=100)
    assert e["step"] == 100 and len(e["eigenvalues"]) == 2 and tr2.steps() == [2, 4, 100]


def test_progress_bar_and_callback(seed, capsys):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 3).double()
    data = (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    seen = []
    r = hessian.eigenvalues(
        model, CE, data, k=2, tol=1e-8, progress=True, seed=seed, callback=lambda info: seen.append(info["num_hvps"])
    )
    r2 = hessian.eigenvalues(model, CE, data, k=2, tol=1e-8, seed=seed)
    assert torch.equal(r.eigenvalues, r2.eigenvalues)  # same seed, same answer
    assert seen == list(range(1, r.num_hvps + 1))
    # a callback returning True stops early
    r3 = hessian.eigenvalues(model, CE, data, k=1, tol=1e-12, seed=seed, callback=lambda info: info["step"] >= 3)
    assert r3.num_hvps == 3
