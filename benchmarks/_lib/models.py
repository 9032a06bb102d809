"""The benchmark models: CIFAR-style ResNet-18 and WRN-16-8 (32x32), a small CNN for 8x8 digits, the
CNN of the MNIST-5k / digits science runs (``MnistCNN``), and torchvision/timm ResNet-50 and ViT-B/16
(224x224) when those packages are importable.

``build(name, width_div=1)`` returns ``(model, input_shape, num_classes)``; ``width_div`` divides
every channel count (the CPU defaults use 4 so that a run finishes in minutes on two cores).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- ResNet-18 (CIFAR)
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 used in the SAM literature (3x3 stem, no max-pool; 11.2M params at width 64)."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ----------------------------------------------------------------------------- WRN-16-8
class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis, 2016), no dropout."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs; WRN-16-8 (depth 16, k 8) has 11.0M params at full width."""

    def __init__(self, depth: int = 16, widen: int = 8, num_classes: int = 10, width_div: int = 1):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [max(1, 16 // width_div)] + [max(1, 16 * m * widen // width_div) for m in (1, 2, 4)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for i, stride in enumerate((1, 2, 2)):
            for j in range(n):
                blocks.append(WideBlock(c_in, widths[i + 1], stride if j == 0 else 1))
                c_in = widths[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ----------------------------------------------------------------------------- digits CNN
class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers for 1x8x8 images (scikit-learn's digits); 57k params."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.linear = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(self.features(x), 1))


class MnistCNN(nn.Module):
    """conv-BN-ReLU x3 (widths w, 2w, 4w), two 2x2 max-pools, global average pool, linear.
    Inputs are raw pixels in [0, 1]; the first op normalises with the training mean/std."""

    def __init__(
        self, width: int = 16, num_classes: int = 10, in_channels: int = 1, mean: float = 0.0, std: float = 1.0
    ):
        super().__init__()
        w = width
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(self.features((x - self.mean) / self.std), 1))


class MLP(nn.Module):
    """Two hidden layers (Linear-BN-ReLU) of ``hidden`` units on the flattened image; raw pixels in,
    normalised inside. Unlike MnistCNN it memorises noisy MNIST-5k labels within 20 epochs."""

    def __init__(
        self, in_features: int = 784, hidden: int = 256, num_classes: int = 10, mean: float = 0.0, std: float = 1.0
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class Normalized(nn.Module):
    """A model behind a per-channel normalisation, so that it takes [0, 1] pixels."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


# ----------------------------------------------------------------------------- registry
CIFAR_MODELS = ("resnet18", "wrn16_8")
IMAGENET_MODELS = ("resnet50", "vit_b_16")


def imagenet_available(name: str) -> Tuple[bool, str]:
    """Whether torchvision (or timm) can build ``name``; the string says why not."""
    try:
        import torchvision  # noqa: F401

        return True, "torchvision"
    except ImportError:
        pass
    try:
        import timm  # noqa: F401

        return True, "timm"
    except ImportError:
        return False, f"{name} needs torchvision or timm (pip install torchvision)"


def build(name: str, width_div: int = 1, num_classes: int = None) -> Tuple[nn.Module, Tuple[int, ...], int]:
    """``(model, input_shape CxHxW, num_classes)`` for a model name."""
    if name == "resnet18":
        nc = num_classes or 10
        return ResNet18(nc, width=max(1, 64 // width_div)), (3, 32, 32), nc
    if name == "wrn16_8":
        nc = num_classes or 10
        return WideResNet(16, 8, nc, width_div=width_div), (3, 32, 32), nc
    if name == "small_cnn":
        nc = num_classes or 10
        return SmallCNN(nc, width=max(1, 32 // width_div)), (1, 8, 8), nc
    if name in IMAGENET_MODELS:
        nc = num_classes or 1000
        ok, lib = imagenet_available(name)
        if not ok:
            raise ImportError(lib)
        if lib == "torchvision":
            import torchvision.models as tvm

            return getattr(tvm, name)(num_classes=nc), (3, 224, 224), nc
        import timm

        timm_name = {"resnet50": "resnet50", "vit_b_16": "vit_base_patch16_224"}[name]
        return timm.create_model(timm_name, num_classes=nc), (3, 224, 224), nc
    raise ValueError(f"unknown model {name!r}; choose from {CIFAR_MODELS + IMAGENET_MODELS + ('small_cnn',)}")
