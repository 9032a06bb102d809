"""The peers of the optimizer benchmarks (benchmarks/_peers.py) and optimizer_step.py's logic.

The peers must compute FusedSAM's step (the benchmarks check that before timing; here the check
itself is checked, and shown to catch a wrong step), optimizer_step.py must run end to end with
them, and its CUDA rows (a CUDA graph of the triton step, the peers checked against the compiled
kernels) are chosen as intended: a GPU session runs them, this one checks the choice.  Shapes,
never speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)
import _peers  # noqa: E402
import optimizer_step  # noqa: E402

from fastsam import FusedSAM  # noqa: E402

SHAPES = [(3, 5), (7,), (1031,)]


def _pair(make, dtype):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return ps, make(ps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_plain_peer_computes_fused_sams_step(dtype, base):
    cls, kw = _peers.BASES[base]
    fused_ok = _peers.fused_step_is_correct(cls, kw, dtype, torch.device("cpu"))
    ref = _pair(lambda ps: FusedSAM(ps, cls, rho=0.05, backend="foreach", **kw), dtype)
    peer = _pair(lambda ps: _peers.PlainSAM(ps, cls, rho=0.05, fused=fused_ok, **kw), dtype)
    assert _peers.compare_steps(ref, peer, dtype) is None


def test_the_check_catches_a_different_step():
    """Another lr, or no perturbation at all (a peer that forgot SAM: only the weights after
    first_step show it, the restore undoes it), is caught in fp32 and bf16.  rho is large here: in
    bf16 a perturbation of a few ulps in norm is what rounding may differ by."""
    cls, kw = _peers.BASES["sgd"]
    for dtype in (torch.float32, torch.bfloat16):
        ref = _pair(lambda ps: FusedSAM(ps, cls, rho=2.0, backend="foreach", **kw), dtype)
        other_lr = _pair(lambda ps: _peers.PlainSAM(ps, cls, rho=2.0, fused=False, **dict(kw, lr=0.09)), dtype)
        assert "second_step" in (_peers.compare_steps(ref, other_lr, dtype) or "")
        ref = _pair(lambda ps: FusedSAM(ps, cls, rho=2.0, backend="foreach", **kw), dtype)
        no_sam = _pair(lambda ps: _peers.PlainSAM(ps, cls, rho=0.0, fused=False, **kw), dtype)
        assert "first_step" in (_peers.compare_steps(ref, no_sam, dtype) or "")


def test_torch_fused_sgd_check_finds_the_16bit_cpu_bug_or_its_fix():
    """torch 2.13's CPU SGD(fused=True) skips the vectorised updates of 16-bit parameters
    (pytorch/pytorch#191763); the check must say so there and pass where torch is fixed."""
    cls, kw = _peers.BASES["sgd"]
    assert _peers.fused_step_is_correct(cls, kw, torch.float32, torch.device("cpu"))
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    cls([p], fused=True, lr=0.5).step()
    torch_is_broken = bool((p.float() == 1.0).any())
    assert _peers.fused_step_is_correct(cls, kw, torch.bfloat16, torch.device("cpu")) == (not torch_is_broken)


def test_cuda_rows_are_chosen_as_intended(monkeypatch):
    """On a GPU: a CUDA-graph row for triton, and the peers checked against the cuda kernels."""
    monkeypatch.setattr(optimizer_step, "fusedsam_backends", lambda device: ["foreach", "triton", "cuda"])
    rows = optimizer_step.sam_rows(torch.device("cuda"), "sgd", peers=True)
    assert rows == [
        "reference",
        "fusedsam-foreach",
        "fusedsam-triton",
        "fusedsam-cuda",
        "fusedsam-triton-graph",
        "compiled",
        "plain",
    ]
    assert optimizer_step.sam_rows(torch.device("cuda"), "adamw", peers=False)[0] == "fusedsam-foreach"
    fused = [r for r in rows if r.startswith("fusedsam-") and not r.endswith("-graph")]
    assert fused[-1] == "fusedsam-cuda"


def test_optimizer_step_runs_with_peers(tmp_path):
    """The whole script on the tiny set: every row timed, the peers checked, files written."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "optimizer_step.py"),
            "--param-sets",
            "tiny",
            "--dtypes",
            "fp32",
            "bf16",
            "--peers",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "optimizer_step_cpu.json").read_text())
    for cfg in data["configs"]:
        rows = {r["row"]: r for r in cfg["rows"]}
        assert {"compiled", "plain", "copy"} <= set(rows) and any(k.startswith("torch-fused-") for k in rows)
        assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows.values())
        assert rows["compiled"]["ratio_to_compiled"] == 1.0
        assert sum("after each half of two steps" in n for n in cfg["notes"]) == 2
        assert cfg["compile_s"] > 0
    if data["cpp_code_path"]:  # the cpp backend ran: its instruction set is in the report
        assert f"cpp backend code path: {data['cpp_code_path']}" in (tmp_path / "optimizer_step_cpu.md").read_text()
