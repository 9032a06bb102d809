"""fastsam.adversarial's contract: equal to a float64 per-sample PGD written from Madry et al.,
the random start uniform in the ball, inputs outside clamp and non-finite gradients are errors,
every setting goes through fastsam._checks, and a call that raises leaves the model as it was."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastsam import adversarial

from .test_adversarial import linear2, small_cnn, worst_direction

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CE = nn.functional.cross_entropy


def _reference_pgd(model, x, y, *, eps, alpha, steps, norm, targeted, clamp):
    """PGD sample by sample in float64: ascend (descend if targeted) the sample's own loss by
    alpha along sign(g) (L-inf) or g / ||g|| (L2), project onto the eps-ball around x
    (L-inf: clip each coordinate; L2: scale by min(1, eps / ||delta||)), clip into clamp."""
    out = []
    for xi, yi in zip(x, y):
        x0 = xi.detach().clone()
        xa = x0.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            (g,) = torch.autograd.grad(CE(model(xa[None]), yi[None]), xa)
            with torch.no_grad():
                d = g.sign() if norm == "linf" else g / g.norm() if g.norm() > 0 else g
                xa = xa + (-1 if targeted else 1) * alpha * d
                delta = xa - x0
                if norm == "linf":
                    delta = delta.clamp(-eps, eps)
                elif delta.norm() > eps:
                    delta = delta * (eps / delta.norm())
                xa = (x0 + delta).clamp(*clamp) if clamp else x0 + delta
        out.append(xa.detach())
    return torch.stack(out)


@pytest.mark.parametrize("norm", adversarial.NORMS)
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("clamp", [(0.0, 1.0), None])
def test_pgd_equals_the_per_sample_reference(seed, norm, targeted, clamp):
    torch.manual_seed(seed)
    m = small_cnn().double().eval()
    x = torch.rand(6, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    eps = 0.1 if norm == "linf" else 0.6
    # alpha * steps = 2.5 eps: some samples reach the boundary, others turn and stay inside
    kw = dict(eps=eps, alpha=eps / 4, steps=10, norm=norm, targeted=targeted, clamp=clamp)
    got = adversarial.pgd(m, x, y, random_start=False, **kw)
    ref = _reference_pgd(m, x, y, **kw)
    # rounding-level differences (2e-16 at most over 80 seeded cases); a slip moves points by ~alpha
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10, msg=lambda s: f"seed={seed}: {s}")


def test_l2_points_inside_the_ball_stay_inside():
    """Three steps of 0.1 inside a ball of radius 1 move exactly 0.3 along the worst direction:
    the projection acts on points outside the ball only."""
    m, x, y = linear2()
    d = worst_direction(m, y)
    x_adv = adversarial.pgd(m, x, y, eps=1.0, alpha=0.1, steps=3, norm="l2", random_start=False, clamp=None)
    torch.testing.assert_close(x_adv - x, 0.3 * d / d.norm(dim=1, keepdim=True), rtol=0, atol=1e-12)
    x_adv = adversarial.pgd(m, x, y, eps=1.0, alpha=0.1, steps=3, norm="linf", random_start=False, clamp=None)
    torch.testing.assert_close(x_adv - x, 0.3 * d.sign(), rtol=0, atol=1e-12)


def _ks_uniform(u):
    """Kolmogorov-Smirnov distance of samples u from U(0, 1)."""
    u = u.sort().values
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=u.dtype)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


@pytest.mark.parametrize("norm", adversarial.NORMS)
def test_random_start_is_uniform_in_the_ball(seed, norm):
    """steps=0 returns the random start. L-inf: each coordinate uniform on [-eps, eps]; L2: the
    radius r has P(r <= t eps) = t^d (uniform in the ball), the direction has mean 0. KS bound
    at level 1e-6: sqrt(ln(2e6) / (2 n))."""
    n, d, eps = 4000, 3, 0.25
    x = torch.zeros(n, d, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    delta = adversarial.pgd(lambda t: t, x, y, eps=eps, alpha=0.1, steps=0, norm=norm, clamp=None, generator=g)
    bound = math.sqrt(math.log(2e6) / (2 * n))
    if norm == "linf":
        assert float(delta.abs().max()) <= eps
        u = (delta.flatten() / eps + 1) / 2
        ks = _ks_uniform(u)
    else:
        r = delta.norm(dim=1)
        assert float(r.max()) <= eps * (1 + 1e-12)
        ks = _ks_uniform((r / eps) ** d)
        mean_dir = (delta / r[:, None]).mean(0)
        assert float(mean_dir.norm()) < 5 / math.sqrt(n), f"seed={seed} mean direction {mean_dir}"
    assert ks < bound, f"seed={seed}: KS distance {ks} >= {bound}"


@pytest.mark.parametrize("norm", adversarial.NORMS)
def test_the_model_only_sees_points_inside_clamp(seed, norm):
    """The random start is clamped before the first forward, and steps=0 returns it clamped."""
    g = torch.Generator().manual_seed(seed)
    m, _, y = linear2()
    x = torch.rand(8, 6, generator=g, dtype=torch.float64)
    x[:, 0] = 0.0
    seen = []

    def model(t):
        seen.append((float(t.detach().min()), float(t.detach().max())))
        return m(t)

    for steps in (0, 3):
        x_adv = adversarial.pgd(model, x, y, eps=0.5, alpha=0.1, steps=steps, norm=norm, generator=g)
        assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    assert seen and all(0.0 <= lo and hi <= 1.0 for lo, hi in seen), f"seed={seed} {seen}"


# ---------------------------------------------------------------- inputs the attack cannot honour
def _snapshot(m):
    return (
        [mod.training for mod in m.modules()],
        [b.clone() for b in m.buffers()],
        [p.detach().clone() for p in m.parameters()],
        [(p.grad, None if p.grad is None else p.grad.clone()) for p in m.parameters()],
    )


def _assert_same(m, snap):
    flags, buffers, params, grads = snap
    assert [mod.training for mod in m.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), buffers))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), params))
    for p, (obj, val) in zip(m.parameters(), grads):
        assert (p.grad is None) if obj is None else (p.grad is obj and torch.equal(p.grad, val))


def _cnn_with_state(seed):
    torch.manual_seed(seed)
    m = small_cnn()
    m.train()
    m[3].eval()
    x = torch.rand(7, 1, 6, 6)
    y = torch.randint(0, 5, (7,))
    m(x).sum().backward()
    m[0].weight.grad = None
    return m, x, y


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "robust_accuracy"])
def test_inputs_outside_clamp_are_an_error(seed, attack):
    """Normalised images (about [-2, 2]) with the default clamp=(0, 1): clamping would move them
    up to ~1 whatever eps (0.03 here), so the call refuses, naming clamp and the range."""
    m, x, y = _cnn_with_state(seed)
    x = (x - 0.5) / 0.25
    snap = _snapshot(m)
    call = {
        "pgd": lambda: adversarial.pgd(m, x, y, eps=0.03, alpha=0.01, steps=3),
        "fgsm": lambda: adversarial.fgsm(m, x, y, eps=0.03),
        "robust_accuracy": lambda: adversarial.robust_accuracy(m, (x, y), eps=0.03, steps=3),
    }[attack]
    with pytest.raises(ValueError, match=r"x has values in \[-\d.*, \d.*\], outside clamp=\(0, 1\)"):
        call()
    _assert_same(m, snap)
    # just outside by less than eps is outside too: the L2 ball would not be honoured either
    x2 = torch.rand(7, 1, 6, 6) * 0.98 + 0.01
    x2[0, 0, 0, 0] = 1.001
    with pytest.raises(ValueError, match="outside clamp"):
        adversarial.pgd(m, x2, y, eps=0.5, alpha=0.1, steps=2, norm="l2")
    assert adversarial.pgd(m, x, y, eps=0.03, alpha=0.01, steps=3, clamp=None).sub(x).abs().max() <= 0.03 + 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_are_an_error(bad):
    m, x, y = linear2()
    x = x.clone()
    x[2, 1] = bad
    with pytest.raises(ValueError, match="x must be finite"):
        adversarial.pgd(m, x, y, eps=0.1, alpha=0.05, steps=2, clamp=None)


def test_nonfinite_gradient_is_an_error_and_changes_nothing(seed):
    m, x, y = _cnn_with_state(seed)
    snap = _snapshot(m)
    with pytest.raises(FloatingPointError, match="input gradient .* was not finite"):
        adversarial.pgd(
            m, x, y, eps=0.1, alpha=0.05, steps=3, model_mode="train", loss_fn=lambda o, t: CE(o, t) * float("nan")
        )
    _assert_same(m, snap)


@pytest.mark.parametrize("model_mode", adversarial.MODEL_MODES)
def test_exception_midway_changes_nothing(seed, model_mode):
    """loss_fn raises on the third step (after BatchNorm updated its statistics in train mode)."""
    m, x, y = _cnn_with_state(seed)
    snap = _snapshot(m)
    calls = []

    def loss_fn(o, t):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return CE(o, t)

    with pytest.raises(KeyboardInterrupt):
        adversarial.pgd(m, x, y, eps=0.1, alpha=0.05, steps=5, loss_fn=loss_fn, model_mode=model_mode)
    _assert_same(m, snap)
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        adversarial.robust_accuracy(m, (x, y), eps=0.1, steps=5, loss_fn=loss_fn, model_mode=model_mode)
    _assert_same(m, snap)


def test_zero_gradient_in_half_precision_is_a_zero_step():
    """A zero input gradient (the model ignores x) steps by 0 in float16/bfloat16, not by 0/0."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.rand(4, 3).to(dtype)
        y = torch.zeros(4, dtype=torch.long)
        model = lambda t: torch.zeros(t.shape[0], 2, dtype=t.dtype) + 0 * t.sum()
        for norm in adversarial.NORMS:
            x_adv = adversarial.pgd(
                model,
                x,
                y,
                eps=0.1,
                alpha=0.05,
                steps=2,
                norm=norm,
                random_start=False,
                loss_fn=lambda o, t: o.float().sum(),
            )
            assert torch.equal(x_adv, x), (dtype, norm)


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("wrap", [np.asarray, torch.tensor], ids=["numpy", "tensor"])
def test_numpy_and_tensor_scalars(wrap):
    m, x, y = linear2()
    a = adversarial.pgd(m, x, y, eps=0.25, alpha=0.125, steps=3, clamp=None, random_start=False)
    b = adversarial.pgd(m, x, y, eps=wrap(0.25), alpha=wrap(0.125), steps=wrap(3), clamp=None, random_start=False)
    assert torch.equal(a, b)
    x01 = torch.rand(8, 6, dtype=torch.float64)
    c = adversarial.pgd(m, x01, y, eps=0.25, alpha=0.125, steps=2, clamp=(wrap(0.0), wrap(1.0)))
    assert float(c.min()) >= 0 and float(c.max()) <= 1
    r = adversarial.robust_accuracy(
        m,
        (x, y),
        eps=wrap(0.25),
        steps=wrap(2),
        clamp=None,
        batch_size=wrap(3),
        restarts=wrap(2),
        random_start=True,
        seed=wrap(4),
    )
    assert r.attack["eps"] == 0.25 and type(r.attack["steps"]) is int and r.attack["alpha"] == 0.0625


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targeted="False"), "targeted must be a bool"),
        (dict(random_start=1), "random_start must be a bool"),
        (dict(steps=3.0), "steps must be an integer >= 0"),
        (dict(alpha=float("inf")), "alpha must be a finite real number >= 0"),
        (dict(clamp=(0.0, float("nan"))), r"clamp\[1\] must be a finite real number"),
        (dict(clamp=(0, torch.ones(2))), r"clamp\[1\] must be a finite real number, got a tensor of shape \(2,\)"),
        (dict(model_mode="test"), "model_mode must be one of 'eval', 'train' or None"),
        (dict(generator=7), "generator must be a torch.Generator on x.s device"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    m, x, y = linear2()
    args = dict(eps=0.1, alpha=0.05, steps=2, clamp=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        adversarial.pgd(m, x, y, **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="l1"), "norm must be one of"),
        (dict(clamp=(1, 0)), "clamp must satisfy low < high"),
        (dict(random_start="yes"), "random_start must be a bool"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(seed=0.5), "seed must be an integer"),
        (dict(restarts=True), "restarts must be an integer"),
        (dict(alpha=-1), "alpha must be >= 0"),
        (dict(model_mode=False), "model_mode must be one of"),
    ],
)
def test_robust_accuracy_checks_settings_before_reading_data(kwargs, match):
    m, x, y = linear2()
    read = []

    def loader():
        read.append(1)
        yield x, y

    with pytest.raises(ValueError, match=match):
        adversarial.robust_accuracy(m, loader(), eps=0.1, **kwargs)
    assert not read


def test_robust_accuracy_never_above_clean_accuracy():
    """A sample counts as robust only if its clean prediction is right too: with a loss that
    pulls towards the labels, attacked inputs of misclassified samples become right, and must
    still not count."""
    m, x, y = linear2(d=4, seed=5)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = m(x).argmax(1)
    y[:40] = 1 - y[:40]
    r = adversarial.robust_accuracy(m, (x, y), eps=3.0, steps=10, clamp=None, loss_fn=lambda o, t: -CE(o, t))
    assert r.clean_acc == pytest.approx(0.8) and r.robust_acc <= r.clean_acc
    x_adv = adversarial.pgd(
        m, x, y, eps=3.0, alpha=0.75, steps=10, clamp=None, random_start=False, loss_fn=lambda o, t: -CE(o, t)
    )
    both = (m(x).argmax(1).eq(y) & m(x_adv).argmax(1).eq(y)).double().mean()
    assert r.robust_acc == pytest.approx(float(both))
    assert adversarial.robust_accuracy(m, (x, y), eps=0.2, steps=1, clamp=None).attack["alpha"] == 0.2
