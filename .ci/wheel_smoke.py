"""Run from outside the checkout, in a fresh environment holding only torch and the built wheel."""

import importlib.metadata
import os

import torch

import fastsam
from fastsam import FusedSAM

assert "site-packages" in fastsam.__file__, fastsam.__file__  # the wheel, not the checkout
assert fastsam.__version__ == importlib.metadata.version("fusedsam"), fastsam.__version__
# the JIT path builds the extension from the sources shipped inside the wheel
shipped = os.listdir(os.path.join(os.path.dirname(fastsam.__file__), "_csrc"))
assert {"bindings.cpp", "sam_cpu.cpp", "sam_kernels.cu", "sam_cpu_loops.h"} <= set(shipped), shipped

torch.manual_seed(0)
model = torch.nn.Linear(5, 3)
x, y = torch.randn(8, 5), torch.randn(8, 3)
opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
before = [p.detach().clone() for p in model.parameters()]


def closure():
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


loss = opt.step(closure)
assert torch.isfinite(loss) and not opt.last_step_skipped
assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
print(f"fusedsam {fastsam.__version__}: one FusedSAM step from the wheel, loss {float(loss.detach()):.4f}")
