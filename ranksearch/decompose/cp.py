"""CP decomposition of a conv (Lebedev et al. 2015, arXiv 1412.6553): a sum of R rank-one terms over its four modes.

A k x k conv Cin -> Cout becomes 1x1 Cin -> R, kh x 1 depthwise R -> R, 1 x kw depthwise R -> R, 1x1 R -> Cout
(the last carries the bias; the depthwise pair carries the stride, padding and dilation, one axis each).

Normalized rank r -> R = max(1, round(r * R_even)), where R_even = ceil(Cout*Cin*kh*kw / (s*Cin + sw*kh + kw + Cout))
is the break-even rank, at which the CP form costs what the conv does (s: input pixels per output pixel, sw: the
horizontal stride). So r = 1 keeps the conv and r = 1/4 costs about a quarter of it. MACs per output pixel:
R * (s*Cin + sw*kh + kw + Cout).

Factors by CP-ALS from an SVD start: TensorLy ``parafac``'s algorithm and start, written here for 4-way conv
weights, because TensorLy's Khatri-Rao products dominate its time: 50 sweeps of a random 128 -> 128 3x3 weight at
R = 141 take 1.6 s here against ~27 s in ``parafac`` (one CPU core), to the same error (0.748 vs 0.755).
CP-ALS can fail at some ranks: a non-finite reconstruction, one worse than
none (relative error > 1), or a degenerate one (terms that cancel: sum of term norms > 100 x the weight's norm)
raises ``DecompositionError`` with the reason, which fails that trial only.
"""

import math

import torch
from torch import nn

from ..models import is_eligible
from .activation import InputWhitening, input_whitening
from .layer import (
    DecomposedLayer,
    DecompositionError,
    FactorOptions,
    original_macs_per_pixel,
    register_decomposition,
    stride_area,
)

MAX_RELATIVE_ERROR = 1.0  # worse than the zero tensor: ALS went astray
MAX_TERM_NORMS = 100.0  # sum of the rank-one terms' norms over the weight's norm: terms cancelling each other


def cp_cost_per_rank(conv: nn.Conv2d) -> int:
    """MACs per output pixel that each CP component costs."""
    kh, kw = conv.kernel_size
    return stride_area(conv) * conv.in_channels + conv.stride[1] * kh + kw + conv.out_channels


def cp_rank(rank: float, conv: nn.Conv2d) -> int:
    """R for a normalized rank: a fraction of the break-even rank (see the module's docstring)."""
    break_even = math.ceil(original_macs_per_pixel(conv) / cp_cost_per_rank(conv))
    return max(1, round(rank * break_even))


def cp_factors(weight: torch.Tensor, rank: int, n_iter_max: int = 50, seed: int = 0) -> list[torch.Tensor]:
    """CP of a conv weight (Cout, Cin, kh, kw) at ``rank``: [out (Cout, R), in (Cin, R), h (kh, R), w (kw, R)] with
    weight ~= sum_r out[:, r] o in[:, r] o h[:, r] o w[:, r]; each term's norm is shared evenly by its 4 factors.

    Raises DecompositionError when the result is unusable (see the module's docstring).
    """
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise DecompositionError("the weight is not finite")
    try:
        factors = als(w, svd_start(w, rank, seed), n_iter_max)
    except torch.linalg.LinAlgError as error:  # a singular system: factors that collapsed
        raise DecompositionError(f"CP-ALS failed ({str(error).splitlines()[0]})") from None
    factors, scale = balanced(factors)
    _check_usable(w, factors, scale)
    return [f.contiguous().to(weight.dtype) for f in factors]


