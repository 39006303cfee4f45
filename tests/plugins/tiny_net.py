"""A test-only model family, in one file: a three-block CNN of any input size, registered as ``tinynet``. Loaded
with ``--plugin tests/plugins/tiny_net.py``; then ``--model tinynet``."""

from collections import OrderedDict

from torch import nn

from ranksearch.models import register_model, scaled_channels


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.MaxPool2d(2))  # fmt: skip


@register_model("tinynet")
def tinynet(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    c1, c2, c3 = (scaled_channels(c, width) for c in (16, 32, 64))
    return nn.Sequential(OrderedDict(
        block1=_block(3, c1), block2=_block(c1, c2), block3=_block(c2, c3),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes)),
    ))  # fmt: skip
