"""Track sharpness (top Hessian eigenvalues) during training."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from torch import nn

from .._checks import ArgumentError, integer
from ._hvp import LossFn
from .eigen import eigenvalues


class SharpnessTracker:
    """Measure lambda_max (or the top k) every ``every`` calls of :meth:`step`.

    ``data`` is a fixed batch / iterable of batches, or a zero-argument callable returning one
    (e.g. to draw a fresh batch per measurement). Extra keywords go to :func:`eigenvalues`
    (``method``, ``tol``, ``max_iter``, ``hvp_mode``, ``model_mode``, ...); note the default
    ``model_mode="eval"``; pass ``model_mode="train"`` to measure as in the SAM late-phase paper.

    Call ``tracker.step()`` once per training step (or per epoch: then ``every`` counts epochs);
    it returns the new history entry when it measured, else None. ``history`` is a list of
    dicts ``{"step", "lambda_max", "eigenvalues", "num_hvps", "seconds", "converged"}``;
    ``steps()`` and ``lambda_max()`` return the two plottable columns.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, every: int = 1, k: int = 1, **kwargs: Any) -> None:
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every = integer("every", every, lo=1)
        self.k = integer("k", k, lo=1)
        self.kwargs = kwargs
        self.count = 0
        self.history: List[Dict[str, Any]] = []

    def step(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Advance the counter; measure if it is a multiple of ``every``."""
        self.count += 1
        if self.count % self.every:
            return None
        return self.measure(self.count if step is None else step)

    def measure(self, step: Optional[int] = None) -> Dict[str, Any]:
        """Measure now and append to ``history`` (``step`` defaults to the counter)."""
        data = self.data() if callable(self.data) else self.data
        t0 = time.perf_counter()
        r = eigenvalues(self.model, self.loss_fn, data, k=self.k, **self.kwargs)
        entry = {
            "step": self.count if step is None else step,
            "lambda_max": float(r.eigenvalues[0]),
            "eigenvalues": r.eigenvalues.tolist(),
            "num_hvps": r.num_hvps,
            "seconds": time.perf_counter() - t0,
            "converged": r.converged,
        }
        self.history.append(entry)
        return entry

    def steps(self) -> List[int]:
        return [h["step"] for h in self.history]

    def lambda_max(self) -> List[float]:
        return [h["lambda_max"] for h in self.history]

    def state_dict(self) -> Dict[str, Any]:
        return {"count": self.count, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "count" not in state or not isinstance(state.get("history"), list):
            raise ArgumentError(
                "state must be a SharpnessTracker state_dict (a dict with 'count' and a list 'history')"
            )
        count = integer("state['count']", state["count"], lo=0)
        if not all(isinstance(h, dict) for h in state["history"]):
            raise ArgumentError("state['history'] must be a list of dicts")
        self.count, self.history = count, [dict(h) for h in state["history"]]
