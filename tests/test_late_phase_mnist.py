"""Smoke runs (tiny sizes) of the issue-13 experiments and the PyHessian comparison benchmark."""

import json
import os
import sys

import pytest
import torch

from .bench_support import image_datasets, without

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = [
    "--limit",
    "240",
    "--epochs",
    "2",
    "--milestone",
    "1",
    "--width",
    "4",
    "--batch-size",
    "32",
    "--num-seeds",
    "2",
    "--hessian-samples",
    "32",
    "--hessian-batch",
    "16",
    "--phase-samples",
    "16",
    "--trace-samples",
    "3",
    "--threads",
    "1",
]


def _datasets():
    return image_datasets()


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


PHASE = ["--switches", "0", "1", "2", "--phase-epoch", "1", "--interp-points", "3"]
TIMING = {"seconds", "cpu_seconds", "hessian_s", "record_s"}


def _numbers(x):
    return without(x, TIMING)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Tiny sweep and phases runs (one job), per data set: {dataset: {experiment: (out dir, json)}}."""
    import late_phase_mnist

    runs = {}
    for dataset in _datasets():
        runs[dataset] = {}
        for exp in ("sweep", "phases"):
            out = tmp_path_factory.mktemp(f"{dataset}_{exp}")
            late_phase_mnist.main(
                ["--experiment", exp, "--dataset", dataset, *TINY, *PHASE, "--jobs", "1", "--out-dir", str(out)]
            )
            runs[dataset][exp] = (out, json.loads((out / f"late_phase_{dataset}_{exp}.json").read_text()))
    return runs


@pytest.mark.parametrize("dataset", _datasets())
def test_sweep_tiny(tiny_runs, dataset):
    out, data = tiny_runs[dataset]["sweep"]
    stem = f"late_phase_{dataset}_sweep"
    for ext in ("json", "md", "png"):
        assert (out / f"{stem}.{ext}").stat().st_size > 0
    seeds = data["seeds"]
    assert len(seeds) == 2
    for s in seeds:
        assert set(s["runs"]) == {"0", "1", "2"} and "phases" not in s and "reverse" not in s
        assert all(r["switch"] == int(t) for t, r in s["runs"].items())
    assert {t["name"] for t in data["tasks"]} >= {"s0 SGD", "s0 SAM from 1", "s1 measure t=2"}
    text = (out / f"{stem}.md").read_text()
    assert "(a) Switch point" in text and "(b) The two phases" not in text and "Wall time" in text


@pytest.mark.parametrize("dataset", _datasets())
def test_phases_reverse_tiny(tiny_runs, dataset):
    out, data = tiny_runs[dataset]["phases"]
    stem = f"late_phase_{dataset}_phases"
    for ext in ("json", "md", "png"):
        assert (out / f"{stem}.{ext}").stat().st_size > 0
    seeds = data["seeds"]
    assert len(seeds) == 2
    for s in seeds:
        assert s["reverse"]["switch"] == 1 and s["sgd"]["switch"] == 2 and s["full_sam"]["switch"] == 0
        ph = s["phases"]
        assert len(ph["interpolation"]["alpha"]) == 3 and len(ph["interpolation"]["sgd_to_full_sam"]) == 3
        assert len(ph["late_sam"]["step"]) == len(ph["sgd"]["step"]) == len(ph["separation"]) > 0
        assert all(v > 0 for v in ph["late_sam"]["distance"])
        assert "w" not in ph["late_sam"]
    text = (out / f"{stem}.md").read_text()
    assert "(b) The two phases" in text and "reverse" in text and "(a) Switch point" not in text


def test_phases_are_the_sweeps_runs(tiny_runs):
    """Recording the phases does not touch the training: the phases experiment's SGD and full SAM
    are the sweep's t = E and t = 0, bitwise."""
    for runs in tiny_runs.values():
        sweep, phases = runs["sweep"][1]["seeds"], runs["phases"][1]["seeds"]
        for a, b in zip(sweep, phases):
            assert _numbers(a["runs"]["2"]) == _numbers(b["sgd"])
            assert _numbers(a["runs"]["0"]) == _numbers(b["full_sam"])


def test_results_do_not_depend_on_jobs(tiny_runs, tmp_path):
    """Two worker processes give the same numbers, bitwise, as one process."""
    import late_phase_mnist

    out = late_phase_mnist.main(
        ["--experiment", "phases", "--dataset", "digits", *TINY, *PHASE, "--jobs", "2", "--out-dir", str(tmp_path)]
    )
    assert out["config"]["jobs"] == 2
    two = json.loads((tmp_path / "late_phase_digits_phases.json").read_text())
    assert _numbers(two["seeds"]) == _numbers(tiny_runs["digits"]["phases"][1]["seeds"])


