"""The SAM steps a user writes instead of FusedSAM: the peers every SAM timing is compared with.

``CompiledSAM``  the same SAM step written with foreach ops and ``torch.compile``'d (inductor):
                 ``first_step`` (global norm, copy, perturbation) and ``second_step`` (restore and
                 the base optimizer's own ``step()``, foreach=True, traced into the same graph) are
                 two compiled functions, as in a training loop, where a forward and a backward pass
                 separate them.  The calls that compiled a graph are timed into ``compile_s``.
``PlainSAM``     the fastest eager torch: a foreach norm and perturbation, a ``copy_`` restore and
                 the base optimizer's ``fused=True`` step.

Both have FusedSAM's math: e = rho * g / (||g|| + 1e-12), the norm accumulated in float32 (float64
for float64), the restore an exact copy, torch's own SGD / AdamW update.  Neither reads the second
gradient's norm: FusedSAM does (its non-finite check, one more read of g), so the peers move fewer
bytes.  ``ACCESSES`` counts the bytes each design must move; ``compare_steps`` checks a peer
against FusedSAM (the benchmarks do before timing).
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch

EPS = 1e-12

# Per parameter element, the reads + writes each design must make in one SAM step (x element size
# = bytes): g = gradient, w = weight, c = restore copy, b = momentum buffer, m/v = Adam's moments.
ACCESSES = {
    # norm r g | perturb r w,g w w,c | second norm (non-finite check) r g | restore+step r c,g,b w w,b
    ("fused", "sgd"): 1 + 4 + 1 + 5,
    ("fused", "adamw"): 1 + 4 + 1 + 7,  # restore+step r c,g,m,v w w,m,v
    # norm r g | copy+perturb r w,g w c,w | restore+step fused by inductor r c,g,b w w,b
    ("compiled", "sgd"): 1 + 4 + 5,
    ("compiled", "adamw"): 1 + 4 + 7,
    # norm r g | copy r w w c | add r w,g w w | copy_ restore r c w w | fused step r w,g,b w w,b
    ("plain", "sgd"): 1 + 2 + 3 + 2 + 5,
    ("plain", "adamw"): 1 + 2 + 3 + 2 + 7,
    # foreach backend on the CPU: norm | copy | add | check | restore | buf*=m | buf+=g | w-=lr*buf
    ("foreach", "sgd"): 1 + 2 + 3 + 1 + 2 + 2 + 3 + 3,
    # ... AdamW: | w*=1-lr*wd | lerp m | v*=b2 | v+=(1-b2)g*g | t=sqrt(v) | t/=bc2 | t+=eps | w+=s*m/t
    ("foreach", "adamw"): 1 + 2 + 3 + 1 + 2 + 2 + 3 + 2 + 3 + 2 + 2 + 2 + 4,
    # per-parameter reference: norm of 1.0*g (r g w t, r t) | clone | e=(1.0*g)*s | w+=e | swap | SGD
    ("reference", "sgd"): 3 + 2 + 4 + 3 + 0 + 2 + 3 + 3,
    # torch's fused base step alone (no SAM): r w,g,b w w,b (AdamW: r w,g,m,v w w,m,v)
    ("base", "sgd"): 5,
    ("base", "adamw"): 7,
}
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}


class _PeerSAM:
    """first_step / second_step / step(closure) with the SAM class's contract, over the parameters
    that have a gradient; the base optimizer is ``base`` (its ``state`` holds the buffers)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs):
        self.params = list(params)
        self.rho = float(rho)
        self.base = base_optimizer(self.params, **kwargs)
        self.copies = [torch.empty_like(p) for p in self.params]  # one copy: what the restore needs

    @property
    def state(self):
        return self.base.state

    def _lists(self):
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        return ([self.params[i] for i in idx], [self.params[i].grad for i in idx], [self.copies[i] for i in idx])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        params, grads, copies = self._lists()
        self._perturb(params, grads, copies, self.rho)
        self._pending = (params, copies)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self._restore_step(*self._pending)
        self._pending = None
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor]):
        """The SAM contract: the caller ran the first forward+backward; the closure runs the second."""
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss


def _sq_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return torch.stack(torch._foreach_norm(grads, 2, dtype=acc)).square().sum()


def _perturb_foreach(params, grads, copies, rho: float) -> None:
    scale = (1.0 / (_sq_norm(grads).sqrt() + EPS)) * rho
    torch._foreach_copy_(copies, params)
    torch._foreach_add_(params, torch._foreach_mul(grads, scale))


