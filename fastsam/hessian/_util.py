"""Small shared helpers: the dtype and callback checks, random probe vectors, progress bars."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Tuple

import torch

from .._checks import ArgumentError

# What the eigen solvers return: (values (k,), vectors (k, n), residuals (k,), converged, steps, shift).
EigsOut = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int, float]
Callback = Callable[[dict], Any]  # callback(info); a True result stops the solver where documented


def check_dtype(dtype: Any) -> Optional[torch.dtype]:
    """The solver's working dtype (``None``: the parameters' dtype, known once the operator exists)."""
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ArgumentError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


def check_callback(callback: Any) -> None:
    if callback is not None and not callable(callback):
        raise ArgumentError(f"callback must be callable as callback(info) or None, got {type(callback).__name__}")


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % (2**63))
    return g


def randn(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=dtype, device=device)


def rademacher(shape: Tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=device).to(dtype).mul_(2).sub_(1)


def eps_of(*dtypes: torch.dtype) -> float:
    return max(torch.finfo(d).eps for d in dtypes)


class Progress:
    """An optional tqdm bar (only on rank 0); a no-op when disabled or tqdm is missing."""

    def __init__(self, enabled: bool, total: Optional[int], desc: str, rank: int = 0) -> None:
        self.bar: Any = None
        if enabled and rank == 0:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is optional
                return
            self.bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> Literal[False]:
        self.close()
        return False