def balanced(factors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same CP terms with each term's norm shared evenly by its factors; and the terms' norms (R,)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (len(factors), R)
    scale = norms.prod(0)  # (R,): each term's norm
    share = 1 / len(factors)
    return [f / n.clamp_min(1e-300) * scale.clamp_min(0) ** share for f, n in zip(factors, norms, strict=True)], scale


def svd_start(w: torch.Tensor, rank: int, seed: int) -> list[torch.Tensor]:
    """Each mode's leading left singular vectors (TensorLy's "svd" start); modes with fewer than ``rank`` of them
    are completed with Gaussian columns, seeded."""
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for mode in range(w.dim()):
        unfolded = w.movedim(mode, 0).flatten(1)  # (dim, rest)
        u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
        start = u[:, :rank] * s[: min(rank, s.numel())]
        if start.shape[1] < rank:
            extra = torch.randn(w.shape[mode], rank - start.shape[1], generator=generator, dtype=w.dtype)
            start = torch.cat([start, extra * s[0] / w.shape[mode] ** 0.5], dim=1)
        factors.append(start)
    return factors


def khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product of (d_k, R) factors: (prod d_k, R), the first factor's index slowest."""
    product = factors[0]
    for factor in factors[1:]:
        product = (product[:, None, :] * factor[None, :, :]).flatten(0, 1)
    return product


def als(w: torch.Tensor, factors: list[torch.Tensor], n_iter_max: int, tol: float = 1e-7) -> list[torch.Tensor]:
    """Alternating least squares: each factor in turn is the exact least-squares fit given the others (its
    mode's unfolding times the others' Khatri-Rao product, through the inverse of their Gram matrices' Hadamard
    product), until the relative error changes by less than ``tol``."""
    out, into, h, k = factors
    cout, cin, kh, kw = w.shape
    by_out, by_in = w.flatten(1), w.transpose(0, 1).flatten(1)  # (Cout, Cin*kh*kw), (Cin, Cout*kh*kw)
    norm, previous = torch.linalg.norm(w), math.inf
    for _ in range(n_iter_max):
        out = _least_squares(by_out @ khatri_rao([into, h, k]), [into, h, k])  # (Cout, R)
        into = _least_squares(by_in @ khatri_rao([out, h, k]), [out, h, k])  # (Cin, R)
        summed = (by_out.T @ out).view(cin, kh, kw, -1)  # (Cin, kh, kw, R): the kernel modes' products share it
        h = _least_squares(torch.einsum("ihwr,ir,wr->hr", summed, into, k), [out, into, k])  # (kh, R)
        k = _least_squares(torch.einsum("ihwr,ir,hr->wr", summed, into, h), [out, into, h])  # (kw, R)
        error = float(torch.linalg.norm(cp_weight([out, into, h, k]) - w) / norm)
        if not math.isfinite(error) or abs(previous - error) < tol:
            break
        previous = error
    return [out, into, h, k]


def _least_squares(mttkrp: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """The factor F minimising the error given the ``others``: F (gram) = mttkrp, with a tiny ridge."""
    gram = torch.stack([f.T @ f for f in others]).prod(0)  # (R, R)
    ridge = 1e-12 * gram.diagonal().mean().clamp_min(1e-300) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, mttkrp.T).T


def _check_usable(w: torch.Tensor, factors: list[torch.Tensor], weights: torch.Tensor) -> None:
    norm = torch.linalg.norm(w)
    if not all(torch.isfinite(f).all() for f in factors):
        raise DecompositionError("CP-ALS diverged: non-finite factors")
    error = float(torch.linalg.norm(cp_weight(factors) - w) / norm)
    if not error <= MAX_RELATIVE_ERROR:
        raise DecompositionError(f"CP-ALS diverged: relative reconstruction error {error:.3g}")
    spread = float(weights.abs().sum() / norm)
    if spread > MAX_TERM_NORMS:
        raise DecompositionError(
            f"CP-ALS degenerated: its terms cancel (term norms sum to {spread:.3g} x the weight's)"
        )


def cp_weight(factors: list[torch.Tensor]) -> torch.Tensor:
    """The (Cout, Cin, kh, kw) weight that CP ``factors`` stand for."""
    out, *rest = factors
    return (out @ khatri_rao(rest).T).view(out.shape[0], *(f.shape[0] for f in rest))


@register_decomposition
class CPConv(DecomposedLayer):
    """1x1 Cin -> R, kh x 1 depthwise, 1 x kw depthwise, 1x1 R -> Cout."""

    method, code = "cp", 2

    def __init__(self, conv: nn.Conv2d, rank: float, ranks: tuple[int] | None = None):
        super().__init__(rank)
        (r,) = ranks or self.integer_ranks(conv, rank)
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        ph, pw = conv.padding
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        mode = conv.padding_mode
        self.first = nn.Conv2d(conv.in_channels, r, 1, bias=False)
        self.vertical = nn.Conv2d(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, bias=False, padding_mode=mode)
        self.horizontal = nn.Conv2d(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, bias=False, padding_mode=mode)
        self.last = nn.Conv2d(r, conv.out_channels, 1, bias=conv.bias is not None)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @staticmethod
    def applies_to(layer: nn.Module) -> bool:
        return is_eligible(layer) and not isinstance(layer.padding, str)  # "same"/"valid" padding: not separable here

    @classmethod
    def integer_ranks(cls, layer: nn.Module, rank: float) -> tuple[int]:
        return (cp_rank(rank, layer),)

    @classmethod
    def macs_per_pixel(cls, layer: nn.Module, ranks: tuple[int]) -> float:
        return ranks[0] * cp_cost_per_rank(layer)

    @classmethod
    def saved_ranks(cls, state_dict: dict[str, torch.Tensor], name: str) -> tuple[int]:
        return (state_dict[f"{name}.first.weight"].shape[0],)  # (R, Cin, 1, 1)

    @classmethod
    def data_aware_basis(cls, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor) -> InputWhitening:
        return input_whitening(inputs)

    @classmethod
    def factorized(cls, layer: nn.Module, rank: float, name: str, options: FactorOptions) -> "CPConv":
        new = cls(layer, rank)
        weight, whitening = layer.weight, None
        if options.method == "activation":  # CP-ALS of the input-whitened weight, its input factor mapped back
            whitening = options.bases[name]
            weight = torch.einsum("ojhw,ji->oihw", weight.detach().double().cpu(), whitening.s).to(weight)
        try:
            out, into, h, w = cp_factors(weight, new.first.out_channels, options.cp_iters)
        except DecompositionError as error:
            raise DecompositionError(f"{name} at CP rank {new.first.out_channels}: {error}") from None
        if whitening is not None:  # back from the whitened space, then the terms' norms shared evenly again
            mapped = [out, whitening.s_inv @ into.double().cpu(), h, w]
            out, into, h, w = (f.to(layer.weight) for f in balanced([f.double().cpu() for f in mapped])[0])
        with torch.no_grad():
            new.first.weight.copy_(into.T[:, :, None, None])  # (R, Cin, 1, 1)
            new.vertical.weight.copy_(h.T[:, None, :, None])  # (R, 1, kh, 1)
            new.horizontal.weight.copy_(w.T[:, None, None, :])  # (R, 1, 1, kw)
            new.last.weight.copy_(out[:, :, None, None])  # (Cout, R, 1, 1)
            if layer.bias is not None:
                new.last.bias.copy_(layer.bias)
        return new

    def integer_rank(self) -> int:
        return self.first.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))
