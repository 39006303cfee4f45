"""Measurements of a model: MACs and params (convs and linear layers), and accuracy.

MACs are counted with thop, and only where a conv or a linear layer multiplies: BatchNorm folds into the conv
before it at inference, and activations, pooling, dropout, normalization and residual adds are not
multiply-accumulates of a weight. That is exactly what PyTorch's own ``FlopCounterMode`` counts (2 FLOPs per
multiply-accumulate of every conv and matrix product, bias excluded); ``flop_counter_macs`` gives its figure, and
the tests and ``benchmarks/flops_check.py`` hold the two equal on every registered model.
"""

import copy
import logging

import torch
from thop import profile
from thop.vision.basic_hooks import zero_ops
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..data.inputs import CIFAR10_INPUT_SIZE
from ..utils.interrupts import interruption_point

# The layers that count, for MACs and params: every conv (Conv1d/2d/3d and their transposes: thop's rules for
# them equal FlopCounterMode's) and every linear layer, subclasses included.
COUNTED = (nn.modules.conv._ConvNd, nn.Linear)


def _countable_layers(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, COUNTED))


def count_params(model: nn.Module) -> int:
    """Weights and biases of convs and linear layers (BatchNorm folds into its conv)."""
    return sum(p.numel() for m in _countable_layers(model) for p in m.parameters(recurse=False))


def _zero_rules(model: nn.Module) -> dict[type, object]:
    """thop's ``zero_ops`` for every module type in ``model`` that is not a conv or linear layer.

    Built from the model itself, so no layer thop has a rule for (BatchNorm and the other norms, average and
    adaptive pooling, softmax, PReLU, upsampling, ...) is missed. A functional matrix product (``torch.matmul``,
    ``F.linear`` outside a Linear module) is still counted by thop, as FlopCounterMode counts it; a functional conv
    (``F.conv2d`` outside a conv module) is not, though FlopCounterMode counts it: no registered model has one.
    """
    return {type(m): zero_ops for m in model.modules() if not isinstance(m, COUNTED)}


def count_macs(model: nn.Module, input_size=CIFAR10_INPUT_SIZE) -> tuple[int, int]:
    """(MACs, params) of ``model`` at one input of ``input_size`` (B, C, H, W; the data's: ``InputSpec.input_size``),
    counted with thop.

    Only convs and linear layers count (bias excluded, as in FlopCounterMode): BatchNorm folds into its conv at
    inference and counts 0, as do activations, pooling and every other layer.
    """
    probe = copy.deepcopy(model).cpu().float()  # thop leaves the caller's model untouched this way
    previous = logging.getLogger("thop").level
    logging.getLogger("thop").setLevel(logging.ERROR)
    try:
        macs, _ = profile(probe, inputs=(torch.zeros(input_size),), custom_ops=_zero_rules(probe), verbose=False)
    finally:
        logging.getLogger("thop").setLevel(previous)
    return int(macs), count_params(model)


def flop_counter_macs(model: nn.Module, input_size=CIFAR10_INPUT_SIZE) -> int:
    """MACs of ``model`` at one input of ``input_size`` by PyTorch's ``FlopCounterMode``: its FLOPs / 2.

    An independent count to check ``count_macs`` against (FlopCounterMode counts 2 FLOPs per multiply-accumulate
    of convs and matrix products, nothing else). Run in eval mode on a copy: the caller's model is untouched.
    """
    probe = copy.deepcopy(model).cpu().float().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        probe(torch.zeros(input_size))
    return counter.get_total_flops() // 2


@torch.inference_mode()
def predict_correct(model: nn.Module, batches) -> float:
    """Fraction of correct top-1 predictions over ``batches`` of (normalized images, labels)."""
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for images, labels in batches:
        interruption_point()  # Ctrl-C / SIGTERM during a trial stops it here
        correct = correct + (model(images).argmax(1) == labels).sum()  # stays on the device: no sync
        total += labels.numel()
    model.train(was_training)
    return float(correct) / max(total, 1)