class CompiledSAM(_PeerSAM):
    """The SAM step written with foreach ops and compiled by inductor (see the module docstring)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs):
        super().__init__(params, base_optimizer, rho, foreach=True, **kwargs)
        self.compile_s = 0.0
        self._perturb_c = torch.compile(_perturb_foreach)
        self._step_c = torch.compile(self._restore_step_eager)

    def _restore_step_eager(self, params, copies) -> None:
        torch._foreach_copy_(params, copies)
        self.base.step()

    def _timed_compile(self, fn, *args) -> None:
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        fn(*args)
        if counters["stats"]["unique_graphs"] != before:  # this call compiled (and ran once)
            self.compile_s += time.perf_counter() - t0

    def _perturb(self, params, grads, copies, rho) -> None:
        self._timed_compile(self._perturb_c, params, grads, copies, rho)

    def _restore_step(self, params, copies) -> None:
        self._timed_compile(self._step_c, params, copies)


class PlainSAM(_PeerSAM):
    """Eager torch at its fastest: foreach norm and perturbation, copy_ restore, fused=True step
    (``fused=False``: the foreach step, where torch's fused one is wrong: ``fused_step_is_correct``)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, fused: bool = True, **kwargs):
        super().__init__(params, base_optimizer, rho, **({"fused": True} if fused else {"foreach": True}), **kwargs)

    def _perturb(self, params, grads, copies, rho) -> None:
        if params[0].device.type != "cpu":
            _perturb_foreach(params, grads, copies, rho)
            return
        # On the CPU the scale is read on the host for free: one pass w + s*g, no temporary.
        scale = float((1.0 / (_sq_norm(grads).sqrt() + EPS)) * rho)
        torch._foreach_copy_(copies, params)
        torch._foreach_add_(params, grads, alpha=scale)

    def _restore_step(self, params, copies) -> None:
        torch._foreach_copy_(params, copies)
        self.base.step()


# How far two designs' perturbations e = rho g / ||g|| may differ, relative to e: their global norms
# are sums of squares in different orders (measured: <= 7e-5 apart in float32 over 40 random gradient
# sets at ResNet shapes, torch._foreach_norm's being the least exact).  A wrong rho or a missing
# perturbation is off by 100%.
SCALE_RTOL = 1e-3


def compare_steps(a, b, dtype: torch.dtype, steps: int = 2, set_grads=None) -> Optional[str]:
    """Run ``steps`` SAM steps of two (params, optimizer) pairs that start from the same weights and
    compare them after every half: the perturbed weights w + e after ``first_step`` (the restore
    undoes a wrong perturbation, so only this catches one; allowed to differ by SCALE_RTOL of e
    more) and weights and state after ``second_step`` (``max_difference``).
    ``set_grads(params, step)`` sets the gradients of one pair (default: they stay in place).
    None when equal within rounding, else what differs where."""
    for step in range(steps):
        w0 = [p.detach().clone() for p in a[0]]
        for params, opt in (a, b):
            if set_grads is not None:
                set_grads(params, step)
            opt.first_step()
        e = [p.detach() - w for p, w in zip(a[0], w0)]
        diff = max_difference((a[0], None), (b[0], None), dtype, allow=[SCALE_RTOL * t.double().norm() for t in e])
        if diff is not None:
            return f"after first_step of step {step}: {diff}"
        for _, opt in (a, b):
            opt.second_step()
        diff = max_difference(a, b, dtype)
        if diff is not None:
            return f"after second_step of step {step}: {diff}"
    return None


def fused_step_is_correct(base_optimizer, kwargs, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch's ``fused=True`` step equals its foreach step (two steps, 1,000 elements: the
    vectorised loops and a tail).  torch 2.13's CPU fused SGD skips the vectorised updates of 16-bit
    parameters (pytorch/pytorch#191763): neither a peer nor a bandwidth ceiling there."""
    gen = torch.Generator().manual_seed(0)
    w, g = (torch.randn(1000, generator=gen).to(device, dtype) for _ in range(2))
    out = []
    for flag in ("fused", "foreach"):
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        opt = base_optimizer([p], **{flag: True}, **kwargs)
        for _ in range(2):
            opt.step()
        out.append(([p], opt))
    return max_difference(out[1], out[0], dtype) is None


def state_tensors(opt, params) -> List[torch.Tensor]:
    """The per-parameter state tensors (momentum, moments) of ``opt``'s base optimizer (or of
    ``opt`` itself, a torch optimizer; none for None), in parameter order."""
    if opt is None:
        return []
    base = getattr(opt, "base_optimizer", None) or getattr(opt, "base", None) or opt
    out = []
    for p in params:
        st = base.state.get(p, {})
        out += [st[k] for k in sorted(st) if torch.is_tensor(st[k]) and st[k].shape == p.shape]
    return out


def max_difference(a, b, dtype: torch.dtype, allow=None) -> Optional[str]:
    """None when two (params, optimizer) pairs hold the same parameters and state within rounding,
    else what differs.  Compared tensor by tensor in norm: ||x - y|| <= 2 eps(dtype) ||x|| (plus
    ``allow[i]`` for the i-th tensor).  Two steps of a few roundings to the storage dtype each
    (<= eps/2 per element and rounding) stay below that; the designs differ in the norm's
    summation order and, in 16 bits, in whether an intermediate (the momentum buffer) is rounded
    before it is used.  A missing or doubled term of the update (lr * buf ~ 0.1 |w| here) is two
    orders of magnitude above it in 16 bits, six in fp32."""
    (pa, oa), (pb, ob) = a, b
    ta, tb = list(pa) + state_tensors(oa, pa), list(pb) + state_tensors(ob, pb)
    if len(ta) != len(tb):
        return f"{len(ta)} tensors against {len(tb)}"
    eps = torch.finfo(dtype).eps
    for i, (x, y) in enumerate(zip(ta, tb)):
        x, y = x.detach().double(), y.detach().double()
        dist, bound = float((x - y).norm()), 2 * eps * float(x.norm()) + (float(allow[i]) if allow else 0.0)
        if not dist <= bound:
            return f"tensor {i} ({tuple(x.shape)}): ||x - y|| = {dist:.3g} > {bound:.3g}"
    return None
