"""Tucker-2 decomposition of convs over their channel modes (Kim et al. 2015, arXiv 1511.06530).

A k x k conv Cin -> Cout becomes 1x1 Cin -> R_in, k x k R_in -> R_out (the core), 1x1 R_out -> Cout.
Three layers of code: ``tucker2_factors`` (pure math on a weight tensor), ``Tucker2Conv.from_conv``
(one conv into its replacement) and ``decompose`` (walks a model by its rank buffers).
"""

import copy
import warnings

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from torch import nn

from .models import rank_modules


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
    if conv.groups != 1 or conv.kernel_size == (1, 1):
        return False
    rank_in, rank_out = tucker2_ranks(rank, conv.in_channels, conv.out_channels)
    return tucker2_macs_per_pixel(conv, rank_in, rank_out) < conv_macs_per_pixel(conv)


def tucker2_factors(
    weight: torch.Tensor, rank_in: int, rank_out: int, n_iter_max: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight (Cout, Cin, kh, kw) over modes 0 and 1, by HOOI (TensorLy).

    Returns (first, core, last): first (R_in, Cin), core (R_out, R_in, kh, kw), last (Cout, R_out),
    with weight ~= core x_0 last x_1 first.T.
    """
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


METHODS = ("hooi", "hosvd", "hosvd+refine")  # see tucker2_factors and hosvd_factors
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
    weight: torch.Tensor, rank_in: int, rank_out: int, method: str = "hooi", bases: Bases | None = None,
    refine_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Tucker-2 factors by ``method``: "hooi" (TensorLy), "hosvd", or "hosvd+refine"."""
    if method == "hooi":
        return tucker2_factors(weight, rank_in, rank_out)
    if method not in METHODS:
        raise ValueError(f"unknown decomposition method {method!r}; choose one of {', '.join(METHODS)}")
    return hosvd_factors(weight, rank_in, rank_out, bases, refine_iters if method == "hosvd+refine" else 0)


class Tucker2Conv(nn.Module):
    """1x1 Cin -> R_in, k x k R_in -> R_out (stride, padding, dilation of the original), 1x1 R_out -> Cout."""

    def __init__(self, conv: nn.Conv2d, rank: float, ranks: tuple[int, int] | None = None):
        """The layer shapes for ``conv`` at normalized ``rank``; ``ranks`` (R_in, R_out) overrides the rule."""
        super().__init__()
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
        self.register_buffer("rank", torch.tensor(float(rank)))
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: float, method: str = "hosvd", bases: Bases | None = None,
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


def decompose(
    model: nn.Module, inplace: bool = False, factorize: bool = True, method: str = "hosvd",
    bases: dict[str, Bases] | None = None, refine_iters: int = 2,
) -> nn.Module:  # fmt: skip
    """Replace every conv whose rank buffer makes Tucker-2 cheaper by its Tucker-2 form.

    Convs that would not get cheaper stay as they are (their buffer still records the rank).
    ``method``: "hosvd" (the default, as in the config), "hosvd+refine" (truncations of ``bases``, the
    cached ``channel_bases`` by conv name, computed here when absent) or "hooi" (TensorLy's partial_tucker).
    ``factorize=False`` builds the layer shapes only (e.g. to count the MACs of a rank choice).
    """
    if not inplace:
        model = copy.deepcopy(model)
    for layers in rank_modules(model).values():
        for name, layer in layers:
            if not isinstance(layer, nn.Conv2d):
                continue  # already decomposed
            rank = float(layer.rank)
            if not should_decompose(layer, rank):
                continue
            if factorize:
                conv_bases = (bases or {}).get(name)
                new = Tucker2Conv.from_conv(layer, rank, method, conv_bases, refine_iters)
            else:
                new = Tucker2Conv(layer, rank)
            model.set_submodule(name, new)
    return model


def model_bases(model: nn.Module) -> dict[str, Bases]:
    """``channel_bases`` of every undecomposed conv of ``model``, by qualified name."""
    return {
        name: channel_bases(layer.weight)
        for layers in rank_modules(model).values()
        for name, layer in layers
        if isinstance(layer, nn.Conv2d)
    }


TUCKER2_KEYS = ("first.weight", "core.weight", "last.weight")


def _saved_tucker2_ranks(state_dict: dict[str, torch.Tensor], name: str) -> tuple[int, int] | None:
    """(R_in, R_out) of conv ``name`` when ``state_dict`` holds it in Tucker-2 form, else None."""
    tensors = [state_dict.get(f"{name}.{key}") for key in TUCKER2_KEYS]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
        return None
    first, core, _ = tensors  # (R_in, Cin, 1, 1), (R_out, R_in, kh, kw), (Cout, R_out, 1, 1)
    return first.shape[0], core.shape[0]


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

    The saved tensors decide each conv's form, not today's rules: a conv saved as ``<name>.first/core/last``
    becomes a Tucker2Conv with the saved R_in and R_out; any other stays a plain conv. A state_dict that does
    not fit (keys or shapes) raises a one-line ValueError.
    """
    for layers in rank_modules(model).values():
        for name, layer in layers:
            key = f"{name}.rank"
            if key not in state_dict:
                raise ValueError(f"state_dict has no rank buffer {key!r}: not a ranksearch model")
            ranks = _saved_tucker2_ranks(state_dict, name)
            if ranks is not None and isinstance(layer, nn.Conv2d):
                model.set_submodule(name, Tucker2Conv(layer, float(layer.rank), ranks))
    _check_fits(model, state_dict)
    model.load_state_dict(state_dict)
    return model


def reconstruction_error(conv: nn.Conv2d, layer: Tucker2Conv) -> float:
    """Relative Frobenius error of the Tucker-2 weight against the conv's weight."""
    with torch.no_grad():
        first = layer.first.weight[:, :, 0, 0]  # (R_in, Cin)
        last = layer.last.weight[:, :, 0, 0]  # (Cout, R_out)
        full = torch.einsum("or,rshw,si->oihw", last, layer.core.weight, first)  # (Cout, Cin, kh, kw)
        return float(torch.linalg.norm(full - conv.weight) / torch.linalg.norm(conv.weight))


__all__ = ["decompose", "Tucker2Conv", "tucker2_factors", "tucker2_ranks", "should_decompose"]
