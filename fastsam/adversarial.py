"""Adversarial examples and robust accuracy: PGD (L-infinity and L2) and FGSM.

    from fastsam import adversarial
    x_adv = adversarial.pgd(model, x, y, eps=4/255, alpha=2/255, steps=10)       # L-inf PGD-10
    x_adv = adversarial.pgd(model, x, y, eps=0.5, alpha=0.1, steps=20, norm="l2")
    x_adv = adversarial.fgsm(model, x, y, eps=8/255)
    r = adversarial.robust_accuracy(model, loader, eps=4/255, alpha=2/255, steps=10)
    r.clean_acc, r.robust_acc                                                     # fractions in [0, 1]

What every attack guarantees:

- ``x_adv`` is a detached tensor of ``x``'s shape and dtype with ``||x_adv - x|| <= eps`` in the
  chosen norm (per sample; up to rounding for L2) and, with ``clamp=(lo, hi)``, ``lo <= x_adv <= hi``.
- The model is used in ``model_mode`` (``"eval"`` by default; ``"train"``: BatchNorm with batch
  statistics, dropout active; ``None``: as it is). Afterwards every module's ``training`` flag
  and every buffer (BatchNorm running statistics) are exactly as before, and the parameters'
  ``.grad`` is untouched: the attack differentiates with respect to the input only
  (``torch.autograd.grad``), never accumulating into parameters.
- ``generator`` (a ``torch.Generator`` on ``x``'s device) makes the random start reproducible;
  without it the global RNG is used.
- ``x`` must be finite and, with ``clamp``, inside it: clamping an input from outside the range
  would move it past any eps, so that is an error (``clamp=None`` for unbounded inputs such as
  normalised images). A loss whose input gradient is not finite raises ``FloatingPointError``.
  Every setting is checked (``ValueError`` naming it) before the model runs; Python, NumPy and
  0-d tensor scalars are accepted alike. A call that raises leaves the model as it was.

Untargeted attacks (default) ascend ``loss_fn(model(x_adv), y)``; ``targeted=True`` descends the
loss towards the labels ``y`` (then the target classes). The loss is summed over the batch, so
each sample's step is that sample's own gradient direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import ArgumentError, choice, flag, integer, real

__all__ = ["pgd", "fgsm", "robust_accuracy", "RobustAccuracy", "NORMS", "MODEL_MODES"]

NORMS = ("linf", "l2")
MODEL_MODES = ("eval", "train", None)


# ----------------------------------------------------------------------------- argument checks
def _check_attack(
    eps: Any,
    alpha: Any,
    steps: Any,
    norm: Any,
    random_start: Any,
    loss_fn: Any,
    clamp: Any,
    model_mode: Any,
    *,
    alpha_none: bool = False,
) -> Tuple[float, Optional[float], int, str, bool, Optional[Tuple[float, float]], Optional[str]]:
    """The attack's settings as plain Python values (every number through fastsam._checks)."""
    eps = real("eps", eps, lo=0)
    alpha = real("alpha", alpha, lo=0, none=alpha_none)
    steps = integer("steps", steps, lo=0)
    norm = choice("norm", norm, NORMS)
    random_start = flag("random_start", random_start)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ArgumentError(f"clamp must be None or a (low, high) pair, got {clamp!r}")
        clamp = (real("clamp[0]", clamp[0]), real("clamp[1]", clamp[1]))
        if not clamp[0] < clamp[1]:
            raise ArgumentError(f"clamp must satisfy low < high, got {clamp!r}")
    model_mode = choice("model_mode", model_mode, ("eval", "train"), none=True)
    return eps, alpha, steps, norm, random_start, clamp, model_mode


def _check_batch(model: Any, x: Any, y: Any) -> None:
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if x.dim() < 1 or x.shape[0] == 0:
        raise ArgumentError(f"x must have a non-empty leading batch dimension, got shape {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ArgumentError(
            f"y must be a tensor with the batch size of x ({x.shape[0]}), got "
            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )


def _check_inputs(x: torch.Tensor, clamp: Optional[Tuple[float, float]]) -> None:
    """x finite and inside ``clamp``: clamping an input from outside the range would move it
    arbitrarily far, past any eps (one host read)."""
    lo_x, hi_x = torch.stack(torch.aminmax(x.detach())).tolist()
    if not (math.isfinite(lo_x) and math.isfinite(hi_x)):
        raise ArgumentError(f"x must be finite, got values in [{lo_x}, {hi_x}]")
    if clamp is not None and (lo_x < clamp[0] or hi_x > clamp[1]):
        away = max(clamp[0] - lo_x, hi_x - clamp[1])
        raise ArgumentError(
            f"x has values in [{lo_x:g}, {hi_x:g}], outside clamp=({clamp[0]:g}, {clamp[1]:g}): the attack "
            f"would move them up to {away:g} to honour clamp, whatever eps; pass clamp=None or the "
            "inputs' own range (e.g. the range of normalised images)"
        )


