"""What FusedSAM needs to know about Lightning's automatic optimization, without importing Lightning.

Lightning's automatic optimization calls ``optimizer.step(closure)`` with a closure object
that runs a whole forward and backward pass (torch.optim's convention), wrapped in
``functools.partial`` by its precision plugins.  FusedSAM recognises that object here,
by its class, so that it can call it for both of SAM's passes.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

ACCUMULATION_RECIPE = (
    "FusedSAM under Lightning's automatic optimization with accumulate_grad_batches > 1: Lightning "
    "runs the earlier micro-batches without the optimizer, so SAM's second pass (at w + e) could "
    "only see the last one.  Use manual optimization: accumulate the first pass over the "
    "micro-batches, opt.first_step(zero_grad=True), the second pass over the same micro-batches, "
    "opt.step() (see examples/lightning_manual.py)"
)

FP16_RECIPE = (
    "  This call came from a GradScaler's step() without a closure, which is what Lightning's "
    "precision='16-mixed' automatic optimization does (it runs the training closure itself, so no "
    "second pass is possible there): use manual optimization (self.automatic_optimization = False; "
    "manual_backward, opt.first_step(), manual_backward, opt.step(); see examples/lightning_manual.py), "
    "or precision='bf16-mixed' / '32' with automatic optimization."
)


def automatic_closure(closure: Any) -> Optional[Any]:
    """Lightning's automatic-optimization closure object inside ``closure``, or None."""
    seen = 0
    stack = [closure]
    while stack and seen < 16:
        c = stack.pop()
        seen += 1
        t = type(c)
        if t.__name__ == "Closure" and t.__module__.split(".")[0] in ("lightning", "pytorch_lightning"):
            return c
        if isinstance(c, functools.partial):
            stack.extend([c.func, *c.args])
    return None


def accumulates(closure_object: Any) -> bool:
    """Whether the automatic-optimization closure runs with gradient accumulation (Lightning then
    drops its zero_grad and keeps its backward)."""
    return getattr(closure_object, "_zero_grad_fn", True) is None and bool(
        getattr(closure_object, "_backward_fn", None)
    )
