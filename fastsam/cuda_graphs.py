"""Capturable FusedSAM and a whole SAM training step in CUDA graphs.

A CUDA graph replays the kernels it recorded with the arguments it recorded.
For a replayed SAM step to follow an LR scheduler and the late-phase switch:

- **capturable** (``make_capturable(opt)``, or ``FusedSAM(..., capturable=True)``):
  every group's ``lr`` becomes a 0-d float32 tensor on the parameters' device,
  as in torch's capturable optimizers; schedulers update it in place
  (``fill_``), and the fused kernels (triton, foreach) read it on the device.
  Adam's step counters already live on the device.  The other hyperparameters
  (momentum, betas, weight decay, rho, eps) stay Python numbers baked into the
  graph, as are ``max_grad_norm``, ``perturb_eps`` and a schedule's rho multiplier:
  ``CapturedSAMStep`` checks before every replay that none of them changed since
  the capture and raises if one did (build a new one).  ``OneCycleLR`` and
  ``CyclicLR`` with ``cycle_momentum=True`` change the momentum every step and
  are refused that way.  Step hooks run while capturing only.
- **the switch** (``sam_start_step``, ``schedule``, ``opt.sam_active``) is a
  host-side decision made per step: ``CapturedSAMStep`` holds one graph of a
  SAM step (two passes) and one of a plain step (one pass) and replays the one
  that ``opt.sam_active`` names, counting ``opt.num_steps`` as the eager loop
  does.  Plain steps before the switch keep costing one pass.

Usage (a GPU; static shapes)::

    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                   sam_start_step=1000, capturable=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    step = CapturedSAMStep(model, opt, loss_fn)
    for x, y in loader:            # every batch of the same shape
        loss = step(x, y)          # eager for the first `warmup` steps of each kind, then replays
        sched.step()

The first ``warmup`` steps of each kind run eagerly (they are real training
steps: state such as momentum buffers and the triton pointer tables must exist
before a capture); then that kind is captured once and replayed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import torch

from . import _checks
from .bn import frozen_bn_stats

if TYPE_CHECKING:
    from .optim import FusedSAM

CAPTURABLE_BACKENDS = ("triton", "foreach")
_BAKED = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "rho", "adaptive", "maximize")


def make_capturable(opt: FusedSAM) -> None:
    """Move every group's lr into a 0-d float32 tensor on its parameters' device (in place).

    The kernels read the lr where they run, and one tensor lives on one device, so every
    parameter of a group must be on the same device: a group that spans devices (two GPUs,
    or a GPU and the CPU) raises ValueError; split it into one param group per device.
    Raises ValueError too when a backend of ``opt`` reads the lr on the host (``cpp`` on the
    CPU is fine; ``cuda`` is not capturable with a changing lr): use backend="triton".
    Every group is checked before any lr moves: an error leaves ``opt`` as it was.
    """
    moves = []
    for gi, g in enumerate(opt.param_groups):
        params = g["params"]
        if not params:
            continue
        dev = params[0].device
        others = sorted({str(p.device) for p in params if p.device != dev})
        if others:
            raise ValueError(
                f"capturable=True needs each param group on one device (its lr tensor is read "
                f"there); param group {gi} spans {dev} and {', '.join(others)}: split it into one "
                "group per device"
            )
        if dev.type == "cuda":
            name = opt.backend_for(dev).NAME
            if name not in CAPTURABLE_BACKENDS:
                raise ValueError(
                    f"capturable=True needs backend 'triton' or 'foreach' for CUDA parameters; "
                    f"param group {gi} runs on {name!r}, whose kernels take the lr as a host number"
                )
        lr = g["lr"]
        if not isinstance(lr, torch.Tensor):
            moves.append((g, float(lr), dev))
        elif lr.device != dev or lr.dim() != 0:
            raise ValueError(
                f"param group {gi}: a tensor lr must be 0-d on {dev}, got shape {tuple(lr.shape)} on {lr.device}"
            )
    for g, lr, dev in moves:
        g["lr"] = torch.tensor(lr, dtype=torch.float32, device=dev)


class CapturedSAMStep:
    """One training step of ``model`` with the FusedSAM ``opt``, replayed from CUDA graphs.

    ``loss_fn(model(x), y)`` is the loss.  ``opt`` must be capturable (``make_capturable``).
    Calling the object with a batch runs one step (SAM or plain, as ``opt.sam_active``
    says) and returns the first-pass loss (a tensor that the next call overwrites).
    The second pass runs under ``frozen_bn_stats(model)``.
    """

    def __init__(
        self, model: torch.nn.Module, opt: FusedSAM, loss_fn: Callable[[Any, Any], torch.Tensor], *, warmup: int = 3
    ) -> None:
        devices = {p.device.type for g in opt.param_groups for p in g["params"]}
        if devices != {"cuda"} or not torch.cuda.is_available():
            raise ValueError(
                "CapturedSAMStep replays CUDA graphs: every parameter must be on a CUDA device "
                f"(found {sorted(devices)}); on other devices call the eager step"
            )
        if not any(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups):
            raise ValueError(
                "opt is not capturable: build it with capturable=True or call "
                "fastsam.cuda_graphs.make_capturable(opt) first"
            )
        warmup = _checks.integer("warmup", warmup, lo=1)
        self.model, self.opt, self.loss_fn, self.warmup = model, opt, loss_fn, warmup
        self._eager: Dict[bool, int] = {True: 0, False: 0}
        self._graphs: Dict[bool, torch.cuda.CUDAGraph] = {}
        self._baked: Dict[bool, list] = {}
        self._loss: Dict[bool, torch.Tensor] = {}
        self._flags: Dict[bool, Optional[torch.Tensor]] = {}  # each graph's skip flag (device memory)
        self._x: Optional[torch.Tensor] = None
        self._y: Optional[torch.Tensor] = None

    # the step itself, as an eager loop would run it
    def _run(self, x: torch.Tensor, y: torch.Tensor, sam: bool) -> torch.Tensor:
        opt = self.opt
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if sam:
            opt.first_step(zero_grad=True)
            with frozen_bn_stats(self.model):
                self.loss_fn(self.model(x), y).backward()
        opt.second_step(zero_grad=False)
        return loss.detach()

    def _hyper(self) -> list:
        """What the graph bakes in besides the lr: the groups' other hyperparameters and the
        optimizer's own settings (clipping, perturb_eps, a schedule's rho multiplier)."""
        opt = self.opt
        scale = getattr(opt.schedule, "rho_scale", None)
        return [{k: g[k] for k in _BAKED if k in g} for g in opt.param_groups] + [
            (opt.max_grad_norm, opt.perturb_eps, None if scale is None else float(scale(opt)))
        ]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt = self.opt
        sam = bool(opt.sam_active)
        if self._eager[sam] < self.warmup:
            self._eager[sam] += 1
            opt.zero_grad(set_to_none=True)
            return self._run(x, y, sam)
        if self._x is None or self._y is None:  # (both are set together)
            self._x, self._y = x.clone(), y.clone()
        self._x.copy_(x)
        self._y.copy_(y)
        graph = self._graphs.get(sam)
        if graph is None:
            graph = self._capture(sam)
        elif self._hyper() != self._baked[sam]:
            raise RuntimeError(
                "a hyperparameter other than lr changed since this step was captured "
                f"({self._baked[sam]} -> {self._hyper()}); the graph would replay the old value: "
                "build a new CapturedSAMStep"
            )
        graph.replay()
        opt.finish_step(self._flags[sam])  # what second_step counts in the eager loop; the flag the replay rewrote
        return self._loss[sam]

    def _capture(self, sam: bool) -> torch.cuda.CUDAGraph:
        opt = self.opt
        x, y = self._x, self._y
        assert x is not None and y is not None  # the static batch, set by __call__ before any capture
        steps = opt.num_steps
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            # the capture records this kind of step whatever the schedule says
            with opt.sam_forced(sam):
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    self._loss[sam] = self._run(x, y, sam)
                self._flags[sam] = opt.skip_flag
        finally:
            opt.num_steps = steps  # capturing ran no step
        self._graphs[sam] = graph
        self._baked[sam] = self._hyper()
        return graph
