"""FusedSAM's host-side caches never serve stale state (found in review; each once a silent bug).

The fused steps cache the per-parameter state dicts (Bucket.states) and the buckets themselves
(keyed on the parameters, their storage and layout, and the param-group dicts).  Resetting the
base optimizer's state, loading a state dict straight into the base optimizer, or re-laying out
a parameter in its own storage must all be seen, as torch's own optimizers see them: compared
with the per-parameter reference on every CPU backend.
"""

import pytest
import torch

from fastsam import FusedSAM

from .conftest import CPU_BACKENDS
from .reference import ReferenceSAM

BASES = [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=0.1))]


def _run(make, change, shape=(5,)):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    opt = make([w])
    base = opt.base_optimizer if hasattr(opt, "base_optimizer") else opt.base
    scale = torch.arange(1.0, w.numel() + 1).reshape(shape)
    for step in range(4):
        if step == 2:
            change(base, w)
        for k in range(2):
            (w.sin() * scale).sum().backward()
            (opt.first_step if k == 0 else opt.second_step)(zero_grad=True)
    return w.detach().clone(), {len(v) for v in base.state.values()}


CHANGES = {
    "state[p] = {}": lambda b, w: b.state.__setitem__(w, {}),
    "state.clear()": lambda b, w: b.state.clear(),
    "del state[p]": lambda b, w: b.state.__delitem__(w),
    "base.load_state_dict, lr 0": lambda b, w: (
        b.load_state_dict(b.state_dict()),
        b.param_groups[0].__setitem__("lr", 0.0),
    ),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base,kw", BASES, ids=["SGD", "Adam"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_state_changes_are_seen(backend, base, kw, change):
    ref_w, ref_st = _run(lambda ps: ReferenceSAM(ps, base, rho=0.05, **kw), CHANGES[change])
    got_w, got_st = _run(lambda ps: FusedSAM(ps, base, rho=0.05, backend=backend, **kw), CHANGES[change])
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=1e-6)
    assert got_st == ref_st, "the base optimizer's state holds what the step wrote"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_relayout_in_the_same_storage_is_seen(backend):
    """p.data = p.data.t(): same storage, new strides: new buckets and copies, no stride error."""

    def transpose(b, w):
        w.data = w.data.t()

    ref_w, _ = _run(lambda ps: ReferenceSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9), transpose, (4, 4))
    got_w, _ = _run(
        lambda ps: FusedSAM(ps, torch.optim.SGD, rho=0.05, backend=backend, lr=0.1, momentum=0.9), transpose, (4, 4)
    )
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=1e-6)


def test_tracked_state_pickles_as_a_mapping():
    import copy
    import pickle

    w = torch.nn.Parameter(torch.randn(3))
    opt = FusedSAM([w], torch.optim.SGD, lr=0.1, momentum=0.9)
    w.grad = torch.ones(3)
    opt.first_step()
    opt.second_step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert len(clone.base_optimizer.state) == 1
