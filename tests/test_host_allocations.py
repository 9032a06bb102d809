"""Host-side buffers are created on the CPU whatever ``torch.set_default_device`` says.

A model built under ``with torch.device("cuda"):`` (or a test that sets the default device, as
tests/test_backend_ops.py does for its GPU cases) makes every factory call without a ``device``
allocate on the GPU: the triton backend's pointer tables then cannot be pinned, and numbers
meant for the host (an empty list's zeros, Lanczos coefficients, a schedule's random draw) land
on the device.  On the CPU the same mistake shows with the "meta" default device, whose tensors
hold no data: the tests below run with it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from fastsam import backends

from .conftest import CPU_BACKENDS

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fastsam"
# torch functions that allocate on the default device unless told otherwise
FACTORIES = {
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "range",
    "linspace",
    "logspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "randperm",
    "normal",
    "empty_strided",
    "scalar_tensor",
    "Generator",
}


def test_every_factory_call_in_the_package_names_its_device():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
            ):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: torch.{node.func.attr}(...)")
    assert not missing, "factory calls that follow torch's default device:\n" + "\n".join(missing)


@pytest.fixture
def meta_default():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _cpu(*shapes):
    return [torch.randn(s, device="cpu") for s in shapes]


def test_triton_ops_on_cpu_tensors_under_a_meta_default_device(seed, meta_default):
    """The pointer tables, block maps and step counters of the triton backend (the interpreter here,
    pinned uploads on a GPU) stay on the CPU: each op gives what it gives without the default."""
    if "triton" not in CPU_BACKENDS:
        pytest.skip("the triton interpreter is not among this run's CPU backends")
    from fastsam.backends import foreach
    from fastsam.backends import triton as tb

    shapes = [(5,), (3000,), (0,), (7, 3)]
    params, grads, copies, m = _cpu(*shapes), _cpu(*shapes), _cpu(*shapes), _cpu(*shapes)
    v = [t.abs() for t in _cpu(*shapes)]
    zero = torch.zeros((), device="cpu")
    runs = []
    for mod in (tb, foreach):
        p, c, mm, vv = ([t.clone() for t in ts] for ts in (params, copies, m, v))
        steps = [torch.full((), 2.0, device="cpu") for _ in p]
        out = [mod.grad_sq_norm(grads, p), mod.dot_sq_norms(p, grads)]
        mod.perturb(p, grads, c, torch.tensor([0.0, 0.5], device="cpu"), 0.1, False)
        mod.restore_adam_step(
            p,
            grads,
            c,
            mm,
            vv,
            steps,
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled=False,
            maximize=False,
            grad_scale=None,
            skip=zero,
        )
        mod.axpby(p, grads, torch.tensor([1.0, -0.5, 0.0], device="cpu"))
        runs.append(out + p + c + mm + vv + steps)
    for a, b in zip(*runs):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_empty_lists_give_cpu_zeros_under_a_meta_default_device(name, meta_default):
    """The contract: reductions over empty lists are zeros on the CPU."""
    be = backends.get(name)
    for got in (be.grad_sq_norm([]), be.dot_sq_norms([], [])):
        assert got.device.type == "cpu" and not got.any()


def test_host_side_numbers_stay_on_the_cpu(meta_default):
    """The Hessian tools' coefficient matrices and RandomSwitch's draw are host numbers."""
    from fastsam.hessian.lanczos import tridiagonal
    from fastsam.schedules import RandomSwitch

    T = tridiagonal([1.0, 2.0, 3.0], [0.5, 0.25])
    assert T.device.type == "cpu" and float(torch.linalg.eigvalsh(T).sum()) == pytest.approx(6.0)

    class Opt:
        num_steps = 0

    draws = [RandomSwitch(0.5, seed=3).decide(Opt()) for _ in range(2)]
    assert draws[0] == draws[1]
