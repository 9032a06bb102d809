"""The plots of the science benchmarks (matplotlib, Agg backend, imported on first use)."""

from __future__ import annotations

import statistics
import textwrap
from typing import Dict, List

from .late_reports import describe


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, title=None, dpi=100, fontsize=8):
    plt = _pyplot()
    if title:
        fig.suptitle(textwrap.fill(title, 230), fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_sweep(a, res, path):
    plt = _pyplot()
    import numpy as np

    E = a.epochs
    ts = sorted({t for r in res for t in r["runs"]})
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("test_acc", "test accuracy (%)"), ("lambda_max", "λmax"), ("trace", "Hessian trace"))
    for j, (key, lab) in enumerate(panels):
        v = np.array([[r["runs"][t][key] for t in ts] for r in res], dtype=float)
        ax[j].errorbar(ts, v.mean(0), yerr=v.std(0, ddof=1) if len(res) > 1 else None, marker="o", capsize=3)
        ax[j].set_xlabel(f"switch epoch t (SAM from t to {E}; 0 = full SAM, {E} = SGD)")
        ax[j].set_ylabel(lab)
        ax[j].axvline(a.milestone, color="gray", ls=":", lw=1)
    _save(fig, path, describe(a))


def plot_phases(a, res, path):
    plt = _pyplot()
    import numpy as np

    fig, axs = plt.subplots(1, 4, figsize=(21, 4.8))
    ph = [r["phases"] for r in res]
    steps = ph[0]["late_sam"]["step"]

    def band(axis, vals, label, color):
        v = np.array(vals, dtype=float)
        m = v.mean(0)
        axis.plot(steps, m, marker="o", ms=3, color=color, label=label)
        if len(v) > 1:
            s = v.std(0, ddof=1)
            axis.fill_between(steps, m - s, m + s, color=color, alpha=0.2)

    band(axs[0], [p["sgd"]["distance"] for p in ph], "SGD: ‖w − w_switch‖", "tab:blue")
    band(axs[0], [p["late_sam"]["distance"] for p in ph], "late SAM: ‖w − w_switch‖", "tab:green")
    band(axs[0], [p["separation"] for p in ph], "‖w_lateSAM − w_SGD‖", "tab:red")
    axs[0].set_xscale("log")
    axs[0].set_yscale("log")
    axs[0].set_xlabel(f"steps after the switch at epoch {a.phase_epoch}")
    axs[0].legend(fontsize=8)
    band(axs[1], [p["sgd"]["lambda_max"] for p in ph], "SGD λmax", "tab:blue")
    band(axs[1], [p["late_sam"]["lambda_max"] for p in ph], "late SAM λmax", "tab:green")
    ax2 = axs[1].twinx()
    for p_key, c in (("sgd", "tab:blue"), ("late_sam", "tab:green")):
        v = np.array([p[p_key]["train_loss"] for p in ph]).mean(0)
        ax2.plot(steps, v, ls="--", color=c)
    ax2.set_ylabel("train loss of the subset (dashed)")
    axs[1].set_xscale("log")
    axs[1].set_xlabel("steps after the switch")
    axs[1].set_ylabel("λmax (solid)")
    axs[1].legend(fontsize=8, loc="upper left")
    it = [p["interpolation"] for p in ph]
    for key, c, lab in (
        ("sgd_to_late_sam", "tab:green", "SGD → late SAM"),
        ("sgd_to_full_sam", "tab:red", "SGD → full SAM"),
    ):
        if key in it[0]:
            v = np.array([x[key] for x in it])
            axs[2].plot(it[0]["alpha"], v.mean(0), marker=".", color=c, label=lab)
    axs[2].set_xlabel("α (0: SGD solution, 1: the other)")
    axs[2].set_ylabel("train loss of the subset")
    axs[2].set_yscale("log")
    axs[2].legend(fontsize=8)
    # (d): the final models, SGD / full SAM / reverse
    keys = [
        (k, lab)
        for k, lab in (("sgd", "SGD"), ("full_sam", "full SAM"), ("reverse", f"SAM → SGD at {a.phase_epoch}"))
        if all(r.get(k) for r in res)
    ]
    for j, (k, _lab) in enumerate(keys):
        lam = [r[k]["lambda_max"] for r in res]
        acc = statistics.mean(r[k]["test_acc"] for r in res)
        axs[3].bar(
            j,
            np.mean(lam),
            yerr=np.std(lam, ddof=1) if len(lam) > 1 else None,
            capsize=3,
            color=("tab:blue", "tab:red", "tab:purple")[j],
        )
        axs[3].text(j, np.mean(lam), f"{acc:.2f}%", ha="center", va="bottom", fontsize=8)
    axs[3].set_xticks(range(len(keys)), [lab for _, lab in keys], fontsize=8)
    axs[3].set_ylabel("final λmax (bar), test accuracy (label)")
    _save(fig, path, describe(a))


