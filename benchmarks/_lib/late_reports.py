"""The markdown reports of benchmarks/late_phase_mnist.py's experiments: (a) sweep, (b)+(d) phases,
(c) adversarial, and the one-line description of a run's setup."""

from __future__ import annotations

import math

import _common

from .runner import timing_line
from .stats import ms


def task_timing(a, tasks_info, wall, cpu):
    """The timing line, the tasks' wall time split by part (training, records, measurements, ...)."""
    parts = {
        "training": 0.0,
        "phase records (λmax + loss of the phase subset)": 0.0,
        "final measurements (accuracy, λmax, trace)": 0.0,
        "interpolation and fits": 0.0,
        "training and PGD evaluation": 0.0,
    }
    for name, sec, rec in tasks_info:
        if "measure" in name:
            parts["final measurements (accuracy, λmax, trace)"] += sec
        elif "interpolation" in name:
            parts["interpolation and fits"] += sec
        elif rec is not None:
            parts["phase records (λmax + loss of the phase subset)"] += rec
            parts["training"] += sec - rec
        else:
            parts["training and PGD evaluation" if "adversarial" in name else "training"] += sec
    return timing_line(a, parts, wall, cpu)


def _by_t(res):
    """(t, the seeds' runs at t) for every t of the seeds' "runs", ascending."""
    for t in sorted({t for r in res for t in r["runs"]}):
        yield t, [r["runs"][t] for r in res if t in r["runs"]]


def report_sweep(a, res, info, wall, timing):
    E = a.epochs
    rows = []
    for t, rs in _by_t(res):
        label = "full SAM" if t == 0 else ("SGD" if t >= E else f"SGD → SAM from epoch {t}")
        rows.append(
            [
                t,
                label,
                E - t,
                ms([x["test_acc"] for x in rs]),
                ms([x["train_acc_clean_labels"] for x in rs]),
                ms([x["train_loss_subset"] for x in rs]),
                ms([x["lambda_max"] for x in rs]),
                ms([x["trace"] for x in rs]),
            ]
        )
    md = [
        f"# Late-phase SAM switch-point sweep: {a.dataset}",
        "",
        _common.machine_line(info),
        "",
        f"Setup: {describe(a)}. Values: mean ± std over seeds {a.seeds}. {timing}",
        "",
        f"Command: `python benchmarks/late_phase_mnist.py {' '.join(a.argv)}`",
        "",
        "## (a) Switch point t (SAM from epoch t to the end)",
        "",
        _common.markdown_table(
            [
                "t",
                "run",
                "SAM epochs",
                "test acc (%)",
                "train acc, clean labels (%)",
                "train loss (subset)",
                "λmax",
                "Hessian trace",
            ],
            rows,
        ),
        "",
    ]
    # paired differences vs SGD and full SAM
    md.append("Paired per seed (same init and data order): test accuracy and λmax minus SGD's / full SAM's:")
    md.append("")
    for t in sorted({t for r in res for t in r["runs"]}):
        if t in (0, E):
            continue
        da = [r["runs"][t]["test_acc"] - r["runs"][E]["test_acc"] for r in res]
        db = [r["runs"][t]["test_acc"] - r["runs"][0]["test_acc"] for r in res if 0 in r["runs"]]
        dl = [r["runs"][t]["lambda_max"] - r["runs"][E]["lambda_max"] for r in res]
        dl0 = [r["runs"][t]["lambda_max"] - r["runs"][0]["lambda_max"] for r in res if 0 in r["runs"]]
        md.append(f"- t={t}: acc − SGD {ms(da)}, acc − SAM {ms(db)}; λmax − SGD {ms(dl)}, λmax − SAM {ms(dl0)}")
    md += [
        "",
        f"The two phases after the switch and the reverse check: `--experiment phases` "
        f"(late_phase_{a.dataset}_phases{a.tag_s}.md).",
        "",
        f"Plot: late_phase_{a.dataset}_sweep{a.tag_s}.png",
    ]
    return "\n".join(md)


