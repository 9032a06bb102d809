"""The foreach backend: torch._foreach_* multi-tensor ops, no compiled code.

Runs wherever torch runs; the CPU default.  Each op is a few foreach calls, so
it makes several passes over memory (the compiled backends make one).

Skipping on non-finite gradients: on the CPU the skip flag is read on the host
(free: the CPU is the device).  On other devices the ops stay sync-free by
masking each tensor with ``torch.where``: correct, but one launch per tensor,
which is what the triton/cuda backends exist to avoid.  ``_common.HOST_READS =
False`` runs that device-side path on CPU tensors too (the tests do).
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from . import _common
from ._common import (
    F32_TINY,
    FACTOR,
    SKIP,
    Epilogue,
    check_bucket,
    check_copies,
    finish_norm,
    on_host,
    scaled,
    scaled_products,
    split_scale,
)

Tensors = Union[List[torch.Tensor], Tuple[torch.Tensor, ...]]  # torch annotates the _foreach ops as returning tuples
NAME = "foreach"


def is_available(device: torch.device, build: bool = True) -> tuple[bool, str]:
    return True, ""


def supports(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _host_skip(skip: torch.Tensor) -> Optional[bool]:
    """The skip flag as a bool where reading it is free (CPU), else None."""
    return bool(skip) if on_host(skip) else None


def _masked_assign(dst: Tensors, new: Tensors, skip: torch.Tensor) -> None:
    """dst <- new unless skip, sync-free (one where per tensor).  The choice is made in dst's
    dtype: a kept value goes through no conversion, so a skip leaves every bit (a NaN's too)."""
    keep = skip.to(torch.bool)
    for d, n in zip(dst, new):
        d.copy_(torch.where(keep, d, n.to(d.dtype)))


def grad_sq_norm(
    grads: Tensors,
    params: Optional[Tensors] = None,
    *,
    accumulate: Optional[torch.Tensor] = None,
    epilogue: Optional[Epilogue] = None,
) -> torch.Tensor:
    """Per-tensor float64 norms (``_foreach_norm`` with ``dtype=float64`` accumulates in float64), so
    no finite gradient overflows; ASAM's |w| * g is formed in float64 too (the product of two finite
    float32 values may exceed float32's range)."""
    check_bucket(grads, params)
    if not grads:
        return finish_norm(torch.zeros((), dtype=torch.float64, device="cpu"), accumulate, epilogue)
    if params is not None:
        wide = [p.to(torch.float64) for p in params]
        grads = torch._foreach_mul(torch._foreach_abs(wide), [g.to(torch.float64) for g in grads])
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    return finish_norm(torch.stack(norms).square().sum(), accumulate, epilogue)


def perturb(
    params: Tensors, grads: Tensors, copies: Tensors, scalars: torch.Tensor, rho: float, adaptive: bool
) -> None:
    check_bucket(params, grads, copies)
    if not params:
        return
    torch._foreach_copy_(copies, params)
    skip = scalars[SKIP]
    host_skip = _host_skip(skip)
    if host_skip:
        return
    dtype = params[0].dtype
    scale = scalars[FACTOR].to(torch.float64) * rho  # float64, as every backend forms it
    if host_skip is not None and not adaptive:
        # CPU: the scale read on the host is the alpha of one add (no temporary e) where it lies in
        # float32's normal range and the dtype's; torch casts alpha to the parameters' dtype.
        if dtype == torch.float64:
            torch._foreach_add_(params, grads, alpha=float(scale))
            return
        hi, lo = split_scale(float(scale))
        if lo == 1.0 and F32_TINY <= abs(hi) <= torch.finfo(dtype).max:
            torch._foreach_add_(params, grads, alpha=hi)
            return
    e = scaled_products(grads, scale)  # float32 where split_scale's two factors are needed
    if adaptive:  # e = scale * g * w^2
        torch._foreach_mul_(e, params)
        torch._foreach_mul_(e, params)
    if host_skip is None:
        _masked_assign(params, torch._foreach_add(params, e), skip)
    elif e[0].dtype != dtype:
        torch._foreach_copy_(params, torch._foreach_add(e, params))
    else:
        torch._foreach_add_(params, e)


def restore(params: Tensors, copies: Tensors) -> None:
    check_bucket(params, copies)
    if params:
        torch._foreach_copy_(params, copies)


def _sam_grads(grads: Tensors, grad_scale: Optional[torch.Tensor], maximize: bool) -> Tensors:
    if grad_scale is not None:
        grads = scaled(grads, grad_scale)
    if maximize:
        grads = torch._foreach_neg(grads)
    return grads


def restore_sgd_step(
    params: Tensors,
    grads: Tensors,
    copies: Tensors,
    momentum_buffers: Tensors,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    first: bool,
    grad_scale: Optional[torch.Tensor],
    skip: torch.Tensor,
) -> None:
    check_bucket(params, grads, copies or None, momentum_buffers or None)
    if not params:
        return
    if copies:
        check_copies(params, copies)
        torch._foreach_copy_(params, copies)
    host_skip = _host_skip(skip)
    if host_skip:
        return
    if host_skip is None:  # compute into temporaries, then assign under the mask
        new_bufs = [b.clone() for b in momentum_buffers]
        new_params = [p.clone() for p in params]
        _sgd_update(
            new_params, grads, new_bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, first, grad_scale
        )
        _masked_assign(momentum_buffers, new_bufs, skip)
        _masked_assign(params, new_params, skip)
        return
    _sgd_update(
        params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay, maximize, first, grad_scale
    )


def _sgd_update(params, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, first, grad_scale):
    # The same sequence of foreach ops as torch.optim.sgd._multi_tensor_sgd.
    d_p = _sam_grads(grads, grad_scale, maximize)
    if weight_decay != 0:
        d_p = torch._foreach_add(d_p, params, alpha=weight_decay)
    if momentum != 0:
        if first:
            torch._foreach_copy_(bufs, d_p)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d_p, alpha=1 - dampening)
        if nesterov:
            d_p = torch._foreach_add(d_p, bufs, alpha=momentum)
        else:
            d_p = bufs
    if isinstance(lr, torch.Tensor):  # capturable: the lr read on the device
        torch._foreach_add_(params, torch._foreach_mul(d_p, -lr))
    else:
        torch._foreach_add_(params, d_p, alpha=-lr)


