"""A test-only decomposition, in one file: spatial SVD (Jaderberg et al. 2014, scheme 2). A k x k conv Cin -> Cout
becomes a k x 1 conv Cin -> R and a 1 x k conv R -> Cout, from the truncated SVD of the weight reshaped to
(Cin * kh, Cout * kw). Loaded with ``--plugin tests/plugins/spatial_svd.py``; nothing in the package names it."""

import torch
from torch import nn

from ranksearch.decompose import DecomposedLayer, FactorOptions, register_decomposition
from ranksearch.models import is_eligible


@register_decomposition
class SpatialSVDConv(DecomposedLayer):
    method, code = "spatial-svd", 101

    def __init__(self, conv: nn.Conv2d, rank: float, ranks: tuple[int] | None = None):
        super().__init__(rank)
        (r,) = ranks or self.integer_ranks(conv, rank)
        (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
        self.vertical = nn.Conv2d(conv.in_channels, r, (kh, 1), padding=(ph, 0), bias=False)  # (R, Cin, kh, 1)
        self.horizontal = nn.Conv2d(r, conv.out_channels, (1, kw), padding=(0, pw), bias=conv.bias is not None)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @staticmethod
    def applies_to(layer: nn.Module) -> bool:
        return is_eligible(layer) and layer.stride == (1, 1) and layer.dilation == (1, 1) and not isinstance(
            layer.padding, str)  # fmt: skip

    @classmethod
    def integer_ranks(cls, layer: nn.Module, rank: float) -> tuple[int]:
        kh, kw = layer.kernel_size
        most = min(layer.in_channels * kh, layer.out_channels * kw)  # the reshaped weight's rank at most
        return (min(most, max(1, round(rank * layer.out_channels))),)

    @classmethod
    def macs_per_pixel(cls, layer: nn.Module, ranks: tuple[int]) -> float:
        (kh, kw), (r,) = layer.kernel_size, ranks
        return r * layer.in_channels * kh + layer.out_channels * r * kw

    @classmethod
    def saved_ranks(cls, state_dict: dict[str, torch.Tensor], name: str) -> tuple[int]:
        return (state_dict[f"{name}.vertical.weight"].shape[0],)

    @classmethod
    def factorized(cls, layer: nn.Module, rank: float, name: str, options: FactorOptions) -> "SpatialSVDConv":
        new = cls(layer, rank)
        out_channels, in_channels, kh, kw = layer.weight.shape
        r = new.vertical.out_channels
        matrix = layer.weight.detach().double().permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:r].sqrt()
        vertical = (u[:, :r] * root).T.reshape(r, in_channels, kh, 1)
        horizontal = (root[:, None] * vh[:r]).reshape(r, out_channels, 1, kw).permute(1, 0, 2, 3)
        with torch.no_grad():
            new.vertical.weight.copy_(vertical)
            new.horizontal.weight.copy_(horizontal)
            if layer.bias is not None:
                new.horizontal.bias.copy_(layer.bias)
        return new

    def integer_rank(self) -> int:
        return self.vertical.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizontal(self.vertical(x))
