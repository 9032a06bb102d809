"""mypy over fastsam/ with the repository's configuration (pyproject.toml's [tool.mypy]): zero errors.

The configuration types the public modules strictly (every function annotated) and checks the
bodies of the others.  Skipped where mypy is not installed.
"""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_fastsam_clean(tmp_path):
    api = pytest.importorskip("mypy.api")
    config = os.path.join(ROOT, "pyproject.toml")
    stdout, stderr, status = api.run(
        [
            "--config-file",
            config,
            "--cache-dir",
            str(tmp_path / "mypy_cache"),
            "--no-error-summary",
            os.path.join(ROOT, "fastsam"),
        ]
    )
    assert status == 0, f"mypy fastsam reported errors:\n{stdout}{stderr}"
    assert "error" not in stdout, stdout
