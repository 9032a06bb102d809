"""The cpp backend's code paths (csrc/sam_cpu.cpp): its element loops are compiled for SSE2, AVX2
and AVX-512 and chosen at run time, and large write-only lists are written with streaming stores.

Every path must give the bits of every other: each op, dtype and option runs on every instruction
set this CPU has, with and without streaming stores, against the base loops without streaming
(tests/test_backend_ops.py checks the default path against float64 references).  Odd sizes and
misaligned views exercise the blocks' tails and the stores' alignment; more than 65,536 elements
take two threads.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastsam.backends import cpp

from .tensor_lists import assert_bitwise, clone

AVAILABLE, WHY = cpp.is_available(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"cpp backend unavailable: {WHY}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NEVER = 1 << 62  # streaming threshold in bytes: never stream
SIZES = [1, 17, 1023, 1025, 32768 + 5, 70001]


ISAS = cpp.instruction_sets() if AVAILABLE else []


@contextlib.contextmanager
def code_path(isa, stream_bytes):
    before = cpp.code_path()
    threshold = int(before.rsplit(">= ", 1)[1].split()[0])
    torch.ops.fastsam.cpu_kernels(isa, stream_bytes)
    try:
        yield
    finally:
        torch.ops.fastsam.cpu_kernels(before.split(";")[0], threshold)


def _lists(dtype, n_lists, positive=False):
    """n_lists lists of tensors of SIZES elements, each a view one element into its storage (so that
    no list starts on a vector boundary)."""
    out = []
    for _ in range(n_lists):
        ts = []
        for n in SIZES:
            t = torch.randn(n + 1, dtype=torch.float64)
            t = t.abs() + 0.1 if positive else t
            ts.append(t.to(dtype)[1:])
        out.append(ts)
    return out


def _run_everywhere(fn, *lists):
    """fn(*clones of lists) on every path; asserts every path's outputs (the lists, and the returned
    tensors) bitwise equal to the base loops' without streaming stores."""
    results = {}
    for isa in ISAS:
        for stream in (NEVER, 0):
            with code_path(isa, stream):
                args = [clone(ls) for ls in lists]
                ret = fn(*args)
                results[(isa, stream)] = [t for ls in args for t in ls] + ([] if ret is None else [ret])
    ref = results[("base", NEVER)]
    for key, got in results.items():
        assert_bitwise(got, ref), key


def test_code_path_is_reported_and_settable():
    path = cpp.code_path()
    assert path.split(";")[0] in ("base", "avx2", "avx512", "avx512-zen4") and "streaming" in path
    assert "base" in ISAS
    with pytest.raises((RuntimeError, ValueError), match="isa must be"):
        torch.ops.fastsam.cpu_kernels("sse9", -1)
    with code_path("base", 123):
        assert cpp.code_path().startswith("base; streaming stores for write-only lists of >= 123 bytes")
    assert cpp.code_path() == path


