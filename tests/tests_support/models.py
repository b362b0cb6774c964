"""Tiny factory models for CLI/pipeline tests (model spec ``tests_support.models:<name>``).

All take 3x16x16 images (no resize), so tests can write small random PNG folders.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PREPROCESS = {"input_size": (16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "channels": 3}


class TinyNet(nn.Module):
    """conv-BN-ReLU, a residual conv pair, global pool, linear: 3x16x16 -> 4 classes."""

    qexport_preprocess = PREPROCESS

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(x))
        x = F.relu(self.conv3(y) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvTransposeNet(nn.Module):
    """A net with an nn.ConvTranspose2d (``up``), which qexport cannot quantize."""

    qexport_preprocess = PREPROCESS

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.up(x))
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Conv3dNet(nn.Module):
    """A net with an nn.Conv3d (``vol``) over a depth-1 view of the image."""

    qexport_preprocess = PREPROCESS

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.vol = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.vol(x.unsqueeze(2)).squeeze(2))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny_net() -> TinyNet:
    """Factory ``tests_support.models:tiny_net`` (seeded random weights)."""
    torch.manual_seed(0)
    return TinyNet()


def convtranspose_net() -> ConvTransposeNet:
    """Factory ``tests_support.models:convtranspose_net``."""
    torch.manual_seed(0)
    return ConvTransposeNet()


def conv3d_net() -> Conv3dNet:
    """Factory ``tests_support.models:conv3d_net``."""
    torch.manual_seed(0)
    return Conv3dNet()


def not_a_model() -> int:
    """A factory that returns something other than an nn.Module."""
    return 3


class TinyBNNet(nn.Module):
    """conv-BN-ReLU everywhere (what activation alignment needs), a residual pair, pool, linear: 3x16x16 -> 4."""

    qexport_preprocess = PREPROCESS

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(y)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny_bn_net(num_classes: int = 4) -> TinyBNNet:
    """Factory ``tests_support.models:tiny_bn_net`` (seeded weights, non-trivial BN statistics)."""
    torch.manual_seed(0)
    net = TinyBNNet(num_classes)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.eval()