# ----------------------------------------------------------------------------- model state
class _ModelState:
    """Put the model in ``mode`` for the attack; restore training flags and buffers afterwards."""

    saved: Optional[Tuple[List[Tuple[nn.Module, bool]], List[Tuple[torch.Tensor, torch.Tensor]]]]

    def __init__(self, model: Any, mode: Optional[str]) -> None:
        self.model, self.mode = model, mode

    def __enter__(self) -> _ModelState:
        m = self.model
        if not isinstance(m, nn.Module):
            self.saved = None
            return self
        self.saved = ([(mod, mod.training) for mod in m.modules()], [(b, b.detach().clone()) for b in m.buffers()])
        if self.mode is not None:
            m.train(self.mode == "train")
        return self

    def __exit__(self, *exc: Any) -> Literal[False]:
        if self.saved is None:
            return False
        flags, buffers = self.saved
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        for mod, training in flags:
            mod.training = training
        return False


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped (N, 1, 1, ...) for broadcasting."""
    # the dtype's smallest normal: a zero gradient steps by 0, not 0/0, in float16 too
    return t.flatten(1).norm(dim=1).clamp_min(torch.finfo(t.dtype).tiny).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
    return delta * torch.where(n > eps, eps / n.clamp_min(torch.finfo(n.dtype).tiny), torch.ones_like(n))


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * eps
    # uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d)
    d = x[0].numel()
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    r = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype).pow(1.0 / d)
    return g / _per_sample_norm(g) * (eps * r).view(-1, *([1] * (x.dim() - 1)))


def _clamp(t: torch.Tensor, clamp: Optional[Tuple[float, float]]) -> torch.Tensor:
    return t if clamp is None else t.clamp(*clamp)


# ----------------------------------------------------------------------------- attacks
def pgd(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    targeted: bool = False,
    loss_fn: Callable = F.cross_entropy,
    clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
    model_mode: Optional[str] = "eval",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al., 2018) in the L-infinity or L2 ball of radius ``eps``.

    Each of ``steps`` iterations moves every sample by ``alpha`` along the sign of its input
    gradient (``norm="linf"``) or its unit-L2 input gradient (``norm="l2"``), then projects onto
    the ``eps``-ball around ``x`` and into ``clamp``. ``random_start``: start from a uniform point
    of the ball (clamped), else from ``x``. ``eps=0`` or ``steps=0`` (without random start)
    returns a copy of ``x``. See the module docstring for what is checked and restored.
    """
    eps, checked_alpha, steps, norm, random_start, clamp, model_mode = _check_attack(
        eps, alpha, steps, norm, random_start, loss_fn, clamp, model_mode
    )
    assert checked_alpha is not None  # (alpha_none=False: None was refused)
    alpha = checked_alpha
    targeted = flag("targeted", targeted)
    _check_batch(model, x, y)
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != x.device.type):
        got = generator.device if isinstance(generator, torch.Generator) else type(generator).__name__
        raise ArgumentError(f"generator must be a torch.Generator on x's device ({x.device}) or None, got {got}")
    _check_inputs(x, clamp)
    x0 = x.detach()
    if random_start and eps > 0:
        x_adv = _clamp(x0 + _random_start(x0, eps, norm, generator), clamp)
    else:
        x_adv = x0.clone()
    if eps == 0 or steps == 0 or alpha == 0:
        return x_adv
    sign = -1.0 if targeted else 1.0
    finite = torch.ones((), dtype=torch.bool, device=x.device)  # read once, after the last step
    with _ModelState(model, model_mode), torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = loss_fn(model(x_adv), y)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
            (g,) = torch.autograd.grad(loss.sum(), x_adv)
            with torch.no_grad():
                finite &= torch.isfinite(g).all()  # sign(NaN) is 0: a NaN gradient would pass as no step
                if norm == "linf":
                    step = g.sign()
                else:
                    step = g / _per_sample_norm(g)
                delta = _project(x_adv + sign * alpha * step - x0, eps, norm)
                x_adv = _clamp(x0 + delta, clamp)
    if not bool(finite):
        raise FloatingPointError(
            "the input gradient of loss_fn(model(x_adv), y) was not finite (a NaN or "
            "infinite loss, or NaN model outputs): no adversarial example to return"
        )
    return x_adv.detach()


def fgsm(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    loss_fn: Callable = F.cross_entropy,
    clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
    model_mode: Optional[str] = "eval",
) -> torch.Tensor:
    """Fast gradient (sign) method (Goodfellow et al., 2015): one step of size ``eps`` from ``x``,
    ``x + eps * sign(grad)`` (``norm="l2"``: ``x + eps * grad / ||grad||``), clamped. Equal to
    ``pgd(..., alpha=eps, steps=1, random_start=False)``."""
    return pgd(
        model,
        x,
        y,
        eps=eps,
        alpha=eps,
        steps=1,
        norm=norm,
        random_start=False,
        targeted=targeted,
        loss_fn=loss_fn,
        clamp=clamp,
        model_mode=model_mode,
    )


