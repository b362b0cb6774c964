"""CIFAR-10 ResNets (He et al. 2016, option-A shortcuts), depth 6n+2; parameter names match the
akamaster/pytorch_resnet_cifar10 checkpoints (``conv1, bn1, layer1.0.conv1, ..., linear``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qexport.errors import QexportError
from qexport.models.preprocess import CIFAR_PRESET, Preprocess
from qexport.models.registry import register_model

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad ``pad`` channels on each side.

    Args:
        pad: channels added before and after (planes // 4).
    """

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; identity or option-A shortcut; ReLU after the add."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``n`` blocks per stage.

    Args:
        n: blocks per stage (depth = 6n + 2).
        num_classes: classifier outputs.
    """

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@register_model("cifar", names=sorted(DEPTHS, key=lambda k: DEPTHS[k]), description="CIFAR-10 ResNets, option-A shortcuts",
                class_names=CIFAR10_CLASSES)
def build_cifar(name: str, num_classes: int | None = None) -> tuple[nn.Module, Preprocess, int]:
    """Build ``cifar:<name>``.

    Args:
        name: resnet20, resnet32, resnet44 or resnet56.
        num_classes: classifier outputs (default 10).

    Returns:
        (model, CIFAR preset, num_classes).
    """
    if name not in DEPTHS:
        raise QexportError(f"unknown CIFAR model {name!r}; known: {', '.join('cifar:' + k for k in DEPTHS)}")
    nc = 10 if num_classes is None else int(num_classes)
    return CifarResNet(DEPTHS[name], nc), CIFAR_PRESET, nc
