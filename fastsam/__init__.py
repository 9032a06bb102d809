"""fastsam: Sharpness-Aware Minimization made cheap.

``FusedSAM`` wraps any torch.optim optimizer; its SAM step runs as a handful of
multi-tensor launches (backends: foreach, triton, cuda, cpp), and it can be
switched on late in training at no cost before.  ``fastsam.hessian`` measures
sharpness (Hessian eigenvalues, trace, spectral density).
"""

from typing import TYPE_CHECKING

from . import schedules
from ._version import __version__
from .bn import disable_running_stats, enable_running_stats, frozen_bn_stats
from .optim import FusedSAM
from .variants import GSAM, FriendlySAM, LookSAM, MomentumSAM

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "FusedSAM",
    "LookSAM",
    "MomentumSAM",
    "GSAM",
    "FriendlySAM",
    "schedules",
    "frozen_bn_stats",
    "disable_running_stats",
    "enable_running_stats",
    "hessian",
    "adversarial",
    "__version__",
]


def __getattr__(name: str) -> "ModuleType":
    # fastsam.hessian / fastsam.adversarial are imported on first use: optimizer users do not pay for it.
    if name in ("hessian", "adversarial"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'fastsam' has no attribute {name!r}")
