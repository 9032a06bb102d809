"""The linter and the formatter over the package, tests, benchmarks and examples (config: pyproject.toml)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["fastsam", "tests", "benchmarks", "examples", "setup.py"]


def _ruff(*args):
    pytest.importorskip("ruff")
    return subprocess.run([sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    res = _ruff("check", "--no-cache")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def test_ruff_format():
    res = _ruff("format", "--check", "--no-cache")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
