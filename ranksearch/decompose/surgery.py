"""Model surgery: replace a model's rank-carrying layers by their decomposed forms, and rebuild a decomposed model
from a state_dict alone.

Which method a layer gets: a k x k conv, the config's ``decomposition`` (``tucker2`` or ``cp``); a 1x1 conv or
linear layer, ``svd`` (such layers carry ranks only when the config's ``svd_layers`` is on). A layer whose
decomposed form would not be cheaper stays as it is (its buffer still records the rank).
"""

import copy

import torch
from torch import nn

from ..models import attach_rank_buffers, is_eligible, is_pointwise, rank_layers
from . import cp, svd, tucker2  # noqa: F401  (each registers its method)
from .layer import DECOMPOSITIONS, DecomposedLayer, FactorOptions, by_code, conv_decompositions
from .tucker2 import Tucker2Conv


def method_for(layer: nn.Module, decomposition: str = "tucker2") -> type[DecomposedLayer] | None:
    """The method that decomposes ``layer`` (an undecomposed conv or linear layer), or None."""
    conv_method = DECOMPOSITIONS.get(decomposition)  # a dict lookup: this runs per layer, per rank, per trial
    if conv_method is None or conv_method.kind != "conv":
        raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {', '.join(conv_decompositions())}")
    if is_eligible(layer):
        method = conv_method
    elif is_pointwise(layer):
        method = next(cls for cls in DECOMPOSITIONS.values() if cls.kind == "pointwise")  # SVD
    else:
        return None
    return method if method.applies_to(layer) else None


def should_decompose(layer: nn.Module, rank: float, decomposition: str = "tucker2") -> bool:
    """True when ``layer`` has a method and its form at ``rank`` has fewer MACs than ``layer``."""
    method = method_for(layer, decomposition)
    return method is not None and method.cheaper(layer, rank)


def integer_rank(layer: nn.Module, decomposition: str = "tucker2") -> int:
    """The integer rank of a rank-carrying layer: a decomposed layer's own, else what its method would give."""
    if isinstance(layer, DecomposedLayer):
        return layer.integer_rank()
    method = method_for(layer, decomposition)
    return max(method.integer_ranks(layer, float(layer.rank))) if method else 1


def decompose(
    model: nn.Module, inplace: bool = False, factorize: bool = True, method: str = "hosvd",
    bases: dict | None = None, refine_iters: int = 2, decomposition: str = "tucker2", cp_iters: int = 50,
    only: set[str] | None = None,
) -> nn.Module:  # fmt: skip
    """Replace every layer whose rank buffer makes its decomposed form cheaper by that form.

    ``decomposition``: what k x k convs become, "tucker2" or "cp"; 1x1 convs and linear layers that carry ranks
    become "svd". ``method``: "activation" (every method: factors that reproduce each layer's outputs, truncations of
    ``bases``, the ``data_aware_bases`` by layer name, required), or, for Tucker-2 (CP and SVD then use their plain
    factors), "hosvd" (the default, as in the config), "hosvd+refine" (truncations of ``bases``, the cached
    ``channel_bases`` by layer name, computed when absent) or "hooi" (TensorLy's partial_tucker).
    ``factorize=False`` builds the layer shapes only (e.g. to count the MACs of a rank choice). ``only``: the names
    of the layers that may be decomposed (None: every one; a sensitivity point decomposes one module alone). A CP
    factorization that fails raises ``DecompositionError``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    options = FactorOptions(method, bases or {}, refine_iters, cp_iters)
    for name, layer in rank_layers(model):
        if isinstance(layer, DecomposedLayer) or (only is not None and name not in only):
            continue  # already decomposed, or left as it is
        rank = float(layer.rank)
        chosen = method_for(layer, decomposition)
        if chosen is None or not chosen.cheaper(layer, rank):
            continue
        new = chosen.factorized(layer, rank, name, options) if factorize else chosen.shaped(layer, rank)
        model.set_submodule(name, new)
    return model


def data_aware_bases(model: nn.Module, statistics: dict, decomposition: str = "tucker2") -> dict:
    """What the "activation" method truncates, by layer name: each undecomposed rank-carrying layer's method's
    ``data_aware_basis`` from its ``statistics`` (``ranksearch.decompose.statistics.layer_statistics``)."""
    bases = {}
    for name, layer in rank_layers(model):
        method = None if isinstance(layer, DecomposedLayer) else method_for(layer, decomposition)
        if method is not None and name in statistics:
            bases[name] = method.data_aware_basis(layer, statistics[name].inputs, statistics[name].outputs)
    return bases


# ----- rebuilding from a state_dict ------------------------------------------------------------------------------

TUCKER2_KEYS = ("first.weight", "core.weight", "last.weight")


def saved_method(state_dict: dict[str, torch.Tensor], name: str) -> type[DecomposedLayer] | None:
    """The method layer ``name`` was saved in, by its ``decomposition`` record; a file written before the record
    existed (ranksearch < 0.5.0) had Tucker-2 only, told by its keys. None: saved undecomposed."""
    record = state_dict.get(f"{name}.decomposition")
    if record is not None:
        method = by_code(int(record))
        if method is None:
            raise ValueError(f"{name} was saved with decomposition code {int(record)}, unknown to this version: "
                             "upgrade ranksearch")  # fmt: skip
        return method
    tensors = [state_dict.get(f"{name}.{key}") for key in TUCKER2_KEYS]
    if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
        return Tucker2Conv
    return None


def _attach_saved_rank_buffers(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Rank buffers on the 1x1 convs and linear layers that ``state_dict`` saved with one (the SVD switch)."""
    for name, layer in model.named_modules():
        if f"{name}.rank" in state_dict and is_pointwise(layer):
            attach_rank_buffers(layer, pointwise=True)