def report_phases(a, res, info, wall, timing):
    P, E = a.phase_epoch, a.epochs
    md = [
        f"# Late-phase SAM: the two phases after the switch, and the reverse check: {a.dataset}",
        "",
        _common.machine_line(info),
        "",
        f"Setup: {describe(a)}. Values: mean ± std over seeds {a.seeds}. {timing}",
        "",
        f"Command: `python benchmarks/late_phase_mnist.py {' '.join(a.argv)}`",
        "",
    ]
    rows = []
    for key, label, sam_ep in (
        ("sgd", "SGD", 0),
        ("full_sam", "full SAM", E),
        ("reverse", f"SAM → SGD from epoch {P} (reverse)", P),
    ):
        rs = [r[key] for r in res if r.get(key)]
        if rs:
            rows.append(
                [
                    label,
                    sam_ep,
                    ms([x["test_acc"] for x in rs]),
                    ms([x["train_acc_clean_labels"] for x in rs]),
                    ms([x["train_loss_subset"] for x in rs]),
                    ms([x["lambda_max"] for x in rs]),
                    ms([x["trace"] for x in rs]),
                ]
            )
    md += [
        "## Final models (the same runs as the sweep's t = E and t = 0; SGD → SAM from "
        f"epoch {P} is the sweep's t = {P} row)",
        "",
        _common.markdown_table(
            [
                "run",
                "SAM epochs",
                "test acc (%)",
                "train acc, clean labels (%)",
                "train loss (subset)",
                "λmax",
                "Hessian trace",
            ],
            rows,
        ),
        "",
    ]
    if any(r.get("reverse") for r in res):
        md.append(
            "Paired per seed, the reverse run minus full SAM / minus SGD: test accuracy "
            f"{ms([r['reverse']['test_acc'] - r['full_sam']['test_acc'] for r in res])} / "
            f"{ms([r['reverse']['test_acc'] - r['sgd']['test_acc'] for r in res])}; λmax "
            f"{ms([r['reverse']['lambda_max'] - r['full_sam']['lambda_max'] for r in res])} / "
            f"{ms([r['reverse']['lambda_max'] - r['sgd']['lambda_max'] for r in res])}."
        )
        md.append("")
    ph = [r["phases"] for r in res if r["phases"]]
    if ph:
        md += [
            f"## (b) The two phases after the switch at epoch {a.phase_epoch}",
            "",
            "Exponential fits log y = c + r·step over the first epoch after the switch "
            f"(steps {ph[0]['fit_first_epoch']['fit_steps']}):",
            "",
        ]
        f = [p["fit_first_epoch"] for p in ph]
        md.append(
            _common.markdown_table(
                ["quantity", "rate r per step", "R²", "doubling steps ln2/r"],
                [
                    [
                        "‖w_lateSAM − w_SGD‖ (separation)",
                        ms([x["separation_rate"] for x in f]),
                        ms([x["separation_r2"] for x in f]),
                        ms([math.log(2) / x["separation_rate"] if x["separation_rate"] > 0 else math.nan for x in f]),
                    ],
                    [
                        "‖w_lateSAM − w_switch‖",
                        ms([x["late_sam_distance_rate"] for x in f]),
                        ms([x["late_sam_distance_r2"] for x in f]),
                        "-",
                    ],
                    [
                        "‖w_SGD − w_switch‖",
                        ms([x["sgd_distance_rate"] for x in f]),
                        ms([x["sgd_distance_r2"] for x in f]),
                        "-",
                    ],
                ],
            )
        )
        steps = ph[0]["late_sam"]["step"]
        rows = []
        for i, s in enumerate(steps):
            rows.append(
                [
                    s,
                    ms([p["sgd"]["distance"][i] for p in ph]),
                    ms([p["late_sam"]["distance"][i] for p in ph]),
                    ms([p["separation"][i] for p in ph]),
                    ms([p["sgd"]["lambda_max"][i] for p in ph]),
                    ms([p["late_sam"]["lambda_max"][i] for p in ph]),
                    ms([p["sgd"]["train_loss"][i] for p in ph]),
                    ms([p["late_sam"]["train_loss"][i] for p in ph]),
                ]
            )
        md += [
            "",
            _common.markdown_table(
                [
                    "steps after switch",
                    "dist SGD",
                    "dist late SAM",
                    "separation",
                    "λmax SGD",
                    "λmax late SAM",
                    "loss SGD",
                    "loss late SAM",
                ],
                rows,
            ),
            "",
        ]
        it = [p["interpolation"] for p in ph]
        al = it[0]["alpha"]
        for key, name in (("sgd_to_late_sam", "SGD → late SAM"), ("sgd_to_full_sam", "SGD → full SAM")):
            if key not in it[0]:
                continue
            curves = [x[key] for x in it]
            i0 = min(range(len(al)), key=lambda i: abs(al[i]))
            i1 = min(range(len(al)), key=lambda i: abs(al[i] - 1))
            ends = [(c[i0], c[i1]) for c in curves]
            inner = [max(c[i0 : i1 + 1]) - max(c[i0], c[i1]) for c in curves]
            md.append(
                f"- Linear path {name} ({len(al)} points, α ∈ [{al[0]:.2f}, {al[-1]:.2f}]): loss at α=0 "
                f"{ms([e[0] for e in ends])}, at α=1 {ms([e[1] for e in ends])}, barrier (max over α∈[0,1] "
                f"minus the larger end) {ms(inner)}."
            )
    md += ["", f"Plot: late_phase_{a.dataset}_phases{a.tag_s}.png"]
    return "\n".join(md)


