"""One run of the late-phase experiments (benchmarks/late_phase_mnist.py, late_phase_rule.py) and its
final measurement.

Every function takes the parsed arguments ``a`` (dataset, schedule, measurement settings) and is a
pure function of them and its inputs, so that the task runner can call it in any process. The label
noise is drawn once (``noise_seed`` 0) unless ``a.noise_per_seed``: then seed s draws its own.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Dict

import torch
from torch import nn

from fastsam import FusedSAM, hessian

from . import data as datasets
from .measure import accuracy, flat, hessian_batches, lam_max, log_steps, memorisation, subset_loss
from .models import MLP, MnistCNN, Normalized, build
from .runner import Progress
from .training import restore, train_epochs


def noise_seed(a, seed) -> int:
    return seed if getattr(a, "noise_per_seed", False) else 0


def load_data(a, seed=0) -> datasets.ImageData:
    ns = noise_seed(a, seed)
    if a.dataset == "cifar10":
        return datasets.load_cifar10_pixels(
            a.data_dir, a.device, noise=a.label_noise, noise_seed=ns, train_limit=getattr(a, "train_limit", None)
        )
    d = datasets.load(a.dataset, noise=a.label_noise, noise_seed=ns, device=a.device, limit=a.limit)
    n = getattr(a, "train_limit", None)
    if n is not None:
        d.train_x, d.train_y, d.train_y_clean = d.train_x[:n], d.train_y[:n], d.train_y_clean[:n]
    return d


def build_model(a, d, seed):
    torch.manual_seed(seed)  # same initial weights for every run of a seed
    if a.dataset == "cifar10":
        m = Normalized(
            build("wrn16_8", width_div=getattr(a, "width_div", 1))[0], datasets.CIFAR_MEAN, datasets.CIFAR_STD
        )
    elif getattr(a, "model", "cnn") == "mlp":
        m = MLP(d.train_x[0].numel(), a.width, 10, d.mean, d.std)
    else:
        m = MnistCNN(a.width, 10, 1, d.mean, d.std)
    m = m.to(a.device).train()
    return m.to(memory_format=torch.channels_last) if getattr(a, "channels_last", False) else m


def make_opt(a, model):
    return FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=a.rho,
        lr=a.lr,
        momentum=0.9,
        weight_decay=a.weight_decay,
        backend="foreach",
    )


def criterion(a):
    return nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)


_SETUP: Dict[tuple, tuple] = {}


def setup(a, seed=0):
    """(data, Hessian batches, phase batches) of seed ``seed``'s noise draw, loaded once per process."""
    key = (
        a.dataset,
        a.data_dir,
        a.device,
        a.label_noise,
        noise_seed(a, seed),
        a.limit,
        getattr(a, "train_limit", None),
        a.hessian_samples,
        a.hessian_batch,
        a.phase_samples,
    )
    if key not in _SETUP:
        d = load_data(a, seed)
        hb = hessian_batches(d.train_x, d.train_y, a.hessian_samples, a.hessian_batch)
        pb = hessian_batches(d.train_x, d.train_y, a.phase_samples, a.hessian_batch)
        _SETUP[key] = (d, hb, pb)
    return _SETUP[key]


def final_measures(a, model, crit, d, hb):
    """Test accuracy, clean-label training accuracy, memorisation of the flipped labels, the loss of
    the sharpness subset, λmax and (``a.trace_samples`` > 0) the Hessian trace."""
    t0 = time.perf_counter()
    lam = lam_max(model, crit, hb, a.final_tol)
    tr = (
        hessian.trace(model, crit, hb, num_samples=a.trace_samples, seed=0, model_mode="train")
        if a.trace_samples
        else None
    )
    mem = memorisation(model, d.train_x, d.train_y, d.train_y_clean)
    return {
        "test_acc": accuracy(model, d.test_x, d.test_y),
        "train_acc_clean_labels": accuracy(model, d.train_x, d.train_y_clean),
        "memorised": mem["memorised"],
        "memorised_chance": mem["chance"],
        "train_loss_subset": subset_loss(model, crit, hb),
        "lambda_max": lam,
        "trace": tr.trace if tr else math.nan,
        "trace_std_error": tr.std_error if tr else math.nan,
        "hessian_s": time.perf_counter() - t0,
    }


