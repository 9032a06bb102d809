"""A plain per-parameter SAM: the published algorithm, written for reading, not speed.

Foret et al. (2021), with ASAM (Kwon et al., 2021): g = grad L(w);
e = rho * T^2 g / ||T g|| with T = |w| (ASAM) or 1 (SAM), the norm global over
all parameters; g_sam = grad L(w + e); w is restored exactly and torch's own
base optimizer (single-tensor path) steps with g_sam, optionally clipped.
Non-finite gradients skip the step.  Everything FusedSAM does is compared with
this class.
"""

import torch


class ReferenceSAM:
    def __init__(self, params, base_cls, rho=0.05, adaptive=False, max_grad_norm=None, perturb_eps=1e-12, **kwargs):
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [dict(g) for g in params]
        else:
            groups = [{"params": params}]
        for g in groups:
            g.setdefault("rho", rho)
            g.setdefault("adaptive", adaptive)
        kwargs.setdefault("foreach", False)
        self.base = base_cls(groups, **kwargs)
        self.param_groups = self.base.param_groups
        self.max_grad_norm = max_grad_norm
        self.eps = perturb_eps
        self.old = {}
        self.skip = False

    def _params(self):
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        sq = 0.0
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                t = (p.abs() * p.grad) if g["adaptive"] else p.grad
                sq += float(t.double().pow(2).sum())
        norm = sq**0.5
        self.skip = not torch.isfinite(torch.tensor(norm)).item()
        for g in self.param_groups:
            scale = g["rho"] / (norm + self.eps)
            for p in g["params"]:
                if p.grad is None:
                    continue
                self.old[p] = p.detach().clone()
                if self.skip:
                    continue
                e = (p * p if g["adaptive"] else 1.0) * p.grad * scale
                p.add_(e)
        if zero_grad:
            self.base.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for p, old in self.old.items():
            p.copy_(old)
        self.old = {}
        params = self._params()
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params)
        skip = self.skip or not torch.isfinite(torch.tensor(sq)).item()
        if not skip:
            if self.max_grad_norm is not None:
                coef = min(1.0, self.max_grad_norm / (sq**0.5 + 1e-6))
                for p in params:
                    p.grad.mul_(coef)
            self.base.step()
        if zero_grad:
            self.base.zero_grad()
        return skip


def train_mlp_with_fused_sam(backend, base_cls, kw, seed, device="cpu", steps=3):
    """A few FusedSAM steps of a small MLP on fixed random data; returns (opt.backend, parameters).

    Run twice with different backends and the same seed to compare them end to end.
    Adam-family runs are float64: in float32 an Adam step amplifies rounding-order
    differences in gradient entries near eps (one seed in a few hundred moved an
    element by 2.5e-5 after one step), so fp32 Adam is compared op by op instead."""
    dtype = torch.float32 if base_cls is torch.optim.SGD else torch.float64
    from fastsam import FusedSAM

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).to(device, dtype)
    opt = FusedSAM(model.parameters(), base_cls, rho=0.05, backend=backend, max_grad_norm=1.0, **kw)
    x, y = torch.randn(32, 20, device=device, dtype=dtype), torch.randint(0, 3, (32,), device=device)
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return opt.backend, [p.detach() for p in model.parameters()]
