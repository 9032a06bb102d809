"""The documentation site builds with ``mkdocs build --strict``: no warning from MkDocs (broken
links and anchors included) or from mkdocstrings reading the docstrings.  Skipped where the docs
tools are not installed (``pip install -e ".[docs]"``)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = dict(
        os.environ,
        NO_MKDOCS_2_WARNING="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "semantics/index.html", "api/optim/index.html", "api/hessian/index.html"):
        assert (site / page).is_file(), page
    # the API reference was generated from the docstrings, not left empty
    api = (site / "api" / "optim" / "index.html").read_text(encoding="utf-8")
    assert "first_step" in api and "sam_start_step" in api
    # the results the benchmarks page cites are part of the site
    assert (site / "results" / "train_throughput_cpu" / "index.html").is_file()
