"""The SAM core shared by FusedSAM, MomentumSAM and the variants.

- ``state``: the settings and the run state (checked on every write) and ``Shared``, the
  descriptor that makes them public attributes of an optimizer;
- ``buckets``: the tensors of a step grouped for the backends, the restore contract and
  the norms;
- ``txn``: all or nothing for the writes of one call;
- ``engine``: ``SAMCore`` (plan -> perturb -> update -> finish) and ``Extension``, the API
  the variants implement.
"""

from .buckets import Bucket, Buckets, Plan, Slice, copies_for, pass_info, pass_scalars, restore_slices
from .engine import Extension, Perturbation, SAMCore
from .state import CLOSURE_CONVENTIONS, PERTURBATION_MODES, Checked, RunState, Settings, Shared, check_group
from .txn import Transaction

__all__ = [
    "Bucket",
    "Buckets",
    "Plan",
    "Slice",
    "copies_for",
    "pass_info",
    "pass_scalars",
    "restore_slices",
    "Extension",
    "Perturbation",
    "SAMCore",
    "CLOSURE_CONVENTIONS",
    "PERTURBATION_MODES",
    "Checked",
    "RunState",
    "Settings",
    "Shared",
    "check_group",
    "Transaction",
]