# ----------------------------------------------------------------------------- evaluation
@dataclass
class RobustAccuracy:
    """Result of :func:`robust_accuracy`: fractions in [0, 1] over ``num_samples`` samples.

    ``robust_acc`` counts a sample as correct when the model classifies both the clean input and
    every attacked input (each restart) correctly: the worst case over the points tried, so it
    is never above ``clean_acc``.
    """

    clean_acc: float
    robust_acc: float
    num_samples: int
    attack: dict


def _batches(data: Any, batch_size: Optional[int]) -> Iterator[Tuple[Any, Any]]:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
        and data[0].dim() > 0
        and data[0].shape[0] == data[1].shape[0]
    ):
        x, y = data
        bs = batch_size or x.shape[0]
        for i in range(0, x.shape[0], bs):
            yield x[i : i + bs], y[i : i + bs]
        return
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(
            "data must be an (inputs, targets) pair of tensors or an iterable of such batches, "
            f"got {type(data).__name__}"
        ) from None
    for i, b in enumerate(it):
        if not (isinstance(b, (tuple, list)) and len(b) >= 2):
            raise TypeError(f"data batch {i} must be an (inputs, targets) pair, got {type(b).__name__}")
        yield b[0], b[1]


def robust_accuracy(
    model: Callable,
    data: Union[Tuple[torch.Tensor, torch.Tensor], Iterable],
    *,
    eps: float,
    alpha: Optional[float] = None,
    steps: int = 10,
    norm: str = "linf",
    random_start: bool = False,
    restarts: int = 1,
    loss_fn: Callable = F.cross_entropy,
    clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
    model_mode: Optional[str] = "eval",
    batch_size: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
    seed: Optional[int] = None,
) -> RobustAccuracy:
    """Clean and robust accuracy of ``model`` under untargeted PGD-``steps`` (``steps=1``,
    ``alpha=eps``, no random start is FGSM).

    ``data``: an ``(x, y)`` pair of tensors (split into ``batch_size`` chunks, default one batch)
    or an iterable of ``(x, y)`` batches (a DataLoader). ``alpha`` defaults to ``eps / 4`` for
    PGD (``eps`` for ``steps=1``). ``restarts`` > 1 (with ``random_start``) keeps the worst case
    per sample. ``device``: where batches are moved (default: the model's first parameter's
    device). ``seed`` seeds the random starts (a private generator; the global RNG is untouched).
    Predictions are taken in ``model_mode``; the model's state is restored as in :func:`pgd`.
    """
    # every setting is checked before the first batch is read
    eps, alpha, steps, norm, random_start, clamp, model_mode = _check_attack(
        eps, alpha, steps, norm, random_start, loss_fn, clamp, model_mode, alpha_none=True
    )
    if alpha is None:
        alpha = eps if steps == 1 else eps / 4
    restarts = integer("restarts", restarts, lo=1)
    if restarts > 1 and not random_start:
        raise ArgumentError("restarts > 1 needs random_start=True (the restarts would be identical)")
    batch_size = integer("batch_size", batch_size, lo=1, none=True)
    seed = integer("seed", seed, lo=-(2**63), hi=2**64 - 1, none=True)  # torch.Generator's range
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
    if device is None and isinstance(model, nn.Module):
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else None
    gen = None
    clean = robust = total = 0
    with _ModelState(model, model_mode):
        for x, y in _batches(data, batch_size):
            if device is not None:
                x, y = x.to(device), y.to(device)
            if gen is None and seed is not None:
                gen = torch.Generator(device=x.device).manual_seed(seed)
            with torch.no_grad():
                ok = _predict(model, x).eq(y)
            clean += int(ok.sum())
            for _ in range(restarts):
                x_adv = pgd(
                    model,
                    x,
                    y,
                    eps=eps,
                    alpha=alpha,
                    steps=steps,
                    norm=norm,
                    random_start=random_start,
                    loss_fn=loss_fn,
                    clamp=clamp,
                    model_mode=None,
                    generator=gen,
                )
                with torch.no_grad():
                    ok &= _predict(model, x_adv).eq(y)
            robust += int(ok.sum())
            total += int(y.shape[0])
    if total == 0:
        raise ArgumentError("data is empty: no samples to evaluate")
    attack = dict(
        eps=eps,
        alpha=alpha,
        steps=steps,
        norm=norm,
        random_start=random_start,
        restarts=restarts,
        clamp=clamp,
        model_mode=model_mode,
    )
    return RobustAccuracy(clean / total, robust / total, total, attack)


def _predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.argmax(1)
