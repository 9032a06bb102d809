"""Comparisons of tensor lists shared by the op-level suites."""

import torch


def clone(ts):
    return [t.clone() for t in ts]


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(a_list, b_list):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert torch.equal(bits(a), bits(b))


def assert_close(actual, expected, tol, what=""):
    rtol, atol = tol
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")
