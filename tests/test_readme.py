"""The README's Python blocks run as written, and its quickstart really switches SAM on."""

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_quickstart_runs_and_switches_sam_on():
    blocks = _blocks()
    assert blocks, "the README lost its quickstart"
    calls = []
    real_backward = torch.Tensor.backward

    def counting_backward(self, *a, **k):
        calls.append(1)
        return real_backward(self, *a, **k)

    ns: dict = {}
    torch.Tensor.backward = counting_backward
    try:
        exec(compile(blocks[0], "README.md:quickstart", "exec"), ns)
    finally:
        torch.Tensor.backward = real_backward
    opt = ns["opt"]
    # 10 steps, SGD before step 8 and SAM (two passes) from it: 8 + 2 * 2 backward passes
    assert len(calls) == 12, len(calls)
    assert opt.sam_active and not opt.last_step_skipped
