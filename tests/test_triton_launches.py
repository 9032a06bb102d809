"""Launch budget of the triton backend: a whole SAM step (first_step + second_step) takes at most
6 kernel launches per (device, dtype) bucket, the same number for 3 and for 300 tensors.

Counted by wrapping the backend's single launcher (fastsam.kernels.triton.multi_tensor.launch).
Runs under the interpreter on the CPU, and on the GPU where there is one.
"""
import pytest
import torch

from fastsam import FusedSAM
from fastsam.backends import triton as tb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tb.is_available(DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)

BUDGET = 6

BASES = {  # (optimizer, options, FusedSAM options, steps counted)
    # two steps: the first creates the momentum buffers (first=True), the second reuses them
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-4), {}, 2),
    "sgd_nesterov_asam_clip": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True),
                               dict(adaptive=True, rho=0.5, max_grad_norm=1.0), 1),
    "adam": (torch.optim.Adam, dict(lr=1e-3), {}, 1),
    "adamw_clip": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2), dict(max_grad_norm=1.0), 1),
}


@pytest.fixture
def launches(monkeypatch):
    from fastsam.kernels.triton import multi_tensor as mt
    names = []
    real = mt.launch

    def counting(kernel, n_programs, *args, **kwargs):
        names.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        real(kernel, n_programs, *args, **kwargs)

    monkeypatch.setattr(mt, "launch", counting)
    return names


def _params(n, dtypes=(torch.float32,)):
    """n small parameters of mixed shapes (one element to a few dozen), cycling through dtypes."""
    shapes = [(1 + i % 3,) if i % 3 == 0 else (2, 1 + i % 4) if i % 3 == 1 else (1, 3, 2) for i in range(n)]
    return [torch.nn.Parameter(torch.randn(s, device=DEVICE, dtype=dtypes[i % len(dtypes)]))
            for i, s in enumerate(shapes)]


def _sam_step_launches(opt, params, launches):
    """Launches of one first_step + second_step (the gradients set by hand, no model)."""
    for p in params:
        p.grad = torch.randn_like(p)
    launches.clear()
    opt.first_step(zero_grad=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.second_step(zero_grad=True)
    return list(launches)


@pytest.mark.parametrize("base", sorted(BASES))
def test_sam_step_launch_count_is_independent_of_the_tensor_count(base, launches):
    base_cls, kw, sam_kw, steps = BASES[base]
    counts = {}
    for n in (3, 300):  # the interpreter runs ~5 ms per program: 300 tensors take a few seconds a step
        params = _params(n)
        opt = FusedSAM(params, base_cls, backend="triton", **sam_kw, **kw)
        assert opt.backend == "triton"
        counts[n] = [len(_sam_step_launches(opt, params, launches)) for _ in range(steps)]
    assert counts[3] == counts[300], counts
    assert all(c <= BUDGET for c in counts[3]), f"{counts[3]} launches, budget {BUDGET}"


def test_launches_per_bucket(launches):
    """Two dtypes: two buckets, each within the budget; which kernels run."""
    params = _params(6, dtypes=(torch.float32, torch.bfloat16))
    opt = FusedSAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend="triton")
    _sam_step_launches(opt, params, launches)
    names = _sam_step_launches(opt, params, launches)
    assert len(names) <= 2 * BUDGET
    per_bucket = ["_sq_norm_partials_kernel", "_sum_kernel", "_perturb_kernel",
                  "_sq_norm_partials_kernel", "_sum_kernel", "_restore_sgd_step_kernel"]
    assert sorted(names) == sorted(per_bucket * 2), names


def test_empty_group_and_zero_size_tensors_launch_nothing_harmful(launches):
    """Zero-size parameters go through (one masked program each); a bucket of them changes nothing."""
    params = [torch.nn.Parameter(torch.randn(0, 3, device=DEVICE)), torch.nn.Parameter(torch.randn(0, device=DEVICE))]
    opt = FusedSAM(params, torch.optim.Adam, lr=1e-3, backend="triton")
    names = _sam_step_launches(opt, params, launches)
    assert len(names) <= BUDGET
    assert all(p.shape[0] == 0 for p in params)
    assert all(float(opt.base_optimizer.state[p]["step"]) == 1.0 for p in params)
    tb.perturb([], [], [], torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE), False)
    tb.restore([], [])
    assert len(launches) == len(names), "an empty list launches nothing"