def plot_adv(a, res, path):
    plt = _pyplot()
    import numpy as np

    ts = sorted({t for r in res for t in r["runs"]})
    fig, ax = plt.subplots(1, 1, figsize=(6, 4.2))
    for key, c in (("clean_acc", "tab:blue"), ("robust_acc", "tab:red")):
        v = np.array([[r["runs"][t][key] for t in ts] for r in res], dtype=float)
        ax.errorbar(
            ts,
            v.mean(0),
            yerr=v.std(0, ddof=1) if len(res) > 1 else None,
            marker="o",
            capsize=3,
            color=c,
            label=key.replace("_", " "),
        )
    ax.set_xlabel(f"epochs of adversarial training at the end (0 = standard, {a.epochs} = full AT)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    _save(fig, path)


# ----------------------------------------------------------------------------- late_phase.py
def lambda_curve(rs: List[Dict]):
    """(epochs, per-seed lambda_max lists): the per-epoch and the just-after-the-switch measurements merged."""
    h, f = rs[0]["history"], rs[0]["fine"]
    pts = sorted(
        [(e, ("h", i)) for i, (e, v) in enumerate(zip(h["epoch"], h["lambda_max"])) if v is not None]
        + [(e, ("f", i)) for i, e in enumerate(f["epoch"])]
    )
    pick = lambda r, src, i: r["history"]["lambda_max"][i] if src == "h" else r["fine"]["lambda_max"][i]
    return [e for e, _ in pts], [[pick(r, *key) for _, key in pts] for r in rs]


def plot_curves(runs: Dict[str, List[Dict]], path: str, title: str, labels: Dict[str, str], branches) -> None:
    """late_phase.py: λmax and test accuracy per epoch (switch dashed), distance from the switch weights;
    a run in ``branches`` is drawn from the switch on (before it, it is its parent's line)."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colors = {"sgd": "tab:blue", "sam": "tab:red", "late-sam": "tab:green", "late-sgd": "tab:purple"}
    switch = next(iter(runs.values()))[0]["switch_epoch"]

    def band(ax, xs, ys_per_seed, kind, marker=None, label=True, from_x=None):
        import numpy as np

        xs, ys = np.array(xs, dtype=float), np.array(ys_per_seed, dtype=float)
        if from_x is not None:  # a branch run: up to the switch it is its parent's line
            xs, ys = xs[xs >= from_x], ys[:, xs >= from_x]
        m = np.nanmean(ys, 0)
        ax.plot(xs, m, color=colors[kind], marker=marker, ms=3, label=labels[kind] if label else None)
        if len(ys) > 1:
            s = np.nanstd(ys, 0, ddof=1)
            ax.fill_between(xs, m - s, m + s, color=colors[kind], alpha=0.2)

    for kind, rs in runs.items():
        h = rs[0]["history"]
        start = switch if kind in branches else None
        band(axes[0], *lambda_curve(rs), kind, "o", from_x=start)
        band(axes[1], h["epoch"], [r["history"]["test_acc"] for r in rs], kind, from_x=start)
        if rs[0]["distance"]["step"]:
            band(axes[2], rs[0]["distance"]["step"], [r["distance"]["distance"] for r in rs], kind)
    for ax, ylab in zip(axes[:2], ("λmax (train-mode Hessian, fixed train subset)", "test accuracy (%)")):
        ax.axvline(switch, color="gray", ls="--", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylab)
    axes[0].set_yscale("log")
    lo = min(min(r["history"]["test_acc"][len(r["history"]["test_acc"]) // 4 :]) for rs in runs.values() for r in rs)
    axes[1].set_ylim(max(lo - 1, 0), 100.5)
    axes[2].set_xlabel(f"steps after the switch (epoch {switch})")
    axes[2].set_ylabel("‖w − w_switch‖")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title("sharpness (dashed: switch)")
    axes[1].set_title("test accuracy")
    axes[2].set_title("distance from the weights at the switch")
    _save(fig, path, title, dpi=110, fontsize=10)


# ----------------------------------------------------------------------------- frontier.py
def plot_gain_cost(summary, path, title):
    """frontier.py: gain in test accuracy over SGD (paired, 95% interval) against the measured cost
    ratio, and test accuracy against λmax, one point per method."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(14, 5.2))
    for r in summary:
        cost, g = np.mean(r["cost_ratio"]), r["vs_sgd"]
        yerr = None if np.isnan(g["lo"]) else [[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]]
        ax[0].errorbar(cost, g["mean"], xerr=np.std(r["cost_ratio"]), yerr=yerr, fmt="o", capsize=3)
        ax[0].annotate(r["method"], (cost, g["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax[1].errorbar(
            np.mean(r["lambda_max"]),
            np.mean(r["test_acc"]),
            xerr=np.std(r["lambda_max"]),
            yerr=np.std(r["test_acc"]),
            fmt="o",
            capsize=3,
        )
        ax[1].annotate(
            r["method"],
            (np.mean(r["lambda_max"]), np.mean(r["test_acc"])),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    sam = next(r for r in summary if r["method"] == "SAM")["vs_sgd"]["mean"]
    ax[0].axhline(0, color="gray", lw=1)
    ax[0].axhline(sam, color="tab:red", ls=":", lw=1, label="SAM's gain")
    ax[0].set_xlabel("whole-run cost / SGD's (measured, same process; ± std over seeds)")
    ax[0].set_ylabel("test accuracy − SGD's, points (paired; 95% interval)")
    ax[0].legend(fontsize=8)
    ax[1].set_xlabel("λmax of the training loss (fixed training subset, train-mode BN)")
    ax[1].set_ylabel("test accuracy (%) (± std over seeds)")
    for x in ax:
        x.grid(alpha=0.3)
    _save(fig, path, title, dpi=110, fontsize=9)


# ----------------------------------------------------------------------------- late_phase_rule.py
def plot_rule(out, path, title, acc_bound, lambda_bound):
    """late_phase_rule.py: per late run, late − full SAM test accuracy (paired, 95% interval) and
    λmax(late) / λmax(full) (ratio of means; dots: per seed), with the rule's bounds."""
    import numpy as np

    plt = _pyplot()
    names = list(out)
    xs = np.arange(len(names))
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.6))
    for i, r in enumerate(names):
        d = out[r]["late_minus_full"]
        yerr = None if np.isnan(d["lo"]) else [[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]]
        color = "tab:green" if out[r]["meets_rule"] else "tab:red"
        ax[0].errorbar(i, d["mean"], yerr=yerr, fmt="o", capsize=4, color=color)
        ax[1].bar(i, out[r]["lambda_ratio"], color=color, alpha=0.6)
        ax[1].plot([i] * len(out[r]["lambda_ratio_per_seed"]), out[r]["lambda_ratio_per_seed"], "k.", ms=3)
    ax[0].axhline(acc_bound, color="gray", ls="--", lw=1, label=f"rule: ≥ {acc_bound}")
    ax[0].axhline(0, color="gray", lw=0.5)
    ax[0].set_ylabel("test accuracy, late − full SAM (points; 95% interval)")
    ax[1].axhline(lambda_bound, color="gray", ls="--", lw=1, label=f"rule: ≤ {lambda_bound}")
    ax[1].axhline(1, color="gray", lw=0.5)
    ax[1].set_ylabel("λmax late / full SAM")
    for x in ax:
        x.set_xticks(xs, names)
        x.legend(fontsize=8)
        x.grid(alpha=0.3, axis="y")
    _save(fig, path, title + " (green: meets the rule)", dpi=110, fontsize=9)
