"""Shared test set-up.

Without CUDA, Triton kernels run in the interpreter on CPU tensors: the
variable must be set before anything imports triton, which is why it is set
here, at the top of the conftest that pytest loads first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets  # noqa: E402

import pytest  # noqa: E402

from fastsam import backends  # noqa: E402


def _cpu_backends():
    names = []
    for name in backends.BACKENDS:
        try:
            backends.resolve(name, torch.device("cpu"))
        except (backends.BackendUnavailable, ValueError):
            continue
        names.append(name)
    return names


CPU_BACKENDS = _cpu_backends()


def pytest_report_header(config):
    return f"fastsam CPU backends under test: {', '.join(CPU_BACKENDS)}; CUDA: {torch.cuda.is_available()}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test, printed on failure (pytest shows fixture values in the report)."""
    s = secrets.randbits(31)
    torch.manual_seed(s)
    return s