def restore_adam_step(
    params: Tensors,
    grads: Tensors,
    copies: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    steps: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    grad_scale: Optional[torch.Tensor],
    skip: torch.Tensor,
) -> None:
    check_bucket(params, grads, copies or None, exp_avgs, exp_avg_sqs)
    if not params:
        return
    if copies:
        check_copies(params, copies)
        torch._foreach_copy_(params, copies)
    host_skip = _host_skip(skip)
    if host_skip:
        return
    if host_skip is None:
        new = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, steps)]
        _adam_update(
            new[0], new[1], new[2], grads, new[3], lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale
        )
        for dst, src in zip((params, exp_avgs, exp_avg_sqs, steps), new):
            _masked_assign(dst, src, skip)
        return
    _adam_update(
        params,
        exp_avgs,
        exp_avg_sqs,
        grads,
        steps,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        maximize,
        grad_scale,
    )


def _adam_update(
    params, exp_avgs, exp_avg_sqs, grads, steps, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale
):
    # Mirrors torch.optim.adam._multi_tensor_adam (amsgrad off), with the bias
    # corrections computed on the device from the step tensors, as torch's
    # capturable path does, so no host read is needed on any device.
    g = _sam_grads(grads, grad_scale, maximize)
    if isinstance(lr, torch.Tensor) and on_host(lr):
        lr = float(lr)  # free on the CPU; keeps the CPU path's host-side bias corrections exact
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, params, alpha=weight_decay)
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if on_host(steps[0]):
        # Host-side bias corrections in Python floats, exactly as torch's
        # non-capturable Adam computes them (reading a CPU tensor is free).
        ts = [float(s) for s in steps]
        step_size = [-lr / (1 - beta1**t) for t in ts]
        torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in ts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
        return
    # Device-side bias corrections from the step tensors (torch's capturable path),
    # in float64 for float64 parameters.
    if params[0].dtype == torch.float64:
        steps = [s.double() for s in steps]
    bc1 = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(bc1, 1)  # beta1^t - 1 = -bias_correction1
    torch._foreach_div_(bc1, lr)
    torch._foreach_reciprocal_(bc1)  # step_size = -lr / bias_correction1
    bc2 = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bc2, 1)
    torch._foreach_neg_(bc2)
    torch._foreach_sqrt_(bc2)  # sqrt(1 - beta2^t)
    torch._foreach_div_(denom, torch._foreach_mul(bc2, bc1))
    torch._foreach_add_(denom, torch._foreach_mul(torch._foreach_reciprocal(bc1), eps))
    torch._foreach_addcdiv_(params, exp_avgs, denom)


