"""What a decomposed layer is, whatever the method: the replacement of one conv or linear layer, carrying its
normalized rank (``rank`` buffer) and a record of its method (``decomposition`` buffer, the method's code), so that
a state_dict alone says how to rebuild it.

Each method (``tucker2``, ``cp``, ``svd``, or a plugin's) subclasses ``DecomposedLayer``, fills in its rules (which
layers it applies to, the integer rank(s) a normalized rank gives, the MACs of its form, how to factorize a weight)
and registers itself with ``@register_decomposition``: the config's and the CLI's choices, ``decompose()`` and the
rebuild from a state_dict all read ``DECOMPOSITIONS``.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..utils.plugins import same_definition


class DecompositionError(ValueError):
    """A factorization that cannot be used (non-finite or exploding); the trial fails with this reason."""


@dataclass
class FactorOptions:
    """How to factorize, for the methods that have choices (the config's values)."""

    method: str = "hosvd"  # "hosvd", "hosvd+refine", "hooi" (Tucker-2 only; CP and SVD use their plain factors) or
    # "activation" (every method: factors that reproduce the layer's outputs on real inputs, see ``activation``)
    bases: dict = field(default_factory=dict)  # by layer name: the cached Tucker-2 channel bases, or for
    # "activation" each layer's ``data_aware_basis``
    refine_iters: int = 2  # HOOI sweeps after the HOSVD start, for "hosvd+refine"
    cp_iters: int = 50  # CP-ALS sweeps (CP only)


def original_macs_per_pixel(layer: nn.Module) -> int:
    """MACs of an undecomposed conv per output pixel (Cout * Cin/groups * kh * kw), or of a linear layer per input
    row (in * out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    kh, kw = layer.kernel_size
    return layer.out_channels * layer.in_channels // layer.groups * kh * kw


def stride_area(layer: nn.Module) -> int:
    """Input pixels per output pixel (a first 1x1 conv runs at the input's resolution)."""
    stride = getattr(layer, "stride", (1, 1))
    return stride[0] * stride[1]


DECOMPOSITIONS: dict[str, type["DecomposedLayer"]] = {}  # by method name, in registration order


def register_decomposition(cls: type["DecomposedLayer"]) -> type["DecomposedLayer"]:
    """Class decorator: register a decomposition under its ``method`` name and ``code``. A second class with a
    taken name or code is refused (the same class imported again, as a plugin file can be, replaces itself)."""
    if cls.kind not in ("conv", "pointwise"):
        raise ValueError(f"decomposition {cls.method!r}: kind must be 'conv' or 'pointwise', got {cls.kind!r}")
    for other in DECOMPOSITIONS.values():
        if (other.method == cls.method or other.code == cls.code) and not same_definition(other, cls):
            raise ValueError(f"decomposition {cls.method!r} (code {cls.code}) clashes with {other.method!r} "
                             f"(code {other.code}): names and codes must be unique")  # fmt: skip
    DECOMPOSITIONS[cls.method] = cls
    return cls


def conv_decompositions() -> tuple[str, ...]:
    """The config's choices of ``decomposition``: the registered methods of kind "conv"."""
    return tuple(cls.method for cls in _by_code() if cls.kind == "conv")


def factor_methods() -> tuple[str, ...]:
    """The config's choices of ``decompose_method``: every registered decomposition's, in order, once."""
    return tuple(dict.fromkeys(m for cls in _by_code() for m in cls.factor_methods))


def _by_code() -> list[type["DecomposedLayer"]]:
    return sorted(DECOMPOSITIONS.values(), key=lambda cls: cls.code)


def by_code(code: int) -> type["DecomposedLayer"] | None:
    return next((cls for cls in DECOMPOSITIONS.values() if cls.code == code), None)


class DecomposedLayer(nn.Module):
    """Base of every method's replacement layer."""

    method: ClassVar[str]  # the registry's name of the method
    code: ClassVar[int]  # its code in the ``decomposition`` buffer (unique; saved with each layer)
    kind: ClassVar[str] = "conv"  # "conv": a choice of the config's ``decomposition`` (what k x k convs become);
    # "pointwise": what 1x1 convs and linear layers become when they carry ranks (``svd_layers``)
    factor_methods: ClassVar[tuple[str, ...]] = ("activation",)  # the ``decompose_method`` values it implements;
    # any other gives its plain factors

    @classmethod
    def uses_channel_bases(cls, method: str) -> bool:
        """True when ``method`` truncates the baseline's cached channel bases (``trial_bases``)."""
        return False

    def __init__(self, rank: float):
        super().__init__()
        self.register_buffer("rank", torch.tensor(float(rank)))
        self.register_buffer("decomposition", torch.tensor(self.code))

    # ----- rules, on the layer to replace ------------------------------------------------------------------------

    @staticmethod
    def applies_to(layer: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def integer_ranks(cls, layer: nn.Module, rank: float) -> tuple[int, ...]:
        """The integer rank(s) of the method's form of ``layer`` at normalized ``rank``."""
        raise NotImplementedError

    @classmethod
    def macs_per_pixel(cls, layer: nn.Module, ranks: tuple[int, ...]) -> float:
        """MACs per output pixel (per row, for a linear layer) of the method's form at integer ``ranks``."""
        raise NotImplementedError

    @classmethod
    def cheaper(cls, layer: nn.Module, rank: float) -> bool:
        """True when the method's form of ``layer`` at ``rank`` has fewer MACs than ``layer`` (else it is kept)."""
        return cls.macs_per_pixel(layer, cls.integer_ranks(layer, rank)) < original_macs_per_pixel(layer)

    @classmethod
    def saved_ranks(cls, state_dict: dict[str, torch.Tensor], name: str) -> tuple[int, ...]:
        """The integer ranks of layer ``name`` as saved in ``state_dict`` (read from its tensors' shapes)."""
        raise NotImplementedError

    # ----- building ----------------------------------------------------------------------------------------------

    @classmethod
    def shaped(cls, layer: nn.Module, rank: float, ranks: tuple[int, ...] | None = None) -> "DecomposedLayer":
        """The replacement's layers for ``layer`` (random weights); ``ranks`` overrides the rank rule. Every method's
        constructor takes (layer, rank, ranks)."""
        return cls(layer, rank, ranks)

    @classmethod
    def data_aware_basis(cls, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor):
        """What the ``activation`` method truncates for ``layer``, from the second moments of its input and output
        channels (``ranksearch.decompose.statistics``); computed once per layer of the baseline."""
        raise NotImplementedError

    @classmethod
    def factorized(cls, layer: nn.Module, rank: float, name: str, options: FactorOptions) -> "DecomposedLayer":
        """The replacement of ``layer`` (named ``name`` in its model) with its factors as weights."""
        raise NotImplementedError

    def integer_rank(self) -> int:
        """The rank that says how big this layer is (the largest of its integer ranks)."""
        raise NotImplementedError
