"""GPU-only checks of the triton backend (skipped without CUDA).

CUDA-graph capture of a whole SAM training step, torch.compile of one, a
tensor over 2**31 elements, the kernels the GPU really runs (torch.profiler),
and no host synchronisation (torch.cuda.set_sync_debug_mode).  The op-level
and launch-count suites (test_backend_ops.py / test_triton_internals.py, test_triton_launches.py) run on
the GPU too when there is one: they pick the device themselves.  The tests that compile with
inductor have "inductor" in their names: benchmarks/gpu_check.sh runs them in a step of their own
(a cold inductor cache takes a while).
"""

import copy

import pytest
import torch

from fastsam import FusedSAM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
KERNELS = (
    "_sq_norm_partials_kernel",
    "_sum_kernel",
    "_perturb_kernel",
    "_restore_kernel",
    "_restore_sgd_step_kernel",
    "_restore_adam_step_kernel",
)


def _sc(scale, skip):
    """The pass's scalars (skip flag, factor) for a perturbation of exactly ``scale`` (rho = 1)."""
    scale = torch.as_tensor(scale)
    return torch.stack([torch.as_tensor(skip).to(device=scale.device, dtype=scale.dtype), scale])


def _model():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).cuda()


def _data():
    return torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")


def _train_step(model, opt, x, y):
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _pair(base):
    cls, kw = BASES[base]
    torch.manual_seed(0)
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), cls, backend="triton", max_grad_norm=5.0, **kw)
    ref_opt = FusedSAM(ref_model.parameters(), cls, backend="triton", max_grad_norm=5.0, **kw)
    assert opt.backend == "triton"
    return model, ref_model, opt, ref_opt


