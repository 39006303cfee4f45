"""Rank buffers and the search's modules, for any model.

Every eligible conv (and, with ``svd_layers``, every 1x1 conv and linear layer) carries a normalized rank in a
registered buffer named ``rank`` (1.0 = not decomposed), so a model's state_dict records its ranks; what the rank
means (Tucker-2's R, CP's or SVD's rank) is the decomposition's rule (``ranksearch.decompose``). A layer "carries a
rank" when it has that buffer: a plain layer, or the decomposed layer that replaced it, found anywhere in the module
tree under the layer's qualified name.

The search's modules group those layers. With ``space="module"`` (the default) the model's grouping rule decides:
a function from the qualified names of its rank-carrying layers to the module of each, stored on the model by the
registry (``ranksearch_grouping``; ``top_level_children`` for a model built elsewhere). With ``space="layer"``
every rank-carrying layer is its own module, named by its qualified name (``stage1.0.conv1``).
"""

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

RANK_STEPS = 32  # ranks live on the grid {1/32, 2/32, ..., 1}
RANK_GRID = tuple(k / RANK_STEPS for k in range(1, RANK_STEPS + 1))


def rank_step(rank: float | None) -> int | None:
    """A normalized rank as k of k/32 (None stays None)."""
    return None if rank is None else round(float(rank) * RANK_STEPS)


def rank_text(rank: float) -> str:
    """``8/32``."""
    return f"{rank_step(rank)}/{RANK_STEPS}"


def steps_text(steps: Iterable[int | None]) -> str:
    """Ranks given as k of k/32, one per module: ``8/8/4/2/2 /32`` (``?`` for a missing one)."""
    return "/".join("?" if k is None else str(k) for k in steps) + f" /{RANK_STEPS}"


def ranks_text(ranks: Iterable[float | None]) -> str:
    """Normalized ranks, one per module: ``8/8/4/2/2 /32`` (``?`` for a missing one)."""
    return steps_text(rank_step(r) for r in ranks)
SEARCH_SPACES = ("module", "layer")  # one rank per module of the grouping rule, or one per eligible conv

Grouping = Callable[[list[str]], list[str]]  # qualified names of the rank-carrying layers -> the module of each
Modules = OrderedDict[str, list[tuple[str, nn.Module]]]  # module name -> [(qualified name, layer)]


def is_eligible(layer: nn.Module) -> bool:
    """A conv a k x k decomposition (Tucker-2, CP) may decompose: a Conv2d with groups == 1 and a kernel larger than
    1x1.

    Grouped and depthwise convs never are; 1x1 convs and linear layers are left as they are.
    """
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and tuple(layer.kernel_size) != (1, 1)


def is_pointwise(layer: nn.Module) -> bool:
    """A layer SVD may decompose (when the config's ``svd_layers`` is on): a 1x1 conv with groups == 1, or a linear
    layer."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and tuple(layer.kernel_size) == (1, 1)


def carries_rank(layer: nn.Module) -> bool:
    return "rank" in dict(layer.named_buffers(recurse=False))


def attach_rank_buffers(model: nn.Module, pointwise: bool = False) -> nn.Module:
    """Give every eligible conv of ``model`` a ``rank`` buffer of 1.0 (those that have one keep theirs); with
    ``pointwise``, every 1x1 conv and linear layer too (``is_pointwise``: for the SVD switch)."""
    for layer in model.modules():
        if (is_eligible(layer) or (pointwise and is_pointwise(layer))) and not carries_rank(layer):
            layer.register_buffer("rank", torch.tensor(1.0))
    return model


def ranked_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 'same' conv carrying a normalized rank buffer (1.0 = not decomposed)."""
    return attach_rank_buffers(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False))


def rank_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(qualified name, layer)] of every layer carrying a rank buffer, in module order."""
    return [(name, layer) for name, layer in model.named_modules() if name and carries_rank(layer)]


def top_level_children(names: list[str]) -> list[str]:
    """The default grouping: the top-level child holding each layer (``conv1``, ``layer1``, ``stage2``).

    When fewer than 3 top-level children hold layers (a ``features`` Sequential, maybe a ``classifier``, as in
    torchvision's mobilenet_v2, densenet, efficientnet), the children of those holding several layers (or all)
    instead (``features.0``, ``features.3``, ``classifier``).
    """
    parts = [name.split(".") for name in names]
    tops = [p[0] for p in parts]
    if len(set(tops)) >= 3:
        return tops
    split = {top for top in tops if tops.count(top) > 1 or len(set(tops)) == 1}
    return [".".join(p[:2]) if len(p) > 1 and p[0] in split else p[0] for p in parts]


def rank_modules(model: nn.Module, space: str = "module") -> Modules:
    """The search's modules: module name -> [(qualified name, layer carrying a rank buffer)], in model order."""
    layers = rank_layers(model)
    if space == "layer":
        return OrderedDict((name, [(name, layer)]) for name, layer in layers)
    if space != "module":
        raise ValueError(f"unknown search space {space!r}; choose one of {', '.join(SEARCH_SPACES)}")
    grouping: Grouping = getattr(model, "ranksearch_grouping", top_level_children)
    modules: Modules = OrderedDict()
    for (name, layer), module in zip(layers, grouping([name for name, _ in layers]), strict=True):
        modules.setdefault(module, []).append((name, layer))
    return modules


def module_names(model: nn.Module, space: str = "module") -> list[str]:
    return list(rank_modules(model, space))


def check_rank(rank: float) -> float:
    """Return ``rank`` if it lies on the 1/32 grid, else raise ValueError."""
    steps = float(rank) * RANK_STEPS
    if not (1 <= round(steps) <= RANK_STEPS and abs(steps - round(steps)) < 1e-6):
        raise ValueError(f"rank {rank} is off the grid: use k/{RANK_STEPS} for k in 1..{RANK_STEPS}")
    return round(steps) / RANK_STEPS


def _check_undecomposed(modules: Modules) -> None:
    for name, layer in (pair for pairs in modules.values() for pair in pairs):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ValueError(
                f"set_ranks needs an undecomposed model, but {name} is already a {type(layer).__name__}; "
                "set the ranks on the original model, then decompose it"
            )


def set_ranks(model: nn.Module, ranks: Sequence[float] | Mapping[str, float], space: str = "module") -> nn.Module:
    """Write one normalized rank per module (of ``space``) into the rank buffers of its layers.

    ``ranks`` is a sequence (one value per module, in order) or a mapping from module name to value.
    The model must be undecomposed: new ranks on decomposed layers would not match their shapes.
    """
    modules = rank_modules(model, space)
    _check_undecomposed(modules)
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


def get_ranks(model: nn.Module, space: str = "module") -> dict[str, float]:
    """Module name -> normalized rank, read from the first layer of each module."""
    return {name: float(layers[0][1].rank) for name, layers in rank_modules(model, space).items()}