def _cpu_info():
    """(vendor_id, cpu family) from /proc/cpuinfo, or None."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    if "vendor_id" not in info or "cpu family" not in info:
        return None
    return info["vendor_id"], int(info["cpu family"])


ZEN4_NOTE = "float32's norm, perturbation, restore + SGD and restore + Adam on the avx2 loops"


def test_zen4_path_runs_where_avx512_does_and_is_autos_choice_on_zen4():
    """avx512-zen4 (the AVX-512 loops, float32's norm, perturbation, restore + SGD and restore + Adam
    on the AVX2 loops) runs wherever avx512 does, says so in the code path, and `auto` takes it on AMD family
    19h (Zen 4) only; its bits are checked against the base loops with every other path's
    (_run_everywhere)."""
    assert ("avx512-zen4" in ISAS) == ("avx512" in ISAS)
    if "avx512" not in ISAS:
        with pytest.raises((RuntimeError, ValueError), match="does not run avx512-zen4"):
            torch.ops.fastsam.cpu_kernels("avx512-zen4", -1)
        return
    with code_path("avx512-zen4", -1):
        assert ZEN4_NOTE in cpp.code_path()
    with code_path("avx512", -1):
        assert ZEN4_NOTE not in cpp.code_path()
    info = _cpu_info()
    if info is None or os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("needs /proc/cpuinfo's vendor and family, and no ATEN_CPU_CAPABILITY cap")
    with code_path("auto", -1):
        auto = cpp.code_path().split(";")[0]
    assert auto == ("avx512-zen4" if info == ("AuthenticAMD", 25) else "avx512")


@pytest.mark.parametrize("cap", ["default", "avx2"])
def test_aten_cpu_capability_caps_the_choice(cap):
    """ATEN_CPU_CAPABILITY (torch's own switch) caps the path, in a fresh process: default gives the
    base loops, avx2 the AVX2 loops where the CPU has them (never avx512-zen4)."""
    code = (
        "import torch; from fastsam.backends import cpp; "
        "assert cpp.is_available(torch.device('cpu'))[0]; print(cpp.code_path())"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want = "avx2" if cap == "avx2" and "avx2" in ISAS else "base"
    assert out.stdout.strip().startswith(want + ";")


def _with_edge_values(ts, dtype):
    """ts with about one element in eight replaced by an edge value: +-0, +-inf, NaN, subnormals,
    the dtype's largest and smallest normal numbers."""
    fi = torch.finfo(dtype)
    edges = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, fi.tiny / 3, -fi.tiny / 5, fi.tiny, fi.max, -fi.max],
        dtype=dtype,
    )
    gen = torch.Generator().manual_seed(1234)
    out = []
    for t in ts:
        t = t.clone()
        pick = torch.randint(0, 8, t.shape, generator=gen) == 0
        t[pick] = edges[torch.randint(0, len(edges), (int(pick.sum()),), generator=gen)]
        out.append(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("factor", [0.37, 2.0**-135])
def test_perturb_of_edge_values(dtype, adaptive, factor):
    """The 4- and 8-byte perturbation on every path, streamed or not, on lists holding infinities,
    NaNs, signed zeros and subnormals, with a scale inside float's range and one beyond it (two-part
    scale): the base loops' bits (the streamed register loop included)."""
    p, g, c = _lists(dtype, 3)
    p, g = _with_edge_values(p, dtype), _with_edge_values(g, dtype)
    scalars = torch.tensor([0.0, factor], dtype=torch.float64)
    _run_everywhere(lambda p, g, c: cpp.perturb(p, g, c, scalars, 0.05, adaptive), p, g, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_and_perturb(seed, dtype, adaptive):
    p, g, c = _lists(dtype, 3)
    _run_everywhere(lambda g, p: cpp.grad_sq_norm(g, p if adaptive else None), g, p)
    scalars = torch.tensor([0.0, 0.37], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    _run_everywhere(lambda p, g, c: cpp.perturb(p, g, c, scalars, 0.05, adaptive), p, g, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "momentum,dampening,nesterov,weight_decay,first",
    [
        (0.0, 0.0, False, 0.0, False),
        (0.9, 0.0, False, 0.0, False),  # torch's defaults: the loops where 1 - dampening is the constant 1
        (0.9, 0.1, False, 5e-4, False),
        (0.9, 0.0, True, 1e-2, False),
        (0.9, 0.1, False, 0.0, True),
    ],
)
@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize("grad_scale", [0.75, 2.0**-130])  # 2^-130: below float's normal range, a two-part scale
def test_restore_sgd_step(seed, dtype, momentum, dampening, nesterov, weight_decay, first, restore, grad_scale):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gs = torch.tensor(grad_scale, dtype=acc)
    skip = torch.tensor(0.0, dtype=acc)

    def step(p, g, c, b):
        cpp.restore_sgd_step(
            p,
            g,
            c if restore else [],
            b if momentum else [],
            lr=0.1,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=False,
            first=first,
            grad_scale=gs,
            skip=skip,
        )

    _run_everywhere(step, *_lists(dtype, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, False), (1e-2, False), (1e-2, True)])
def test_restore_adam_step(seed, dtype, weight_decay, decoupled):
    p, g, c, m = _lists(dtype, 4)
    (v,) = _lists(dtype, 1, positive=True)
    steps = [torch.tensor(3.0) for _ in SIZES]
    skip = torch.tensor(0.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def step(p, g, c, m, v, s):
        cpp.restore_adam_step(
            p,
            g,
            c,
            m,
            v,
            s,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=weight_decay,
            decoupled=decoupled,
            maximize=True,
            grad_scale=None,
            skip=skip,
        )

    _run_everywhere(step, p, g, c, m, v, steps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_and_variant_ops(seed, dtype):
    x, y, out = _lists(dtype, 3)
    _run_everywhere(lambda p, c: cpp.restore(p, c), x, y)
    _run_everywhere(lambda x, y: cpp.dot_sq_norms(x, y), x, y)
    coefs = torch.tensor([0.3, -1.7, 0.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    _run_everywhere(lambda x, y, o: cpp.axpby(x, y, coefs, out=o), x, y, out)
    _run_everywhere(lambda x, y: cpp.axpby(x, y, coefs), x, y)


def _c10_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """c10::BFloat16(float)'s bits (round to nearest even; NaN -> 0x7FC0), from float32 ``x``."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(x), torch.full_like(rounded, 0x7FC0), rounded)


# (x bits, y bits, a, b): a * x + b * y is exact in float32 (a, b powers of two, or one product a
# small correction of the other), and its bf16 rounding is the case named.
BF16_CASES = [
    (0x3F80, 0x3B80, 1.0, 1.0),  # 1 + 2^-8: halfway, even below -> down
    (0x3F81, 0x3B80, 1.0, 1.0),  # (1 + 2^-7) + 2^-8: halfway, odd below -> up
    (0x3F80, 0x3B81, 1.0, 1.0),  # just above halfway -> up
    (0x3F80, 0x3B7F, 1.0, 1.0),  # just below halfway -> down
    (0x7F7F, 0x7B00, 1.0, 1.0),  # largest finite + half its ulp: halfway, odd -> inf
    (0x7F7F, 0x7A80, 1.0, 1.0),  # largest finite + a quarter ulp -> stays finite
    (0x0080, 0x0000, 2.0**-8, 0.0),  # 2^-134, a float32 subnormal: halfway, even -> 0
    (0x00C0, 0x0000, 2.0**-7, 0.0),  # 1.5 * 2^-133: above halfway -> smallest bf16 subnormal
    (0x8000, 0x0000, 1.0, 1.0),  # -0 + 0
    (0xFFC1, 0x0000, 1.0, 1.0),  # a negative NaN with a payload -> c10's 0x7FC0
    (0x7F80, 0x3F80, 1.0, 1.0),  # inf
    (0xFF80, 0x3F80, 1.0, 1.0),  # -inf
]


@pytest.mark.parametrize("at_end", [False, True])
def test_bf16_stores_round_as_c10(at_end):
    """The vectorised bf16 store gives c10::BFloat16's bits: ties to even, the largest finite value
    rounding to inf, float32 subnormals, signed zero, NaN; in the vector body and in the scalar tail."""
    _store_cases(torch.bfloat16, BF16_CASES, _c10_bf16_bits, at_end)


# (x bits, y bits, a, b) in fp16, as BF16_CASES.
F16_CASES = [
    (0x3C00, 0x1000, 1.0, 1.0),  # 1 + 2^-11: halfway, even below -> down
    (0x3C01, 0x1000, 1.0, 1.0),  # (1 + 2^-10) + 2^-11: halfway, odd below -> up
    (0x7BFF, 0x4C00, 1.0, 1.0),  # 65504 + 16: halfway to 65536, odd -> inf
    (0x7BFF, 0x4BFF, 1.0, 1.0),  # 65504 + 15.99: stays finite
    (0x0001, 0x0000, 1.5, 0.0),  # 1.5 units of 2^-24: halfway -> 2 units (even)
    (0x0001, 0x0000, 2.5, 0.0),  # 2.5 units: halfway -> 2 units (even)
    (0x0001, 0x0000, 0.5, 0.0),  # half a unit: halfway -> 0
    (0x03FF, 0x0001, 1.0, 1.0),  # the largest subnormal + a unit: the smallest normal
]


def _store_cases(dtype, cases, want_bits, at_end):
    pad = [0x3C00 if dtype == torch.float16 else 0x3F80] * 37
    for a, b in sorted({(a, b) for _, _, a, b in cases}):
        sub = [c for c in cases if (c[2], c[3]) == (a, b)]
        xb, yb = [c[0] for c in sub], [c[1] for c in sub]
        x = torch.tensor(pad + xb if at_end else xb + pad, dtype=torch.int64).to(torch.int16).view(dtype)
        y = torch.tensor(pad + yb if at_end else yb + pad, dtype=torch.int64).to(torch.int16).view(dtype)
        want = want_bits(a * x.float() + b * y.float())
        for isa in ISAS:
            with code_path(isa, NEVER):
                out = [torch.empty_like(x)]
                cpp.axpby([x], [y], torch.tensor([a, b, 0.0]), out=out)
                assert torch.equal(out[0].view(torch.int16).to(torch.int64) & 0xFFFF, want), (isa, a, b)


def _c10_half_bits(x: torch.Tensor) -> torch.Tensor:
    """c10::Half(float)'s bits: IEEE round to nearest even (torch's conversion), NaN -> sign | 0x7E00."""
    bits = x.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    sign = (x.view(torch.int32).to(torch.int64) >> 16) & 0x8000
    return torch.where(torch.isnan(x), sign | 0x7E00, bits)


@pytest.mark.parametrize("at_end", [False, True])
def test_f16_stores_round_as_c10(at_end):
    _store_cases(torch.float16, F16_CASES, _c10_half_bits, at_end)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16bit_value_loads_and_stores_back(dtype):
    """All 65,536 bit patterns through a load and a store (axpby x + (-0) * 0, which is x for every x,
    -0 included): every value comes back bit for bit (subnormals, infinities, signed zeros), NaNs as
    c10's: sign | 0x7E00 for fp16, 0x7FC0 for bf16."""
    x = torch.arange(1 << 16, dtype=torch.int64).to(torch.int16).view(dtype)
    y = torch.zeros_like(x)
    u = torch.arange(1 << 16, dtype=torch.int64)
    nan = torch.isnan(x.float())
    want = torch.where(nan, (u & 0x8000) | 0x7E00 if dtype == torch.float16 else torch.full_like(u, 0x7FC0), u)
    for isa in ISAS:
        with code_path(isa, NEVER):
            out = [torch.empty_like(x)]
            cpp.axpby([x], [y], torch.tensor([1.0, -0.0, 0.0]), out=out)
            assert torch.equal(out[0].view(torch.int16).to(torch.int64) & 0xFFFF, want), isa


def _chunk_sq_norm(g, w=None):
    """One chunk's sum as the CPU twin defines it (csrc/sam_cpu_loops.h: sq_norm): float terms in
    16 lanes, each lane summed in element order, then the tail, then tail + lanes in double."""
    v = g.float().numpy()
    if w is not None:
        v = np.abs(w.float().numpy()) * v
    full = len(v) // 16 * 16
    lanes = np.zeros(16, dtype=np.float32)
    for row in v[:full].reshape(-1, 16):
        lanes = lanes + row * row
    tail = np.float32(0)
    for x in v[full:]:
        tail = np.float32(tail + x * x)
    total = float(tail)
    for x in lanes:
        total += float(x)
    return total


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_keeps_each_chunks_summation_order(threads, dtype, adaptive):
    # The norm reads several chunks at once (sq_norm_group); each chunk's partial, and their
    # fixed-order sum, must still be the one-chunk-at-a-time loop's, to the bit.
    chunk = 32768
    gen = torch.Generator().manual_seed(7)
    sizes = [2 * chunk + 17, 5, chunk, 1, 100, chunk + 16, 3 * chunk]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    expected = 0.0
    for g, p in zip(grads, params):
        for b in range(0, g.numel(), chunk):
            expected += _chunk_sq_norm(g[b : b + chunk], p[b : b + chunk] if adaptive else None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for isa in ISAS:
            with code_path(isa, NEVER):
                got = cpp.grad_sq_norm(grads, params if adaptive else None)
                assert got.dtype == torch.float64
                assert got.item() == expected, (isa, got.item(), expected)
    finally:
        torch.set_num_threads(before)


def _bf16(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int16).view(torch.bfloat16)


def _bits(t):
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


def _bf16_sum_cases(layout):
    """BF16_CASES' x and y whose sum is the case (a = b = 1), then 37 ones, as bf16; c10's bits of
    x + y; and how a test hands a tensor to an op: whole ("registers": the register loop on AVX2
    and AVX-512) or as one-element tensors ("scalar": the scalar loop)."""
    sub = [c for c in BF16_CASES if (c[2], c[3]) == (1.0, 1.0)]
    pad = [0x3F80] * 37
    x, y = _bf16([c[0] for c in sub] + pad), _bf16([c[1] for c in sub] + pad)
    split = (lambda t: [t]) if layout == "registers" else (lambda t: list(t.clone().split(1)))
    return x, y, _c10_bf16_bits(x.float() + y.float()), split


@pytest.mark.parametrize("stream", [NEVER, 0])
@pytest.mark.parametrize("layout", ["registers", "scalar"])
def test_bf16_sgd_update_rounds_as_c10(layout, stream):
    """The SGD update's bfloat16 loads, in-register rounding of the momentum buffer and stores give
    c10::BFloat16's bits for ties, overflow, subnormals and NaN, in the register loop (AVX2 and
    AVX-512: the cases and a padding of 37 ones in one tensor) and in the scalar one (one-element
    tensors), with and without streaming stores (the NaNs a run of turns stored become c10's 0x7FC0
    after them, read back from what the streaming stores wrote): with momentum 1, no dampening and
    c = 0, buf <- bf16(buf + g), w <- 0 + (-lr) * buf, lr = -1."""
    x, y, want, split = _bf16_sum_cases(layout)
    for isa in ISAS:
        with code_path(isa, stream):
            p, buf = split(torch.empty_like(x)), split(x.clone())
            cpp.restore_sgd_step(
                p,
                split(y.clone()),
                split(torch.zeros_like(x)),
                buf,
                lr=-1.0,
                momentum=1.0,
                dampening=0.0,
                nesterov=False,
                weight_decay=0.0,
                maximize=False,
                first=False,
                grad_scale=None,
                skip=torch.tensor(0.0),
            )
            for got in (torch.cat(buf), torch.cat(p)):
                assert torch.equal(_bits(got), want), isa


@pytest.mark.parametrize("stream", [NEVER, 0])
@pytest.mark.parametrize("layout", ["registers", "scalar"])
def test_bf16_perturbation_rounds_as_c10(layout, stream):
    """The perturbation's bfloat16 stores give c10::BFloat16's bits for ties, overflow, subnormals
    and NaN (the turns round without the NaN select; the NaNs a run of turns stored become 0x7FC0
    after them), with and without streaming stores, in the register loop and in the scalar one;
    the restore copy is the parameters' bits: p <- bf16(p + 1 * g), c <- p."""
    x, y, want, split = _bf16_sum_cases(layout)
    for isa in ISAS:
        with code_path(isa, stream):
            p, c = split(x.clone()), split(torch.full_like(x, 7.0))
            cpp.perturb(p, split(y.clone()), c, torch.tensor([0.0, 1.0]), 1.0, False)
            assert torch.equal(_bits(torch.cat(p)), want), isa
            assert torch.equal(_bits(torch.cat(c)), _bits(x)), isa


def _nan_with_payload(low_bits: int) -> float:
    """A float64 NaN that becomes the float32 NaN 0x7F800000 | low_bits (the top 23 of its 52
    payload bits are float32's), as the ops convert their scalars."""
    (value,) = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000000 | (low_bits << 29)))
    return value


@pytest.mark.parametrize("stream", [NEVER, 0])
@pytest.mark.parametrize("adaptive", [False, True])
def test_bf16_perturbation_with_a_nan_scale_payload(adaptive, stream):
    """A NaN scale whose payload fills the float's low half (0x7FFFFFFF): rounded without the NaN
    select, p + scale * g would round to a zero (0x7FFFFFFF + 0x8000 wraps), so the register loops
    must not take it.  Every instruction set gives c10's NaN 0x7FC0 in every parameter, and the
    restore copy holds the parameters' bits."""
    nan = _nan_with_payload(0x7FFFFF)
    gen = torch.Generator().manual_seed(6)
    w, g = (torch.randn(1000, generator=gen).to(torch.bfloat16) for _ in range(2))
    for isa in ISAS:
        with code_path(isa, stream):
            p, c = [w.clone()], [torch.empty_like(w)]
            cpp.perturb(p, [g.clone()], c, torch.tensor([0.0, nan], dtype=torch.float64), 1.0, adaptive)
            assert torch.equal(_bits(p[0]), torch.full_like(_bits(p[0]), 0x7FC0)), isa
            assert torch.equal(_bits(c[0]), _bits(w)), isa


@pytest.mark.parametrize("stream", [NEVER, 0])
@pytest.mark.parametrize("scalar", ["momentum", "lr", "dampening", "weight_decay", "grad_scale", "maximize"])
def test_bf16_sgd_update_with_a_nan_scalar_payload(scalar, stream):
    """A NaN scalar whose payload fills the float's low half (0x7FFFFFFF; negated, 0xFFFFFFFF, for
    the gradient's scale under ``maximize``): the register loops round without the NaN select
    only where no NaN can lose its NaN-ness, and this one would round to a zero (the momentum
    buffer would hold a zero and the parameters their old values).  For every switch of the
    update, restoring from copies (streamed when ``stream`` is 0): every instruction set gives
    the base loops' bits, and the parameters and the buffer are c10's NaN 0x7FC0 wherever the NaN
    reaches them, numbers elsewhere."""
    nan = _nan_with_payload(0x7FFFFF)
    assert struct.unpack("<I", struct.pack("<f", nan))[0] == 0x7FFFFFFF
    gen = torch.Generator().manual_seed(5)
    n = 1000
    w, g, b = (torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(3))
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, maximize=scalar == "maximize")
    if scalar in kwargs:
        kwargs[scalar] = nan
    grad_scale = torch.tensor(nan) if scalar in ("grad_scale", "maximize") else None
    for nesterov, first in [(False, False), (True, False), (False, True)]:
        if nesterov and scalar == "dampening":
            continue  # torch's SGD: nesterov needs zero dampening
        got = {}
        for isa in ISAS:
            with code_path(isa, stream):
                p, buf = [torch.empty_like(w)], [b.clone()]
                cpp.restore_sgd_step(
                    p,
                    [g.clone()],
                    [w.clone()],
                    buf,
                    nesterov=nesterov,
                    first=first,
                    grad_scale=grad_scale,
                    skip=torch.tensor(0.0),
                    **kwargs,
                )
                got[isa] = (_bits(p[0]), _bits(buf[0]))
        for isa, (p_bits, buf_bits) in got.items():
            assert torch.equal(p_bits, got["base"][0]), (isa, nesterov, first)
            assert torch.equal(buf_bits, got["base"][1]), (isa, nesterov, first)
        # torch's first step takes the buffer as the gradient: no momentum, no dampening in it
        unused = first and scalar in ("momentum", "dampening")
        reaches_p, reaches_buf = not unused or (nesterov and scalar == "momentum"), not unused and scalar != "lr"
        for bits, reached in ((got["base"][0], reaches_p), (got["base"][1], reaches_buf)):
            if reached:
                assert torch.equal(bits, torch.full_like(bits, 0x7FC0)), (nesterov, first)
            else:
                assert not torch.isnan(bits.to(torch.int16).view(torch.bfloat16)).any(), (nesterov, first)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("values", ["randn", "edges"])
def test_bf16_norm_of_whole_chunk_groups(threads, adaptive, values):
    """Lists of 1 to 7 whole chunks, so that the bf16 norm's groups hold 1, 2, 3 and 4 chunks with a
    whole turn each (sq_norm_group's lockstep registers on AVX2 and AVX-512): every instruction set
    gives the base loops' bits, and NumPy's lanes' (one chunk at a time); "edges" adds -0, bf16
    subnormals, negative weights and squares beyond float's range (the rescaled pass)."""
    chunk = 32768
    gen = torch.Generator().manual_seed(11)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in range(1, 8):
            g = torch.randn(k * chunk, generator=gen)
            w = torch.randn(k * chunk, generator=gen)
            if values == "edges":
                g[::97] = -0.0
                g[5::101] = 1e-39
                g[7::4099] = 1e30
                w[3::89] = -0.0
                w[11::89] = -3.0
            g, w = g.to(torch.bfloat16), w.to(torch.bfloat16)
            got = {}
            for isa in ISAS:
                with code_path(isa, NEVER):
                    got[isa] = cpp.grad_sq_norm([g], [w] if adaptive else None).item()
            assert all(v == got["base"] for v in got.values()), (k, got)
            exact = float(((w.double().abs() * g.double()) if adaptive else g.double()).square().sum())
            assert got["base"] == pytest.approx(exact, rel=1e-4), k
            if values == "randn":
                expected = 0.0
                for b in range(0, k * chunk, chunk):
                    expected += _chunk_sq_norm(g[b : b + chunk], w[b : b + chunk] if adaptive else None)
                assert got["base"] == expected, k
    finally:
        torch.set_num_threads(before)


def test_weight_decay_below_float_range_is_taken_as_torch_does():
    """torch tests weight_decay != 0 in double and adds weight_decay * w in float: a decay that rounds
    to 0 in float still turns an infinite weight's update into NaN (0 * inf), on every path."""
    p = torch.tensor([1.0, float("inf"), -2.0] * 11)
    g = torch.randn(33, generator=torch.Generator().manual_seed(3))
    ref = p.clone().requires_grad_()
    ref.grad = g.clone()
    torch.optim.SGD([ref], lr=0.1, weight_decay=1e-50, foreach=False).step()
    assert ref.isnan().sum() == 11
    for isa in ISAS:
        with code_path(isa, NEVER):
            got = p.clone()
            cpp.restore_sgd_step(
                [got],
                [g.clone()],
                [],
                [],
                lr=0.1,
                momentum=0.0,
                dampening=0.0,
                nesterov=False,
                weight_decay=1e-50,
                maximize=False,
                first=False,
                grad_scale=None,
                skip=torch.tensor(0.0),
            )
        torch.testing.assert_close(got, ref.detach(), rtol=0, atol=0, equal_nan=True, msg=isa)