def _with_records(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` plus the ``decomposition`` records that files written before them lack."""
    missing = {
        f"{name}.decomposition": layer.decomposition
        for name, layer in model.named_modules()
        if isinstance(layer, DecomposedLayer) and f"{name}.decomposition" not in state_dict
    }
    return {**state_dict, **missing} if missing else state_dict


def _check_fits(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """A one-line ValueError unless ``state_dict`` has exactly the keys and shapes of ``model``'s."""
    expected = model.state_dict()
    common = expected.keys() & state_dict.keys()
    problems = {
        "missing": expected.keys() - state_dict.keys(),
        "unexpected": state_dict.keys() - expected.keys(),
        "wrong shape of": {k for k in common if expected[k].shape != state_dict[k].shape},
    }
    found = [f"{what} {min(keys)!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
             for what, keys in problems.items() if keys]  # fmt: skip
    if found:
        raise ValueError(f"state_dict does not fit the {type(model).__name__}: {'; '.join(found)}")


def decomposed_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a (possibly decomposed) state_dict into an undecomposed ``model`` of the same architecture.

    The saved tensors decide each layer's form, not today's rules: its ``decomposition`` record (or, in files
    written before records, Tucker-2 keys) names the method, and the saved shapes give its ranks; any other layer
    stays plain. A state_dict that does not fit (keys or shapes) raises a one-line ValueError.
    """
    _attach_saved_rank_buffers(model, state_dict)
    for name, layer in rank_layers(model):
        key = f"{name}.rank"
        if key not in state_dict:
            raise ValueError(f"state_dict has no rank buffer {key!r}: not a ranksearch model")
        method = saved_method(state_dict, name)
        if method is None or isinstance(layer, DecomposedLayer):
            continue
        try:
            ranks = method.saved_ranks(state_dict, name)
        except KeyError:
            continue  # its tensors are missing: left plain, so that _check_fits names what is missing
        model.set_submodule(name, method.shaped(layer, float(state_dict[key]), ranks))
    state_dict = _with_records(state_dict, model)
    _check_fits(model, state_dict)
    model.load_state_dict(state_dict)
    return model


def conv_ranks(model: nn.Module, decomposition: str = "tucker2") -> tuple[dict[str, int], list[str]]:
    """Integer rank of every rank-carrying layer (Tucker-2's R, CP's or SVD's rank), and the layers kept
    undecomposed, of a decomposed ``model``."""
    ranks, kept = {}, []
    for name, layer in rank_layers(model):
        ranks[name] = integer_rank(layer, decomposition)
        if not isinstance(layer, DecomposedLayer):
            kept.append(name)
    return ranks, kept
