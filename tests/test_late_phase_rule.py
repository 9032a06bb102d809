"""benchmarks/late_phase_rule.py at tiny size, the pieces it adds to benchmarks/_lib (validation
split, per-seed noise, memorisation, paired intervals, rebuilt optimizer at the switch) and the
CIFAR-10 path of benchmarks/late_phase_mnist.py from a uint8 subset file (bf16 autocast,
channels-last, --train-limit). Shapes and invariants only, never the science."""

import argparse
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from .bench_support import image_datasets

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("group", image_datasets())
def test_rule_tiny(tmp_path, group):
    import late_phase_rule
    from _lib.late_rule import GROUPS, RULE_ACC, RULE_LAMBDA

    data = late_phase_rule.main(["--tiny", "--group", group, "--jobs", "1", "--out-dir", str(tmp_path)])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"late_phase_rule_{group}_tiny.{ext}").stat().st_size > 0
    assert list(data["runs"]) == GROUPS[group]
    for name, o in data["runs"].items():
        assert o["meets_rule"] == (o["late_minus_full"]["mean"] >= RULE_ACC and o["lambda_ratio"] <= RULE_LAMBDA)
        for kind in ("SGD", "SAM", "late", "SGD at switch", "SAM at switch"):
            assert len(o["per_seed"][kind]["memorised"]) == 2, (name, kind)
        assert all(math.isfinite(x) and x > 0 for x in o["per_seed"]["late"]["lambda_max"])
        assert 0 < o["switch"] < o["epochs"]
    text = (tmp_path / f"late_phase_rule_{group}_tiny.md").read_text()
    assert "meets the rule" in text and "Memorisation" in text
    if group == "digits":
        assert "(E) Optimizer state rebuilt" in text


def test_rebuilt_optimizer_drops_the_momentum():
    """A late run from a checkpoint with the optimizer rebuilt is a run whose SGD momentum starts
    at zero at the switch; carried over, it continues the trunk's."""
    from _lib.late_rule import schedule_args
    from _lib.late_runs import train_task

    a = schedule_args(argparse.Namespace(tiny=True, limit=120, device="cpu", seeds=[0], jobs=1, threads=1), "A")
    trunk = train_task(a, 0, 0, a.epochs, False, None, (2,), False, "SGD")
    ck = trunk["ckpts"][2]
    assert any(len(s) for s in ck["opt"]["state"].values())  # the trunk has momentum to lose
    carried = train_task(a, 0, 2, a.epochs, True, ck, (), False, "carried")
    rebuilt = train_task(a, 0, 2, a.epochs, True, ck, (), False, "rebuilt", True)
    again = train_task(a, 0, 2, a.epochs, True, ck, (), False, "rebuilt", True)
    w = lambda r: torch.cat([v.flatten() for k, v in r["state"].items() if "running" not in k])
    assert not torch.equal(w(carried), w(rebuilt)) and torch.equal(w(rebuilt), w(again))


def test_validation_split_and_noise_per_seed():
    from _lib import data

    old = data.load("digits", noise=0.25, noise_seed=0)
    same = data.load("digits", noise=0.25, noise_seed=0, val_size=0.0)
    assert torch.equal(old.train_y, same.train_y) and same.val_x is None
    d0 = data.load("digits", noise=0.25, noise_seed=0, val_size=0.2)
    d1 = data.load("digits", noise=0.25, noise_seed=1, val_size=0.2)
    assert len(d0.train_x) + len(d0.val_x) == len(old.train_x) and len(d0.test_x) == len(old.test_x)
    assert torch.equal(d0.val_x, d1.val_x) and torch.equal(d0.val_y_clean, d1.val_y_clean)  # a fixed carve
    assert not torch.equal(d0.val_y, d1.val_y)  # each seed its own noise draw
    both = torch.cat([d0.train_y != d0.train_y_clean, d0.val_y != d0.val_y_clean]).float().mean()
    assert abs(float(both) - 0.25) < 1e-3  # the noise is drawn over train + validation
    # no validation image is a training image
    tr = {tuple(x.flatten().tolist()) for x in d0.train_x}
    assert not any(tuple(x.flatten().tolist()) in tr for x in d0.val_x[:50])


def test_memorisation_counts():
    from _lib.measure import memorisation

    class Fixed(torch.nn.Module):  # predicts the class stored in the input
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 10).float()

    y_clean = torch.tensor([0, 1, 2, 3, 4, 5])
    y_noisy = torch.tensor([0, 1, 7, 8, 9, 5])  # three flipped
    pred = torch.tensor([0, 1, 7, 3, 6, 5])  # one memorised, one clean, one elsewhere
    m = memorisation(Fixed(), pred[:, None].float(), y_noisy, y_clean)
    assert m["flipped"] == 3 and m["memorised"] == pytest.approx(100 / 3)
    assert m["clean_on_flipped"] == pytest.approx(100 / 3) and m["chance"] == pytest.approx(200 / 3 / 9)


def test_paired_interval():
    from _lib.stats import paired, t975

    p = paired([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 1.0])
    assert p["mean"] == pytest.approx(2.8) and p["hi"] - p["mean"] == pytest.approx(2.776 * p["std"] / 5**0.5)
    assert t975(4) == 2.776 and t975(100) == 1.96


def test_cifar10_subset_file_and_gpu_options(tmp_path, fake_cifar10):
    """The one-line conversion writes a uint8 .npz; the sweep trains from it with bf16 autocast,
    channels-last and --train-limit (on the CPU here)."""
    import late_phase_mnist
    from _lib.data import read_cifar10, write_cifar10_subset

    path = write_cifar10_subset(str(fake_cifar10), str(tmp_path / "sub.npz"), train=16, test=4)
    xtr, ytr, xte, yte = read_cifar10(path)
    assert xtr.dtype == torch.uint8 and xtr.shape == (16, 3, 32, 32) and xte.shape == (4, 3, 32, 32)
    full = read_cifar10(str(fake_cifar10))
    assert torch.equal(xtr, full[0][:16]) and torch.equal(yte, full[3][:4])
    out = late_phase_mnist.main(
        [
            "--experiment",
            "sweep",
            "--dataset",
            "cifar10",
            "--data-dir",
            path,
            "--device",
            "cpu",
            "--train-limit",
            "12",
            "--width-div",
            "16",
            "--epochs",
            "2",
            "--milestone",
            "1",
            "--switches",
            "0",
            "2",
            "--batch-size",
            "4",
            "--num-seeds",
            "1",
            "--hessian-samples",
            "8",
            "--hessian-batch",
            "4",
            "--trace-samples",
            "0",
            "--amp",
            "bf16",
            "--channels-last",
            "--jobs",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert out["config"]["amp"] == "bf16" and out["config"]["n_train"] == 12
    text = (tmp_path / "late_phase_cifar10_sweep.md").read_text()
    assert "bf16 autocast, channels-last" in text and "width/16" in text
    run = out["seeds"][0]["runs"][0]
    assert math.isfinite(run["lambda_max"]) and math.isnan(run["trace"])
    saved = json.loads((tmp_path / "late_phase_cifar10_sweep.json").read_text())
    assert saved["config"]["channels_last"] is True
    assert np.isfinite(saved["seeds"][0]["runs"]["2"]["test_acc"])
