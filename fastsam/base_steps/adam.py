"""torch.optim.Adam / AdamW (amsgrad off; weight decay coupled or decoupled; maximize)
fused with the restore."""

from __future__ import annotations

from typing import List

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _get_scalar_dtype

from ..backends._common import FACTOR, SKIP
from ._skipped import restored_only


def handles(base: Optimizer) -> bool:
    if type(base) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    return all(
        not g.get("differentiable", False)
        and not g.get("amsgrad", False)
        and not any(isinstance(b, torch.Tensor) for b in g["betas"])
        for g in base.param_groups
    )


def prepare(base: Optimizer, bucket, slices: List, scalars: torch.Tensor, clip: bool, tx) -> None:
    """Create the moments and step counters this step needs (undone with the step) and register
    one fused restore + update write per slice with ``tx``."""
    if restored_only(bucket, slices, scalars, tx):
        return
    g = bucket.group
    state = base.state
    step_dtype = _get_scalar_dtype()
    for p, st in zip(bucket.keys, bucket.states(state)):
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=step_dtype, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tx.on_undo(lambda st=st: [st.pop(k, None) for k in ("step", "exp_avg", "exp_avg_sq")])
        elif st["step"].device != p.device:  # a CPU step counter left by torch's non-capturable Adam
            old, st["step"] = st["step"], st["step"].to(p.device)
            tx.on_undo(lambda st=st, old=old: st.__setitem__("step", old))
    decoupled = g.get("decoupled_weight_decay", type(base) is torch.optim.AdamW)
    beta1, beta2 = g["betas"]
    for s in slices:
        sts = bucket.states_of(state, s)
        m, v = bucket.view([t["exp_avg"] for t in sts]), bucket.view([t["exp_avg_sq"] for t in sts])
        steps = [t["step"] for t in sts]

        def run(s=s, m=m, v=v, steps=steps):
            bucket.backend.restore_adam_step(
                s.params,
                s.grads,
                s.copies,
                m,
                v,
                steps,
                lr=g["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=g["eps"],
                weight_decay=g["weight_decay"],
                decoupled=decoupled,
                maximize=g.get("maximize", False),
                grad_scale=scalars[FACTOR] if clip else None,
                skip=scalars[SKIP],
            )

        tx.write(run, s.params + m + v + steps, backend=bucket.backend)
