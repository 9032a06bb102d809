"""Small shared helpers: argument checks, random probe vectors, progress bars."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    return float(tol)


def check_dtype(dtype, op) -> torch.dtype:
    """The working dtype of the solver's vectors: the parameter dtype unless given."""
    if dtype is None:
        return op.dtype
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % (2 ** 63))
    return g


def randn(n: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=dtype, device=device)


def rademacher(shape, gen: torch.Generator, dtype, device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=device).to(dtype).mul_(2).sub_(1)


def eps_of(*dtypes) -> float:
    return max(torch.finfo(d).eps for d in dtypes)


class Progress:
    """An optional tqdm bar (only on rank 0); a no-op when disabled or tqdm is missing."""

    def __init__(self, enabled: bool, total: Optional[int], desc: str, rank: int = 0):
        self.bar = None
        if enabled and rank == 0:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is optional
                return
            self.bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int = 1, **postfix):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
