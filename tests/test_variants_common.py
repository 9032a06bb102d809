"""Shared problem and plain per-parameter float64 references for the variant/schedule tests.

The problem: parameters of odd shapes in two param groups; step t's loss is a
smooth non-convex function whose coefficients depend on t (a different
"batch" every step).  The references follow the published algorithms with
Python loops over parameters and torch's single-tensor base optimizers.
"""

import io
import math

import torch

SHAPES = [(7, 3), (5,), (3, 2, 3), (11,), (2, 5)]


def make_params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def groups(params, base):
    lr2 = 0.05 if base is torch.optim.SGD else 3e-3
    return [{"params": params[:3]}, {"params": params[3:], "lr": lr2, "rho": 0.08}]


def base_kwargs(base):
    if base is torch.optim.SGD:
        return dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    return dict(lr=1e-2, weight_decay=1e-2)


def loss_at(params, t, poison=None):
    g = torch.Generator().manual_seed(1000 + t)
    total = 0.0
    for p in params:
        a = torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) + 0.5
        b = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 2
        total = total + (0.5 * a * p * p + torch.sin(b * p) + 0.05 * p**4).sum()
    if poison is not None:
        total = total * poison
    return total


def grads_at(params, t):
    ps = [p.detach().clone().requires_grad_() for p in params]
    loss_at(ps, t).backward()
    return [p.grad for p in ps]


def drive(opt, params, steps, start=0, counter=None, poison=None, drop=None):
    """``steps`` steps of ``opt.step(closure)``; ``poison``: {t: ("first"|"second", value)};
    ``drop``: {t: parameter indices whose gradients are removed (None) in both passes of step t}."""
    poison = poison or {}
    drop = drop or {}

    def dropped(t):
        for i in drop.get(t, ()):
            params[i].grad = None

    for t in range(start, start + steps):
        where, val = poison.get(t, (None, None))
        loss_at(params, t, val if where == "first" else None).backward()
        dropped(t)

        def closure(t=t, where=where, val=val):
            if counter is not None:
                counter.append(t)
            loss_at(params, t, val if where == "second" else None).backward()
            dropped(t)

        opt.step(closure)
        opt.zero_grad()


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def resume_check(make_opt, base, steps=12, cut=5, driver=drive):
    """Uninterrupted vs saved at ``cut`` and resumed into a fresh optimizer: bitwise equal."""
    pa = make_params()
    oa = make_opt(groups(pa, base))
    driver(oa, pa, steps)
    pb = make_params()
    ob = make_opt(groups(pb, base))
    driver(ob, pb, cut)
    sd = roundtrip(ob.state_dict())
    pc = [p.detach().clone().requires_grad_() for p in pb]
    oc = make_opt(groups(pc, base))
    oc.load_state_dict(sd)
    driver(oc, pc, steps - cut, start=cut)
    for x, y in zip(pa, pc):
        assert torch.equal(x, y)


class RefBase:
    """Groups with rho, a torch single-tensor base optimizer on plain float64 tensors."""

    def __init__(self, params, base, rho=0.05, **kw):
        self.params = [p.detach().clone() for p in params]
        gs = [
            {"params": self.params[:3]},
            {"params": self.params[3:], "lr": 0.05 if base is torch.optim.SGD else 3e-3, "rho": 0.08},
        ]
        for g in gs:
            g.setdefault("rho", rho)
        self.base = base(gs, foreach=False, **kw)
        self.groups = self.base.param_groups
        self.t = 0

    def items(self):
        for g in self.groups:
            for p in g["params"]:
                yield g, p

    def perturb(self, d):
        """w <- w + rho_group * d / (||d|| + 1e-12) (entries None: no gradient, not moved); returns
        the old weights."""
        norm = math.sqrt(sum(float((x * x).sum()) for x in d if x is not None))
        old = [p.clone() for p in self.params]
        for (g, p), x in zip(self.items(), d):
            if x is not None:
                p.add_(x * (g["rho"] / (norm + 1e-12)))
        return old

    def base_step(self, direction):
        for p, x in zip(self.params, direction):
            p.grad = None if x is None else x.clone()
        self.base.step()


def grads_without(params, t, drop=()):
    """grads_at with the gradients of the parameters ``drop`` (indices) removed (None)."""
    return [None if i in drop else g for i, g in enumerate(grads_at(params, t))]


def close(a, b, tol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=tol, atol=tol)


def test_problem_is_deterministic():
    p = make_params()
    g1, g2 = grads_at(p, 3), grads_at(p, 3)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