def report_adv(a, res, info, wall, timing):
    E = a.epochs
    rows = []
    for t, rs in _by_t(res):
        label = "standard" if t == 0 else ("full AT" if t >= E else f"standard → AT, last {t} epochs")
        rows.append([t, label, ms([x["clean_acc"] for x in rs]), ms([x["robust_acc"] for x in rs])])
    md = [
        f"# Late-phase adversarial training: {a.dataset}",
        "",
        _common.machine_line(info),
        "",
        f"Setup: {describe(a)}. Training attack: L∞ PGD-{a.at_steps}, ε={a.eps:.4g}, step {a.at_alpha:.4g}, "
        f"random start, model in train mode (BN statistics of the attack passes discarded). Evaluation: "
        f"L∞ PGD-{a.eval_steps}, ε={a.eps:.4g}, step {a.eval_alpha:.4g}, no random start, eval mode, "
        f"{a.n_test} test images; robust = correct on the clean and the attacked image. "
        f"Mean ± std over seeds {a.seeds}. {timing}",
        "",
        f"Command: `python benchmarks/late_phase_mnist.py {' '.join(a.argv)}`",
        "",
        _common.markdown_table(["AT epochs t", "run", "clean test acc (%)", "robust test acc (%)"], rows),
        "",
        "Paired per seed, robust accuracy minus full AT's:",
        "",
    ]
    full = max(t for r in res for t in r["runs"])
    for t in sorted({t for r in res for t in r["runs"]}):
        if t == full:
            continue
        d = [r["runs"][t]["robust_acc"] - r["runs"][full]["robust_acc"] for r in res]
        c = [r["runs"][t]["clean_acc"] - r["runs"][full]["clean_acc"] for r in res]
        md.append(f"- t={t}: robust {ms(d)}, clean {ms(c)}")
    md += ["", f"Plot: late_phase_{a.dataset}_adversarial{a.tag_s}.png"]
    return "\n".join(md)


def describe(a):
    div = getattr(a, "width_div", 1)
    model = ("WRN-16-8" + (f" (width/{div})" if div > 1 else "")) if a.dataset == "cifar10" else f"CNN width {a.width}"
    hess = (
        ""
        if a.experiment == "adversarial"
        else (
            f"; λmax (Lanczos tol {a.final_tol}) and trace (Hutch++ {a.trace_samples} HVPs) of the training loss "
            "on the "
            f"first {a.hessian_samples} training images in batches of {a.hessian_batch}, train mode"
        )
    )
    if a.experiment == "phases":
        hess += (
            f"; after the switch at epoch {a.phase_epoch}: λmax (tol {a.phase_tol}) and loss of the first "
            f"{a.phase_samples} training images at 14 log-spaced steps; {a.interp_points} interpolation points, "
            f"α ∈ [{a.interp_lo:g}, {a.interp_hi:g}]"
        )
    gpu = "".join(
        s
        for s, on in (
            (", bf16 autocast", getattr(a, "amp", None) == "bf16"),
            (", channels-last", getattr(a, "channels_last", False)),
        )
        if on
    )
    return (
        f"{a.dataset} ({a.n_train} train / {a.n_test} test, symmetric label noise {a.label_noise:g} on the "
        f"training labels), {model}, {a.epochs} epochs, batch {a.batch_size}, lr {a.lr} x0.1 at epoch "
        f"{a.milestone}, momentum 0.9, wd {a.weight_decay}, label smoothing {a.label_smoothing}, rho {a.rho} "
        f"(FusedSAM(SGD), foreach){gpu}" + hess
    )
