"""Decompositions as a registry (``DECOMPOSITIONS``, filled by ``@register_decomposition``): ``tucker2`` and ``cp``
for k x k convs, ``svd`` for 1x1 convs and linear layers; a plugin file (``--plugin``) can add one.

``layer`` (what every decomposed layer is: its rank, its method record, its rules), one file per method
(``tucker2``, ``cp``, ``svd``: pure math on a weight, then the replacement layer), and ``surgery`` (walking a
model: ``decompose``, ``decomposed_from_state_dict``). Rank estimation
(VBMF): ``vbmf``; the layer statistics of the data-aware method: ``statistics``.
"""

from .cp import CPConv, cp_factors, cp_rank
from .layer import (
    DECOMPOSITIONS,
    DecomposedLayer,
    DecompositionError,
    FactorOptions,
    conv_decompositions,
    factor_methods,
    original_macs_per_pixel,
    register_decomposition,
)
from .surgery import (
    conv_ranks,
    data_aware_bases,
    decompose,
    decomposed_from_state_dict,
    integer_rank,
    method_for,
    saved_method,
    should_decompose,
)
from .svd import SVDLayer, svd_factors, svd_rank
from .tucker2 import METHODS as TUCKER2_METHODS
from .tucker2 import (
    Bases,
    Tucker2Conv,
    channel_bases,
    conv_macs_per_pixel,
    factorize,
    hosvd_factors,
    model_bases,
    reconstruction_error,
    tucker2_factors,
    tucker2_macs_per_pixel,
    tucker2_ranks,
)

__all__ = [
    "DECOMPOSITIONS", "TUCKER2_METHODS", "Bases", "CPConv", "DecomposedLayer", "DecompositionError",
    "FactorOptions", "SVDLayer", "Tucker2Conv", "channel_bases", "conv_decompositions", "conv_macs_per_pixel",
    "conv_ranks", "cp_factors", "cp_rank", "data_aware_bases", "factor_methods", "register_decomposition",
    "decompose", "decomposed_from_state_dict", "factorize", "hosvd_factors", "integer_rank", "method_for",
    "model_bases", "original_macs_per_pixel", "reconstruction_error", "saved_method", "should_decompose",
    "svd_factors", "svd_rank", "tucker2_factors", "tucker2_macs_per_pixel", "tucker2_ranks",
]  # fmt: skip
