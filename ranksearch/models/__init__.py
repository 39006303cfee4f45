"""Models as registry entries: builders by name, each with the rule grouping its convs into the search's modules.

``registry`` (names, builders, grouping rules), ``ranks`` (rank buffers on eligible convs, the search's modules,
setting and reading ranks), and one file per family: ``vgg``, ``resnet_cifar``, ``torchvision_models``.
"""

from . import resnet_cifar, torchvision_models, vgg  # noqa: F401  (each registers its models)
from .ranks import (
    RANK_GRID,
    RANK_STEPS,
    SEARCH_SPACES,
    Grouping,
    attach_rank_buffers,
    check_rank,
    get_ranks,
    is_eligible,
    is_pointwise,
    module_names,
    rank_layers,
    rank_modules,
    rank_step,
    rank_text,
    ranked_conv,
    ranks_text,
    set_ranks,
    steps_text,
    top_level_children,
)
from .registry import (
    build_model,
    check_model_name,
    check_width,
    model_names,
    register_family,
    register_model,
    scaled_channels,
)
from .resnet_cifar import ResNet, resnet18, resnet20, resnet56
from .vgg import VGG, vgg11_cifar, vgg16_cifar, vgg_blocks

__all__ = [
    "RANK_GRID", "RANK_STEPS", "SEARCH_SPACES", "VGG", "attach_rank_buffers", "build_model", "check_model_name",
    "check_rank", "check_width", "get_ranks", "Grouping", "is_eligible", "is_pointwise", "model_names",
    "module_names", "rank_layers", "rank_modules", "rank_step", "rank_text", "ranked_conv", "ranks_text",
    "register_family", "register_model", "ResNet", "resnet18", "resnet20", "resnet56", "scaled_channels", "set_ranks",
    "steps_text", "top_level_children", "vgg11_cifar", "vgg16_cifar", "vgg_blocks",
]  # fmt: skip
