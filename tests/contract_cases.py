"""What the contract, property and integration suites share: every fastsam optimizer built
the same way, a small problem whose gradient changes with the weights and the step, one
optimizer step in each optimizer's own form, and bitwise comparison of nested state."""

import io

import torch

from fastsam import GSAM, FriendlySAM, FusedSAM, LookSAM, MomentumSAM

VARIANTS = ("FusedSAM", "LookSAM", "GSAM", "FriendlySAM", "MomentumSAM")
CLASSES = {
    "FusedSAM": FusedSAM,
    "LookSAM": LookSAM,
    "GSAM": GSAM,
    "FriendlySAM": FriendlySAM,
    "MomentumSAM": MomentumSAM,
}
# Each variant's own options, chosen so that a few steps exercise what it adds: LookSAM reuses g_v
# every other step, FriendlySAM's EMA moves fast enough to matter within three steps.
OPTIONS = {
    "FusedSAM": {},
    "LookSAM": dict(k=2, alpha=0.7),
    "GSAM": dict(alpha=0.3),
    "FriendlySAM": dict(sigma=1.0, lmbda=0.6),
    "MomentumSAM": {},
}
BASE_KW = {
    torch.optim.SGD: dict(lr=0.1, momentum=0.9),
    torch.optim.Adam: dict(lr=1e-2),
    torch.optim.AdamW: dict(lr=1e-2, weight_decay=1e-2),
}
SHAPES = [(4, 3), (4,), (), (2, 3, 2)]


def build(name, params, base=torch.optim.SGD, backend="foreach", rho=0.05, **kw):
    """``name``'s optimizer over ``params`` with its own options, around ``base`` (its BASE_KW
    unless ``kw`` overrides them)."""
    return CLASSES[name](params, base, rho=rho, backend=backend, **{**OPTIONS[name], **BASE_KW[base], **kw})


def make_params(seed=0, dtype=torch.float64, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def loss_at(params, t=0):
    """A smooth non-convex loss whose coefficients depend on the step ``t`` (a new batch each step).
    A complex parameter enters through its real view, so that it and a real parameter holding that
    view see the same loss; parameters that do not require grad take no part (no gradient)."""
    g = torch.Generator().manual_seed(1000 + t)
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        v = torch.view_as_real(p) if p.is_complex() else p
        a = (torch.rand(v.shape, generator=g, dtype=torch.float64) + 0.5).to(v.dtype)
        b = (torch.randn(v.shape, generator=g, dtype=torch.float64) * 2).to(v.dtype)
        if p.requires_grad:
            total = total + (0.5 * a * v * v + torch.sin(b * v) + 0.05 * v**4).sum().double()
    return total


def step(opt, params, t=0, form="closure"):
    """One optimizer step on ``loss_at(params, t)``: ``step(closure)`` (torch's convention: the closure
    zeroes, runs forward and backward), or the two-step form (FusedSAM and its subclasses)."""

    def closure():
        opt.zero_grad()
        loss = loss_at(params, t)
        loss.backward()
        return loss

    if form == "closure":
        return opt.step(closure)
    opt.zero_grad()
    loss_at(params, t).backward()
    opt.first_step(zero_grad=True)
    loss_at(params, t).backward()
    opt.second_step(zero_grad=True)
    return None


def same(a, b, path="state"):
    """Assert that two nested structures (dicts, lists, tensors, numbers) are equal, tensors bitwise
    (dtype and shape included)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.nan_to_num(), b.nan_to_num())), (
            f"{path}: max |diff| {(a.double() - b.double()).abs().max()}"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"


def snapshot(opt, params):
    """The parameters and the whole state dict, copied (what 'unchanged' is checked against)."""
    return [p.detach().clone() for p in params], _copied(opt.state_dict())


def _copied(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v) for v in obj)
    return obj


def saved(obj, weights_only=True):
    """``obj`` through torch.save and torch.load (weights_only by default)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)
