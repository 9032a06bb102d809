"""benchmarks/gpu_check.sh cannot fail on its own account: its --dry-run runs every step on the CPU
(Triton interpreter, tiny sizes) and must pass, leaving its log and the benchmarks' JSON + markdown."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:] + log[-4000:]
    for name in ("build_extension", "tests", "host_cost", "optimizer_step", "train_throughput"):
        assert f"=== {name} rc=0" in log, name
    files = os.listdir(tmp_path)
    assert any(f.startswith("host_cost_") and f.endswith(".json") for f in files), files
    assert any(f.startswith("optimizer_step_") and f.endswith(".md") for f in files), files
