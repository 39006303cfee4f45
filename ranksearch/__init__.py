"""ranksearch: multi-objective Optuna search over the Tucker-2 ranks of a CNN's convs."""

__version__ = "0.7.0"

from .decompose import decompose  # noqa: E402
from .export import load_model  # noqa: E402
from .measure import count_macs  # noqa: E402
from .models import set_ranks, vgg16_cifar  # noqa: E402

__all__ = ["vgg16_cifar", "set_ranks", "decompose", "count_macs", "load_model", "__version__"]