@pytest.mark.parametrize("base", sorted(BASES))
def test_cuda_graph_capture_replays_like_eager(base):
    """Forward, backward and the whole FusedSAM step in one CUDA graph (after eager warm-up steps,
    as torch's capture recipe does); replays give the parameters the eager steps give."""
    model, ref_model, opt, ref_opt = _pair(base)
    x, y = _data()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _train_step(model, opt, x, y)
            _train_step(ref_model, ref_opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the gradients are allocated inside: new addresses, new tables
        _train_step(model, opt, x, y)
    for _ in range(4):
        graph.replay()
        _train_step(ref_model, ref_opt, x, y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_groups,n_tensors", [(4, 3000), (16, 700)], ids=["4x3000", "16x700"])
def test_cuda_graph_capture_of_a_step_over_thousands_of_tensors(n_groups, n_tensors):
    """Every table of a step is new while capturing (the gradients come from the graph's pool): the
    pinned arena reserved by the eager steps holds them all (tests/test_triton_internals.py
    simulates the same on the CPU).  The gradients are slices of one buffer (the backward of a cat),
    so the buckets also mix aligned and unaligned tensors."""
    torch.manual_seed(0)
    groups = [
        [torch.nn.Parameter(torch.randn(1 + (j % 3), device="cuda")) for j in range(n_tensors)] for _ in range(n_groups)
    ]
    twin = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in groups]

    def loss(gs):
        flat = torch.cat([p.reshape(-1) for g in gs for p in g])
        return (flat.sin() * flat).sum()

    def step(gs, opt):
        loss(gs).backward()
        opt.first_step(zero_grad=True)
        loss(gs).backward()
        opt.second_step(zero_grad=True)

    opt, ref = (
        FusedSAM([{"params": g} for g in gs], torch.optim.SGD, lr=0.05, momentum=0.9, backend="triton")
        for gs in (groups, twin)
    )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(groups, opt)
            step(twin, ref)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(groups, opt)
    for _ in range(2):
        graph.replay()
        step(twin, ref)
    torch.cuda.synchronize()
    for g, h in zip(groups, twin):
        for p, q in zip(g, h):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", sorted(BASES))
def test_inductor_compile_of_a_training_step_matches_eager(base):
    model, ref_model, opt, ref_opt = _pair(base)
    x, y = _data()
    torch._dynamo.reset()
    compiled_step = torch.compile(_train_step)
    for _ in range(3):
        compiled_step(model, opt, x, y)
        _train_step(ref_model, ref_opt, x, y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_inductor_compiled_function_calling_the_ops():
    """The torch.library custom ops under inductor (mutable lists, a returned norm)."""
    from fastsam.backends import triton as tb

    shapes = [(1000,), (33, 7), (5,)]
    data = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(3)]

    def update(params, grads, copies, bufs, scale, skip):
        tb.perturb(params, grads, copies, _sc(scale, skip), 1.0, True)
        tb.restore_sgd_step(
            params,
            grads,
            copies,
            bufs,
            lr=0.1,
            momentum=0.9,
            dampening=0.0,
            nesterov=True,
            weight_decay=1e-3,
            maximize=False,
            first=False,
            grad_scale=None,
            skip=skip,
        )
        return tb.grad_sq_norm(grads, params)

    runs = []
    for fn in (update, torch.compile(update)):
        params, grads, bufs = [[t.clone() for t in ts] for ts in data]
        copies = [torch.empty_like(p) for p in params]
        scale, skip = torch.tensor(0.3, device="cuda"), torch.zeros((), device="cuda")
        runs.append((fn(params, grads, copies, bufs, scale, skip), params, bufs))
    (n1, p1, b1), (n2, p2, b2) = runs
    torch.testing.assert_close(n1, n2)
    for a, b in zip(p1 + b1, p2 + b2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("base", sorted(BASES))
def test_steady_state_step_neither_synchronises_nor_copies(base):
    """After a warm-up step: no host synchronisation, no host-to-device copy (the tables are cached),
    and at most 6 kernels on the GPU for first_step + second_step together, counting every kernel
    the profiler sees in the two windows (ours and any torch op's), not only the backend's."""
    model, _, opt, _ = _pair(base)
    x, y = _data()
    for _ in range(2):
        _train_step(model, opt, x, y)

    def profiled(fn):
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    torch.nn.functional.cross_entropy(model(x), y).backward()
    first = profiled(lambda: opt.first_step(zero_grad=True))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    second = profiled(lambda: opt.second_step(zero_grad=True))
    names = first + second
    kernels = [n for n in names if "Memcpy" not in n and "Memset" not in n]
    ours = [n for n in kernels if any(k in n for k in KERNELS)]
    assert len(kernels) <= 6 and len(ours) == len(kernels), (first, second)
    # the grads of the second backward usually reuse the first one's blocks; a miss may upload a table,
    # but the only host-to-device copies allowed are such table uploads (a few KB)
    assert sum("HtoD" in n for n in names) <= 4, names


def test_tensor_over_2_31_elements():
    """One fp16 parameter of 2**31 + 5 elements: int64 offsets (the last chunk starts past 2**31)."""
    from fastsam.backends import triton as tb

    n = 2**31 + 5
    try:
        p = torch.zeros(n, dtype=torch.float16, device="cuda")
        g = torch.zeros(n, dtype=torch.float16, device="cuda")
        c = torch.empty_like(p)
    except torch.OutOfMemoryError:
        pytest.skip("needs ~13 GB of GPU memory")
    tail = slice(n - 7, n)
    g[tail] = torch.arange(1, 8, dtype=torch.float16, device="cuda")
    g[0] = 1.0
    p[tail] = 2.0
    assert tb.grad_sq_norm([g]).item() == 1 + sum(i * i for i in range(1, 8))
    tb.perturb([p], [g], [c], _sc(torch.tensor(0.5, device="cuda"), torch.zeros((), device="cuda")), 1.0, False)
    assert c[tail].tolist() == [2.0] * 7 and c[0].item() == 0.0
    assert p[tail].tolist() == [2.0 + 0.5 * i for i in range(1, 8)] and p[0].item() == 0.5
    tb.restore_sgd_step(
        [p],
        [g],
        [c],
        [],
        lr=1.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        maximize=False,
        first=False,
        grad_scale=None,
        skip=torch.zeros((), device="cuda"),
    )
    assert p[tail].tolist() == [2.0 - i for i in range(1, 8)] and p[0].item() == -1.0
    assert p[1 : n - 7].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ops_match_foreach_on_the_gpu(dtype):
    """Compiled kernels (not the interpreter) against foreach: odd sizes, multi-chunk tensors,
    an unaligned view, every op.  The full matrix runs under the interpreter in test_backend_ops.py /
    test_triton_internals.py."""
    from fastsam.backends import foreach
    from fastsam.backends import triton as tb

    torch.manual_seed(0)
    flat = torch.randn(100_003, device="cuda").to(dtype)
    shapes = [(1,), (7,), (0,), (3, 11, 31), (65537,), (64, 3, 7, 7)]

    def make(scale=1.0):
        return [(torch.randn(s, device="cuda") * scale).to(dtype) for s in shapes] + [flat[3:50_000].clone()[1:]]

    params, grads, copies, bufs, exp_avgs = make(), make(), make(), make(), make()
    exp_avg_sqs = [v.abs() for v in make()]
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}[dtype]
    zero, scale = torch.zeros((), device="cuda"), torch.tensor(0.3, device="cuda")

    def close(a, b):
        top = max(t.double().abs().max().item() for t in b if t.numel())
        for x, y in zip(a, b):
            assert (x.double() - y.double()).abs().max().item() <= tol * top if x.numel() else True

    for weighted in (False, True):
        got = tb.grad_sq_norm(grads, params if weighted else None).item()
        want = foreach.grad_sq_norm(grads, params if weighted else None).item()
        assert abs(got - want) <= 1e-2 * want

    runs = []
    for mod in (tb, foreach):
        p, c, b, m, v = ([t.clone() for t in ts] for ts in (params, copies, bufs, exp_avgs, exp_avg_sqs))
        steps = [torch.full((), 4.0, device="cuda") for _ in p]
        mod.perturb(p, grads, c, _sc(scale, zero), 1.0, True)
        mod.restore_sgd_step(
            p,
            grads,
            c,
            b,
            lr=0.1,
            momentum=0.9,
            dampening=0.1,
            nesterov=False,
            weight_decay=1e-3,
            maximize=False,
            first=False,
            grad_scale=scale,
            skip=zero,
        )
        p2 = [t.clone() for t in p]
        mod.restore_adam_step(
            p2,
            grads,
            p,
            m,
            v,
            steps,
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8 if dtype == torch.float32 else 1e-3,
            weight_decay=1e-2,
            decoupled=True,
            maximize=False,
            grad_scale=None,
            skip=zero,
        )
        runs.append((p, b, p2, m, v, steps))
    for got, want in zip(*runs):
        close(got, want)
