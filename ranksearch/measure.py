"""Measurements of a model: MACs and params (convs and linear layers), and accuracy."""

import copy
import logging

import torch
from thop import profile
from thop.vision.basic_hooks import zero_ops
from torch import nn


def _countable_layers(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def count_params(model: nn.Module) -> int:
    """Weights and biases of convs and linear layers (BatchNorm folds into its conv)."""
    return sum(p.numel() for m in _countable_layers(model) for p in m.parameters(recurse=False))


def count_macs(model: nn.Module, input_size=(1, 3, 32, 32)) -> tuple[int, int]:
    """(MACs, params) of ``model`` at one input of ``input_size``, counted with thop.

    Only convs and linear layers count: BatchNorm folds into its conv at inference and counts 0,
    as do activations and pooling.
    """
    probe = copy.deepcopy(model).cpu().float()  # thop leaves the caller's model untouched this way
    zero = {nn.BatchNorm2d: zero_ops, nn.BatchNorm1d: zero_ops, nn.ReLU: zero_ops, nn.MaxPool2d: zero_ops}
    previous = logging.getLogger("thop").level
    logging.getLogger("thop").setLevel(logging.ERROR)
    try:
        macs, _ = profile(probe, inputs=(torch.zeros(input_size),), custom_ops=zero, verbose=False)
    finally:
        logging.getLogger("thop").setLevel(previous)
    return int(macs), count_params(model)


@torch.inference_mode()
def predict_correct(model: nn.Module, batches) -> float:
    """Fraction of correct top-1 predictions over ``batches`` of (normalized images, labels)."""
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for images, labels in batches:
        correct = correct + (model(images).argmax(1) == labels).sum()  # stays on the device: no sync
        total += labels.numel()
    model.train(was_training)
    return float(correct) / max(total, 1)