def train_task(a, seed, start, end, sam, ck=None, save_at=(), record=False, label="", fresh_opt=False):
    """One run of a seed: from the initial weights (start 0, ``ck`` None) or from a checkpoint at
    epoch ``start``, SAM on or off to ``end``; ``fresh_opt``: a new optimizer at the checkpoint (its
    state, the SGD momentum, not restored: the late-phase paper's code), else the checkpoint's.
    ``record``: from epoch ``a.phase_epoch`` on (or from ``start`` if later), at log-spaced steps
    after the switch, the weights, their distance from the switch weights, λmax and the loss of the
    phase subset."""
    d, _, pb = setup(a, seed)
    crit = criterion(a)
    model = build_model(a, d, seed)
    opt = make_opt(a, model)
    gen = torch.Generator().manual_seed(seed)
    if ck is not None:
        restore(ck, model, opt, gen, with_opt=not fresh_opt)
    spe = len(d.train_x) // a.batch_size
    P = a.phase_epoch
    prog = Progress(end - start, f"seed {seed} {label}")
    parts = {"record_s": 0.0}
    out = {"seed": seed, "start": start, "end": end, "sam": sam}
    if not record:
        ckpts = train_epochs(a, d, model, opt, gen, crit, start, end, sam=sam, save_at=set(save_at), progress=prog)
    else:
        step0 = P * spe
        rec_set = {step0 + s for s in log_steps(a.phase_steps if a.phase_steps else (a.epochs - P) * spe)}
        rec = {"step": [], "w": [], "distance": [], "lambda_max": [], "train_loss": []}
        ckpts = (
            train_epochs(a, d, model, opt, gen, crit, start, P, sam=sam, save_at=set(save_at), progress=prog)
            if start < P
            else {}
        )
        w_p = flat(model)

        def on_step(gs):
            if gs in rec_set:
                t1 = time.perf_counter()
                w = flat(model)
                rec["step"].append(gs - step0)
                rec["w"].append(w)
                rec["distance"].append(float((w - w_p).norm()))
                rec["lambda_max"].append(lam_max(model, crit, pb, a.phase_tol))
                rec["train_loss"].append(subset_loss(model, crit, pb))
                parts["record_s"] += time.perf_counter() - t1

        ckpts.update(
            train_epochs(
                a,
                d,
                model,
                opt,
                gen,
                crit,
                max(start, P),
                end,
                sam=sam,
                save_at=set(save_at),
                on_step=on_step,
                progress=prog,
            )
        )
        out.update(record=rec, w_switch=w_p)
    out.update(
        state=copy.deepcopy(model.state_dict()), ckpts=ckpts, test_acc=accuracy(model, d.test_x, d.test_y), parts=parts
    )
    return out


def measure_task(a, seed, state, switch):
    """Final test accuracy, clean-label training accuracy, loss, λmax and trace of a trained model."""
    d, hb, _ = setup(a, seed)
    model = build_model(a, d, seed)
    model.load_state_dict(state)
    return {**final_measures(a, model, criterion(a), d, hb), "switch": switch}


def memorisation_task(a, seed, state):
    """Test accuracy and memorisation of the flipped labels of a model state (at a switch)."""
    d, _, _ = setup(a, seed)
    model = build_model(a, d, seed)
    model.load_state_dict(state)
    mem = memorisation(model, d.train_x, d.train_y, d.train_y_clean)
    return {
        "test_acc": accuracy(model, d.test_x, d.test_y),
        "memorised": mem["memorised"],
        "memorised_chance": mem["chance"],
    }


def train_cost(a, start, end, sam, record=False):
    """About how many SGD epochs a run costs (for the ETA only)."""
    c = (end - start) * (2.0 if sam else 1.0)
    return c + (14 * 3.5 if record else 0.0)  # a phase record: 14 λmax of the phase subset ~ 3.5 SGD epochs each


MEASURE_COST = 35.0  # final_measures ~ 35 SGD epochs (Lanczos tol 1e-3 + 30-product Hutch++, 4 batches)
