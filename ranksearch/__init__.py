"""ranksearch: multi-objective Optuna search over the Tucker-2 ranks of a CNN's convs.

A light import: ``import ranksearch`` loads torch and the models and decompositions, not the search stack (optuna),
tensorly, thop or onnx; the other public names load when first used, and ``load_model`` needs no optuna.
"""

import importlib

__version__ = "0.13.0"

from .decompose import decompose  # noqa: E402  (eager: the function shadows its subpackage's name)

_PUBLIC = {  # name: the module that defines it
    "vgg16_cifar": ".models", "set_ranks": ".models", "count_macs": ".models.measure", "load_model": ".deliver.load",
}  # fmt: skip
__all__ = ["decompose", *_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ranksearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
