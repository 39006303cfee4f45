"""Tucker-2 decomposition of convs over their channel modes (Kim et al. 2015, arXiv 1511.06530).

A k x k conv Cin -> Cout becomes 1x1 Cin -> R_in, k x k R_in -> R_out (the core), 1x1 R_out -> Cout.
Normalized rank r -> R = max(1, round(r * Cout)), R_in = min(R, Cin), R_out = min(R, Cout); MACs per output pixel
s*Cin*R_in + R_in*R_out*kh*kw + R_out*Cout (s: input pixels per output pixel, for a strided conv), against
Cout*Cin*kh*kw. Pure math on a weight tensor (``tucker2_factors``, ``hosvd_factors``), then ``Tucker2Conv``
(one conv into its replacement); ``surgery.decompose`` walks a model.
"""

import warnings

import torch
from torch import nn

from ..models import is_eligible, rank_layers
from .activation import Tucker2Basis, tucker2_basis, tucker2_truncated
from .layer import DecomposedLayer, FactorOptions, register_decomposition


def tucker2_ranks(rank: float, in_channels: int, out_channels: int) -> tuple[int, int]:
    """(R_in, R_out) for a normalized rank: R = max(1, round(r * Cout)), clamped to each mode."""
    r = max(1, round(rank * out_channels))
    return min(r, in_channels), min(r, out_channels)


def conv_macs_per_pixel(conv: nn.Conv2d) -> int:
    """MACs of a plain conv per output pixel: Cout * Cin/groups * kh * kw."""
    kh, kw = conv.kernel_size
    return conv.out_channels * conv.in_channels // conv.groups * kh * kw


def tucker2_macs_per_pixel(conv: nn.Conv2d, rank_in: int, rank_out: int) -> float:
    """MACs of the Tucker-2 form per output pixel; the first 1x1 runs at the input resolution."""
    kh, kw = conv.kernel_size
    input_pixels_per_output = conv.stride[0] * conv.stride[1]
    return (
        input_pixels_per_output * conv.in_channels * rank_in
        + rank_in * rank_out * kh * kw
        + rank_out * conv.out_channels
    )


def should_decompose(conv: nn.Conv2d, rank: float) -> bool:
    """True when the conv is decomposable and its Tucker-2 form has fewer MACs than the conv."""
    return Tucker2Conv.applies_to(conv) and Tucker2Conv.cheaper(conv, rank)


