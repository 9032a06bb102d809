"""FriendlySAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization").

The perturbation uses the batch gradient minus sigma times an EMA of past
batch gradients (the "full gradient" component), as in nblt/F-SAM, utils.py
(``FriendlySAM.first_step``):

    first SAM step:  m = g, the perturbation uses g
    afterwards:      d = g - sigma * m_old;  m = lmbda * m_old + (1 - lmbda) * g
    e = rho * d / (||d|| + 1e-12)   (ASAM: * w^2, the weighted norm)

then SAM's second pass and base step (the base optimizer steps with the
gradient at w + e).  Defaults sigma=1, lmbda=0.95 (train.py's defaults; their
run.sh uses 0.6 on CIFAR-100).  The rule is per parameter, as theirs: a
parameter without an EMA yet (the first SAM step, or its first gradient) starts
it with m = g and perturbs with its plain g, while the others of the same step
use theirs.  The EMA updates only on SAM steps (steps a schedule skips do not
see it) and not on a skipped (non-finite, first or second pass) step.

Through each bucket's backend (``axpby``): d goes to a scratch buffer (one pass;
``p.grad`` keeps g), and the step commits the EMA from m and d,

    m <- (lmbda + (1 - lmbda) sigma) m + (1 - lmbda) d      (= lmbda m + (1 - lmbda) g)

with one axpby masked by the second pass's skip flag (which folds in the first's):
no host read, except on a step where some parameter gets its first EMA (whether
it has one is host state; see ``FriendlySAMStep.commit``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import _checks
from ..core.buckets import Bucket, Buckets
from ..core.engine import Extension, Perturbation, SAMCore, Scalars
from ..core.state import Checked, Shared
from ..core.txn import Transaction
from ..optim import FusedSAM
from . import _ops

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

Tensors = List[torch.Tensor]


class FriendlySAMSettings(Checked):
    CHECKS = {"sigma": lambda v: _checks.real("sigma", v), "lmbda": lambda v: _checks.real("lmbda", v, lo=0, hi=1)}
    sigma: float
    lmbda: float


class FriendlySAMStep(Extension):
    """FriendlySAM's additions to the core step: the perturbation direction d (first pass) and the
    EMA committed with the step."""

    name = "FriendlySAM"
    buffers = ("fsam_m",)
    settings: FriendlySAMSettings

    def __init__(self, sigma: float, lmbda: float) -> None:
        self.settings = FriendlySAMSettings(sigma=sigma, lmbda=lmbda)
        self.token = object()  # renewed whenever some parameter gets its first EMA: the plans are stale

    def forget(self) -> None:
        self.token = object()

    def _plan(self, core: SAMCore, b: Bucket) -> Tuple[List[int], List[torch.Tensor], List[torch.Tensor], List[int]]:
        """(indices with an EMA, their m, their d buffers, indices without one) of bucket ``b``,
        cached on the bucket until a parameter gets its first EMA or the state is loaded."""
        hit = b.scratch.get("fsam")
        if hit is None or hit[0] is not self.token:
            has = [i for i, k in enumerate(b.keys) if "fsam_m" in core.sam_state.get(k, {})]
            new = [i for i, k in enumerate(b.keys) if "fsam_m" not in core.sam_state.get(k, {})]
            ms = [core.sam_state[b.keys[i]]["fsam_m"] for i in has]
            ds = [core.buffer(b.keys[i], "fsam_d", b.params[i]) for i in has]
            hit = b.scratch["fsam"] = (self.token, has, ms, ds, new)
        return hit[1:]

    def first_gradient(self, core: SAMCore, buckets: Buckets, tx: Transaction) -> None:
        """Per parameter, as nblt/F-SAM's first_step: with an EMA m, d = g - sigma m (into a scratch
        buffer, the perturbation's direction); without one, d = g and its EMA starts at g once the
        step commits.  Nothing is read by the host."""
        pending: List[Tuple[Bucket, Tensors, Tensors, List[Tuple[torch.Tensor, torch.Tensor]]]] = []
        sigma = self.settings.sigma
        for b in buckets:
            has, ms, ds, new = self._plan(core, b)
            if has:
                g = b.grads if len(has) == len(b.keys) else [b.grads[i] for i in has]
                b.backend.axpby(g, ms, _const(b, 1.0, -sigma), out=ds)
                if len(has) == len(b.keys):
                    direction = list(ds)
                else:
                    direction = list(b.grads)
                    for i, d in zip(has, ds):
                        direction[i] = d
                b.grads = direction
            fresh = [(b.keys[i], b.grads[i].clone()) for i in new]
            pending.append((b, ms, ds, fresh))
        variant = core.run.variant
        variant["fsam"] = pending
        tx.on_undo(lambda: variant.pop("fsam", None))

    def commit(
        self,
        core: SAMCore,
        pending: Optional[Perturbation],
        buckets: Buckets,
        scalars: Optional[Scalars],
        tx: Transaction,
    ) -> None:
        """m <- a m + b d unless the step was skipped (first or second pass): one masked axpby per
        bucket with the second pass's skip flag, on the device.  Parameters getting their first EMA
        are the one host read: whether m exists is host state, so on such a step (the first SAM step,
        or a parameter's first gradient) the flag is read once."""
        data = core.run.variant.get("fsam")
        if pending is None or not data:
            return
        lmbda, sigma = self.settings.lmbda, self.settings.sigma
        flag = None if scalars is None else next(iter(scalars.values()))[0]
        fresh_taken = None
        for b, ms, ds, fresh in data:
            if ms:
                like = _like(b)
                a, bb = lmbda + (1.0 - lmbda) * sigma, 1.0 - lmbda
                if flag is None:
                    c = _const(b, a, bb)
                elif _ops.on_host(like) and flag.device.type == "cpu":
                    c = _const(b, a, bb, float(flag))
                else:  # the skip flag joins the coefficients on the device: one op, no host read
                    c = torch.cat([_const(b, a, bb)[:2], flag.to(like).view(1)])

                def ema(
                    b: Bucket = b, ms: List[torch.Tensor] = ms, ds: List[torch.Tensor] = ds, c: torch.Tensor = c
                ) -> None:
                    b.backend.axpby(ms, ds, c)

                tx.write(ema, ms, backend=b.backend)
            if fresh:
                if fresh_taken is None:
                    fresh_taken = flag is None or not bool(flag)  # the host read (see the docstring)
                if fresh_taken:
                    for k, m in fresh:
                        st = core.sam_state.setdefault(k, {})
                        st["fsam_m"] = m
                        tx.on_undo(functools.partial(st.pop, "fsam_m", None))
                    token = self.token
                    self.token = object()
                    tx.on_undo(functools.partial(setattr, self, "token", token))

    def finished(self, core: SAMCore, sam: bool) -> None:
        core.run.variant.pop("fsam", None)

    def undone(self, core: SAMCore) -> None:
        core.run.variant.pop("fsam", None)

    def state_dict(self) -> Dict[str, Any]:
        return {"sigma": self.settings.sigma, "lmbda": self.settings.lmbda}

    def load_state_dict(self, d: Dict[str, Any]) -> Callable[[], None]:
        values = self.settings.checked({k: d[k] for k in ("sigma", "lmbda") if k in d})

        def apply() -> None:
            for k, v in values.items():
                setattr(self.settings, k, v)
            self.forget()

        return apply


def _const(b: Bucket, a: float, bb: float, skip: float = 0.0) -> torch.Tensor:
    """[a, bb, skip] on the bucket's device (float64), made once per value."""
    consts = b.scratch.setdefault("fsam_consts", {})
    c = consts.get((a, bb, skip))
    if c is None:
        c = consts[(a, bb, skip)] = _ops.coefs(a, bb, skip, _like(b))
    return c


def _like(b: Bucket) -> torch.Tensor:
    """A 0-d float64 tensor on the bucket's device (what its coefficients are made of: float64, as the
    pass's skip flag they take in is, so that nothing is converted; axpby rounds them once)."""
    hit = b.scratch.get("fsam_like")
    if hit is None:
        hit = b.scratch["fsam_like"] = torch.zeros((), device=b.device, dtype=torch.float64)
    return hit


class FriendlySAM(FusedSAM):
    """``FriendlySAM(params, base_optimizer, rho=0.05, adaptive=False, sigma=1.0, lmbda=0.95, **kwargs)``."""

    sigma = Shared("extension_settings", "FriendlySAM's sigma: how much of the gradients' EMA d removes.")
    lmbda = Shared("extension_settings", "FriendlySAM's EMA factor, in [0, 1].")

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        sigma: float = 1.0,
        lmbda: float = 0.95,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, adaptive, extension=FriendlySAMStep(sigma, lmbda), **kwargs)
