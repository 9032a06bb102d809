"""Hessian sharpness from Hessian-vector products: top-k eigenvalues, trace, spectral density.

    from fastsam import hessian
    r = hessian.eigenvalues(model, loss_fn, (x, y), k=5)            # Lanczos
    r.eigenvalues        # (5,) float64, largest first
    r.eigenvectors       # flat (5, n) tensor; r.vector(i) is parameter-shaped
    t = hessian.trace(model, loss_fn, loader, num_samples=99)        # Hutch++
    d = hessian.density(model, loss_fn, (x, y), num_iter=80)         # SLQ; d.plot()
    hv = hessian.hvp(model, loss_fn, (x, y), vector)                 # parameter-shaped

The operator is the Hessian of the loss averaged over all samples of ``data`` (and over all
ranks of an initialised process group). The model's mode, buffers and ``.grad`` are restored,
also when a call raises. A loss that is not finite on some batch, or a product that is not,
raises ``FloatingPointError`` naming the batch; arguments are checked (``ValueError`` naming
the argument) before ``data`` is read.
"""

from ._hvp import HVP_MODES, MODEL_MODES, HessianOperator, hvp, unflatten
from .density import DensityResult, density
from .eigen import EigenResult, eigenvalues
from .trace import TraceResult, trace
from .tracker import SharpnessTracker

__all__ = [
    "eigenvalues",
    "trace",
    "density",
    "hvp",
    "SharpnessTracker",
    "HessianOperator",
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "unflatten",
    "HVP_MODES",
    "MODEL_MODES",
]
