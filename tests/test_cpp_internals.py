"""The compiled CPU twin's own machinery (backend "cpp", csrc/sam_cpu.cpp); the op results are
tests/test_backend_ops.py's.

The extension builds in CI, the norm does not depend on the thread count,
malformed calls raise (in C++) before writing, the meta kernels give fake
outputs, the operators trace under torch.compile, and a few FusedSAM steps on
cpp equal those on foreach.
"""

from __future__ import annotations

import pytest
import torch

from fastsam.backends import cpp

from .reference import train_mlp_with_fused_sam
from .tensor_lists import assert_bitwise as _assert_bitwise
from .tensor_lists import assert_close as _assert_close
from .tensor_lists import clone as _clone

CPU = torch.device("cpu")
AVAILABLE, WHY = cpp.is_available(CPU)
needs_ext = pytest.mark.skipif(not AVAILABLE, reason=f"cpp backend unavailable: {WHY}")


def _like(shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]


def test_extension_builds():
    """CI must build the CPU twin: a build failure fails here instead of skipping everything."""
    assert AVAILABLE, WHY


@needs_ext
def test_grad_sq_norm_independent_of_thread_count(seed):
    g = _like([(300000,), (77777,)], torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.grad_sq_norm(g)
        torch.set_num_threads(max(2, threads))
        many = cpp.grad_sq_norm(g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_ext
def test_malformed_calls_raise_before_writing():
    p = [torch.zeros(4), torch.zeros(5)]
    z = torch.tensor(0.0)
    before = _clone(p)
    with pytest.raises(ValueError, match="different dtypes"):
        torch.ops.fastsam.perturb(p, [torch.ones(4), torch.ones(5, dtype=torch.float64)], _clone(p), z, z, False)
    with pytest.raises(ValueError, match="equal lengths"):
        torch.ops.fastsam.restore(p, [torch.ones(4)])
    with pytest.raises(ValueError, match="shape"):
        torch.ops.fastsam.restore(p, [torch.ones(4), torch.ones(6)])
    with pytest.raises(ValueError, match="strides"):
        torch.ops.fastsam.restore([torch.zeros(3, 4)], [torch.ones(4, 3).t()])
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.fastsam.restore(p, [torch.ones(4), torch.ones(5, device="meta")])
    with pytest.raises(ValueError, match="one-element"):
        torch.ops.fastsam.perturb(p, _clone(p), _clone(p), torch.ones(2), z, False)
    with pytest.raises(ValueError, match="not supported"):
        ints = [torch.zeros(3, dtype=torch.int32)]
        torch.ops.fastsam.perturb(ints, ints, _clone(ints), z, z, False)
    _assert_bitwise(p, before)
    assert cpp.supports(torch.float64) and not cpp.supports(torch.int32)


@needs_ext
def test_meta_kernels_give_fake_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = [torch.randn(5), torch.randn(3, dtype=torch.float32)]
        out = torch.ops.fastsam.grad_sq_norm(g, [])
        assert out.shape == () and out.dtype == torch.float64  # the norms are float64 for every dtype
        torch.ops.fastsam.perturb(g, g, [torch.empty(5), torch.empty(3)], torch.tensor(1.0), torch.tensor(0.0), True)
        scalars = torch.empty(2, dtype=torch.float64)
        torch.ops.fastsam.norm_perturb(g, g, [torch.empty(5), torch.empty(3)], scalars, 0.05, 1e-12, True)
        torch.ops.fastsam.norm_restore_sgd_step(g, g, [], [], scalars, None, 0.1, 0.0, 0.0, False, 0.0, False, False)
        with pytest.raises(ValueError, match="'scalars' must be a pass's scalars"):
            torch.ops.fastsam.norm_perturb(g, g, g, torch.empty(2), 0.05, 1e-12, False)  # float32: not written


@needs_ext
def test_the_passes_with_their_norms_refuse_before_writing():
    p = [torch.zeros(4), torch.zeros(5)]
    c, g, bufs = _clone(p), [torch.ones(4), torch.ones(5)], _clone(p)
    scalars = torch.full((2,), 3.0, dtype=torch.float64)
    before = _clone(p) + _clone(c) + _clone(bufs) + [scalars.clone()]
    sgd = (0.1, 0.9, 0.0, False, 0.0, False, False)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.fastsam.norm_perturb(p, [torch.ones(4), torch.ones(6)], c, scalars, 0.05, 1e-12, False)
    with pytest.raises(ValueError, match="'prev' must be a pass's scalars"):
        torch.ops.fastsam.norm_restore_sgd_step(p, g, c, bufs, scalars, torch.zeros(1), *sgd)
    with pytest.raises(ValueError, match="is the parameter itself"):
        torch.ops.fastsam.norm_restore_sgd_step(p, g, [c[0], p[1]], bufs, scalars, None, *sgd)
    with pytest.raises(ValueError, match="momentum_buffers"):
        torch.ops.fastsam.norm_restore_sgd_step(p, g, c, [], scalars, None, *sgd)
    _assert_bitwise(_clone(p) + _clone(c) + _clone(bufs) + [scalars], before)


@needs_ext
def test_ops_trace_under_torch_compile(seed):
    """Graph capture with the fake kernels and functionalized mutation (aot_eager: no C++ codegen here)."""
    torch._dynamo.reset()

    def sam_step(p, g, c, bufs):
        sq = torch.ops.fastsam.grad_sq_norm(g, [])
        skip = (~torch.isfinite(sq)).float()
        torch.ops.fastsam.perturb(p, g, c, 0.05 / (sq.sqrt() + 1e-12), skip, False)
        torch.ops.fastsam.restore_sgd_step(p, g, c, bufs, 0.1, 0.9, 0.0, False, 0.0, False, False, None, skip)

    shapes = [(33,), (4, 5)]
    args = [_like(shapes, torch.float32) for _ in range(4)]
    expect = [_clone(a) for a in args]
    sam_step(*expect)
    compiled = torch.compile(sam_step, backend="aot_eager", fullgraph=True)
    compiled(*args)
    for got, exp in zip(args, expect):
        _assert_close(got, exp, (1e-6, 1e-6))


@needs_ext
@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
        (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    ],
)
def test_fused_sam_cpp_matches_foreach(seed, base, kw):
    """A few FusedSAM steps: backend cpp against backend foreach, same data."""

    def run(backend):
        return train_mlp_with_fused_sam(backend, base, kw, seed)

    name, got = run("cpp")
    assert name == "cpp"
    _, exp = run("foreach")
    _assert_close(got, exp, (1e-5, 1e-6))
