"""What the science benchmarks measure on a model: accuracy, loss, sharpness (lambda_max of the
training loss on a fixed subset, train-mode BatchNorm as in the late-phase paper), memorisation of
noisy labels, distances in weight space and exponential-growth fits."""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastsam import frozen_bn_stats, hessian


def flat(model) -> torch.Tensor:
    """A copy of all parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


@torch.no_grad()
def accuracy(model, x, y, batch: int = 1000) -> float:
    """Accuracy (%) in eval mode."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return 100.0 * correct / len(x)


@torch.no_grad()
def evaluate(model, x, y, batch: int = 1000) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy %) in eval mode."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train(was)
    return loss / len(x), 100.0 * correct / len(x)


@torch.no_grad()
def predictions(model, x, batch: int = 1000) -> torch.Tensor:
    """Predicted classes in eval mode."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def memorisation(model, x, y_noisy, y_clean) -> dict:
    """How far the model has fitted the flipped training labels. ``memorised``: % of the images
    whose label was flipped on which the model predicts the flipped label; ``chance``: what that
    would be if its errors on those images fell on the 9 wrong classes alike (error rate / 9);
    ``clean_on_flipped``: % of them predicted as their true class. NaN without flipped labels."""
    flipped = y_noisy != y_clean
    n = int(flipped.sum())
    if n == 0:
        return {"flipped": 0, "memorised": math.nan, "chance": math.nan, "clean_on_flipped": math.nan}
    pred = predictions(model, x[flipped])
    mem = 100.0 * int((pred == y_noisy[flipped]).sum()) / n
    clean = 100.0 * int((pred == y_clean[flipped]).sum()) / n
    return {"flipped": n, "memorised": mem, "chance": (100.0 - clean) / 9, "clean_on_flipped": clean}


@torch.no_grad()
def subset_loss(model, crit, batches) -> float:
    """The training loss of the fixed subset as the Hessian sees it: train mode (batch statistics),
    running statistics untouched, sample-averaged over the batches."""
    was = model.training
    model.train()
    with frozen_bn_stats(model):
        tot = sum(float(crit(model(x), y)) * len(y) for x, y in batches)
    model.train(was)
    return tot / sum(len(y) for _, y in batches)


def lam_max(model, crit, batches, tol: float, seed: int = 0) -> float:
    """Largest Hessian eigenvalue (Lanczos) of ``crit`` over ``batches``, model in train mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = hessian.eigenvalues(model, crit, batches, k=1, method="lanczos", tol=tol, seed=seed, model_mode="train")
    return float(r.eigenvalues[0])


def hessian_batches(x, y, n: int, batch: int) -> List[tuple]:
    """The first ``n`` images (all if fewer) in batches of ``batch``: the fixed sharpness subset."""
    m = min(n, len(x))
    return [(x[i : min(i + batch, m)], y[i : min(i + batch, m)]) for i in range(0, m, batch)]


def log_steps(total: int, count: int = 14) -> List[int]:
    """About ``count`` log-spaced step numbers in 1..total (distinct integers)."""
    if total < 1:
        return []
    return sorted(
        {max(1, min(total, int(round(math.exp(i * math.log(total) / max(1, count - 1)))))) for i in range(count)}
    )


def fit_rate(steps: Sequence[float], values: Sequence[float]):
    """Least-squares fit log(value) = c + r * step; returns (r, R^2) (NaN if < 3 positive points)."""
    pts = [(s, math.log(v)) for s, v in zip(steps, values) if v > 0]
    if len(pts) < 3:
        return math.nan, math.nan
    xs, ys = zip(*pts)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    c = my - r * mx
    ss_res = sum((y - c - r * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return r, (1 - ss_res / ss_tot) if ss_tot > 0 else math.nan


def flat_state(model, state) -> torch.Tensor:
    """The parameters of ``state`` loaded into a copy of ``model``, as one vector."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return flat(m)


def interpolate(model_a_state, w_a, w_b, model, crit, batches, alphas) -> List[float]:
    """Training loss of the subset at (1 - alpha) w_a + alpha w_b (parameters; train-mode BN)."""
    m = copy.deepcopy(model)
    m.load_state_dict(model_a_state)
    params = list(m.parameters())
    sizes = [p.numel() for p in params]
    out = []
    for al in alphas:
        w = (1 - al) * w_a + al * w_b
        with torch.no_grad():
            for p, c in zip(params, w.split(sizes)):
                p.copy_(c.view_as(p))
        out.append(subset_loss(m, crit, batches))
    return out
