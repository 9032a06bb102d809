"""benchmarks/gpu_check.sh cannot fail on its own account: its --dry-run runs every step on the CPU
(Triton interpreter, tiny sizes, no time caps) and must pass, leaving its log, a summary with one
"passed" row per step, and the benchmarks' JSON + markdown.  A second, short run breaks the compiler:
the summary then reports the failed build with its first error line, the later step still runs and
reports, and the build is attempted once, not again by the test collection of a later step."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = (
    "build_extension",
    "contract_triton",
    "contract_cuda",
    "tests_triton",
    "tests_cuda",
    "tests_variants",
    "host_cost",
    "train_throughput",
    "optimizer_step",
    "inductor",
)
BUILDING = "fastsam: building the C++ extension"


def _run(out_dir, **env):
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(env)
    # no timeout: a loaded CI machine is slow, not wrong (the GPU run has its own caps)
    res = subprocess.run(["bash", SCRIPT, "--dry-run", str(out_dir)], env=full, capture_output=True, text=True)
    log = (out_dir / "gpu_check.log").read_text() if (out_dir / "gpu_check.log").exists() else ""
    rows = {}
    if (out_dir / "summary.md").exists():
        for line in (out_dir / "summary.md").read_text().splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return res, log, rows


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    res, log, rows = _run(tmp_path, PYTHON=sys.executable)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:] + log[-4000:]
    assert list(rows) == [STEPS[1], STEPS[0], *STEPS[2:]], rows  # the build is recorded when waited for
    assert all(r[0] == "passed" for r in rows.values()), rows
    files = os.listdir(tmp_path)
    assert any(f.startswith("host_cost_") and f.endswith(".json") for f in files), files
    assert any(f.startswith("optimizer_step_") and f.endswith(".md") for f in files), files


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs bash")
def test_a_failed_build_is_reported_and_not_retried(tmp_path):
    """The compiler is a script that logs which process calls it and fails: the build step's process
    calls it, the next step's (whose conftest would build the extension on import) must not."""
    calls = tmp_path / "cxx_calls"
    cxx = tmp_path / "broken_cxx"
    cxx.write_text(f"#!/bin/sh\necho $PPID >> {calls}\nexit 1\n")
    cxx.chmod(0o755)
    res, log, rows = _run(
        tmp_path / "out",
        PYTHON=sys.executable,
        CXX=str(cxx),
        FASTSAM_CACHE_DIR=str(tmp_path / "empty_cache"),
        GPU_CHECK_STEPS="build_extension contract_cuda",
    )
    assert res.returncode != 0
    assert rows["build_extension"][0] == "failed" and "rc=1" in rows["build_extension"][2], rows
    assert rows["contract_cuda"][0] in ("passed", "failed"), rows  # it ran, whatever it found
    assert all(rows[s][0] == "not run" for s in STEPS if s not in ("build_extension", "contract_cuda")), rows
    assert log.count(BUILDING) == 1, log[-6000:]
    callers = set(calls.read_text().split())
    assert len(callers) == 1, f"{len(callers)} processes tried to build the extension"


def test_step_caps_fit_the_budget_with_margin():
    """On the GPU the steps' caps, in the script's order (a background step overlapping the steps
    until it is waited for), add up to less than the budget, and the budget leaves room for the
    script's own seconds within the 8 minutes a GPU session gives the call (600 s per command)."""
    text = open(SCRIPT).read()
    budget = int(re.search(r"BUDGET_S=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", text).group(1))
    t, background, names = 0, {}, []
    for kind, name, cap in re.findall(r"^(?:if ! )?(start_step|finish_step|step) (\w+)(?: (\d+))?\b", text, re.M):
        if kind == "finish_step":
            t = max(t, background.pop(name))
        elif cap:
            names.append(name)
            if kind == "start_step":
                background[name] = t + int(cap)
            else:
                t += int(cap)
    assert sorted(names) == sorted(STEPS) and not background, (names, background)
    assert t <= budget - 15, f"caps add up to {t} s on the critical path, budget {budget} s"
    assert budget <= 8 * 60 - 20
