"""Data-aware factors (the ``activation`` method): chosen to reproduce a layer's outputs on real inputs, not its
weights, from the second moments of its input and output channels (``ranksearch.decompose.statistics``).

With Sigma = E[x x^T] over the layer's input channels and S its symmetric square root, the output error of an input
projection P, E ||W (x - P x)||^2, is ||G (I - P) S||_F^2 where G^T G = the weight's input-mode Gram matrix (exact for
a linear layer or a 1x1 conv; for a k x k conv, when the channels at different offsets of a patch are uncorrelated).
Its best rank-R solution is P = (S V_R)(V_R^T S^-1), V_R the leading eigenvectors of S G^T G S: the whitening of
ASVD / SVD-LLM. So:

- Tucker-2: the last 1x1 is the leading eigenvectors of E[y y^T] (output-response PCA, Zhang et al. 2015,
  arXiv 1505.06798); the first 1x1 is V_R^T S^-1, and the core is the weight between the two, W x_out U^T x_in (S V_R).
- SVD: the truncated SVD of W S, mapped back: first = sqrt(s) V^T S^-1, last = U sqrt(s).
- CP: CP-ALS of the input-whitened weight W x_in S, whose input factor is then mapped back by S^-1.

Each basis below is computed once per layer of the baseline; a trial only truncates it. The factors a trial gets
are then re-expressed, for the same product, in the shape plain HOSVD and SVD give: orthonormal channel factors
with the scale in the core (Tucker-2), balanced singular values (SVD), terms' norms shared evenly (CP). The whitened
factor V_R^T S^-1 itself is badly scaled for SGD: fine-tuned as it is, it lost accuracy that the orthonormal form
keeps (BENCHMARKS.md, "Data-aware factors").
"""

from dataclasses import dataclass

import torch

DAMPING = 1e-6  # eigenvalues of Sigma floored at this fraction of their mean: dead channels stay invertible


def whitening(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1): the symmetric square root of the second-moment matrix ``sigma`` and its inverse (float64)."""
    sigma = sigma.double()
    values, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    values = values.clamp_min(DAMPING * values.mean().clamp_min(1e-30))
    root = values.sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def _leading_eigenvectors(symmetric: torch.Tensor) -> torch.Tensor:
    """All eigenvectors of a symmetric matrix as columns, the largest eigenvalue first."""
    _, vectors = torch.linalg.eigh((symmetric + symmetric.T) / 2)
    return vectors.flip(1)


@dataclass
class Tucker2Basis:
    """A conv's data-aware Tucker-2 bases, most significant first: ``last`` (Cout, Cout) columns span the output
    responses; rows of ``first`` (Cin, Cin) project the input, columns of ``lift`` (Cin, Cin) carry it back."""

    last: torch.Tensor
    first: torch.Tensor
    lift: torch.Tensor


def tucker2_basis(weight: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor) -> Tucker2Basis:
    """``Tucker2Basis`` of a conv weight (Cout, Cin, kh, kw) from its input and output second moments."""
    w = weight.detach().double().cpu()
    s, s_inv = whitening(inputs)
    by_input = w.transpose(0, 1).flatten(1)  # (Cin, Cout*kh*kw)
    v = _leading_eigenvectors(s @ (by_input @ by_input.T) @ s)  # (Cin, Cin)
    return Tucker2Basis(last=_leading_eigenvectors(outputs.double()), first=v.T @ s_inv, lift=s @ v)


def tucker2_truncated(
    weight: torch.Tensor, basis: Tucker2Basis, rank_in: int, rank_out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first (R_in, Cin), core (R_out, R_in, kh, kw), last (Cout, R_out)) at the given ranks, as the weight is."""
    w = weight.detach().double().cpu()
    last, first, lift = basis.last[:, :rank_out], basis.first[:rank_in], basis.lift[:, :rank_in]
    q, r = torch.linalg.qr(first.T)  # first = r^T q^T: orthonormal rows q^T, the rest r^T moves into the core
    core = torch.einsum("oihw,or,is->rshw", w, last, lift @ r.T)  # (R_out, R_in, kh, kw)
    first = q.T  # (R_in, Cin)
    dtype, device = weight.dtype, weight.device
    return tuple(t.contiguous().to(device=device, dtype=dtype) for t in (first, core, last))


@dataclass
class SVDBasis:
    """A matrix's data-aware SVD: W S = U diag(s) V^T; ``last`` = U sqrt(s), rows of ``first`` = sqrt(s) V^T S^-1."""

    first: torch.Tensor  # (k, Cin)
    last: torch.Tensor  # (Cout, k)


def svd_basis(matrix: torch.Tensor, inputs: torch.Tensor) -> SVDBasis:
    """``SVDBasis`` of a (Cout, Cin) matrix from the second moments of its inputs."""
    s, s_inv = whitening(inputs)
    u, values, vh = torch.linalg.svd(matrix.detach().double().cpu() @ s, full_matrices=False)
    root = values.sqrt()
    return SVDBasis(first=root[:, None] * vh @ s_inv, last=u * root)


def svd_truncated(basis: SVDBasis, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (R, Cin), last (Cout, R)) of the rank-R data-aware product, split as a plain SVD splits: U sqrt(s),
    sqrt(s) V^T with orthonormal U and V (float64)."""
    first, last = basis.first[:rank], basis.last[:, :rank]
    q_first, r_first = torch.linalg.qr(first.T)  # first = r_first^T q_first^T
    q_last, r_last = torch.linalg.qr(last)  # last = q_last r_last
    u, values, vh = torch.linalg.svd(r_last @ r_first.T)  # (R, R): the product is q_last (u s vh) q_first^T
    root = values.sqrt()
    return root[:, None] * (vh @ q_first.T), (q_last @ u) * root


@dataclass
class InputWhitening:
    """S and S^-1 of a conv's input channels (for CP-ALS in the whitened space)."""

    s: torch.Tensor
    s_inv: torch.Tensor


def input_whitening(inputs: torch.Tensor) -> InputWhitening:
    return InputWhitening(*whitening(inputs))
