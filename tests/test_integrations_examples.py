"""The examples in examples/ run (few steps; each well under a minute on the CPU)."""

import importlib.util
import pathlib

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_amp():
    acc = _load("plain_amp").main(["--steps", "12", "--accum", "2"])
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_lightning_automatic(precision):
    pytest.importorskip("lightning")
    tr = _load("lightning_automatic").main(["--steps", "6", "--precision", precision])
    assert tr.global_step == tr.optimizers[0].num_steps == 6


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_lightning_manual(precision):
    pytest.importorskip("lightning")
    tr = _load("lightning_manual").main(["--steps", "6", "--precision", precision])
    assert tr.global_step == tr.optimizers[0].num_steps == 6


def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    tr = _load("hf_trainer").main(["--steps", "6", "--out", str(tmp_path)])
    assert tr.sam_optimizer.num_steps == 6 and tr.sam_optimizer.sam_start_step == 3
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