def test_sweep_and_phases_together(tiny_runs, tmp_path):
    """Both experiments in one run share their common runs (trained and measured once) and give
    the numbers of the separate runs."""
    import late_phase_mnist

    out = late_phase_mnist.main(
        [
            "--experiment",
            "sweep",
            "phases",
            "--dataset",
            "digits",
            *TINY,
            *PHASE,
            "--jobs",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    names = [t["name"] for t in out["tasks"]]
    assert len(names) == len(set(names)) and names.count("s0 SGD") == 1 and names.count("s0 measure t=0") == 1
    separate = sum(len(tiny_runs["digits"][e][1]["tasks"]) for e in ("sweep", "phases"))
    assert len(names) < separate
    for exp in ("sweep", "phases"):
        data = json.loads((tmp_path / f"late_phase_digits_{exp}.json").read_text())
        assert _numbers(data["seeds"]) == _numbers(tiny_runs["digits"][exp][1]["seeds"])
        assert "Run together with sweep and phases" in (tmp_path / f"late_phase_digits_{exp}.md").read_text()


def test_default_jobs():
    import late_phase_mnist as lp

    assert lp.parse_args([]).jobs == max(1, min(2, os.cpu_count() or 1))
    assert lp.parse_args(["--device", "cuda"]).jobs == 1
    assert lp.parse_args(["--jobs", "3"]).jobs == 3


def test_adversarial_tiny(tmp_path):
    import late_phase_mnist

    late_phase_mnist.main(
        [
            "--experiment",
            "adversarial",
            "--dataset",
            "digits",
            *TINY,
            "--at-epochs",
            "2",
            "1",
            "--eval-steps",
            "2",
            "--at-steps",
            "1",
            "--jobs",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "late_phase_digits_adversarial.json").read_text())
    for s in data["seeds"]:
        assert set(s["runs"]) == {"0", "1", "2"}
        for r in s["runs"].values():
            assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 100
    assert (tmp_path / "late_phase_digits_adversarial.png").stat().st_size > 0


def test_log_steps_and_fit():
    from _lib.measure import fit_rate, log_steps

    s = log_steps(310, 14)
    assert s[0] == 1 and s[-1] == 310 and s == sorted(set(s))
    r, r2 = fit_rate([1, 2, 3, 4], [2.0**k for k in (1, 2, 3, 4)])
    assert r == pytest.approx(0.6931, rel=1e-3) and r2 == pytest.approx(1.0)


def test_label_noise():
    import numpy as np
    from _lib import data

    y = np.arange(1000) % 10
    z = data.symmetric_noise(y, 0.25, 10, seed=0)
    assert (z != y).sum() == 250 and z.min() >= 0 and z.max() <= 9
    with pytest.raises(ValueError, match="label noise must be in"):
        data.symmetric_noise(y, 1.0, 10, seed=0)


def test_hessian_vs_pyhessian_tiny(tmp_path):
    import hessian_vs_pyhessian

    out = hessian_vs_pyhessian.main(
        [
            "--batch",
            "16",
            "--num-batches",
            "2",
            "--train-steps",
            "1",
            "--rounds",
            "1",
            "--reps",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    rows = out["rows"]
    assert rows["fastsam, 1 batch, kept graph"]["num_cached"] == 1
    assert rows["fastsam, 2 batches, kept graph"]["num_cached"] == 2
    assert rows["fastsam, 1 batch, recomputed"]["num_cached"] == 0
    if out["have_pyhessian"]:  # same products as PyHessian's
        assert rows["fastsam, 1 batch, kept graph"]["rel_diff_to_pyhessian"] < 1e-5
        assert rows["fastsam, 2 batches, kept graph"]["rel_diff_to_pyhessian"] < 1e-5
    assert (tmp_path / "hessian_vs_pyhessian_cpu.md").stat().st_size > 0


def test_cifar10_path_without_the_data(tmp_path, fake_cifar10):
    """The CIFAR-10 path: fake python batches -> [0, 1] pixels, noise on the training labels only,
    the WRN-16-8 behind a normalisation layer."""
    import late_phase_mnist as lp

    a = lp.parse_args(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--device", "cpu", "--label-noise", "0.5"])
    assert (a.epochs, a.milestone, a.lr, a.batch_size, a.switches[-2:]) == (160, 80, 0.01, 128, [155, 160])
    assert (a.eps, a.at_alpha, a.at_steps, a.at_epochs) == (4 / 255, 2 / 255, 10, [160, 10])
    from _lib.late_runs import build_model, load_data

    d = load_data(a)
    assert d.train_x.shape == (20, 3, 32, 32) and float(d.train_x.min()) >= 0 and float(d.train_x.max()) <= 1
    assert d.noisy_fraction == 0.5 and d.test_y.tolist() == list(range(4))
    m = build_model(a, d, 0)
    assert m(d.test_x[:2]).shape == (2, 10)
