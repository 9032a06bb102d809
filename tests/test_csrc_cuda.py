"""The CUDA kernels (backend "cuda", csrc/sam_kernels.cu) on a GPU.

Each op against the foreach backend on the same device, against the CPU twin
(same math header: the two differ only by FMA contraction and fp32 rounding
order), and against triton where it runs, on fresh random data: the sizes of
the CPU tests, chunk and launch boundaries (65536, 65537, 320 chunks + 3
elements), more tensors than one launch holds, misaligned views (the scalar
path) and a 2^31+-element tensor when memory allows.  Also: skip leaves
params/state bitwise unchanged, no host synchronisation, CUDA graph capture.

All marked gpu: skipped without a CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fastsam import backends
from fastsam.backends import cpp, cuda

from .reference import train_mlp_with_fused_sam

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.float64: (1e-12, 1e-14),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}
CHUNK = 65536


def _sc(scale, skip):
    """The pass's scalars (skip flag, factor) for a perturbation of exactly ``scale`` (rho = 1)."""
    scale = torch.as_tensor(scale)
    return torch.stack([torch.as_tensor(skip).to(device=scale.device, dtype=scale.dtype), scale])


def _dev():
    return torch.device("cuda", torch.cuda.current_device())


def _available():
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return cuda.is_available(_dev())


def test_cuda_backend_available():
    ok, why = _available()
    assert ok, why


@pytest.fixture
def dev():
    ok, why = _available()
    if not ok:
        pytest.skip(why)
    return _dev()


def _others(device):
    """Backends to compare against on `device`: foreach always, triton where it runs."""
    names = ["foreach"]
    try:
        backends.resolve("triton", device)
        names.append("triton")
    except (backends.BackendUnavailable, ValueError):
        pass
    return names


def _shapes(big=False):
    rand = int(torch.randint(2, 300000, ()))
    shapes = [(1,), (7,), (1023,), (65537,), (0,), (3, 5, 7), (rand,), (CHUNK,), (33, 31)]
    if big:
        shapes.append((320 * CHUNK + 3,))  # a launch boundary inside one tensor
    return shapes


def _rand(shapes, dtype, device, scale=1.0, positive=False, misaligned=False):
    out = []
    for s in shapes:
        t = torch.randn(s, dtype=torch.float64, device=device) * scale
        t = (t.abs() + 0.1 if positive else t).to(dtype)
        if misaligned:  # same values at an odd element offset: forces the scalar path
            buf = torch.empty(t.numel() + 1, dtype=dtype, device=device)
            t = buf[1:].view(s).copy_(t)
        out.append(t)
    return out


def _clone(ts):
    return [t.clone() for t in ts]


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise(xs, ys):
    for x, y in zip(xs, ys):
        assert torch.equal(_bits(x), _bits(y))


def _close(xs, ys, tol, what):
    for i, (x, y) in enumerate(zip(xs, ys)):
        torch.testing.assert_close(
            x.double().cpu(), y.double().cpu(), rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}[{i}]: {m}"
        )


