"""Backends: the multi-tensor kernels behind FusedSAM.

FusedSAM groups the parameters of each param group by (device, dtype) into a
*bucket* and hands each bucket's tensor lists to one backend.  Every backend is
a module that exposes the same names, so the data path reads
``FusedSAM -> backend module -> kernels``:

``NAME``
    the backend's name ("foreach", "triton", "cuda", "cpp").
``is_available(device: torch.device, build: bool = True) -> tuple[bool, str]``
    whether the backend can run on ``device``; the string says why not and how
    to fix it (shown to users who ask for this backend explicitly).  With
    ``build=False`` a compiled backend counts only if its extension is already
    built (no JIT compile is started); the others ignore ``build``.
``supports(dtype: torch.dtype) -> bool``
    dtypes it handles; FusedSAM falls back to "foreach" for the others.

The ops (all tensors of one call share a device and a dtype; lists may be empty
and tensors may have zero elements: both are no-ops).  Device-side scalars are
0-d tensors, or the 1-D *scalars* of a pass (``_common.py``: ``SKIP`` and
``FACTOR`` slots), on the bucket's device: float64 for every dtype (the ops also
take float32 ones); nothing here may synchronise with the host, except the foreach and
cpp backends on the CPU, where there is no separate device to wait for
(``_common.HOST_READS = False`` makes them take the sync-free path of other devices on
CPU tensors too, which is how the CPU tests run that path):

``grad_sq_norm(grads, params=None, *, accumulate=None, epilogue=None) -> Tensor``
    0-d float64 sum of squares: sum(g**2), or sum((|w|*g)**2) when ``params`` is
    given (the ASAM norm), plus ``accumulate`` (the total of the buckets before this
    one).  Finite for every finite float32 gradient ("finite means finite":
    1e20**2 overflows float32): foreach, triton and cuda square and sum in float64
    for every dtype; cpp sums each chunk in float (the loop that keeps up with
    memory), and a chunk whose float sum overflows again with g scaled by 2^-80,
    the sum scaled back in float64 (powers of two: exact), its chunks' sums added
    in float64.  Only non-finite gradients make the result inf/nan.  With ``epilogue``
    (``_common.Epilogue``) it also writes the pass's scalars, in float64: skip flag
    and 1/(||g||+eps) (first pass) or skip flag and clip coefficient (second pass).
``perturb(params, grads, copies, scalars, rho, adaptive)``
    ``copies <- params`` (an exact copy, used by the restore), then unless
    ``scalars[SKIP]`` ``params <- params + rho * scalars[FACTOR] * g``, with
    ``* w**2`` when ``adaptive``.  The float64 scale ``rho * FACTOR`` may lie below
    float32's normal range; float32/16-bit math applies it as ``(g * hi) * lo``
    (``_common.split_scale``), the correctly rounded product.
``restore(params, copies)``
    ``params <- copies``.

**The restore contract** of the two fused steps below: ``copies`` is either
empty (nothing to restore: the params themselves are read) or holds one
distinct copy per parameter (``kernels/checks.py: check_copies``; a copy that
is its parameter is an error).  FusedSAM splits a bucket whose parameters are
of both kinds (a parameter without a first-pass gradient was not perturbed)
into two calls (``fastsam/_buckets.py: restore_slices``); no backend infers
per call whether it restores.

``restore_sgd_step(params, grads, copies, momentum_buffers, *, lr, momentum,
dampening, nesterov, weight_decay, maximize, first, grad_scale, skip)``
    restore as above and, unless ``skip``, torch.optim.SGD's update of the
    restored params with ``grads * grad_scale`` (``grad_scale`` is None or a
    0-d tensor: the clipping coefficient, float64, applied as ``split_scale``'s
    two factors like the perturbation's scale).  ``first`` (Python bool) means the
    momentum buffers are fresh (torch initialises them to the gradient);
    ``momentum_buffers`` is an empty list when momentum == 0.
``restore_adam_step(params, grads, copies, exp_avgs, exp_avg_sqs, steps, *, lr,
beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale, skip)``
    restore as above and, unless ``skip``, torch.optim.Adam's update
    (AdamW's when ``decoupled``), amsgrad off.  ``steps`` are the per-tensor
    0-d step counters (float32/64, on the bucket's device); they are
    incremented unless ``skip``.

**A pass with its norm**: what FusedSAM's step calls where a pass covers one bucket and
nothing needs the pass's scalars between the norm and the write (fastsam/core/engine.py:
``_one_pass``).  Each gives the bits of the ops it stands for, called in turn; ``scalars`` is the
pass's 1-D float64 scalars, written.  The cpp backend has each as one operator (one call, the
epilogue on the host, the gradient list handed over once); the others compose their own ops
(``_common.norm_perturb_of``, ``_common.norm_restore_sgd_step_of``).

``norm_perturb(params, grads, copies, scalars, rho, adaptive, *, eps)``
    ``grad_sq_norm(grads, params if adaptive else None, epilogue=Epilogue(scalars, "perturb",
    eps))``, then ``perturb(params, grads, copies, scalars, rho, adaptive)``.
``norm_restore_sgd_step(params, grads, copies, momentum_buffers, scalars, prev, *, lr, momentum,
dampening, nesterov, weight_decay, maximize, first)``
    ``grad_sq_norm(grads, epilogue=Epilogue(scalars, "step", prev=prev))`` (``prev``: the first
    pass's scalars, or None), then ``restore_sgd_step(..., grad_scale=None,
    skip=scalars[SKIP])``: the second pass, neither clipped nor unscaled.

**The variants' ops** (LookSAM, GSAM, FriendlySAM: fastsam/variants/): the per-element
math beyond SAM's, with coefficients that stay on the device.

``dot_sq_norms(xs, ys, *, accumulate=None) -> Tensor``
    shape (3,), float64: ``[sum <x, y>, sum ||x||**2, sum ||y||**2]`` over the lists, in
    one pass over both, accumulated in float64 for every dtype (as ``grad_sq_norm``),
    plus ``accumulate`` (a (3,) tensor: the total of the buckets before this one).  Empty
    lists: zeros (float64, on the CPU) or a copy of ``accumulate``.  Non-finite input
    makes the affected entries inf/nan.
``axpby(xs, ys, coefs, *, out=None)``
    ``out <- coefs[0] * x + coefs[1] * y`` element-wise in float32 (float64 for float64
    lists): each product rounded, then their sum rounded, never contracted into a fused
    multiply-add, and the result rounded once to the lists' dtype.  Every backend thus
    gives torch's ``(c[0] * x.float() + c[1] * y.float()).to(dtype)`` bit for bit, on
    every device: the triton kernel is compiled without FP fusion, the CUDA kernel
    rounds with ``__fmul_rn``/``__fadd_rn``, foreach forms b * y before adding it (the
    ``alpha`` of ``_foreach_add_`` is an FMA on the CPU).  ``out`` defaults to ``xs``
    (in place) and may be ``xs`` or ``ys`` (element-wise aliasing) or a third list.
    Nothing at all is written when ``coefs[2] != 0`` (the skip flag).
    ``coefs``: a 1-D floating tensor of >= 3 elements on the lists' device, float32 or
    float64 (a and b are rounded once to the op-math dtype: the variants' coefficients
    come from the float64 reductions and are not converted first), so that coefficients
    computed on the device (from ``dot_sq_norms``) never cross to the host.  0 * inf is nan: a zero coefficient
    does not mask a non-finite input (use the skip flag for that).

Every op has one test suite run against every backend: tests/test_backend_ops.py.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("foreach", "triton", "cuda", "cpp")
_MODULES = {
    "foreach": "fastsam.backends.foreach",
    "triton": "fastsam.backends.triton",
    "cuda": "fastsam.backends.cuda",
    "cpp": "fastsam.backends.cpp",
}
ENV_VAR = "FASTSAM_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and how to fix it."""


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def get(name: str) -> ModuleType:
    """The backend module called ``name`` (raises BackendUnavailable if it cannot be imported)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot be imported: {exc}") from exc


def _usable(name: str, device: torch.device, build: bool = False) -> bool:
    mod = _import(name)
    return mod is not None and mod.is_available(device, build=build)[0]


def available(device: torch.device, build: bool = False) -> list:
    """Names of the backends that can run on ``device`` (``FASTSAM_BACKEND`` is not consulted).

    ``build=True`` lets the compiled backends JIT-build the extension if it is
    not built yet (a minute or more, once); by default only a prebuilt or
    cached extension counts.
    """
    return [name for name in BACKENDS if _usable(name, torch.device(device), build)]


def resolve(requested: str, device: torch.device) -> str:
    """Pick the backend name for parameters on ``device``: the one rule, used by every optimizer.

    An explicit name (anything but "auto") always wins, and raises BackendUnavailable when that
    backend cannot run on ``device``.  For "auto", the ``FASTSAM_BACKEND`` environment variable,
    when set, names the backend (checked like an explicit name, the variable named in errors);
    otherwise "auto" prefers compiled code: on CUDA "cuda" (the csrc/ extension, when it is
    built) then "triton" then "foreach"; on the CPU "cpp" (the csrc/ CPU twin, when it is
    built) then "foreach".  "auto" never starts a compile; naming "cuda" or "cpp" explicitly
    builds the extension on first use.
    """
    if requested != "auto":
        if requested not in _MODULES:
            raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
        return _checked(requested, device, f"backend {requested!r}")
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in ("auto",) + BACKENDS:
            raise ValueError(
                f"the environment variable {ENV_VAR} must be one of 'auto', "
                f"{', '.join(map(repr, BACKENDS))}; got {env!r}"
            )
        if env != "auto":
            return _checked(env, device, f"backend {env!r} (from the environment variable {ENV_VAR})")
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    for cand in order:
        if _usable(cand, device):
            return cand
    return "foreach"


def _checked(name: str, device: torch.device, what: str) -> str:
    ok, why = get(name).is_available(device)
    if not ok:
        raise BackendUnavailable(f"{what} cannot run on {device}: {why}")
    return name