# ---------------------------------------------------------------- the variants' ops
def dot_sq_norms(xs: Tensors, ys: Tensors, *, accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[<x, y>, ||x||^2, ||y||^2], in float64 whatever the lists' dtype (a finite float32 gradient's
    squares may overflow float32).  CPU: both lists flattened into one buffer each (one cat) and
    three dot products, since a CPU foreach norm is a loop over the tensors, one reduction each.
    Elsewhere a fixed number of multi-tensor launches without the two flat copies (the memory of a
    large model): ``_dot_sq_norms_multi``."""
    check_bucket(xs, ys)
    if not xs:
        return torch.zeros(3, dtype=torch.float64, device="cpu") if accumulate is None else accumulate.clone()
    acc = torch.float64
    out = (_dot_sq_norms_flat if on_host(xs[0]) else _dot_sq_norms_multi)(xs, ys, acc)
    if accumulate is not None:
        out = out + accumulate
    return out


def _dot_sq_norms_flat(xs: Tensors, ys: Tensors, acc: torch.dtype) -> torch.Tensor:
    xf = torch.cat([x.reshape(-1) for x in xs]).to(acc)
    yf = torch.cat([y.reshape(-1) for y in ys]).to(acc)
    return torch.stack([torch.dot(xf, yf), torch.dot(xf, xf), torch.dot(yf, yf)])


def _dot_sq_norms_multi(xs: Tensors, ys: Tensors, acc: torch.dtype) -> torch.Tensor:
    """One norm call: the products x*y split into their positive and negative parts, x*x and y*y,
    all summed as L1 norms (same-sign sums, each as accurate as a norm; the one subtraction is the
    dot product's own cancellation).  The lists are cast to float64 first (one op per tensor): the
    products of float32 values may overflow float32, those of 16-bit values round in 16 bits."""
    if xs[0].dtype != acc:
        xs, ys = [x.to(acc) for x in xs], [y.to(acc) for y in ys]
    n = len(xs)
    pos = torch._foreach_mul(xs, ys)
    neg = torch._foreach_clamp_max(pos, 0.0)
    torch._foreach_sub_(pos, neg)  # the positive parts (exact: p - min(p, 0))
    sums = (
        torch.stack(
            torch._foreach_norm(pos + neg + torch._foreach_mul(xs, xs) + torch._foreach_mul(ys, ys), 1, dtype=acc)
        )
        .view(4, n)
        .sum(1)
    )
    return torch.cat([(sums[0] - sums[1]).view(1), sums[2:]])


def axpby(xs: Tensors, ys: Tensors, coefs: torch.Tensor, *, out: Optional[Tensors] = None) -> None:
    """out <- coefs[0] x + coefs[1] y unless coefs[2] (see the contract: two products and a sum, each
    rounded, never an FMA; ``_foreach_add_``'s alpha would be one on the CPU).  On the CPU the
    coefficients are read on the host; elsewhere the update is computed into temporaries and
    assigned under the skip mask (one ``where`` per tensor, sync-free)."""
    check_bucket(xs, ys, out)
    if not xs:
        return
    if out is None:
        out = xs
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    cast = xs[0].dtype != acc  # 16-bit lists: computed in float32, rounded once to 16 bits
    xa, ya = ([x.to(acc) for x in xs], [y.to(acc) for y in ys]) if cast else (xs, ys)
    if on_host(coefs):
        a, b, skip = coefs[:3].tolist()
        if skip != 0:
            return
        by = torch._foreach_mul(ya, b)
        if out is xs and not cast:  # in place, one temporary (b y, formed before x changes)
            if a != 1.0:  # x * 1 is x
                torch._foreach_mul_(xs, a)
            torch._foreach_add_(xs, by)
            return
        torch._foreach_add_(by, torch._foreach_mul(xa, a))
        torch._foreach_copy_(out, by)
        return
    c = coefs.to(acc)
    new = torch._foreach_mul(xa, c[0])
    torch._foreach_add_(new, torch._foreach_mul(ya, c[1]))
    _masked_assign(out, new, c[2] != 0)


# The two passes of a step with their norms, as the core calls them on one bucket.
norm_perturb = _common.norm_perturb_of(grad_sq_norm, perturb)
norm_restore_sgd_step = _common.norm_restore_sgd_step_of(grad_sq_norm, restore_sgd_step)
