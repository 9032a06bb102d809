"""The task graphs of benchmarks/late_phase_mnist.py's experiments: (a) the switch-point sweep,
(b) the two phases after the switch, (d) the reverse check, (c) late adversarial training.
Every run of a seed shares its initial weights and data order."""

from __future__ import annotations

from typing import List

import torch

from fastsam import adversarial

from .late_runs import MEASURE_COST, build_model, criterion, make_opt, measure_task, setup, train_cost, train_task
from .measure import fit_rate, flat_state, interpolate
from .runner import Progress, Task
from .training import checkpoint, restore, train_epochs


# ----------------------------------------------------------------------------- (a), (b), (d)
def interp_task(a, seed, sgd, late, full):
    """Separation and escape-rate fits of the two records; the loss along SGD -> late SAM and
    SGD -> full SAM (final weights)."""
    d, hb, _ = setup(a, seed)
    crit = criterion(a)
    spe = len(d.train_x) // a.batch_size
    srec, lrec = sgd["record"], late["record"]
    sep = [float((ws - wl).norm()) for ws, wl in zip(srec["w"], lrec["w"])]
    first = [i for i, s in enumerate(lrec["step"]) if s <= spe]
    r_sep, r2_sep = fit_rate([lrec["step"][i] for i in first], [sep[i] for i in first])
    r_sam, r2_sam = fit_rate([lrec["step"][i] for i in first], [lrec["distance"][i] for i in first])
    r_sgd, r2_sgd = fit_rate([srec["step"][i] for i in first], [srec["distance"][i] for i in first])
    alphas = [a.interp_lo + i * (a.interp_hi - a.interp_lo) / (a.interp_points - 1) for i in range(a.interp_points)]
    base = build_model(a, d, seed)
    w_sgd = flat_state(base, sgd["state"])
    interp = {
        "alpha": alphas,
        "sgd_to_late_sam": interpolate(sgd["state"], w_sgd, flat_state(base, late["state"]), base, crit, hb, alphas),
    }
    if full is not None:
        interp["sgd_to_full_sam"] = interpolate(
            sgd["state"], w_sgd, flat_state(base, full["state"]), base, crit, hb, alphas
        )
    strip = lambda r: {k: v for k, v in r.items() if k != "w"}
    return {
        "sgd": strip(srec),
        "late_sam": strip(lrec),
        "separation": sep,
        "fit_first_epoch": {
            "separation_rate": r_sep,
            "separation_r2": r2_sep,
            "late_sam_distance_rate": r_sam,
            "late_sam_distance_r2": r2_sam,
            "sgd_distance_rate": r_sgd,
            "sgd_distance_r2": r2_sgd,
            "fit_steps": [lrec["step"][i] for i in first],
        },
        "interpolation": interp,
    }


def late_sam_tasks(a, seed, exps) -> List[Task]:
    """The runs of one seed for the experiments ``exps`` (sweep and/or phases), each run once when
    both are asked for. sweep (a): one SGD trunk, checkpointed at every switch epoch; SAM from each
    checkpoint to the end (t = 0 from the initial weights); every final model measured. phases
    (b): the trunk and SAM from its checkpoint at P recorded after P (recording does not touch the
    training: the same runs, bitwise, as the sweep's); full SAM, for the SGD -> full SAM line and
    (d): SAM -> SGD from full SAM's checkpoint at P; SGD, full SAM and the reverse run measured."""
    E, P = a.epochs, a.phase_epoch
    sweep, phases = "sweep" in exps, "phases" in exps
    rev = phases and a.reverse
    k = f"s{seed}"
    trunk = f"{k} SGD"
    starts = sorted(t for t in a.switches if t < E) if sweep else [0]
    if phases and P not in starts:
        starts.append(P)
    saves = sorted({t for t in starts if t > 0})
    tasks = [
        Task(
            trunk, train_task, (seed, 0, E, False, None, saves, phases, "SGD"), cost=train_cost(a, 0, E, False, phases)
        )
    ]
    for t in sorted(starts):
        rec = phases and t == P
        if t == 0:
            tasks.append(
                Task(
                    f"{k} SAM from 0",
                    train_task,
                    (seed, 0, E, True, None, (P,) if rev else (), False, "SAM from 0"),
                    cost=train_cost(a, 0, E, True),
                )
            )
        else:
            tasks.append(
                Task(
                    f"{k} SAM from {t}",
                    train_task,
                    lambda res, t=t, rec=rec: (seed, t, E, True, res[trunk]["ckpts"][t], (), rec, f"SAM from {t}"),
                    deps=[trunk],
                    cost=train_cost(a, t, E, True, rec),
                )
            )
    if rev:
        tasks.append(
            Task(
                f"{k} SAM->SGD from {P}",
                train_task,
                lambda res: (seed, P, E, False, res[f"{k} SAM from 0"]["ckpts"][P], (), False, f"SAM->SGD from {P}"),
                deps=[f"{k} SAM from 0"],
                cost=train_cost(a, P, E, False),
            )
        )
    if phases:
        deps = [trunk, f"{k} SAM from {P}", f"{k} SAM from 0"]
        tasks.append(
            Task(
                f"{k} interpolation",
                interp_task,
                lambda res: (seed, *(res[d] for d in deps)),
                deps=deps,
                cost=2 * a.interp_points * 0.15,
            )
        )
    measured = sorted(a.switches) if sweep else [0, E]
    for t in measured:
        src = trunk if t >= E else f"{k} SAM from {t}"
        tasks.append(
            Task(
                f"{k} measure t={t}",
                measure_task,
                lambda res, src=src, t=t: (seed, res[src]["state"], t),
                deps=[src],
                cost=MEASURE_COST,
            )
        )
    if rev:
        tasks.append(
            Task(
                f"{k} measure reverse",
                measure_task,
                lambda res: (seed, res[f"{k} SAM->SGD from {P}"]["state"], P),
                deps=[f"{k} SAM->SGD from {P}"],
                cost=MEASURE_COST,
            )
        )
    return tasks


