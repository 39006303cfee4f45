"""A rank vector's MACs and params without building its model: a table of each module's cost at every grid rank.

MACs and params are sums over layers, and a rank-carrying layer's cost depends on its own rank only, so a model's
cost at a rank vector is its fixed part (every layer that carries no rank) plus, per module, the cost of its layers
at the module's rank. Each layer's cost at rank k/32 is that of its decomposed form when the form is cheaper (as
``decompose`` decides), else its own: MACs are the form's MACs per output pixel times the layer's output pixels
(measured once by a forward pass), params those of the form's layers. The table agrees with ``count_macs`` of the
decomposed model exactly (tests/test_budget.py); budgets and the sensitivity allocations read it thousands of
times per trial.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.inputs import CIFAR10_INPUT_SIZE
from ..decompose import method_for, original_macs_per_pixel
from ..models import RANK_STEPS, rank_modules
from ..models.measure import count_macs, count_params

TABLE_COSTS = ("macs", "params")  # the costs a table holds; latency is measured (``LatencyMeter``)


def output_pixels(model: nn.Module, layers: Sequence[nn.Module], input_size=CIFAR10_INPUT_SIZE) -> dict[int, int]:
    """Output pixels (H x W; 1 row for a linear layer) of each of ``layers`` at one input, by ``id``."""
    pixels: dict[int, int] = {}

    def record(layer, _inputs, output):
        rows = output.numel() // output.shape[-1]  # a linear layer's: one per input row
        pixels[id(layer)] = output.shape[-2] * output.shape[-1] if output.dim() == 4 else rows

    hooks = [layer.register_forward_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return pixels


def layer_costs(layer: nn.Module, pixels: int, decomposition: str, rank: float) -> tuple[float, float]:
    """(MACs, params) of ``layer`` at normalized ``rank``: its decomposed form's when that is cheaper, else its own."""
    method = method_for(layer, decomposition)
    if method is None or not method.cheaper(layer, rank):
        return pixels * original_macs_per_pixel(layer), count_params(layer)
    macs = pixels * method.macs_per_pixel(layer, method.integer_ranks(layer, rank))
    return macs, count_params(method.shaped(layer, rank))


@dataclass(frozen=True)
class CostTable:
    """Costs of a model by rank vector (one rank per module of its search space, in order)."""

    modules: list[str]
    base: dict[str, float]  # the undecomposed model's cost, by name (TABLE_COSTS)
    fixed: dict[str, float]  # the part no rank changes
    steps: dict[str, list[list[float]]]  # cost name -> per module, its cost at k/32 for k = 1..32 (index k - 1)
    original: dict[str, list[float]]  # cost name -> per module, its cost with its layers as they are

    def cost(self, name: str, ranks: Sequence[float]) -> float:
        if len(ranks) != len(self.modules):
            raise ValueError(f"expected {len(self.modules)} ranks (one per module), got {len(ranks)}")
        rows = self.steps[name]
        return self.fixed[name] + sum(row[round(r * RANK_STEPS) - 1] for row, r in zip(rows, ranks, strict=True))

    def ratio(self, name: str, ranks: Sequence[float]) -> float:
        """The cost as a ratio to the undecomposed model's."""
        return self.cost(name, ranks) / self.base[name]

    def alone_ratio(self, name: str, module: str, rank: float) -> float:
        """The model's cost ``name``, as a ratio to the baseline's, with only ``module`` decomposed at ``rank``."""
        index = self.modules.index(module)
        saved = self.original[name][index] - self.steps[name][index][round(rank * RANK_STEPS) - 1]
        return 1 - saved / self.base[name]


def cost_table(
    model: nn.Module, space: str = "module", decomposition: str = "tucker2", input_size=CIFAR10_INPUT_SIZE
) -> CostTable:
    """The cost table of an undecomposed ``model`` (its rank buffers say which layers carry ranks) at one input of
    ``input_size`` (B, C, H, W; the data's: ``InputSpec.input_size``)."""
    modules = rank_modules(model, space)
    layers = [layer for pairs in modules.values() for _, layer in pairs]
    pixels = output_pixels(model, layers, input_size)
    macs, params = count_macs(model, input_size)
    base = {"macs": float(macs), "params": float(params)}
    steps: dict[str, list[list[float]]] = {name: [] for name in TABLE_COSTS}
    original: dict[str, list[float]] = {name: [] for name in TABLE_COSTS}
    for pairs in modules.values():
        rows = {name: [0.0] * RANK_STEPS for name in TABLE_COSTS}
        original["macs"].append(sum(pixels[id(layer)] * original_macs_per_pixel(layer) for _, layer in pairs))
        original["params"].append(sum(count_params(layer) for _, layer in pairs))
        for _, layer in pairs:
            for k in range(1, RANK_STEPS + 1):
                layer_macs, layer_params = layer_costs(layer, pixels[id(layer)], decomposition, k / RANK_STEPS)
                rows["macs"][k - 1] += layer_macs
                rows["params"][k - 1] += layer_params
        for name in TABLE_COSTS:
            steps[name].append(rows[name])
    fixed = {name: base[name] - sum(original[name]) for name in TABLE_COSTS}
    return CostTable(list(modules), base, fixed, steps, original)
