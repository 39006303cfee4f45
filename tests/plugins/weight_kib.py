"""A test-only cost, in one file: the weights' memory in KiB (parameters and buffers), minimised beside accuracy.
Loaded with ``--plugin tests/plugins/weight_kib.py``; then ``--objectives accuracy,weight_kib``."""

from torch import nn

from ranksearch.objectives import Metric, register_cost


def weight_kib(model: nn.Module, example) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1024


WEIGHT_KIB = register_cost(Metric("weight_kib", "weight_kib", "weight_kib", "weights (KiB)", "weights", "minimize",
                                  unit="KiB", measure=weight_kib))  # fmt: skip
