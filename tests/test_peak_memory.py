"""FusedSAM's peak memory over SGD's is one copy of the parameters that have a gradient.

That copy is what SAM must keep (w, to restore after the perturbed pass); the per-parameter
reference SAM keeps the same.  Measured as the peak of live tensor bytes over two training steps
(model, gradients, optimizer state, activations, temporaries): on the CPU the allocator's own
running total (benchmarks/_common.py: peak_tensor_bytes), on CUDA ``max_memory_allocated``.  The
model has a layer that gets no gradient (a copy of it would be a waste) and BatchNorm (the second
pass runs under frozen_bn_stats); the batch makes the activations larger than the parameters, as in
training, so that the peak is in a backward pass.  Counting bytes, not timing.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from fastsam import FusedSAM, frozen_bn_stats

from .conftest import CPU_BACKENDS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from _common import peak_tensor_bytes
from reference_sam import ReferenceSAM

# Bytes a step may allocate besides the copy: the passes' scalars and norms (a few 0-d and 2-element
# tensors per pass).  A stray copy of any tensor of the model (the smallest: a 1 KiB bias) exceeds it.
SLACK = 512
# Backends here, on their devices; triton on the CPU is the interpreter, whose memory is not the GPU's.
CASES = [("cpu", b) for b in CPU_BACKENDS if b != "triton"] + [
    pytest.param("cuda", b, marks=pytest.mark.gpu) for b in ("triton", "cuda", "foreach")
]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(256, 256),
            torch.nn.BatchNorm1d(256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
        self.unused = torch.nn.Linear(256, 256)  # never in the forward: no gradient, no copy

    def forward(self, x):
        return self.body(x)


def _peak(device, fn) -> int:
    if device.type != "cuda":
        return peak_tensor_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def _run(make_opt, base, x, y, sam):
    """Two training steps of a fresh copy of ``base`` (built inside: its bytes count too)."""
    model = copy.deepcopy(base)
    opt = make_opt(model.parameters())
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if not sam:
            opt.step()
            continue

        def closure():
            with frozen_bn_stats(model):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            return loss

        opt.step(closure)


def _extra_over_sgd(device, make_opt):
    torch.manual_seed(0)
    base = Net().to(device)
    x, y = torch.randn(1024, 256, device=device), torch.randint(0, 10, (1024,), device=device)
    copy_bytes = sum(p.numel() * p.element_size() for p in base.body.parameters())
    sgd = _peak(device, lambda: _run(lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), base, x, y, False))
    sam = _peak(device, lambda: _run(make_opt, base, x, y, True))
    return sam - sgd, copy_bytes


def test_the_reference_sam_keeps_one_copy():
    """The yardstick, and a check of the measurement: the per-parameter SAM keeps one clone per parameter."""
    extra, copy_bytes = _extra_over_sgd(
        torch.device("cpu"), lambda ps: ReferenceSAM(ps, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
    )
    assert abs(extra - copy_bytes) <= SLACK, (extra, copy_bytes)


@pytest.mark.parametrize("device,backend", CASES)
def test_fused_sam_extra_memory_is_one_copy_of_the_parameters(device, backend):
    extra, copy_bytes = _extra_over_sgd(
        torch.device(device), lambda ps: FusedSAM(ps, torch.optim.SGD, rho=0.05, backend=backend, lr=0.01, momentum=0.9)
    )
    assert abs(extra - copy_bytes) <= SLACK, (extra, copy_bytes)


def test_peak_tensor_bytes_counts_live_tensors_only():
    """The CPU measurement: the peak of what is alive at once, not of what was ever allocated."""
    n = 1 << 16

    def fn():
        a = torch.empty(n)  # 256 KiB
        b = torch.empty(n)  # 512 KiB live
        del a, b
        c = torch.empty(n // 2)  # 128 KiB after both were freed
        del c

    assert peak_tensor_bytes(fn) == 2 * n * 4
