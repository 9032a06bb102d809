"""``SAMTrainer``: SAM inside the Hugging Face ``Trainer`` (``pip install fastsam[transformers]``).

The Trainer runs one forward+backward per micro-batch (``training_step``) and steps the
optimizer after the last micro-batch of each gradient-accumulation window, without a
closure.  ``SAMTrainer.training_step`` adds SAM's second pass:

- every micro-batch: the first pass (at w), as the Trainer does it; while SAM is
  active the micro-batch is kept until the window ends;
- the last micro-batch of a window: ``first_step`` (w -> w + e, from the gradient
  accumulated over the whole window), then the second pass over every kept micro-batch.
  The Trainer then clips (``max_grad_norm``, on the SAM gradient) and calls
  ``optimizer.step()``, which finishes the SAM step (restore + base step).

While SAM is inactive (``sam_start_step``, a schedule, ``opt.sam_active = False``) a step
is exactly the Trainer's.  Both passes accumulate over the micro-batches: a window of k
micro-batches keeps k batches of inputs alive until its end.

The optimizer is either a ``FusedSAM`` passed in ``optimizers=(opt, scheduler)``, or built
here around the optimizer the Trainer would build (``args.optim``, its param groups and
weight decay, or ``optimizer_cls_and_kwargs``) with the SAM arguments of the constructor.
The logs get ``sam_loss``: the mean second-pass loss (at w + e) of the SAM steps since the
last log.  Checkpoints (``save_strategy``, ``resume_from_checkpoint``) hold FusedSAM's
state_dict, its step count included.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from transformers import Trainer

from ..optim import FusedSAM

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with SAM (FusedSAM).

    Args (keyword-only, besides the Trainer's own):
        sam_rho: neighbourhood radius (FusedSAM's ``rho``).
        sam_adaptive: ASAM.
        sam_start_step: late-phase SAM: plain steps until this many optimizer steps.
        sam_start_fraction: the same as a fraction of the run's optimizer steps
            (``max_steps`` or the Trainer's count of them); exclusive with ``sam_start_step``.
        sam_kwargs: further FusedSAM arguments (``perturb_eps``, ``backend``, ``schedule``, ...).

    The SAM arguments configure the optimizer built here; a FusedSAM passed in
    ``optimizers=`` is used as it is (passing SAM arguments as well is an error).
    """

    optimizer: Optional[torch.optim.Optimizer]  # the Trainer's (possibly accelerate-wrapped) optimizer

    def __init__(
        self,
        *args: Any,
        sam_rho: float = 0.05,
        sam_adaptive: bool = False,
        sam_start_step: Optional[int] = None,
        sam_start_fraction: Optional[float] = None,
        sam_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        opts = kwargs.get("optimizers", (None, None))
        given = opts[0] if opts else None
        if given is not None and not isinstance(given, FusedSAM):
            raise TypeError(
                f"SAMTrainer needs a FusedSAM in optimizers=(opt, scheduler), got {type(given).__name__}; pass "
                "optimizers=(FusedSAM(params, torch.optim.AdamW, rho=...), None) or leave optimizers out and "
                "give sam_rho/sam_start_step/... to build one around the Trainer's optimizer"
            )
        custom = (
            sam_rho != 0.05
            or sam_adaptive
            or sam_start_step is not None
            or sam_start_fraction is not None
            or sam_kwargs
        )
        if given is not None and custom:
            raise ValueError(
                "SAM arguments (sam_rho, sam_start_step, ...) configure the optimizer SAMTrainer "
                "builds; the FusedSAM passed in optimizers= already has its own"
            )
        if sam_start_step is not None and sam_start_fraction is not None:
            raise ValueError("give sam_start_step or sam_start_fraction, not both")
        if sam_start_fraction is not None and not 0.0 <= float(sam_start_fraction) <= 1.0:
            raise ValueError(f"sam_start_fraction must be in [0, 1], got {sam_start_fraction!r}")
        self.sam_rho, self.sam_adaptive = sam_rho, sam_adaptive
        self.sam_start_step, self.sam_start_fraction = sam_start_step, sam_start_fraction
        self.sam_kwargs = dict(sam_kwargs or {})
        self._sam_window: list = []  # the kept micro-batches of the current window
        self._sam_loss_sum: Union[float, torch.Tensor] = 0.0  # second-pass losses since the last log
        self._sam_loss_steps = 0
        self._sam_total_steps: Optional[int] = None
        super().__init__(*args, **kwargs)

    # ---------------------------------------------------------------- the optimizer
    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self._sam_total_steps = num_training_steps
        return super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        assert opt_model is not None  # the Trainer has its model by the time it builds the optimizer
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_cls_and_kwargs is not None:
            cls, kw = self.optimizer_cls_and_kwargs
        else:
            cls, kw = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kw = dict(kw)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or {
            "params",
            "model",
            "optimizer_dict",
        } & set(kw):
            raise ValueError(
                f"SAMTrainer cannot wrap the optimizer args.optim={self.args.optim!r} ({cls!r}); "
                "choose a torch.optim optimizer (adamw_torch, sgd, ...) or pass a FusedSAM in "
                "optimizers="
            )
        start = self.sam_start_step
        if self.sam_start_fraction is not None:
            total = self.args.max_steps if self.args.max_steps > 0 else (self._sam_total_steps or 0)
            start = int(round(self.sam_start_fraction * total))
        self.optimizer = FusedSAM(
            groups, cls, rho=self.sam_rho, adaptive=self.sam_adaptive, sam_start_step=start, **self.sam_kwargs, **kw
        )
        return self.optimizer

    @property
    def sam_optimizer(self) -> FusedSAM:
        """The FusedSAM under the Trainer's (accelerate-wrapped) optimizer."""
        opt = self.optimizer
        while not isinstance(opt, FusedSAM):
            inner = getattr(opt, "optimizer", None)
            if inner is None or inner is opt:
                raise TypeError(f"SAMTrainer's optimizer is not a FusedSAM: {type(self.optimizer).__name__}")
            opt = inner
        return opt

    # ---------------------------------------------------------------- the two passes
    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None, *args: Any, **kw: Any
    ) -> torch.Tensor:
        opt = self.sam_optimizer
        first = super().training_step(model, inputs, num_items_in_batch, *args, **kw)
        if not opt.sam_active:
            self._sam_window.clear()
            return first
        self._sam_window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:  # not the last micro-batch of the window yet
            return first
        window, self._sam_window = self._sam_window, []
        opt.first_step(zero_grad=True)
        for inp, n in window:  # the second pass, accumulated over the same micro-batches
            loss = super().training_step(model, inp, n, *args, **kw)
            self._sam_loss_sum = self._sam_loss_sum + loss.detach()  # on the device; read at log time
        self._sam_loss_steps += 1
        return first

    def log(self, logs: Dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._sam_loss_steps:
            logs = dict(logs)
            logs["sam_loss"] = round(float(self._sam_loss_sum) / self._sam_loss_steps, 6)
            self._sam_loss_sum, self._sam_loss_steps = 0.0, 0
        return super().log(logs, *args, **kwargs)
