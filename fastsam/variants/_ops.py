"""The variants' math over the buckets of a step, through each bucket's backend.

LookSAM, GSAM and FriendlySAM need, beyond SAM's ops, a dot product between the two
gradients with both norms and a linear combination of two tensor lists.  These are the
backend ops ``dot_sq_norms`` and ``axpby`` (fastsam/backends/__init__.py), one fused pass
each in every backend (foreach, triton, cpp, cuda); this module runs them over all
buckets of a step (``b.backend.<op>(...)``) and forms their coefficients.

Reductions chain their running total from bucket to bucket on one device (the
``accumulate`` argument) when the buckets share device, backend and accumulation dtype
(``fastsam.core.pass_info``), else add per-bucket results on the first bucket's device,
all-reduced over FSDP2 shards as the core's norms are.

Coefficients (``coefs`` = [a, b, skip]) are formed where the reduction lives:

* on the CPU, on the host in Python floats (reading a CPU tensor costs nothing, and a
  dozen scalar torch ops cost more host time than the step's kernels on small models);
* elsewhere, with scalar torch ops on the device: nothing is read by the host.

``HOST_SCALARS = False`` forces the device formulas on the CPU too, so that the tests run
the code path of CUDA devices (tests/test_variants_*.py do).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..backends._common import SKIP
from ..core.buckets import Bucket, pass_info, reduce_over_shards, to_device

Tensors = List[torch.Tensor]
HOST_SCALARS = True  # form coefficients on the host when the reduction is on the CPU (see the docstring)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_host(t: torch.Tensor) -> bool:
    """Whether ``t``'s coefficients are formed on the host (a CPU tensor, unless HOST_SCALARS is off)."""
    return HOST_SCALARS and t.device.type == "cpu"


def _info(buckets: Sequence[Bucket]) -> Tuple[torch.dtype, torch.device, bool]:
    return getattr(buckets, "info", None) or pass_info(buckets)


# ---------------------------------------------------------------- reductions over the buckets
def _sum_over(
    buckets: Sequence[Bucket],
    reduce: Callable[[Bucket], Callable[..., torch.Tensor]],
    lists: Sequence[Sequence[Tensors]],
) -> torch.Tensor:
    """The total of ``reduce(*lists_of_bucket_i, accumulate=...)`` over the buckets, on the first
    bucket's device: chained through ``accumulate`` where the buckets allow it, else per-bucket
    results added on the main device, the local sums of sharded buckets all-reduced first."""
    acc, main, chain = _info(buckets)
    if chain:
        total = None
        for b, *ts in zip(buckets, *lists):
            total = reduce(b)(*ts, accumulate=total)
        assert total is not None  # buckets is never empty (pass_info reads buckets[0])
        return total
    partial: Dict[Any, torch.Tensor] = {}
    for b, *ts in zip(buckets, *lists):
        part = to_device(reduce(b)(*ts), main, acc)
        partial[b.shard] = partial[b.shard] + part if b.shard in partial else part
    total = None
    for shard, part in partial.items():  # bucket order: the same on every rank
        part = reduce_over_shards(part, shard)
        total = part if total is None else total + part
    assert total is not None  # buckets is never empty (pass_info reads buckets[0])
    return total


def dot_sq_norms(buckets: Sequence[Bucket], xs: Sequence[Tensors], ys: Sequence[Tensors]) -> torch.Tensor:
    """(3,) [<x, y>, ||x||^2, ||y||^2] over all buckets (``xs[i]``/``ys[i]`` are bucket i's lists),
    on the first bucket's device."""
    return _sum_over(buckets, lambda b: b.backend.dot_sq_norms, (xs, ys))


def sq_norm_over(
    buckets: Sequence[Bucket], lists: Sequence[Tensors], extra: Sequence[Tuple[Any, Tensors]] = ()
) -> torch.Tensor:
    """0-d sum of squares over bucket i's ``lists[i]`` (and over ``extra``: (backend, list)
    pairs outside the buckets), on the first bucket's device."""
    acc, main, _ = _info(buckets)
    total = _sum_over(buckets, lambda b: b.backend.grad_sq_norm, (lists,))
    for backend, ts in extra:
        part = to_device(backend.grad_sq_norm(ts), main, acc)
        total = part if total is None else total + part
    return total


def axpby(
    buckets: Sequence[Bucket],
    xs: Sequence[Tensors],
    ys: Sequence[Tensors],
    coefs: torch.Tensor,
    out: Optional[Sequence[Tensors]] = None,
) -> None:
    """``out[i] <- coefs[0] xs[i] + coefs[1] ys[i]`` per bucket unless ``coefs[2]`` (out: in place)."""
    per = CoefsOn(coefs)
    for i, (b, x, y) in enumerate(zip(buckets, xs, ys)):
        if x:
            b.backend.axpby(x, y, per(b.device, b.dtype), out=None if out is None else out[i])


class CoefsOn:
    """``coefs`` on each bucket's device in its accumulation dtype, or float64 (which every backend's
    axpby takes, rounding a and b once: the coefficients formed from the float64 reductions are not
    converted first), converted once per pair."""

    def __init__(self, coefs: torch.Tensor) -> None:
        self.coefs = coefs
        self._by: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __call__(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        acc = acc_dtype(dtype)
        c = self.coefs
        if c.device == device and c.dtype in (acc, torch.float64):
            return c
        key = (device, acc)
        hit = self._by.get(key)
        if hit is None:
            hit = self._by[key] = to_device(c, device, acc)
        return hit


Scalar = Union[float, torch.Tensor]


def coefs(a: Scalar, b: Scalar, skip: Scalar, like: torch.Tensor) -> torch.Tensor:
    """[a, b, skip] as a 1-D tensor on ``like``'s device and dtype: Python floats (host) or 0-d
    device tensors (one stack, no host read)."""
    if all(isinstance(v, (int, float)) for v in (a, b, skip)):
        return torch.tensor([a, b, skip], dtype=like.dtype, device=like.device)
    vals = [
        v.to(like.dtype) if torch.is_tensor(v) else torch.full((), v, dtype=like.dtype, device=like.device)
        for v in (a, b, skip)
    ]
    return torch.stack(vals)


def skip_of(scalars: Optional[Dict[torch.device, torch.Tensor]], like: torch.Tensor) -> Scalar:
    """A pass's skip flag (``run.first_scalars``) for coefficients made like ``like``: a float on the
    host path, a 0-d tensor on ``like``'s device otherwise; 0.0 when there are no scalars."""
    if not scalars:
        return 0.0
    s = scalars.get(like.device)
    if s is None:
        s = next(iter(scalars.values()))
    if on_host(like) and s.device.type == "cpu":
        return float(s[SKIP])
    return to_device(s[SKIP], like.device, like.dtype)
