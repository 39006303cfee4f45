"""VGG with BatchNorm for 32x32 images: ``vgg11``, ``vgg16``; the search's modules are its blocks.

Larger images work too: global average pooling before the classifier, the identity at 32x32 (where the last block
leaves 1x1 maps), so the weights, the MACs and the outputs at 32x32 are those of every earlier version.

The convs sit at ``features.block<k>.<i>`` (the names, and so the state_dict keys, of every earlier version):
one rank per block, ``block1`` .. ``block5``.
"""

from collections import OrderedDict

import torch
from torch import nn

from .registry import register_model, scaled_channels

# Output channels of each conv, one list per block; a 2x2 max-pool closes each block.
_CFGS: dict[str, list[list[int]]] = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


def vgg_blocks(names: list[str]) -> list[str]:
    """VGG's grouping rule: the block holding each conv (``features.block3.0`` -> ``block3``); a layer outside the
    blocks is its own module (``classifier``, ranked when the SVD switch is on)."""
    return [name.split(".")[1] if name.startswith("features.") else name.split(".")[0] for name in names]


def _vgg_block(in_channels: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels in widths:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (or larger): 5 blocks, each halving the resolution, global average
    pooling, then one Linear."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 10, width: float = 1.0):
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for index, widths in enumerate(cfg, start=1):
            widths = [scaled_channels(c, width) for c in widths]
            blocks[f"block{index}"] = _vgg_block(in_channels, widths)
            in_channels = widths[-1]
        self.features = nn.Sequential(blocks)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, H/32, W/32): (B, C, 1, 1) for a 32x32 input
        return self.classifier(x.mean(dim=(2, 3)))  # global average pooling: (B, C), exact at 1x1


@register_model("vgg16", grouping=vgg_blocks)
def vgg16_cifar(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG16 with BatchNorm for 32x32 images (13 convs in 5 blocks); ``width`` scales every conv."""
    return VGG(_CFGS["vgg16"], num_classes=num_classes, width=width)


@register_model("vgg11", grouping=vgg_blocks)
def vgg11_cifar(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG11 with BatchNorm for 32x32 images (8 convs in 5 blocks)."""
    return VGG(_CFGS["vgg11"], num_classes=num_classes, width=width)
