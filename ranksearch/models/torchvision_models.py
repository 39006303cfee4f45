"""``torchvision:<name>``: any torchvision classification model, built untrained for ``num_classes``.

Built with ``torchvision.models.get_model(name, weights=None, num_classes=...)``: never a download. These models
have no width multiplier (width must be 1.0). The search's modules are the default grouping
(``top_level_children``): the top-level children holding eligible convs (``conv1``, ``layer1`` .. ``layer4`` of
resnet18); when one child holds them all (``features`` of mobilenet_v2, densenet, efficientnet), its children
(``features.0``, ...). Only eligible convs carry ranks: mobilenet_v2's depthwise and 1x1 convs do not, which
leaves it its 3x3 stem alone.
"""

import functools
import re

import torch
from torch import nn

from .registry import register_family

# Models whose builders add training-only auxiliary outputs unless told not to (the search wants logits only).
_EXTRA_ARGS = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False}}


@functools.cache
def classification_models() -> tuple[str, ...]:
    """The names of torchvision's classification models (``torchvision.models.list_models``)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@register_family("torchvision", variants=classification_models, fixed_width=True)
def torchvision_model(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """torchvision's ``name`` with random weights and ``num_classes`` outputs (``width`` must be 1.0)."""
    import torchvision

    if width != 1.0:
        raise ValueError(f"torchvision:{name} has no width multiplier: width must be 1.0, got {width:g}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_EXTRA_ARGS.get(name, {}))


# densenet's checkpoint files name a dense layer's parts "norm.1" (keys torchvision renames when it loads them)
_LEGACY_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_AUXILIARY_HEADS = ("aux1.", "aux2.", "AuxLogits.")  # googlenet's and inception_v3's training-only classifiers


def modern_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict as torchvision's own loading fixes its checkpoint files for a model with the keys of
    ``expected``: densenet's legacy keys renamed, and the auxiliary heads a model built without them lacks dropped.
    Any other state_dict is returned as it is."""
    renamed = {}
    for key, tensor in state.items():
        legacy = _LEGACY_DENSE_KEY.match(key)
        key = legacy.group(1) + legacy.group(2) if legacy and key not in expected else key
        if key.startswith(_AUXILIARY_HEADS) and key not in expected:
            continue
        renamed[key] = tensor
    return renamed
