"""Smoke tests of the benchmark scripts: they run, write their files, and every number is finite.

They check the output's shape, never its speed or its science (benchmarks/NOTES.md has those).
Each script runs in a subprocess with one torch thread, as a user would run it.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)


def _run(script, *args, timeout=240):
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _table(md_text):
    """The first markdown table in ``md_text`` as (header, rows)."""
    lines = [ln for ln in md_text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def test_train_throughput_quick(tmp_path):
    from train_throughput import COLUMNS

    stdout = _run("train_throughput.py", "--quick", "--threads", 1, "--out-dir", tmp_path)
    md = (tmp_path / "train_throughput_cpu_quick.md").read_text()
    data = json.loads((tmp_path / "train_throughput_cpu_quick.json").read_text())
    assert "| model |" in stdout
    header, rows = _table(md)
    assert header == COLUMNS
    variants = [r[1] for r in rows]
    assert variants[:3] == ["sgd", "reference-sam", "fusedsam-foreach"]
    assert variants[-1].startswith("late-phase-")
    timing_cols = [
        COLUMNS.index(c) for c in ("images/s", "median step (ms)", "step-time ratio vs SGD", "whole-run ratio vs SGD")
    ]
    for r in rows:
        for i in timing_cols:
            assert math.isfinite(float(r[i])) and float(r[i]) > 0, (r, COLUMNS[i])
    assert data["machine"]["torch"] and data["machine"]["cpu"]
    for row in data["results"][0]["rows"]:
        assert all(math.isfinite(t) and t > 0 for t in row["step_times_ms"])
        assert math.isfinite(row["loss_after"])
        if os.path.exists("/proc/self/clear_refs"):  # the CPU memory probe needs it
            assert math.isfinite(row["peak_memory_mib"]), row["variant"]


def test_train_throughput_family_quick(tmp_path):
    """--family adds the SAM family's rows; their passes/step are the closure calls counted."""
    _run(
        "train_throughput.py",
        "--quick",
        "--family",
        "--threads",
        1,
        "--no-memory",
        "--backends",
        "foreach",
        "--out-dir",
        tmp_path,
    )
    data = json.loads((tmp_path / "train_throughput_cpu_family_quick.json").read_text())
    rows = {r["variant"].rsplit("-", 1)[0]: r for r in data["results"][0]["rows"]}
    assert set(rows) >= {"interval-k5", "looksam-k5", "momentum-sam", "gsam", "friendly-sam"}
    assert rows["momentum-sam"]["predicted_passes"] == 1.0  # one pass per step, no closure
    assert rows["gsam"]["predicted_passes"] == 2.0 and rows["friendly-sam"]["predicted_passes"] == 2.0
    assert 1.0 <= rows["looksam-k5"]["predicted_passes"] <= 2.0
    for r in rows.values():
        assert math.isfinite(r["loss_after"]) and r["whole_run_ratio_vs_sgd"] > 0
    assert len(data["family_targets"]) == 5


def test_late_phase_tiny(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    _run(
        "late_phase.py",
        "--epochs",
        2,
        "--late-epochs",
        1,
        "--milestones",
        1,
        "--hessian-samples",
        32,
        "--hessian-batch",
        16,
        "--hessian-every",
        1,
        "--trace-samples",
        3,
        "--switch-every",
        20,
        "--out-dir",
        tmp_path,
    )
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"late_phase_digits.{ext}").stat().st_size > 0
    header, rows = _table((tmp_path / "late_phase_digits.md").read_text())
    assert header[:5] == ["run", "test acc (%)", "train loss (CE)", "λmax", "Hessian trace"]
    assert [r[0] for r in rows] == ["SGD", "SAM", "SGD → SAM (last t)"]
    data = json.loads((tmp_path / "late_phase_digits.json").read_text())
    for kind, runs in data["runs"].items():
        for r in runs:
            for key in ("test_acc", "train_loss", "lambda_max", "trace", "train_time_s"):
                assert math.isfinite(r[key]), (kind, key)
            assert all(math.isfinite(v) for v in r["history"]["lambda_max"]), kind
            assert len(r["history"]["test_acc"]) == 2
    assert data["runs"]["late-sam"][0]["identical_to_parent_at_switch"] is True
    assert data["runs"]["late-sam"][0]["sam_steps"] > 0 and data["runs"]["sgd"][0]["sam_steps"] == 0


def test_cifar10_loader_and_augmentation(tmp_path, fake_cifar10):
    """The CIFAR-10 path without the data: fake python-pickle batches in the standard layout."""
    import torch
    from _lib.data import crop_flip, load_cifar10

    data = load_cifar10(str(tmp_path), torch.device("cpu"))
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_y.tolist() == list(range(4)) * 5
    assert data.train_x.dtype == torch.float32 and abs(float(data.train_x.mean())) < 1.0
    out = crop_flip(data.train_x, torch.Generator().manual_seed(0))
    assert out.shape == data.train_x.shape
    # every output image is a shifted (and maybe mirrored) window of the zero-padded input
    padded = torch.nn.functional.pad(data.train_x[0], (4, 4, 4, 4))
    windows = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    assert any(torch.equal(out[0], w) or torch.equal(out[0], w.flip(2)) for w in windows)


def _avx2_and_cc():
    import shutil

    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and bool(
        shutil.which("gcc") or shutil.which("cc")
    )


@pytest.mark.skipif(not _avx2_and_cc(), reason="the skeleton's loops need AVX2 and a C compiler")
def test_step_skeleton_tiny(tmp_path):
    """The bf16 step's skeleton builds and runs (tiny shapes: the loops' scalar tails), and every
    row has a finite time and, but for the mark itself, a finite share of its bytes/s."""
    _run("step_skeleton.py", "--param-set", "tiny", "--repeats", 2, "--out-dir", tmp_path, timeout=600)
    data = json.loads((tmp_path / "step_skeleton_cpu_tiny.json").read_text())
    rows = data["rows"]
    assert list(rows)[:3] == ["skeleton: moves only", "skeleton: math, truncating", "skeleton: math, rounding"]
    assert list(rows)[-1] == "torch fused fp32 SGD"
    for name, r in rows.items():
        assert math.isfinite(r["ms"]) and r["ms"] > 0, name
        share = r["share_of_fused_fp32_bytes_per_s"]
        assert (share is None) == (name == "torch fused fp32 SGD"), name
        assert share is None or (math.isfinite(share) and share > 0), name
    header, table = _table((tmp_path / "step_skeleton_cpu_tiny.md").read_text())
    assert header[0] == "row" and [r[0] for r in table] == list(rows)


def test_host_cost_cold(tmp_path):
    """--cold: every step after the eviction copy, in blocks of one; its own result files."""
    _run("host_cost.py", "--sizes", 3, "--repeats", 2, "--cold", "--backends", "foreach", "--out-dir", tmp_path)
    md = (tmp_path / "host_cost_cpu_cold.md").read_text()
    assert "each after a 64 MiB copy (cold caches)" in md
    data = json.loads((tmp_path / "host_cost_cpu_cold.json").read_text())
    assert {"3/torch SGD fused=True (1 step)", "3/FusedSAM foreach (first+second)"} <= set(data["results"])
    for r in data["results"].values():
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0 and r["n"] == 2
