import math

import pytest
import torch

from ranksearch.decompose.vbmf import evbmf, tucker2_vbmf_ranks

SIGMA = 0.1  # noise standard deviation per entry


def low_rank_plus_noise(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    """Rank-``rank`` signal with singular values 3..6 times the noise edge SIGMA * (sqrt(L) + sqrt(M)), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen, dtype=torch.float64))  # (rows, rank)
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen, dtype=torch.float64))  # (cols, rank)
    d = torch.linspace(6, 3, rank, dtype=torch.float64) * SIGMA * (math.sqrt(rows) + math.sqrt(cols))
    return u @ torch.diag(d) @ v.T + SIGMA * torch.randn(rows, cols, generator=gen, dtype=torch.float64)


SHAPES = [(40, 60, 3), (60, 40, 5), (100, 300, 10), (40, 60, 10)]


@pytest.mark.parametrize("rows, cols, rank", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_rank_and_noise_variance(rows, cols, rank, seed):
    matrix = low_rank_plus_noise(rows, cols, rank, seed)
    result = evbmf(matrix)
    assert result.rank == rank
    assert result.singular_values.shape == (rank,)
    assert abs(result.sigma2 / SIGMA**2 - 1) < 0.3
    assert evbmf(matrix.T).rank == rank
    assert evbmf(matrix, sigma2=SIGMA**2).rank == rank
    # posterior means are shrunk singular values, still in descending order
    singular = torch.linalg.svdvals(matrix)[:rank]
    assert (result.singular_values < singular).all() and (result.singular_values > 0).all()
    assert (result.singular_values.diff() <= 0).all()


def test_accepts_numpy_and_float32():
    matrix = low_rank_plus_noise(40, 60, 3, seed=5)
    assert evbmf(matrix.numpy()).rank == 3
    assert evbmf(matrix.float()).rank == 3


@pytest.mark.parametrize("rows, cols", [(40, 60), (60, 40), (100, 300), (30, 30), (1, 50)])
def test_pure_noise_has_rank_zero(rows, cols):
    # Noise singular values stay near sigma * (sqrt(L) + sqrt(M)), i.e. x <= (1 + sqrt(alpha))^2, below the EVB
    # threshold x_bar = (1 + tau_bar)(1 + alpha / tau_bar) > (1 + sqrt(alpha))^2: EVB keeps nothing.
    for seed in range(5):
        noise = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        result = evbmf(noise)
        assert result.rank == 0 and result.singular_values.numel() == 0
        if rows > 1:
            assert abs(result.sigma2 - 1) < 0.3


def test_threshold_and_shrinkage_match_the_theorem_at_alpha_one():
    # L = M: tau_bar = 2.5129 (the zero of log(1 + tau) / tau = 1/2), so with sigma2 = 1 the EVB threshold is
    # gamma_EVB = sqrt(M (1 + tau_bar)(1 + 1 / tau_bar)).
    size, tau_bar = 10, 2.5129
    threshold = math.sqrt(size * (1 + tau_bar) * (1 + 1 / tau_bar))
    gammas = torch.tensor([3 * threshold, 1.002 * threshold, 0.998 * threshold, 1.0], dtype=torch.float64)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix[range(4), range(4)] = gammas
    result = evbmf(matrix, sigma2=1.0)
    assert result.rank == 2
    g = gammas[:2]
    a = 1 - 2 * size / g**2  # 1 - (L + M) sigma2 / gamma^2
    expected = g / 2 * (a + torch.sqrt(a**2 - 4 * size**2 / g**4))
    torch.testing.assert_close(result.singular_values, expected)


def test_zero_matrix_and_bad_input():
    result = evbmf(torch.zeros(5, 7))
    assert result.rank == 0 and result.sigma2 == 0.0
    with pytest.raises(ValueError):
        evbmf(torch.zeros(3))
    with pytest.raises(ValueError):
        evbmf(torch.ones(3, 4), sigma2=0.0)
    with pytest.raises(ValueError):
        tucker2_vbmf_ranks(torch.ones(3, 4))


def tucker2_weight(cout: int, cin: int, rank_in: int, rank_out: int, noise: float, seed: int) -> torch.Tensor:
    """core x_0 U_out x_1 U_in with orthonormal factors, plus Gaussian noise: (cout, cin, 3, 3)."""
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(rank_out, rank_in, 3, 3, generator=gen)  # (R_out, R_in, kh, kw)
    u_out, _ = torch.linalg.qr(torch.randn(cout, rank_out, generator=gen))  # (Cout, R_out)
    u_in, _ = torch.linalg.qr(torch.randn(cin, rank_in, generator=gen))  # (Cin, R_in)
    weight = torch.einsum("oikl,ao,bi->abkl", core, u_out, u_in)  # (Cout, Cin, kh, kw)
    return weight + noise * torch.randn(weight.shape, generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tucker2_ranks_of_a_tucker2_weight(seed):
    weight = tucker2_weight(cout=32, cin=24, rank_in=4, rank_out=6, noise=0.01, seed=seed)
    assert tucker2_vbmf_ranks(weight) == (4, 6)
    assert tucker2_vbmf_ranks(weight.requires_grad_()) == (4, 6)


def test_weakening_below_one_never_lowers_the_ranks():
    # A decaying channel spectrum in heavy noise: the borderline components are where weakening matters.
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, 3, 3, generator=gen) * torch.logspace(0, -1.5, 64)[:, None, None, None]
    for w in (weight, tucker2_weight(cout=32, cin=24, rank_in=4, rank_out=6, noise=0.5, seed=1)):
        plain = tucker2_vbmf_ranks(w)
        previous = plain
        for weakening in (0.8, 0.5, 0.25, 0.1):
            ranks = tucker2_vbmf_ranks(w, weakening=weakening)
            assert ranks[0] >= previous[0] and ranks[1] >= previous[1]
            previous = ranks
        assert previous[0] + previous[1] > plain[0] + plain[1]  # weakening does keep more somewhere
        stronger = tucker2_vbmf_ranks(w, weakening=4.0)
        assert stronger[0] <= plain[0] and stronger[1] <= plain[1]
