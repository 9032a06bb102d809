"""Launch budget of the triton backend: a whole SAM step (first_step + second_step) takes at most
6 kernel launches per (device, dtype) bucket, everything included, the same number for 3 and for
120 tensors (more than one launch of apex's multi_tensor_apply takes).

Counted two ways at once: the triton launches by wrapping the backend's single launcher
(fastsam.kernels.triton.multi_tensor.launch), and every torch op that FusedSAM or the backend
dispatches outside the launcher by a TorchDispatchMode (views and allocations excluded: they
launch nothing on a GPU).  The scalar epilogue (norm -> skip flag and 1/(||g||+eps), the clip
coefficient, the combined skip flag) runs inside the norm's final kernel, so no torch op is left.
Runs under the interpreter on the CPU, and on the GPU where there is one (the GPU check also
counts the launches with the CUDA profiler: tests/test_triton_gpu.py).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsam import FusedSAM
from fastsam.backends import triton as tb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tb.is_available(DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)

BUDGET = 6

BASES = {  # (optimizer, options, FusedSAM options, steps counted)
    # two steps: the first creates the momentum buffers (first=True), the second reuses them
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-4), {}, 2),
    "sgd_nesterov_asam_clip": (
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(adaptive=True, rho=0.5, max_grad_norm=1.0),
        1,
    ),
    "adam": (torch.optim.Adam, dict(lr=1e-3), {}, 1),
    "adamw_clip": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2), dict(max_grad_norm=1.0), 1),
}


# Ops that launch nothing on a GPU: allocations, and metadata/views.
_FREE = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "_local_scalar_dense",
}


class _Ops(TorchDispatchMode):
    """Every torch op dispatched while active, except inside the triton launcher."""

    def __init__(self, names):
        super().__init__()
        self.names = names
        self.in_launcher = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_launcher and not func.is_view and name not in _FREE:
            self.names.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """The names of the triton launches and the torch ops of what runs while it is used."""
    from fastsam.kernels.triton import multi_tensor as mt

    names = []
    mode = _Ops(names)
    real = mt.launch

    def counting(kernel, n_programs, *args, **kwargs):
        names.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        mode.in_launcher = True
        try:
            real(kernel, n_programs, *args, **kwargs)
        finally:
            mode.in_launcher = False

    monkeypatch.setattr(mt, "launch", counting)
    with mode:
        yield names


def _params(n, dtypes=(torch.float32,)):
    """n small parameters of mixed shapes (one element to a few dozen), cycling through dtypes."""
    shapes = [(1 + i % 3,) if i % 3 == 0 else (2, 1 + i % 4) if i % 3 == 1 else (1, 3, 2) for i in range(n)]
    return [
        torch.nn.Parameter(torch.randn(s, device=DEVICE, dtype=dtypes[i % len(dtypes)])) for i, s in enumerate(shapes)
    ]


def _sam_step_launches(opt, params, launches):
    """Launches and torch ops of one first_step + second_step (the gradients set by hand, no model),
    after a warm-up step, so that the count is the steady state's (tables cached, buffers made).
    The gradient tensors stay the same objects, as in a loop whose gradients come back at the same
    addresses; setting them is not counted."""
    with torch.utils._python_dispatch._disable_current_modes():
        values = [[torch.randn_like(p) for p in params] for _ in range(2)]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    counted = []
    for _ in range(2):
        for i, phase in enumerate((opt.first_step, opt.second_step)):
            with torch.utils._python_dispatch._disable_current_modes():
                for p, v in zip(params, values[i]):
                    p.grad.copy_(v)
            launches.clear()
            phase()
            counted.append(list(launches))
    return counted[2] + counted[3]


@pytest.mark.parametrize("base", sorted(BASES))
def test_sam_step_launch_count_is_independent_of_the_tensor_count(base, launches):
    base_cls, kw, sam_kw, steps = BASES[base]
    counts = {}
    # 120 tensors: more than one launch of apex's multi_tensor_apply takes (110), and few enough for
    # the interpreter, which runs every program in Python
    for n in (3, 120):
        params = _params(n)
        opt = FusedSAM(params, base_cls, backend="triton", **sam_kw, **kw)
        assert opt.backend == "triton"
        counts[n] = [len(_sam_step_launches(opt, params, launches)) for _ in range(steps)]
    assert counts[3] == counts[120], counts
    assert all(c <= BUDGET for c in counts[3]), f"{counts[3]} launches, budget {BUDGET}"


def test_launches_per_bucket(launches):
    """Two dtypes: two buckets, each within the budget, plus one copy launch: the undo snapshot of the
    bucket whose update is committed first (fastsam/core/txn.py: every write but the last is
    snapshotted, so that an update that fails in the second bucket can be undone in the first)."""
    params = _params(6, dtypes=(torch.float32, torch.bfloat16))
    opt = FusedSAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend="triton")
    _sam_step_launches(opt, params, launches)
    names = _sam_step_launches(opt, params, launches)
    assert len(names) <= 2 * BUDGET + 1
    per_bucket = [
        "_sq_norm_partials_kernel",
        "_sum_kernel",
        "_perturb_kernel",
        "_sq_norm_partials_kernel",
        "_sum_kernel",
        "_restore_sgd_step_kernel",
    ]
    assert sorted(names) == sorted(per_bucket * 2 + ["_restore_kernel"]), names


def test_empty_group_and_zero_size_tensors_launch_nothing_harmful(launches):
    """Zero-size parameters go through (one masked program each); a bucket of them changes nothing."""
    params = [torch.nn.Parameter(torch.randn(0, 3, device=DEVICE)), torch.nn.Parameter(torch.randn(0, device=DEVICE))]
    opt = FusedSAM(params, torch.optim.Adam, lr=1e-3, backend="triton")
    names = _sam_step_launches(opt, params, launches)
    assert len(names) <= BUDGET
    assert all(p.shape[0] == 0 for p in params)
    assert all(float(opt.base_optimizer.state[p]["step"]) == 2.0 for p in params)  # warm-up + counted step
    with torch.utils._python_dispatch._disable_current_modes():
        scalars = torch.zeros(2, device=DEVICE)
    launches.clear()
    tb.perturb([], [], [], scalars, 0.05, False)
    tb.restore([], [])
    assert launches == [], "an empty list launches nothing"


def test_the_counter_sees_torch_ops(launches):
    """The dispatch mode is live: a scalar torch op outside the launcher is counted."""
    launches.clear()
    torch.ones(3, device=DEVICE).sqrt()
    assert launches == ["aten.ones", "aten.sqrt"] or launches == ["aten.sqrt"] or "aten.sqrt" in launches


# ------------------------------------------------------------------ the variants' ops and steps
def test_variant_ops_launch_a_fixed_number_of_kernels(launches):
    """dot_sq_norms: 2 launches (partials, sums), axpby: 1, for 3 tensors and for 120."""
    for n in (3, 120):
        xs, ys = _params(n), _params(n)
        with torch.utils._python_dispatch._disable_current_modes():
            xs, ys = [x.detach() for x in xs], [y.detach() for y in ys]
            coefs = torch.tensor([1.0, -0.5, 0.0], device=DEVICE)
        for _ in range(2):  # the second call: tables cached
            launches.clear()
            r = tb.dot_sq_norms(xs, ys)
            tb.dot_sq_norms(xs, ys, accumulate=r)
            tb.axpby(xs, ys, coefs)
            tb.axpby(xs, ys, coefs, out=ys)
        assert launches == ["_dot_sq_norms_partials_kernel", "_dot_sq_norms_sum_kernel"] * 2 + ["_axpby_kernel"] * 2, (
            launches
        )


def _variant(name, params):
    from fastsam import GSAM, FriendlySAM, LookSAM

    kw = dict(lr=0.05, momentum=0.9)
    if name == "gsam":
        return GSAM(params, torch.optim.SGD, alpha=0.3, backend="triton", **kw)
    if name == "friendly":
        return FriendlySAM(params, torch.optim.SGD, backend="triton", **kw)
    return LookSAM(params, torch.optim.SGD, k=2, backend="triton", **kw)


def _variant_step_launches(opt, params, launches, steps):
    """Launches and torch ops of each of ``steps`` step(closure) calls after two warm-up steps (the
    closure sets the second gradients; nothing outside the optimizer is counted)."""
    with torch.utils._python_dispatch._disable_current_modes():
        values = [[torch.randn_like(p) for p in params] for _ in range(2)]
        for p in params:
            p.grad = torch.zeros_like(p)

    def set_grads(i):
        mode = torch.utils._python_dispatch._disable_current_modes()
        with mode:
            for p, v in zip(params, values[i]):
                p.grad.copy_(v)

    counts = []
    for s in range(2 + steps):
        set_grads(0)
        launches.clear()
        opt.first_step() if opt.sam_active else None
        n_first = list(launches)
        launches.clear()

        # the second pass's gradients set outside the count
        if opt.core.run.pending is not None:
            set_grads(1)
        launches.clear()
        opt.second_step()
        if s >= 2:
            counts.append(len(n_first) + len(launches))
    return counts


@pytest.mark.parametrize("name", ["gsam", "friendly", "looksam"])
def test_variant_step_launch_count_is_independent_of_the_tensor_count(name, launches):
    """A variant's step (triton kernels plus every scalar torch op that forms its coefficients on the
    device) takes the same number of launches for 3 tensors as for 40.  Under the interpreter the
    coefficients of CPU tensors are formed on the host (fastsam/variants/_ops.py): HOST_SCALARS off
    counts the device formulas that run on a GPU."""
    from fastsam.variants import _ops

    old = _ops.HOST_SCALARS
    _ops.HOST_SCALARS = False
    try:
        counts = {}
        for n in (3, 40):  # the interpreter: ~5 ms per program and launch, so 40 tensors
            params = _params(n)
            opt = _variant(name, params)
            counts[n] = _variant_step_launches(opt, params, launches, 2)
    finally:
        _ops.HOST_SCALARS = old
    assert counts[3] == counts[40], counts
    assert max(counts[3]) <= VARIANT_BUDGET[name], counts


# Launches per step of one bucket, the device formulas' scalar torch ops included (measured on a
# 3- and a 40-tensor bucket, equal): FusedSAM's 6 plus
#   GSAM: copy of g, dot_sq_norms (2), axpby, 14 scalar ops forming the coefficients: 24;
#   FriendlySAM: two axpby, the commit's axpby and one cat (the skip flag into its coefficients): 10;
#   LookSAM (k=2): full step copy of g, dot_sq_norms (2), axpby, norm of g_v (2), ~10 scalar ops
#   (the skip flag, the projection coefficient, the where keeping ||g_v||^2): 24 or so; a reuse
#   step 4 + norm of g (2), axpby and ~6 scalar ops.
# The scalar ops are the next thing to fuse (an epilogue of dot_sq_norms' sum kernel, as sq_norm has).
VARIANT_BUDGET = {"gsam": 24, "friendly": 10, "looksam": 25}
