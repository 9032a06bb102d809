"""Smoke test of benchmarks/frontier.py at tiny size: it runs every method, writes JSON/markdown/PNG,
and the counted passes per step match what each method must run.  Never its speed or its science."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frontier_tiny(tmp_path):
    pytest.importorskip("sklearn")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "frontier.py"), "--tiny",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "frontier_digits_tiny.json").read_text())
    assert (tmp_path / "frontier_digits_tiny.md").exists()
    rows = {r["method"]: r for r in data["results"]["rows"]}
    assert len(rows) == 10 and rows["sgd"]["measured_passes"] == 1.0
    assert rows["sam"]["measured_passes"] == 2.0 and rows["gsam alpha=0.1"]["measured_passes"] == 2.0
    assert rows["momentum-sam rho=0.3"]["measured_passes"] == 1.0
    for r in rows.values():
        assert math.isfinite(r["acc_mean"]) and math.isfinite(r["cost_ratio_mean"]) and r["cost_ratio_mean"] > 0
        assert 1.0 <= r["measured_passes"] <= 2.0
