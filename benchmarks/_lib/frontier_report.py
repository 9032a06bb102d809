"""The reports of the tuned frontier: the selection table (validation accuracy over each grid) and
the final table (test accuracy, paired differences to SGD and to SAM with 95% intervals, λmax,
memorisation of the flipped labels, measured cost)."""

from __future__ import annotations

import statistics
from typing import Dict, List

import _common

from .frontier_methods import Method, setting_label
from .frontier_runs import choose
from .stats import ci, ms, paired


def selection_table(a, res, table: Dict[str, Method], chosen) -> str:
    rows = []
    for m in table.values():
        c = choose(a, res, m)
        cells = [
            (f"**{setting_label(m, v)}: {mean:.2f}**" if v == c["value"] else f"{setting_label(m, v)}: {mean:.2f}")
            for v, mean in c["means"].items()
        ]
        base = chosen[m.name]
        at = (
            ""
            if m.stage == 0
            else (
                f"on lr {base['base']['lr']:g}, wd {base['base']['wd']:g}"
                + (f", rho {base['sam_rho']:g}" if m.stage == 2 else "")
            )
        )
        rows.append([m.name, at, "; ".join(cells)])
    return _common.markdown_table(
        ["method", "tuned", "mean validation accuracy (%) per setting (selected in bold)"], rows
    )


def summarise(finals: List[dict], chosen, table: Dict[str, Method]) -> List[dict]:
    """Per method: the per-seed numbers and their summaries."""
    by = lambda name, key: [f["methods"][name][key] for f in finals]
    sgd, sam = by("SGD", "test_acc"), by("SAM", "test_acc")
    out = []
    for name, m in table.items():
        acc = by(name, "test_acc")
        er = sorted(x for f in finals for x in f["methods"][name]["epoch_ratios"])
        out.append(
            {
                "method": name,
                "setting": setting_label(m, chosen[name]["value"], chosen[name]["sam_rho"]),
                "test_acc": acc,
                "vs_sgd": paired(acc, sgd),
                "vs_sam": paired(acc, sam),
                "lambda_max": by(name, "lambda_max"),
                "memorised": by(name, "memorised"),
                "memorised_chance": by(name, "memorised_chance"),
                "cost_ratio": by(name, "cost_ratio"),
                "epoch_ratio_p10_p90": [_common.percentile(er, 0.1), _common.percentile(er, 0.9)],
                "passes": statistics.mean(by(name, "passes")),
                "predicted_passes": m.passes,
            }
        )
    return out


def final_table(summary: List[dict]) -> str:
    rows = []
    for r in summary:
        rows.append(
            [
                r["method"],
                r["setting"],
                ms(r["test_acc"]),
                ci(r["vs_sgd"]) if r["method"] != "SGD" else "-",
                ci(r["vs_sam"]) if r["method"] != "SAM" else "-",
                ms(r["lambda_max"]),
                f"{ms(r['memorised'])} ({statistics.mean(r['memorised_chance']):.1f})",
                ms(r["cost_ratio"]),
                f"{r['passes']:.3f}",
            ]
        )
    return _common.markdown_table(
        [
            "method",
            "selected setting",
            "test acc (%)",
            "− SGD, points [95% CI]",
            "− SAM, points [95% CI]",
            "λmax",
            "flipped labels memorised % (chance)",
            "cost vs SGD",
            "passes/step",
        ],
        rows,
    )
