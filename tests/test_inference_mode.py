"""Optimizer calls inside ``torch.inference_mode()``: buffers made there (restore copies,
momentum and Adam moments, variants' state, undo snapshots) would be inference tensors, which
torch refuses to update in place once the mode is off; torch.optim.SGD with momentum, stepped
once inside it, raises at every step after.  The contract here: steps inside and outside the mode
give exactly the results of steps outside only, on every backend and variant, with SGD and AdamW."""

import copy

import pytest
import torch

from .conftest import CPU_BACKENDS
from .contract_cases import VARIANTS, build, clone_params, loss_at, make_params, same, saved, step

# Adam and AdamW share one base step (fastsam/base_steps/adam.py): AdamW covers it, with decay
BASES = [torch.optim.SGD, torch.optim.AdamW]


def _two_step(opt, params, t, inference, second=None):
    """One SAM step in the two-step form; the optimizer's calls inside inference mode where asked
    (the backward passes cannot run there); ``second`` (default: as ``inference``) for the second
    half."""
    opt.zero_grad()
    loss_at(params, t).backward()
    if not hasattr(opt, "first_step"):  # one-pass variants: step() on the gradient at hand
        with torch.inference_mode(inference):
            opt.step()
        return
    with torch.inference_mode(inference):
        opt.first_step(zero_grad=True)
    loss_at(params, t).backward()
    with torch.inference_mode(inference if second is None else second):
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("inside", ["first", "middle"])
def test_steps_inside_inference_mode_leave_a_working_optimizer(backend, base, name, inside):
    params = make_params(seed=3, dtype=torch.float32)
    ref_params = clone_params(params)
    opt = build(name, params, base=base, backend=backend)
    ref = build(name, ref_params, base=base, backend=backend)
    for t in range(4):
        # "first": the state is created inside inference mode; "middle": state created outside is
        # updated inside once, then outside again
        inference = t == 0 if inside == "first" else t == 1
        _two_step(opt, params, t, inference)
        _two_step(ref, ref_params, t, False)
    for p in params:
        assert not p.is_inference()
    same([p.detach() for p in params], [p.detach() for p in ref_params], "params")
    same(opt.state_dict(), ref.state_dict())
    for st in opt.base_optimizer.state.values():
        for k, v in st.items():
            assert not (torch.is_tensor(v) and v.is_inference()), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "settings",
    [dict(adaptive=True), dict(max_grad_norm=0.5), dict(sam_start_step=1)],
    ids=["adaptive", "clipped", "late-start"],
)
def test_settings_inside_inference_mode(backend, settings):
    """The settings that add buffers or passes (ASAM's scale, clipping's norm, a switch from the
    base step to SAM), with the step that creates their state inside inference mode."""
    params = make_params(seed=5, dtype=torch.float32)
    ref_params = clone_params(params)
    opt = build("FusedSAM", params, backend=backend, **settings)
    ref = build("FusedSAM", ref_params, backend=backend, **settings)
    for t in range(4):
        _two_step(opt, params, t, t <= 1)
        _two_step(ref, ref_params, t, False)
    same([p.detach() for p in params], [p.detach() for p in ref_params], "params")
    same(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
@pytest.mark.parametrize("name", ["FusedSAM", "LookSAM", "GSAM", "FriendlySAM"])
@pytest.mark.parametrize("inside", ["first-half", "second-half"])
def test_one_half_of_a_step_inside_inference_mode(backend, base, name, inside):
    """The mode changes between the two halves of one step: the perturbation made in one mode is
    restored in the other."""
    params = make_params(seed=7, dtype=torch.float32)
    ref_params = clone_params(params)
    opt = build(name, params, base=base, backend=backend)
    ref = build(name, ref_params, base=base, backend=backend)
    for t in range(4):
        first = inside == "first-half" and t < 2
        second = inside == "second-half" and t < 2
        _two_step(opt, params, t, first, second)
        _two_step(ref, ref_params, t, False)
    same([p.detach() for p in params], [p.detach() for p in ref_params], "params")
    same(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_momentum_sam_unperturbed_inside_inference_mode(backend):
    """Evaluation at the unperturbed weights inside inference mode (the plausible use of
    ``unperturbed()``), then steps outside it: the results of a run without the mode.  Two
    buckets, so that the re-application's writes are snapshotted."""
    params = make_params(seed=9, dtype=torch.float32)
    ref_params = clone_params(params)

    def groups(ps):  # two buckets: the writes of a re-application are snapshotted
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}]

    opt = build("MomentumSAM", groups(params), backend=backend)
    ref = build("MomentumSAM", groups(ref_params), backend=backend)
    for t in range(4):
        _two_step(opt, params, t, False)
        _two_step(ref, ref_params, t, False)
        with torch.inference_mode():
            with opt.unperturbed():
                loss_at(params, t)
    same([p.detach() for p in params], [p.detach() for p in ref_params], "params")
    same(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_load_state_dict_inside_inference_mode(backend, name):
    """A checkpoint loaded inside inference mode: the state it casts into place is stepped after."""
    params = make_params(seed=11, dtype=torch.float32)
    opt = build(name, params, backend=backend)
    for t in range(2):
        _two_step(opt, params, t, False)
    sd = saved(opt.state_dict())  # torch.save and load: tensors of their own
    ref_params = clone_params(params)
    ref = build(name, ref_params, backend=backend)
    ref.load_state_dict(copy.deepcopy(sd))
    with torch.inference_mode():
        opt.load_state_dict(sd)
    for t in range(2, 4):
        _two_step(opt, params, t, False)
        _two_step(ref, ref_params, t, False)
    same([p.detach() for p in params], [p.detach() for p in ref_params], "params")
    same(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_with_closure_inside_inference_mode_runs_the_closure_outside_it(backend):
    """``step(closure)``'s closure needs a backward pass, which inference mode forbids: the
    optimizer's calls, the closure included, run outside the mode (documented in semantics.md)."""
    params = make_params(seed=13, dtype=torch.float32)
    ref_params = clone_params(params)
    opt = build("FusedSAM", params, backend=backend)
    ref = build("FusedSAM", ref_params, backend=backend)
    for t in range(3):
        with torch.inference_mode(t == 0):
            step(opt, params, t)
        step(ref, ref_params, t)
    same([p.detach() for p in params], [p.detach() for p in ref_params], "params")
    same(opt.state_dict(), ref.state_dict())
