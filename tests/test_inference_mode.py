"""Steps taken inside ``torch.inference_mode()``: buffers the optimizer creates there (restore
copies, momentum and Adam moments, variants' state) are inference tensors, which torch refuses to
update in place once inference mode is off.  torch.optim leaves a user stuck there; the contract
here is that the next step outside inference mode works and matches a run that never entered it,
on every backend, variant and base optimizer."""

import pytest
import torch

from .conftest import CPU_BACKENDS
from .contract_cases import BASE_KW, VARIANTS, build, clone_params, loss_at, make_params, same

BASES = list(BASE_KW)


def _two_step(opt, params, t, inference):
    """One SAM step in the two-step form; the optimizer's calls inside inference mode where asked
    (the backward passes cannot run there)."""
    opt.zero_grad()
    loss_at(params, t).backward()
    if not hasattr(opt, "first_step"):  # one-pass variants: step() on the gradient at hand
        with torch.inference_mode(inference):
            opt.step()
        return
    with torch.inference_mode(inference):
        opt.first_step(zero_grad=True)
    loss_at(params, t).backward()
    with torch.inference_mode(inference):
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