def sweep_seed(a, seed, res):
    k = f"s{seed}"
    return {"seed": seed, "runs": {t: res[f"{k} measure t={t}"] for t in sorted(a.switches)}}


def phases_seed(a, seed, res):
    k = f"s{seed}"
    return {
        "seed": seed,
        "sgd": res[f"{k} measure t={a.epochs}"],
        "full_sam": res[f"{k} measure t=0"],
        "reverse": res.get(f"{k} measure reverse"),
        "phases": res[f"{k} interpolation"],
    }


# ----------------------------------------------------------------------------- (c)
def adversarial_task(a, seed):
    """Standard training, then full AT and standard -> AT for the last t epochs (from its checkpoints);
    clean and robust test accuracy of each."""
    d, _, _ = setup(a, seed)
    crit = criterion(a)
    E = a.epochs

    def atk(t):  # the training attack; its random starts are seeded per run
        return {
            "eps": a.eps,
            "alpha": a.at_alpha,
            "steps": a.at_steps,
            "gen": torch.Generator(device=d.train_x.device).manual_seed(10_000 + 1000 * seed + t),
        }

    def evaluate(model):
        r = adversarial.robust_accuracy(
            model,
            (d.test_x, d.test_y),
            eps=a.eps,
            alpha=a.eval_alpha,
            steps=a.eval_steps,
            random_start=False,
            batch_size=500,
        )
        return {"clean_acc": 100 * r.clean_acc, "robust_acc": 100 * r.robust_acc}

    model = build_model(a, d, seed)
    opt = make_opt(a, model)
    gen = torch.Generator().manual_seed(seed)
    init = checkpoint(model, opt, gen)
    starts = sorted({E - t for t in a.at_epochs if 0 < t < E})
    ck = train_epochs(
        a, d, model, opt, gen, crit, 0, E, sam=False, save_at=set(starts), progress=Progress(E, f"seed {seed} standard")
    )
    out = {0: evaluate(model)}  # key: AT epochs at the end
    for t in sorted(set(a.at_epochs), reverse=True):
        if t <= 0:
            continue
        model = build_model(a, d, seed)
        opt = make_opt(a, model)
        gen = torch.Generator()
        s = max(0, E - t)
        restore(init if s == 0 else ck[s], model, opt, gen)
        train_epochs(
            a,
            d,
            model,
            opt,
            gen,
            crit,
            s,
            E,
            sam=False,
            attack=atk(t),
            progress=Progress(E - s, f"seed {seed} AT last {min(t, E)}"),
        )
        out[min(t, E)] = evaluate(model)
    return {"seed": seed, "runs": out}


def adversarial_cost(a) -> float:
    """About how many SGD epochs one seed's adversarial task costs (for the ETA only)."""
    return a.epochs + sum(min(t, a.epochs) for t in set(a.at_epochs) if t > 0) * (1 + a.at_steps)
