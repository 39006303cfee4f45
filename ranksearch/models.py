"""VGG for 32x32 images, with a normalized Tucker-2 rank buffer on every conv.

The convs are grouped into blocks ("modules" of the search): one rank per block. Each conv carries
its block's rank in a registered buffer named ``rank``, so a model's state_dict records its ranks.
"""

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

RANK_STEPS = 32  # ranks live on the grid {1/32, 2/32, ..., 1}
RANK_GRID = tuple(k / RANK_STEPS for k in range(1, RANK_STEPS + 1))

# Output channels of each conv, one list per block; a 2x2 max-pool closes each block.
_CFGS: dict[str, list[list[int]]] = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Register a builder under ``name``; a second builder with the same name is refused."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return wrap


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Build a registered model by name."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return _BUILDERS[name](num_classes=num_classes, width=width)


def scaled_channels(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def ranked_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 'same' conv carrying a normalized rank buffer (1.0 = not decomposed)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    conv.register_buffer("rank", torch.tensor(1.0))
    return conv


def _vgg_block(in_channels: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels in widths:
        layers += [ranked_conv(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: 5 blocks, each halving the resolution, then one Linear."""

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
        x = self.features(x)  # (B, C, 1, 1) for a 32x32 input
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg16")
def vgg16_cifar(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG16 with BatchNorm for 32x32 images (13 convs in 5 blocks); ``width`` scales every conv."""
    return VGG(_CFGS["vgg16"], num_classes=num_classes, width=width)


@register_model("vgg11")
def vgg11_cifar(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG11 with BatchNorm for 32x32 images (8 convs in 5 blocks)."""
    return VGG(_CFGS["vgg11"], num_classes=num_classes, width=width)


def rank_modules(model: nn.Module) -> OrderedDict[str, list[tuple[str, nn.Module]]]:
    """The search's modules: block name -> [(qualified name, layer carrying a rank buffer)]."""
    modules: OrderedDict[str, list[tuple[str, nn.Module]]] = OrderedDict()
    for block_name, block in model.features.named_children():
        layers = [
            (f"features.{block_name}.{name}", layer)
            for name, layer in block.named_children()
            if "rank" in dict(layer.named_buffers(recurse=False))
        ]
        if layers:
            modules[block_name] = layers
    return modules


def module_names(model: nn.Module) -> list[str]:
    return list(rank_modules(model))


def check_rank(rank: float) -> float:
    """Return ``rank`` if it lies on the 1/32 grid, else raise ValueError."""
    steps = float(rank) * RANK_STEPS
    if not (1 <= round(steps) <= RANK_STEPS and abs(steps - round(steps)) < 1e-6):
        raise ValueError(f"rank {rank} is off the grid: use k/{RANK_STEPS} for k in 1..{RANK_STEPS}")
    return round(steps) / RANK_STEPS


def set_ranks(model: nn.Module, ranks: Sequence[float] | Mapping[str, float]) -> nn.Module:
    """Write one normalized rank per module into the rank buffers of its convs.

    ``ranks`` is a sequence (one value per module, in order) or a mapping from module name to value.
    The model must be undecomposed: new ranks on Tucker-2 layers would not match their shapes.
    """
    modules = rank_modules(model)
    layers = [pair for pairs in modules.values() for pair in pairs]
    decomposed = [(name, layer) for name, layer in layers if not isinstance(layer, nn.Conv2d)]
    if decomposed:
        name, layer = decomposed[0]
        raise ValueError(
            f"set_ranks needs an undecomposed model, but {name} is already a {type(layer).__name__}; "
            "set the ranks on the original model, then decompose it"
        )
    if not isinstance(ranks, Mapping):
        ranks = list(ranks)
        if len(ranks) != len(modules):
            raise ValueError(f"expected {len(modules)} ranks (one per module), got {len(ranks)}")
        ranks = dict(zip(modules, ranks, strict=True))
    unknown = set(ranks) - set(modules)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}; the model has {list(modules)}")
    for name, rank in ranks.items():
        value = check_rank(rank)
        for _, layer in modules[name]:
            layer.rank.fill_(value)
    return model


def get_ranks(model: nn.Module) -> dict[str, float]:
    """Module name -> normalized rank, read from the first conv of each module."""
    return {name: float(layers[0][1].rank) for name, layers in rank_modules(model).items()}
