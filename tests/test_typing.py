"""mypy over fastsam/ with the repository's configuration (mypy.ini): zero errors (about 10 s, cold cache).

The configuration types the public modules strictly (every function annotated) and checks the
bodies of the others; see mypy.ini.  Skipped where mypy is not installed.
"""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_fastsam_clean(tmp_path):
    api = pytest.importorskip("mypy.api")
    config = os.path.join(ROOT, "mypy.ini")
    # mypy.ini where it exists, else mypy's own discovery from the root (pyproject.toml's [tool.mypy])
    args = ["--config-file", config] if os.path.exists(config) else []
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configuration names paths relative to the root
    try:
        stdout, stderr, status = api.run([*args, "--cache-dir", str(tmp_path / "mypy_cache"),
                                          "--no-error-summary", "fastsam"])
    finally:
        os.chdir(cwd)
    assert status == 0, f"mypy fastsam reported errors:\n{stdout}{stderr}"