def tucker2_factors(
    weight: torch.Tensor, rank_in: int, rank_out: int, n_iter_max: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight (Cout, Cin, kh, kw) over modes 0 and 1, by HOOI (TensorLy).

    Returns (first, core, last): first (R_in, Cin), core (R_out, R_in, kh, kw), last (Cout, R_out),
    with weight ~= core x_0 last x_1 first.T.
    """
    import tensorly as tl  # only HOOI needs it: loading a model or decomposing by HOSVD does not
    from tensorly.decomposition import partial_tucker

    out_channels, in_channels = weight.shape[:2]
    rank_in, rank_out = min(rank_in, in_channels), min(rank_out, out_channels)
    w = weight.detach().to(torch.float64)
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorLy warns on full-rank modes, which are exact anyway
        (core, (last, first_t)), _ = partial_tucker(
            w, rank=[rank_out, rank_in], modes=[0, 1], n_iter_max=n_iter_max, init="svd"
        )
    dtype = weight.dtype
    return first_t.T.contiguous().to(dtype), core.contiguous().to(dtype), last.contiguous().to(dtype)


METHODS = ("hooi", "hosvd", "hosvd+refine", "activation")  # see tucker2_factors, hosvd_factors, tucker2_truncated
Bases = tuple[torch.Tensor, torch.Tensor]  # (U_out (Cout, Cout), U_in (Cin, Cin)), most significant first


def _leading_left_vectors(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading left singular vectors of ``matrix`` (rows, cols), count <= rows.

    Eigenvectors of the (rows, rows) Gram matrix: much cheaper than an SVD when cols >> rows, and
    defined even when count > cols (the extra vectors then span the null space).
    """
    _, vectors = torch.linalg.eigh(matrix @ matrix.T)  # ascending eigenvalues
    return vectors.flip(1)[:, :count]


def channel_bases(weight: torch.Tensor) -> Bases:
    """Left singular vectors of a conv weight's mode-0 and mode-1 unfoldings, in float64.

    Computed once per conv of the baseline: a Tucker-2 at any rank is then a truncation of these.
    """
    w = weight.detach().to(torch.float64)  # (Cout, Cin, kh, kw)
    u_out = _leading_left_vectors(w.flatten(1), w.shape[0])  # (Cout, Cout)
    u_in = _leading_left_vectors(w.transpose(0, 1).flatten(1), w.shape[1])  # (Cin, Cin)
    return u_out, u_in


def hosvd_factors(
    weight: torch.Tensor, rank_in: int, rank_out: int, bases: Bases | None = None, refine_iters: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 by truncated HOSVD from (cached) channel bases, then ``refine_iters`` HOOI sweeps.

    Returns (first, core, last) like ``tucker2_factors``.
    """
    w = weight.detach().to(torch.float64)  # (Cout, Cin, kh, kw)
    u_out, u_in = bases if bases is not None else channel_bases(weight)
    rank_in, rank_out = min(rank_in, w.shape[1]), min(rank_out, w.shape[0])
    last, first_t = u_out[:, :rank_out], u_in[:, :rank_in]  # (Cout, R_out), (Cin, R_in)
    for _ in range(refine_iters):  # alternate: best output basis for the input basis, then the reverse
        projected = torch.einsum("oihw,is->oshw", w, first_t)  # (Cout, R_in, kh, kw)
        last = _leading_left_vectors(projected.flatten(1), rank_out)
        projected = torch.einsum("oihw,or->irhw", w, last)  # (Cin, R_out, kh, kw)
        first_t = _leading_left_vectors(projected.flatten(1), rank_in)
    core = torch.einsum("oihw,or,is->rshw", w, last, first_t)  # (R_out, R_in, kh, kw)
    dtype = weight.dtype
    return first_t.T.contiguous().to(dtype), core.contiguous().to(dtype), last.contiguous().to(dtype)


def factorize(
    weight: torch.Tensor, rank_in: int, rank_out: int, method: str = "hooi", bases: Bases | Tucker2Basis | None = None,
    refine_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Tucker-2 factors by ``method``: "hooi" (TensorLy), "hosvd", "hosvd+refine", or "activation" (``bases``: the
    conv's ``Tucker2Basis``, required)."""
    if method == "hooi":
        return tucker2_factors(weight, rank_in, rank_out)
    if method == "activation":
        if not isinstance(bases, Tucker2Basis):
            raise ValueError("the activation method needs the conv's data-aware basis "
                             "(ranksearch.decompose.statistics)")
        return tucker2_truncated(weight, bases, min(rank_in, weight.shape[1]), min(rank_out, weight.shape[0]))
    if method not in METHODS:
        raise ValueError(f"unknown decomposition method {method!r}; choose one of {', '.join(METHODS)}")
    return hosvd_factors(weight, rank_in, rank_out, bases, refine_iters if method == "hosvd+refine" else 0)


@register_decomposition
class Tucker2Conv(DecomposedLayer):
    """1x1 Cin -> R_in, k x k R_in -> R_out (stride, padding, dilation of the original), 1x1 R_out -> Cout."""

    method, code = "tucker2", 1
    factor_methods = ("hosvd", "hosvd+refine", "hooi", "activation")

    @classmethod
    def uses_channel_bases(cls, method: str) -> bool:
        return method in ("hosvd", "hosvd+refine")

    def __init__(self, conv: nn.Conv2d, rank: float, ranks: tuple[int, int] | None = None):
        """The layer shapes for ``conv`` at normalized ``rank``; ``ranks`` (R_in, R_out) overrides the rule."""
        super().__init__(rank)
        rank_in, rank_out = ranks or tucker2_ranks(rank, conv.in_channels, conv.out_channels)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.first = nn.Conv2d(conv.in_channels, rank_in, 1, bias=False)
        self.core = nn.Conv2d(
            rank_in,
            rank_out,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            bias=False,
        )
        self.last = nn.Conv2d(rank_out, conv.out_channels, 1, bias=conv.bias is not None)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @staticmethod
    def applies_to(layer: nn.Module) -> bool:
        return is_eligible(layer)  # a k x k conv (k > 1) with groups == 1

    @classmethod
    def integer_ranks(cls, layer: nn.Module, rank: float) -> tuple[int, int]:
        return tucker2_ranks(rank, layer.in_channels, layer.out_channels)

    @classmethod
    def macs_per_pixel(cls, layer: nn.Module, ranks: tuple[int, int]) -> float:
        return tucker2_macs_per_pixel(layer, *ranks)

    @classmethod
    def saved_ranks(cls, state_dict: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
        first, core = state_dict[f"{name}.first.weight"], state_dict[f"{name}.core.weight"]
        return first.shape[0], core.shape[0]  # (R_in, Cin, 1, 1), (R_out, R_in, kh, kw)

    @classmethod
    def data_aware_basis(cls, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor) -> Tucker2Basis:
        return tucker2_basis(layer.weight, inputs, outputs)

    @classmethod
    def factorized(cls, layer: nn.Module, rank: float, name: str, options: FactorOptions) -> "Tucker2Conv":
        return cls.from_conv(layer, rank, options.method, options.bases.get(name), options.refine_iters)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: float, method: str = "hosvd", bases: Bases | Tucker2Basis | None = None,
                  refine_iters: int = 2) -> "Tucker2Conv":  # fmt: skip
        """The Tucker-2 replacement of ``conv`` with its factors (by ``method``) as weights."""
        layer = cls(conv, rank)
        rank_in, rank_out = layer.first.out_channels, layer.core.out_channels
        first, core, last = factorize(conv.weight, rank_in, rank_out, method, bases, refine_iters)
        with torch.no_grad():
            layer.first.weight.copy_(first[:, :, None, None])  # (R_in, Cin, 1, 1)
            layer.core.weight.copy_(core)  # (R_out, R_in, kh, kw)
            layer.last.weight.copy_(last[:, :, None, None])  # (Cout, R_out, 1, 1)
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    def integer_rank(self) -> int:
        return max(1, round(float(self.rank) * self.out_channels))  # R, before the clamp to each mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


def model_bases(model: nn.Module) -> dict[str, Bases]:
    """``channel_bases`` of every undecomposed k x k conv of ``model`` (those Tucker-2 applies to), by name."""
    return {name: channel_bases(layer.weight) for name, layer in rank_layers(model) if Tucker2Conv.applies_to(layer)}


def reconstruction_error(conv: nn.Conv2d, layer: Tucker2Conv) -> float:
    """Relative Frobenius error of the Tucker-2 weight against the conv's weight."""
    with torch.no_grad():
        first = layer.first.weight[:, :, 0, 0]  # (R_in, Cin)
        last = layer.last.weight[:, :, 0, 0]  # (Cout, R_out)
        full = torch.einsum("or,rshw,si->oihw", last, layer.core.weight, first)  # (Cout, Cin, kh, kw)
        return float(torch.linalg.norm(full - conv.weight) / torch.linalg.norm(conv.weight))
