"""What each rank-carrying layer of the baseline sees on real images: the second moments of its input and output
channels, from which the ``activation`` method chooses factors that reproduce the layer's outputs rather than its
weights (``decompose.activation``).

Measured once per baseline on ``images`` training images (augmented as in training, BatchNorm in eval mode), and
cached beside the baseline's checkpoint (``<checkpoint>.activations.pt``), keyed by the baseline's weights, the data
and the image count, so that a trial only truncates.
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.datasets import DeviceData
from ..models import rank_layers
from ..utils.files import keyed_cache

BATCH = 128  # images per forward pass while measuring
SEED = 0  # which training images (and augmentations) are measured


@dataclass
class LayerStatistics:
    """Uncentred second moments over every position a layer sees: E[x x^T] of its input channels (Cin, Cin) and
    E[y y^T] of its output channels without the bias (Cout, Cout); float64."""

    inputs: torch.Tensor
    outputs: torch.Tensor


class _Moments:
    """Running sums of x x^T over the positions of a layer's inputs (and of y y^T over its outputs)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.inputs = self.outputs = None
        self.count_in = self.count_out = 0

    @staticmethod
    def _rows(tensor: torch.Tensor) -> torch.Tensor:
        """(channels, positions) in float64: (N, C, H, W) -> (C, N*H*W); (N, C) -> (C, N)."""
        if tensor.dim() == 4:
            return tensor.detach().transpose(0, 1).flatten(1).double()
        return tensor.detach().flatten(0, -2).T.double()

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x, y = self._rows(args[0]), output
        if module.bias is not None:
            y = y - module.bias.view(1, -1, *([1] * (y.dim() - 2)))
        y = self._rows(y)
        self.inputs = x @ x.T + (0 if self.inputs is None else self.inputs)
        self.outputs = y @ y.T + (0 if self.outputs is None else self.outputs)
        self.count_in += x.shape[1]
        self.count_out += y.shape[1]

    def statistics(self) -> LayerStatistics:
        return LayerStatistics((self.inputs / self.count_in).cpu(), (self.outputs / self.count_out).cpu())


def layer_statistics(model: nn.Module, data: DeviceData, images: int) -> dict[str, LayerStatistics]:
    """``LayerStatistics`` of every undecomposed rank-carrying layer of ``model``, on ``images`` training images."""
    moments = {name: _Moments(layer) for name, layer in rank_layers(model) if hasattr(layer, "weight")}
    hooks = [m.layer.register_forward_hook(m) for m in moments.values()]
    was_training = model.training
    model.eval()
    batches = data.train_batches(min(BATCH, images), torch.Generator().manual_seed(SEED))
    try:
        with torch.no_grad():
            seen = 0
            while seen < images:
                batch, _ = next(batches)
                model(batch[: images - seen].float())
                seen += len(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {name: m.statistics() for name, m in moments.items()}


def statistics_key(model: nn.Module, data_identity: dict, images: int) -> str:
    """A digest of the baseline's weights, the data and the number of images the statistics were measured on."""
    digest = hashlib.sha256(json.dumps([data_identity, images], sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        if name.endswith(".weight"):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_statistics(model: nn.Module, checkpoint: Path, data: DeviceData, images: int) -> dict[str, LayerStatistics]:
    """``layer_statistics`` of the baseline, computed once and cached beside its ``checkpoint`` (one process computes
    them when several start at once; the others wait for its file)."""
    def measure() -> dict[str, LayerStatistics]:
        print(f"activations: measuring layer statistics on {images} training images", file=sys.stderr, flush=True)
        return layer_statistics(model, data, images)

    return keyed_cache(
        checkpoint.with_suffix(".activations.pt"), statistics_key(model, data.identity, images), "statistics", measure,
        encode=lambda statistics: {n: (s.inputs, s.outputs) for n, s in statistics.items()},
        decode=lambda saved: {name: LayerStatistics(*pair) for name, pair in saved.items()}, what="layer statistics",
    )  # fmt: skip