def _flag(v, device):
    return torch.tensor(float(v), device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
def test_grad_sq_norm(dev, dtype, adaptive, misaligned, seed):
    shapes = _shapes(big=not misaligned)
    g, w = _rand(shapes, dtype, dev, misaligned=misaligned), _rand(shapes, dtype, dev)
    got = cuda.grad_sq_norm(g, w if adaptive else None)
    assert got.device == dev and got.dim() == 0
    ref = sum(((wi.double().abs() * gi.double()) if adaptive else gi.double()).square().sum() for gi, wi in zip(g, w))
    torch.testing.assert_close(got.double(), ref, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    cpu = cpp.grad_sq_norm([t.cpu() for t in g], [t.cpu() for t in w] if adaptive else None)
    torch.testing.assert_close(got.double().cpu(), cpu.double(), rtol=1e-5, atol=0)
    g[3][-1] = float("nan")
    assert torch.isnan(cuda.grad_sq_norm(g, w if adaptive else None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
def test_perturb(dev, dtype, adaptive, skip, misaligned, seed):
    shapes = _shapes()
    p, g = _rand(shapes, dtype, dev, misaligned=misaligned), _rand(shapes, dtype, dev)
    p0 = _clone(p)
    c = [torch.full_like(t, 3.0) for t in p]
    scale = torch.tensor(0.0137, device=dev)
    cuda.perturb(p, g, c, _sc(scale, _flag(skip, dev)), 1.0, adaptive)
    _assert_bitwise(c, p0)
    if skip:
        _assert_bitwise(p, p0)
        return
    for name in _others(dev) + ["cpp"]:
        if name == "cpp":
            q, qc = [t.cpu() for t in p0], [torch.empty_like(t.cpu()) for t in p0]
            cpp.perturb(q, [t.cpu() for t in g], qc, _sc(scale.cpu(), _flag(False, "cpu")), 1.0, adaptive)
        else:
            mod = backends.get(name)
            if not mod.supports(dtype):
                continue
            q, qc = _clone(p0), [torch.empty_like(t) for t in p0]
            mod.perturb(q, g, qc, _sc(scale, _flag(False, dev)), 1.0, adaptive)
        _close(p, q, TOL[dtype], f"params vs {name}")


def test_restore_many_tensors(dev, seed):
    """More tensors than one launch holds (the struct fills by tensors, not blocks)."""
    shapes = [(int(torch.randint(1, 5000, ())),) for _ in range(700)]
    p, c = _rand(shapes, torch.float32, dev), _rand(shapes, torch.float32, dev)
    cuda.restore(p, c)
    _assert_bitwise(p, c)


SGD_CASES = [
    (0.0, 0.0, False, 0.0, False, False),
    (0.9, 0.0, False, 5e-4, False, False),
    (0.9, 0.0, False, 5e-4, False, True),
    (0.9, 0.0, True, 1e-2, True, False),
    (0.5, 0.3, False, 1e-3, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: "m{}_d{}_n{}_wd{}_max{}_first{}".format(*c))
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
def test_restore_sgd_step(dev, dtype, case, clip, misaligned, seed):
    momentum, dampening, nesterov, wd, maximize, first = case
    shapes = _shapes()
    p, g, c = (_rand(shapes, dtype, dev, misaligned=misaligned) for _ in range(3))
    bufs = _rand(shapes, dtype, dev) if momentum else []
    kw = dict(
        lr=0.1,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=wd,
        maximize=maximize,
        first=first,
    )
    gs = torch.tensor(0.37, device=dev) if clip else None
    inputs = (_clone(p), _clone(bufs))
    cuda.restore_sgd_step(p, g, c, bufs, grad_scale=gs, skip=_flag(False, dev), **kw)
    for name in _others(dev) + ["cpp"]:
        q, qb = _clone(inputs[0]), _clone(inputs[1])
        if name == "cpp":
            q, qb = [t.cpu() for t in q], [t.cpu() for t in qb]
            cpp.restore_sgd_step(
                q,
                [t.cpu() for t in g],
                [t.cpu() for t in c],
                qb,
                grad_scale=None if gs is None else gs.cpu(),
                skip=_flag(False, "cpu"),
                **kw,
            )
        else:
            mod = backends.get(name)
            if not mod.supports(dtype):
                continue
            mod.restore_sgd_step(q, g, c, qb, grad_scale=gs, skip=_flag(False, dev), **kw)
        _close(p, q, TOL[dtype], f"params vs {name}")
        _close(bufs, qb, TOL[dtype], f"buffers vs {name}")
    # skip: restored, buffers bitwise untouched
    b0 = _clone(bufs)
    cuda.restore_sgd_step(p, g, c, bufs, grad_scale=gs, skip=_flag(True, dev), **kw)
    _assert_bitwise(p, c)
    _assert_bitwise(bufs, b0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd,decoupled,maximize", [(0.0, False, False), (1e-2, False, True), (1e-2, True, False)])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
def test_restore_adam_step(dev, dtype, wd, decoupled, maximize, clip, step_dtype, seed):
    shapes = _shapes()
    p, g, c = (_rand(shapes, dtype, dev) for _ in range(3))
    m, v = _rand(shapes, dtype, dev, 0.1), _rand(shapes, dtype, dev, 0.01, positive=True)
    steps = [torch.tensor(float(int(torch.randint(0, 20, ()))), dtype=step_dtype, device=dev) for _ in shapes]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, decoupled=decoupled, maximize=maximize)
    gs = torch.tensor(0.37, device=dev) if clip else None
    inputs = [_clone(x) for x in (p, m, v, steps)]
    cuda.restore_adam_step(p, g, c, m, v, steps, grad_scale=gs, skip=_flag(False, dev), **kw)
    assert [float(s) for s in steps] == [float(s) + 1 for s in inputs[3]]
    compare = ["cpp"] + (list(_others(dev)) if dtype in (torch.float32, torch.float64) else [])
    for name in compare:
        q = [_clone(x) for x in inputs]
        if name == "cpp":
            q = [[t.cpu() for t in x] for x in q]
            cpp.restore_adam_step(
                q[0],
                [t.cpu() for t in g],
                [t.cpu() for t in c],
                q[1],
                q[2],
                q[3],
                grad_scale=None if gs is None else gs.cpu(),
                skip=_flag(False, "cpu"),
                **kw,
            )
        else:
            mod = backends.get(name)
            if not mod.supports(dtype):
                continue
            mod.restore_adam_step(q[0], g, c, q[1], q[2], q[3], grad_scale=gs, skip=_flag(False, dev), **kw)
        # GPU bias corrections are double too; fp32 differences come from FMA contraction
        for what, x, y in zip(("params", "exp_avgs", "exp_avg_sqs"), (p, m, v), q[:3]):
            _close(x, y, TOL[dtype], f"{what} vs {name}")
    state = [_clone(x) for x in (m, v, steps)]
    cuda.restore_adam_step(p, g, c, m, v, steps, grad_scale=gs, skip=_flag(True, dev), **kw)
    _assert_bitwise(p, c)
    for now, before in zip((m, v, steps), state):
        _assert_bitwise(now, before)


def test_no_host_synchronisation(dev, seed):
    shapes = _shapes()
    p, g, c, b = (_rand(shapes, torch.float32, dev) for _ in range(4))
    m, v = _rand(shapes, torch.float32, dev), _rand(shapes, torch.float32, dev, positive=True)
    steps = [torch.zeros((), device=dev) for _ in shapes]
    skip, scale, gs = _flag(False, dev), torch.tensor(0.01, device=dev), torch.tensor(0.5, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sq = cuda.grad_sq_norm(g, p)
        torch.ops.fastsam.perturb(p, g, c, scale * sq, skip, True)
        cuda.restore_sgd_step(
            p,
            g,
            c,
            b,
            lr=0.1,
            momentum=0.9,
            dampening=0.0,
            nesterov=False,
            weight_decay=0.0,
            maximize=False,
            first=False,
            grad_scale=gs,
            skip=skip,
        )
        cuda.restore_adam_step(
            p,
            g,
            c,
            m,
            v,
            steps,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled=True,
            maximize=False,
            grad_scale=gs,
            skip=skip,
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture(dev, seed):
    """The ops capture into a CUDA graph; a replay does what an eager step does."""
    shapes = _shapes()
    g = _rand(shapes, torch.float32, dev)
    init = [_rand(shapes, torch.float32, dev) for _ in range(2)]  # params, momentum buffers
    skip, gs = _flag(False, dev), torch.tensor(0.5, device=dev)

    def step(p, c, b):
        sq = cuda.grad_sq_norm(g)
        torch.ops.fastsam.perturb(p, g, c, 0.05 / (sq.sqrt() + 1e-12), skip, False)
        cuda.restore_sgd_step(
            p,
            g,
            c,
            b,
            lr=0.1,
            momentum=0.9,
            dampening=0.0,
            nesterov=False,
            weight_decay=0.0,
            maximize=False,
            first=False,
            grad_scale=gs,
            skip=skip,
        )

    eager_p, eager_b = _clone(init[0]), _clone(init[1])
    step(eager_p, [torch.empty_like(t) for t in eager_p], eager_b)

    p, b = _clone(init[0]), _clone(init[1])
    c = [torch.empty_like(t) for t in p]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(p, c, b)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(p, c, b)
    for dst, src in zip(p + b, init[0] + init[1]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    _close(p, eager_p, (1e-6, 1e-7), "params after replay")
    _close(b, eager_b, (1e-6, 1e-7), "buffers after replay")


def test_huge_tensor_past_int32(dev, seed):
    """A tensor of 2^31 + 5 elements (fp16, 4 GiB per list): 64-bit indexing end to end."""
    n = (1 << 31) + 5
    free, _ = torch.cuda.mem_get_info(dev)
    if free < 4 * n * 2 + (4 << 30):
        pytest.skip(f"needs ~{4 * n * 2 / 2**30 + 4:.0f} GiB free on the GPU")
    p = torch.randn(n, dtype=torch.float16, device=dev)
    g = torch.randn(n, dtype=torch.float16, device=dev)
    c = torch.empty_like(p)
    sq = cuda.grad_sq_norm([g])
    step = 1 << 28
    ref = sum(g[i : i + step].float().square().sum(dtype=torch.float64) for i in range(0, n, step))
    torch.testing.assert_close(sq.double(), ref, rtol=1e-4, atol=0)
    tail = slice(n - 1000, n)
    p_tail = p[tail].clone()
    cuda.perturb([p], [g], [c], _sc(torch.tensor(0.5, device=dev), _flag(False, dev)), 1.0, False)
    assert torch.equal(c[tail], p_tail)
    torch.testing.assert_close(
        p[tail].float(), (p_tail.float() + 0.5 * g[tail].float()).half().float(), rtol=1e-3, atol=1e-3
    )
    buf = torch.zeros_like(p)
    cuda.restore_sgd_step(
        [p],
        [g],
        [c],
        [buf],
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        maximize=False,
        first=True,
        grad_scale=None,
        skip=_flag(False, dev),
    )
    torch.testing.assert_close(buf[tail], g[tail])
    torch.testing.assert_close(p[tail].float(), (p_tail.float() - 0.1 * g[tail].float()), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)), (torch.optim.Adam, dict(lr=1e-3))]
)
def test_fused_sam_cuda_matches_foreach(dev, base, kw, seed):
    def run(backend):
        return train_mlp_with_fused_sam(backend, base, kw, seed, device=dev)

    name, got = run("cuda")
    assert name == "cuda"
    assert run("auto")[0] == "cuda"  # auto prefers the extension when it is built
    _close(got, run("foreach")[1], (1e-4, 1e-5), "params vs foreach")
