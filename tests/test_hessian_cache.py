"""fastsam.hessian graph reuse: kept first-order graphs give the same products, within a budget."""

import pytest
import torch
from torch import nn

import fastsam.hessian as hessian

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CE = nn.functional.cross_entropy


def setup(seed=0, n=24):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)).double()
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]
    nparam = sum(p.numel() for p in m.parameters())
    vs = [torch.randn(nparam, generator=g, dtype=torch.float64) for _ in range(3)]
    return m, batches, vs


def products(m, data, vs, counter=None, **kw):
    calls = [0]

    def loss(out, y):
        calls[0] += 1
        return CE(out, y)

    with hessian.HessianOperator(m, loss, data, model_mode="train", seed=3, **kw) as op:
        out = [op.matvec(v) for v in vs]
        cached = op.num_cached
    assert not op._graphs  # freed on exit
    return out, cached, calls[0]


@pytest.mark.parametrize("nbatches", [1, 3])
def test_cached_equals_recomputed(nbatches):
    m, batches, vs = setup()
    data = batches[0] if nbatches == 1 else batches
    ref, c0, calls0 = products(m, data, vs, cache_graph=False)
    got, c1, calls1 = products(m, data, vs)
    assert c0 == 0 and c1 == nbatches
    assert calls0 == 3 * nbatches and calls1 == nbatches  # one forward per batch, not per product
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_budget_bounds_the_cache():
    m, batches, vs = setup()
    ref, _, _ = products(m, batches, vs, cache_graph=False)
    none, c0, calls0 = products(m, batches, vs, cache_bytes=0)
    assert c0 == 0 and calls0 == 9
    # a budget of one batch's graph: the first batch is kept, the other two recomputed
    with hessian.HessianOperator(m, CE, batches[:1], model_mode="train", seed=3) as op:
        op.matvec(vs[0])
        one = op._cached_bytes
    assert one > 0
    part, c1, calls1 = products(m, batches, vs, cache_bytes=one)
    assert c1 == 1 and calls1 == 1 + 2 * 3
    forced, c2, _ = products(m, batches, vs, cache_graph=True, cache_bytes=0)
    assert c2 == 3
    for r, a, b, c in zip(ref, none, part, forced):
        for t in (a, b, c):
            torch.testing.assert_close(r, t, rtol=1e-10, atol=1e-12)


def test_state_restored_with_cache():
    m, batches, vs = setup()
    m.eval()
    m[3].train()
    m(batches[0][0]).sum().backward()
    flags = [mod.training for mod in m.modules()]
    buffers = [b.clone() for b in m.buffers()]
    grads = [(p.grad, p.grad.clone()) for p in m.parameters()]
    r = hessian.eigenvalues(m, CE, batches, k=2, tol=1e-8, model_mode="train", seed=0)
    assert [mod.training for mod in m.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), buffers))
    for p, (obj, val) in zip(m.parameters(), grads):
        assert p.grad is obj and torch.equal(p.grad, val)
    r0 = hessian.eigenvalues(m, CE, batches, k=2, tol=1e-8, model_mode="train", seed=0, cache_graph=False)
    torch.testing.assert_close(r.eigenvalues, r0.eigenvalues, rtol=1e-8, atol=1e-10)


def test_trace_and_density_accept_cache_args():
    m, batches, _ = setup()
    a = hessian.trace(m, CE, batches, num_samples=6, seed=1, cache_graph=False)
    b = hessian.trace(m, CE, batches, num_samples=6, seed=1)
    assert a.trace == pytest.approx(b.trace, rel=1e-9)
    d = hessian.density(m, CE, batches, num_iter=5, seed=1, cache_bytes=0)
    assert d.num_hvps == 5


def test_cache_errors():
    m, batches, _ = setup()
    with pytest.raises(ValueError, match="cache_graph=True needs hvp_mode='double_backward'"):
        hessian.HessianOperator(m, CE, batches, hvp_mode="forward_over_reverse", cache_graph=True)
    with pytest.raises(ValueError, match="cache_graph must be a bool or None"):
        hessian.HessianOperator(m, CE, batches, cache_graph="yes")
    with pytest.raises(ValueError, match="cache_bytes must be an integer >= 0"):
        hessian.HessianOperator(m, CE, batches, cache_bytes=-1)
    # forward-over-reverse never caches (nothing to reuse) and still works
    with hessian.HessianOperator(m, CE, batches, hvp_mode="forward_over_reverse") as op:
        op.matvec(torch.ones(op.n, dtype=torch.float64))
        assert op.num_cached == 0
