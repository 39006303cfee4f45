"""ResNets for 32x32 images: ``resnet20``, ``resnet56`` (He et al. 2016, CIFAR) and ``resnet18``.

- ``resnet20`` / ``resnet56``: a 3x3 stem of 16 channels, then 3 stages of n = 3 / 9 basic blocks at 16, 32, 64
  channels (stride 2 entering stages 2 and 3), global average pooling, one Linear. Shortcuts are option A of the
  paper's CIFAR experiments: identity, or, where a block halves the resolution and widens, the input subsampled and
  zero-padded to the new channels (no parameters): 0.27 M and 0.85 M parameters, as published.
- ``resnet18``: ResNet-18 for 32x32 inputs: a 3x3 stem of 64 channels and no max-pool, then 4 stages of 2 basic
  blocks at 64, 128, 256, 512 channels; option-B shortcuts (a strided 1x1 conv and BatchNorm) where the shape
  changes, as in the ImageNet ResNet-18.

The search's modules are the top-level children holding convs: ``stem``, ``stage1`` .. ``stage3`` (``stage4``).
``width`` scales every channel count.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model, scaled_channels


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: the input subsampled by ``stride`` and zero-padded from ``in_channels`` to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        extra = out_channels - in_channels
        self.stride, self.pad = stride, (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, Cin, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # (B, Cout, H/s, W/s)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Option B: a strided 1x1 conv and BatchNorm."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm, and a shortcut added before the last ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A 3x3 stem, stages of basic blocks (the first of each stage after the first has stride 2), pooling, Linear."""

    def __init__(self, stem: int, stages: list[int], blocks: int, shortcut: str, num_classes: int, width: float):
        super().__init__()
        channels = scaled_channels(stem, width)
        self.stem = nn.Sequential(_conv3x3(3, channels), nn.BatchNorm2d(channels), nn.ReLU())
        for index, stage_channels in enumerate(stages, start=1):
            out_channels, stride = scaled_channels(stage_channels, width), 1 if index == 1 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(channels, out_channels, stride if block == 0 else 1, shortcut))
                channels = out_channels
            self.add_module(f"stage{index}", nn.Sequential(*layers))
        self.stage_count = len(stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index in range(1, self.stage_count + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.fc(x.mean(dim=(2, 3)))  # global average pooling: (B, C)


@register_model("resnet20")
def resnet20(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet-20 for CIFAR (He et al. 2016): 19 3x3 convs in 3 stages of 3 blocks, option-A shortcuts."""
    return ResNet(16, [16, 32, 64], 3, "A", num_classes, width)


@register_model("resnet56")
def resnet56(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet-56 for CIFAR (He et al. 2016): 55 3x3 convs in 3 stages of 9 blocks, option-A shortcuts."""
    return ResNet(16, [16, 32, 64], 9, "A", num_classes, width)


@register_model("resnet18")
def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, 4 stages of 2 blocks, option-B shortcuts."""
    return ResNet(64, [64, 128, 256, 512], 2, "B", num_classes, width)
