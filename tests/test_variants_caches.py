"""The variants' per-bucket caches: bounded when the gradient pattern changes (they live on the
bucket objects, which die with the pattern), and dropped by deepcopy/pickle (a bucket's backend is a
module), so a copy keeps stepping bitwise as the original."""

import copy
import gc
import io
import weakref

import pytest
import torch

from fastsam import GSAM, FriendlySAM, LookSAM

from .test_variants_common import base_kwargs, drive, groups, make_params

VARIANTS = [(GSAM, dict(alpha=0.1)), (LookSAM, dict(k=2)), (FriendlySAM, {})]
IDS = [c.__name__ for c, _ in VARIANTS]


@pytest.mark.parametrize("cls,kw", VARIANTS, ids=IDS)
def test_caches_do_not_keep_old_buckets_or_gradients_alive(cls, kw):
    """One parameter has a gradient only every other step: each change of pattern is a new bucket
    list.  The caches used to keep every bucket object (and its last gradients) alive."""
    torch.manual_seed(0)
    ps = [torch.randn(64, 64, requires_grad=True) for _ in range(3)]
    opt = cls(ps, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, backend="foreach", **kw)
    refs = []  # weakrefs of every gradient tensor, per step
    for t in range(40):

        def fb(t=t):
            loss = sum((p * p).sum() for p in ps[:2]) + (0 if t % 2 else (ps[2] ** 2).sum())
            loss.backward()
            refs.append((t, [weakref.ref(p.grad) for p in ps if p.grad is not None]))

        fb()
        opt.step(fb)
        opt.zero_grad(set_to_none=True)
    gc.collect()
    # Alive at most: the current bucket list's gradients (step 39) and one older list (LookSAM's
    # last full step, 38); everything before is freed.
    alive = sorted({t for t, rs in refs for r in rs if r() is not None})
    assert all(t >= 38 for t in alive), alive
    # and no per-optimizer cache grows with the steps
    assert "_bufs_cache" not in opt.__dict__ and "_fsam_plans" not in opt.__dict__
    sizes = {k: len(v) for k, v in opt.__dict__.items() if isinstance(v, dict) and k.startswith("_")}
    assert all(n <= 8 for n in sizes.values()), sizes


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("steps", [3, 4])
@pytest.mark.parametrize("cls,kw", VARIANTS, ids=IDS)
def test_deepcopy_and_pickle_keep_a_working_variant(cls, kw, steps, how):
    """After a few steps (LookSAM k=2: 3 steps end on a full step, the next is a reuse step; 4 end
    on a reuse step), deepcopy and torch.save/load give an optimizer that keeps stepping and matches
    the original bitwise.  Step 5 drops a gradient (a new bucket pattern) on both."""
    base = torch.optim.SGD
    p = make_params()
    opt = cls(groups(p, base), base, rho=0.05, **kw, **base_kwargs(base))
    drive(opt, p, steps, drop={1: {4}})
    clone = copy.deepcopy(opt) if how == "deepcopy" else _saved(opt)
    cp = _params_of(clone)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(cp, p))
    assert clone.num_steps == opt.num_steps == steps
    drive(opt, p, 4, start=steps, drop={5: {2}})
    drive(clone, cp, 4, start=steps, drop={5: {2}})
    assert clone.num_steps == steps + 4
    assert all(torch.equal(a, b) for a, b in zip(p, cp))
    for x, y in zip(p, cp):
        assert opt.state[x].keys() == clone.state[y].keys()
        assert all(torch.equal(v, clone.state[y][k]) for k, v in opt.state[x].items() if torch.is_tensor(v))
    if cls is LookSAM:
        assert (clone.full_steps, clone.reuse_steps) == (opt.full_steps, opt.reuse_steps)
        assert opt.reuse_steps > 0
