"""fastsam.adversarial: PGD/FGSM against closed-form worst cases, invariants, state restoration."""

import pytest
import torch
from torch import nn

import fastsam
from fastsam import adversarial

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def linear2(d=6, seed=0):
    """A 2-class linear model with known weights (float64)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(d, 2).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(2, d, generator=g, dtype=torch.float64))
        m.bias.copy_(torch.randn(2, generator=g, dtype=torch.float64))
    x = torch.randn(8, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    return m, x, y


def worst_direction(m, y):
    """Per sample: w_other - w_y, the input direction that increases the cross-entropy fastest
    (for 2 classes the loss is a monotone function of (w_other - w_y) . x, for every x)."""
    w = m.weight.detach()
    return w[1 - y] - w[y]


@pytest.mark.parametrize("random_start", [False, True])
def test_linf_linear_closed_form(random_start):
    m, x, y = linear2()
    eps = 0.3
    g = torch.Generator().manual_seed(1)
    x_adv = adversarial.pgd(
        m, x, y, eps=eps, alpha=eps / 4, steps=10, random_start=random_start, clamp=None, generator=g
    )
    # every coordinate moves by alpha in the same direction each step: 8 steps reach the corner
    torch.testing.assert_close(x_adv - x, eps * worst_direction(m, y).sign(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("random_start", [False, True])
def test_l2_linear_closed_form(random_start):
    m, x, y = linear2()
    eps = 0.5
    d = worst_direction(m, y)
    g = torch.Generator().manual_seed(2)
    x_adv = adversarial.pgd(
        m, x, y, eps=eps, alpha=eps / 2, steps=60, norm="l2", random_start=random_start, clamp=None, generator=g
    )
    expect = eps * d / d.norm(dim=1, keepdim=True)
    torch.testing.assert_close(x_adv - x, expect, rtol=0, atol=1e-6 if random_start else 1e-12)


def test_fgsm_closed_form_and_margin():
    m, x, y = linear2()
    eps = 0.2
    x_adv = adversarial.fgsm(m, x, y, eps=eps, clamp=None)
    d = worst_direction(m, y)
    torch.testing.assert_close(x_adv - x, eps * d.sign(), rtol=0, atol=1e-12)
    # the margin drops by exactly eps * ||w_y - w_other||_1, the L-inf worst case
    margin = lambda z: (m(z).gather(1, y[:, None]) - m(z).gather(1, (1 - y)[:, None])).squeeze(1)
    torch.testing.assert_close(margin(x) - margin(x_adv), eps * d.abs().sum(1))
    x2 = adversarial.fgsm(m, x, y, eps=eps, norm="l2", clamp=None)
    torch.testing.assert_close(margin(x) - margin(x2), eps * d.norm(dim=1))


def test_targeted_moves_towards_target():
    m, x, y = linear2()
    target = 1 - y
    x_adv = adversarial.pgd(m, x, target, eps=0.3, alpha=0.1, steps=5, targeted=True, clamp=None, random_start=False)
    torch.testing.assert_close(x_adv - x, 0.3 * worst_direction(m, y).sign(), rtol=0, atol=1e-12)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


@pytest.mark.parametrize("norm", adversarial.NORMS)
@pytest.mark.parametrize("model_mode", adversarial.MODEL_MODES)
def test_ball_range_state_and_grads(norm, model_mode):
    torch.manual_seed(0)
    m = small_cnn()
    m.train()
    m[3].eval()  # mixed per-module flags must come back exactly
    x = torch.rand(7, 1, 6, 6)
    y = torch.randint(0, 5, (7,))
    m(x).sum().backward()  # some existing .grad
    m[0].weight.grad = None  # and one missing
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in m.parameters()]
    flags = [mod.training for mod in m.modules()]
    buffers = [b.clone() for b in m.buffers()]
    eps = 0.1 if norm == "linf" else 0.5
    x_adv = adversarial.pgd(m, x, y, eps=eps, alpha=eps / 3, steps=5, norm=norm, model_mode=model_mode)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
    else:
        assert float(delta.norm(dim=1).max()) <= eps * (1 + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert [mod.training for mod in m.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), buffers))
    for p, (obj, val) in zip(m.parameters(), grads):
        if obj is None:
            assert p.grad is None
        else:
            assert p.grad is obj and torch.equal(p.grad, val)


def test_attack_increases_loss_and_clamps():
    torch.manual_seed(3)
    m = small_cnn().eval()
    x = torch.rand(16, 1, 6, 6)
    y = m(x).argmax(1)
    ce = nn.functional.cross_entropy
    x_adv = adversarial.pgd(m, x, y, eps=0.3, alpha=0.05, steps=10)
    with torch.no_grad():
        assert float(ce(m(x_adv), y)) > float(ce(m(x), y))
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    x_mid = 0.2 + 0.4 * x  # inputs inside the narrower range
    x_lo = adversarial.pgd(m, x_mid, y, eps=0.3, alpha=0.05, steps=3, clamp=(0.2, 0.6))
    assert bool((x_lo >= torch.tensor(0.2)).all()) and bool((x_lo <= torch.tensor(0.6)).all())
    assert float((x_lo - x_mid).abs().max()) <= 0.3 + 1e-6


def test_determinism_with_generator():
    torch.manual_seed(0)
    m = small_cnn().eval()
    x, y = torch.rand(5, 1, 6, 6), torch.randint(0, 5, (5,))
    a = adversarial.pgd(m, x, y, eps=0.1, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(7))
    b = adversarial.pgd(m, x, y, eps=0.1, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(7))
    c = adversarial.pgd(m, x, y, eps=0.1, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    r1 = adversarial.robust_accuracy(m, (x, y), eps=0.1, steps=3, random_start=True, seed=4)
    r2 = adversarial.robust_accuracy(m, (x, y), eps=0.1, steps=3, random_start=True, seed=4)
    assert r1 == r2


def test_zero_eps_and_zero_steps():
    m, x, y = linear2()
    assert torch.equal(adversarial.pgd(m, x, y, eps=0.0, alpha=0.1, steps=5, clamp=None), x)
    assert torch.equal(adversarial.pgd(m, x, y, eps=0.3, alpha=0.1, steps=0, random_start=False, clamp=None), x)


def test_robust_accuracy_linear():
    """Linear 2-class model: a sample survives an L-inf attack iff its margin > eps * ||w_y - w_o||_1."""
    m, x, y = linear2(d=4, seed=5)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = m(x).argmax(1)
    y[:20] = 1 - y[:20]  # 10% wrong
    eps = 0.1
    d = worst_direction(m, y)
    logits = m(x).detach()
    margin = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, (1 - y)[:, None]).squeeze(1)
    expect = float(((margin > 0) & (margin > eps * d.abs().sum(1))).double().mean())
    r = adversarial.robust_accuracy(m, (x, y), eps=eps, steps=10, clamp=None, batch_size=64)
    assert r.num_samples == 200 and r.clean_acc == pytest.approx(0.9)
    assert r.robust_acc == pytest.approx(expect) and r.robust_acc <= r.clean_acc
    loader = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 200, 50)]
    assert adversarial.robust_accuracy(m, loader, eps=eps, steps=10, clamp=None).robust_acc == pytest.approx(expect)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-0.1), "eps must be >= 0"),
        (dict(eps=float("nan")), "eps must be a finite real number"),
        (dict(alpha=-1.0), "alpha must be >= 0"),
        (dict(steps=-1), "steps must be an integer >= 0"),
        (dict(steps=2.5), "steps must be an integer >= 0"),
        (dict(norm="l1"), "norm must be one of"),
        (dict(clamp=(1.0, 0.0)), "clamp must satisfy low < high"),
        (dict(clamp=(0.0,)), "clamp must be None or a"),
        (dict(model_mode="test"), "model_mode must be one of"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    m, x, y = linear2()
    args = dict(eps=0.1, alpha=0.05, steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        adversarial.pgd(m, x, y, **args)


def test_errors_other():
    m, x, y = linear2()
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        adversarial.pgd(m, x.long(), y, eps=0.1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="y must be a tensor with the batch size"):
        adversarial.pgd(m, x, y[:3], eps=0.1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        adversarial.fgsm(m, x, y, eps=-1)
    with pytest.raises(ValueError, match="restarts > 1 needs random_start"):
        adversarial.robust_accuracy(m, (x, y), eps=0.1, restarts=2)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        adversarial.robust_accuracy(m, (x, y), eps=-0.1)


def test_lazy_attribute():
    assert fastsam.adversarial is adversarial
