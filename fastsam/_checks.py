"""The one set of argument checks behind every public setting in fastsam.

A setting is checked wherever it enters: a constructor, ``load_state_dict``,
``add_param_group``, a public setter, or (for values users edit in place, such
as a param group's ``rho``) the next step.  Every check accepts Python, NumPy
and 0-d tensor scalars alike, returns the plain Python value the code stores,
and raises an error whose message names the argument (and, for a value read
from the environment, the variable).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Optional, Sequence, overload

import torch

__all__ = ["real", "integer", "flag", "choice", "ArgumentError"]


class ArgumentError(ValueError):
    """A setting outside its type or range; a ValueError, as torch.optim raises for bad hyperparameters."""


def _scalar(value: Any) -> Any:
    """A 0-d (or one-element) tensor or a NumPy scalar as the Python number it holds; anything else as is."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex():
            return value  # refused by the caller, with the shape in the message
        return value.item()
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return item()
    return value


def _where(name: str, env: Optional[str]) -> str:
    return f"{name} (from the environment variable {env})" if env else name


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


@overload
def real(
    name: str,
    value: Any,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
    none: Literal[False] = False,
    env: Optional[str] = None,
) -> float: ...
@overload
def real(
    name: str,
    value: Any,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
    none: bool,
    env: Optional[str] = None,
) -> Optional[float]: ...
def real(
    name: str,
    value: Any,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
    none: bool = False,
    env: Optional[str] = None,
) -> Optional[float]:
    """``value`` as a finite Python float in [lo, hi] (open ends where asked); ``None`` passes when ``none``."""
    if value is None and none:
        return None
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ArgumentError(
            f"{_where(name, env)} must be a finite real number{_range(lo, hi, lo_open, hi_open)}"
            f"{' or None' if none else ''}, got {_describe(value)}"
        )
    v = float(v)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
        raise ArgumentError(f"{_where(name, env)} must be{_range(lo, hi, lo_open, hi_open)}, got {v!r}")
    return v


@overload
def integer(
    name: str,
    value: Any,
    *,
    lo: Optional[int] = None,
    hi: Optional[int] = None,
    none: Literal[False] = False,
    env: Optional[str] = None,
) -> int: ...
@overload
def integer(
    name: str, value: Any, *, lo: Optional[int] = None, hi: Optional[int] = None, none: bool, env: Optional[str] = None
) -> Optional[int]: ...
def integer(
    name: str,
    value: Any,
    *,
    lo: Optional[int] = None,
    hi: Optional[int] = None,
    none: bool = False,
    env: Optional[str] = None,
) -> Optional[int]:
    """``value`` as a Python int in [lo, hi]: integral numbers only (``2.0`` and ``True`` are refused)."""
    if value is None and none:
        return None
    if torch.is_tensor(value) and (value.is_floating_point() or value.dtype == torch.bool):
        v: Any = value  # a float or bool tensor is not an integer
    else:
        v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ArgumentError(
            f"{_where(name, env)} must be an integer{_range(lo, hi, False, False)}"
            f"{' or None' if none else ''}, got {_describe(value)}"
        )
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ArgumentError(f"{_where(name, env)} must be an integer{_range(lo, hi, False, False)}, got {v!r}")
    return v


@overload
def flag(name: str, value: Any, *, none: Literal[False] = False) -> bool: ...
@overload
def flag(name: str, value: Any, *, none: bool) -> Optional[bool]: ...
def flag(name: str, value: Any, *, none: bool = False) -> Optional[bool]:
    """``value`` as a Python bool: ``True``/``False``, NumPy bools and one-element bool tensors only.

    Truthiness is not enough: ``adaptive="False"`` would switch ASAM on."""
    if value is None and none:
        return None
    if torch.is_tensor(value):
        if value.dtype != torch.bool or value.numel() != 1:
            raise ArgumentError(f"{name} must be a bool{' or None' if none else ''}, got {_describe(value)}")
        return bool(value.item())
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise ArgumentError(f"{name} must be a bool{' or None' if none else ''}, got {_describe(value)}")


@overload
def choice(
    name: str, value: Any, options: Sequence[str], *, env: Optional[str] = None, none: Literal[False] = False
) -> str: ...
@overload
def choice(
    name: str, value: Any, options: Sequence[str], *, env: Optional[str] = None, none: bool
) -> Optional[str]: ...
def choice(
    name: str, value: Any, options: Sequence[str], *, env: Optional[str] = None, none: bool = False
) -> Optional[str]:
    """``value`` if it is one of ``options`` (strings); ``None`` passes when ``none``."""
    if value is None and none:
        return None
    if not isinstance(value, str) or value not in options:
        raise ArgumentError(
            f"{_where(name, env)} must be one of {', '.join(map(repr, options))}"
            f"{' or None' if none else ''}, got {value!r}"
        )
    return value


def _range(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    if lo is None and hi is None:
        return ""
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    return f" {'<' if hi_open else '<='} {hi:g}"
