"""Truncated SVD of a 1x1 conv or a linear layer: Cin -> R -> Cout (on when the config's ``svd_layers`` is).

Normalized rank r -> R = max(1, round(r * min(Cin, Cout))) (r = 1: the exact factorization). MACs per output
pixel (per row, for a linear layer): R * (Cin + Cout), against Cin * Cout; the first layer takes the conv's stride,
so both run at the output's resolution. W (Cout, Cin) = U S V^T: first = sqrt(S) V^T, last = U sqrt(S), truncated.
"""

import torch
from torch import nn

from ..models import is_pointwise
from .activation import SVDBasis, svd_basis, svd_truncated
from .layer import DecomposedLayer, FactorOptions, register_decomposition


def svd_rank(rank: float, in_features: int, out_features: int) -> int:
    return max(1, round(rank * min(in_features, out_features)))


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (R, Cin), last (Cout, R)) with last @ first the best rank-R approximation of ``matrix`` (Cout, Cin)."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(matrix.dtype), (u[:, :rank] * root).to(matrix.dtype)


def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


@register_decomposition
class SVDLayer(DecomposedLayer):
    """Two linear maps Cin -> R -> Cout: 1x1 convs for a 1x1 conv, linear layers for a linear layer."""

    method, code, kind = "svd", 3, "pointwise"

    def __init__(self, layer: nn.Module, rank: float, ranks: tuple[int] | None = None):
        super().__init__(rank)
        (r,) = ranks or self.integer_ranks(layer, rank)
        self.in_channels, self.out_channels = _features(layer)
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            self.first, self.last = nn.Linear(self.in_channels, r, bias=False), nn.Linear(r, self.out_channels, bias)
        else:
            self.first = nn.Conv2d(self.in_channels, r, 1, layer.stride, layer.padding, bias=False)
            self.last = nn.Conv2d(r, self.out_channels, 1, bias=bias)
        self.to(device=layer.weight.device, dtype=layer.weight.dtype)

    @staticmethod
    def applies_to(layer: nn.Module) -> bool:
        return is_pointwise(layer)  # a 1x1 conv with groups == 1, or a linear layer

    @classmethod
    def integer_ranks(cls, layer: nn.Module, rank: float) -> tuple[int]:
        return (svd_rank(rank, *_features(layer)),)

    @classmethod
    def macs_per_pixel(cls, layer: nn.Module, ranks: tuple[int]) -> float:
        return ranks[0] * sum(_features(layer))

    @classmethod
    def saved_ranks(cls, state_dict: dict[str, torch.Tensor], name: str) -> tuple[int]:
        return (state_dict[f"{name}.first.weight"].shape[0],)  # (R, Cin) or (R, Cin, 1, 1)

    @classmethod
    def data_aware_basis(cls, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor) -> SVDBasis:
        return svd_basis(layer.weight.flatten(1), inputs)

    @classmethod
    def factorized(cls, layer: nn.Module, rank: float, name: str, options: FactorOptions) -> "SVDLayer":
        new = cls(layer, rank)
        r = new.integer_rank()
        if options.method == "activation":  # the truncated SVD of W S, mapped back (see ``activation``)
            first, last = (t.to(layer.weight) for t in svd_truncated(options.bases[name], r))
        else:
            first, last = svd_factors(layer.weight.flatten(1), r)  # (R, Cin), (Cout, R)
        with torch.no_grad():
            new.first.weight.copy_(first.view_as(new.first.weight))
            new.last.weight.copy_(last.view_as(new.last.weight))
            if layer.bias is not None:
                new.last.bias.copy_(layer.bias)
        return new

    @property
    def linear(self) -> bool:
        return isinstance(self.first, nn.Linear)

    def integer_rank(self) -> int:
        return self.first.out_features if self.linear else self.first.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))
