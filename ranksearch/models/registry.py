"""The model registry: a name -> a builder and its grouping rule (how its convs form the search's modules).

``register_model(name, grouping)`` registers one builder ``(num_classes, width) -> nn.Module``;
``register_family(prefix, variants, grouping)`` registers builders of many models named ``<prefix>:<variant>``
(``torchvision:resnet18``). Every model built through either gets rank buffers on its eligible convs and carries
its registry name (``ranksearch_name``) and grouping rule (``ranksearch_grouping``), which deep copies and
decomposed copies keep; a model rebuilt from a state_dict is built here first.

A family file registers its models when imported: the package's own are imported in one place
(``ranksearch/models/__init__.py``); a user's is a plugin file (``--plugin my_models.py``, see
``ranksearch.utils.plugins``).
"""

import difflib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..utils.plugins import same_definition
from .ranks import Grouping, attach_rank_buffers, top_level_children


@dataclass(frozen=True)
class Family:
    """Models named ``<prefix>:<variant>``, built by ``build(variant, num_classes, width)``."""

    build: Callable[..., nn.Module]
    variants: Callable[[], Sequence[str]]  # the valid variants, for error messages
    grouping: Grouping
    fixed_width: bool  # True: the family's models take no width multiplier (width must be 1.0)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, Family] = {}


def _ranked(model: nn.Module, name: str, grouping: Grouping) -> nn.Module:
    """``model`` with rank buffers on its eligible convs, its registry name and its grouping rule."""
    attach_rank_buffers(model)
    model.ranksearch_name = name
    model.ranksearch_grouping = grouping
    return model


def register_model(name: str, grouping: Grouping = top_level_children):
    """Register a builder under ``name``; a second builder with the same name is refused.

    The decorated builder, also when called directly, returns its model ranked (``_ranked``).
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS and not same_definition(_BUILDERS[name].__wrapped__, builder):
            raise ValueError(f"model {name!r} is already registered")

        @functools.wraps(builder)
        def build(*args, **kwargs) -> nn.Module:
            return _ranked(builder(*args, **kwargs), name, grouping)

        _BUILDERS[name] = build
        return build

    return wrap


def register_family(
    prefix: str,
    variants: Callable[[], Sequence[str]],
    grouping: Grouping = top_level_children,
    fixed_width: bool = False,
):
    """Register ``build(variant, num_classes, width)`` for the models named ``<prefix>:<variant>``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if prefix in _FAMILIES and not same_definition(_FAMILIES[prefix].build, builder):
            raise ValueError(f"model family {prefix!r} is already registered")
        _FAMILIES[prefix] = Family(builder, variants, grouping, fixed_width)
        return builder

    return wrap


def model_names() -> list[str]:
    """The registered names, then one ``<prefix>:<name>`` pattern per family."""
    return sorted(_BUILDERS) + [f"{prefix}:<name>" for prefix in sorted(_FAMILIES)]


def _family(name: str) -> tuple[Family, str] | None:
    prefix, colon, variant = name.partition(":")
    return (_FAMILIES[prefix], variant) if colon and prefix in _FAMILIES else None


def check_model_name(name: str) -> str:
    """Return ``name`` when it names a registered model (or a valid variant of a family), else raise ValueError."""
    if name in _BUILDERS:
        return name
    found = _family(name)
    if found is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}, or pass the plugin that "
                         "registers it (--plugin FILE.py)")  # fmt: skip
    family, variant = found
    valid = family.variants()
    if variant not in valid:
        close = difflib.get_close_matches(variant, valid, n=5, cutoff=0.5) or list(valid[:5])
        examples = ", ".join(f"{name.partition(':')[0]}:{v}" for v in close)
        raise ValueError(f"unknown model {name!r}; its family has {len(valid)} models, e.g. {examples}")
    return name


def check_width(name: str, width: float) -> float:
    """Return ``width`` when the model ``name`` can be built at it, else raise ValueError."""
    found = _family(name)
    if found is not None and found[0].fixed_width and width != 1.0:
        raise ValueError(f"{name} has no width multiplier: width must be 1.0, got {width:g}")
    return width


def build_model(name: str, num_classes: int = 10, width: float = 1.0, svd_layers: bool = False) -> nn.Module:
    """Build a registered model by name, with rank buffers of 1.0 on its eligible convs (and, with ``svd_layers``,
    on its 1x1 convs and linear layers)."""
    check_width(check_model_name(name), width)
    if name in _BUILDERS:
        model = _BUILDERS[name](num_classes=num_classes, width=width)
    else:
        family, variant = _family(name)
        model = _ranked(family.build(variant, num_classes=num_classes, width=width), name, family.grouping)
    return attach_rank_buffers(model, pointwise=True) if svd_layers else model


def scaled_channels(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, at least 1."""
    return max(1, round(channels * width))
