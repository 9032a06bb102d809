"""The report of benchmarks/late_phase_rule.py: the decision rule per late run, memorisation of the
flipped labels at the switch and at the end, and the rebuilt-vs-carried comparison (E)."""

from __future__ import annotations

from typing import Dict

import _common

from .late_rule import LATE, RULE_ACC, RULE_LAMBDA
from .stats import ci, ms, paired


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def rule_table(out: Dict[str, dict]) -> str:
    rows = []
    for r, o in out.items():
        p = o["per_seed"]
        lam = " / ".join(ms(p[k]["lambda_max"]) for k in ("SGD", "SAM", "late"))
        rows.append(
            [
                r,
                o["describe"],
                f"{o['sam_steps']} ({o['sam_steps_after_decay']})",
                ms(p["SGD"]["test_acc"]),
                ms(p["SAM"]["test_acc"]),
                ms(p["late"]["test_acc"]),
                ci(o["late_minus_full"]),
                ci(o["full_minus_sgd"]),
                lam,
                f"{o['lambda_ratio']:.2f}",
                f"{_yes(o['meets_accuracy'])} / {_yes(o['meets_lambda'])}: **{_yes(o['meets_rule'])}**",
            ]
        )
    return _common.markdown_table(
        [
            "run",
            "what",
            "late SAM steps (after the decay)",
            "SGD test acc (%)",
            "full SAM",
            "late SAM",
            "late − full, points [95% CI]",
            "full − SGD [95% CI]",
            "λmax SGD / full / late",
            "λ late / full",
            f"acc ≥ {RULE_ACC} / λ ratio ≤ {RULE_LAMBDA}: meets the rule",
        ],
        rows,
    )


def memorisation_table(out: Dict[str, dict]) -> str:
    rows = []
    for r, o in out.items():
        p = o["per_seed"]

        def mem(k):
            return f"{ms(p[k]['memorised'])} ({ms(p[k]['memorised_chance'])})"

        rows.append(
            [
                r,
                o["switch"],
                mem("SGD at switch"),
                mem("SAM at switch"),
                mem("SGD"),
                mem("SAM"),
                mem("late"),
                ci(o["late_minus_sgd"]),
            ]
        )
    return _common.markdown_table(
        [
            "run",
            "switch epoch",
            "at the switch: SGD (chance)",
            "full SAM",
            "at the end: SGD",
            "full SAM",
            "late SAM",
            "late − SGD test acc, points [95% CI]",
        ],
        rows,
    )


def rebuilt_lines(out: Dict[str, dict]) -> list:
    """(E): the rebuilt optimizer against the carried one at the same switch, paired per seed."""
    lines = []
    for r, o in out.items():
        if not o["rebuilt"]:
            continue
        twin = next(
            (
                q
                for q, (s, t, fresh) in LATE.items()
                if not fresh and s == o["schedule"] and t == LATE[r][1] and q in out
            ),
            None,
        )
        if twin is None:
            continue
        a, b = o["per_seed"]["late"], out[twin]["per_seed"]["late"]
        lines.append(
            f"- {r} (rebuilt) − {twin} (carried): test accuracy {ci(paired(a['test_acc'], b['test_acc']))} "
            f"points, λmax {ci(paired(a['lambda_max'], b['lambda_max']))}, memorised "
            f"{ci(paired(a['memorised'], b['memorised']))} points (paired per seed, 95% CI)."
        )
    return lines
