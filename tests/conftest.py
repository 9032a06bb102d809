"""Shared test set-up.

Without CUDA, Triton kernels run in the interpreter on CPU tensors: the
variable must be set before anything imports triton, which is why it is set
here, at the top of the conftest that pytest loads first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets

import pytest

from fastsam import backends

# Every backend that runs on CPU tensors here: foreach always, triton under
# the interpreter, cpp when the extension builds.  FASTSAM_CPU_BACKENDS=foreach,triton
# restricts the list (CI's triton-3.6 run does not build the extension).
_ONLY = [n for n in os.environ.get("FASTSAM_CPU_BACKENDS", "").split(",") if n]
if _ONLY:
    CPU_BACKENDS = [n for n in _ONLY if backends.get(n).is_available(torch.device("cpu"), build=False)[0]]
else:
    CPU_BACKENDS = backends.available(torch.device("cpu"), build=True)


def pytest_report_header(config):
    return f"fastsam CPU backends under test: {', '.join(CPU_BACKENDS)}; CUDA: {torch.cuda.is_available()}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from a fresh seed of torch's, NumPy's and Python's global generators,
    reported with its failure so that it can be replayed with FASTSAM_TEST_SEED=<seed>."""
    import random

    s = int(os.environ.get("FASTSAM_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(s)
    random.seed(s)
    try:
        import numpy as np

        np.random.seed(s)
    except ImportError:
        pass
    request.node.fastsam_seed = s
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    s = getattr(item, "fastsam_seed", None)
    if report.failed and s is not None:
        report.sections.append(("fastsam", f"replay with FASTSAM_TEST_SEED={s}"))


@pytest.fixture
def seed(_seeded):
    """The test's seed (torch's global generator is seeded with it), for tests that draw their own
    generators from it."""
    return _seeded


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest with one intra-op thread (and are robust on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_cifar10(tmp_path):
    """CIFAR-10's python batches in the standard layout under tmp_path/cifar-10-batches-py:
    4 images per batch (5 training batches, 1 test batch), labels 0..3."""
    import pickle

    import numpy as np

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(range(4))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root
