"""Empirical variational Bayesian matrix factorization (EVBMF): a rank from the global analytic solution.

[N13] Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-observed variational Bayesian
matrix factorization", JMLR 14 (2013): the EVB solution (threshold and shrinkage) for a known noise variance.
[N15] Nakajima, Tomioka, Sugiyama & Babacan, "Condition for perfect dimensionality recovery by variational
Bayesian PCA", JMLR 16 (2015) (NIPS 2012 "Perfect dimensionality recovery..."): the noise-variance objective
Omega and its bounds, as in the authors' MATLAB code and its public Python ports.
Kim et al. 2015 (arXiv 1511.06530) take Tucker-2 ranks from EVBMF of a conv's two channel-mode unfoldings.

Notation: V is L x M with L <= M, alpha = L / M, gamma_h its singular values, x_h = gamma_h^2 / (M * sigma2).
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VBMFResult:
    rank: int  # number of singular components EVB keeps (0 for pure noise)
    sigma2: float  # noise variance used for the threshold (estimated, or as given)
    singular_values: torch.Tensor  # (rank,) float64 posterior-mean singular values, descending


def _x_bar(alpha: float) -> float:
    """EVB threshold in x [N13]: x_bar = (1 + tau_bar)(1 + alpha / tau_bar), i.e. gamma_EVB^2 = M sigma2 x_bar.

    tau_bar is the zero of Xi(tau; alpha) = Phi(tau) + Phi(tau / alpha), Phi(z) = log(1 + z) / z - 1/2, which falls
    from 1 (tau -> 0) to -1 (tau -> inf): bisection in log space. tau_bar = 2.5129 at alpha = 1; public ports
    use 2.5129 * sqrt(alpha) for every alpha, exact only at alpha = 1.
    """
    phi = lambda z: math.log1p(z) / z - 0.5
    lo, hi = 1e-12, 1e12
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if phi(mid) + phi(mid / alpha) > 0 else (lo, mid)
    tau_bar = math.sqrt(lo * hi)
    return (1 + tau_bar) * (1 + alpha / tau_bar)


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """tau(x; alpha) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2: x = (1 + tau)(1 + alpha / tau)."""
    b = x - (1 + alpha)
    return 0.5 * (b + torch.sqrt(b * b - 4 * alpha))


def _omega(sigma2: float, s2: torch.Tensor, M: int, alpha: float, x_bar: float) -> float:
    """L * Omega(sigma2) of [N15] up to a constant: sum_h psi(x_h), psi = psi0 + [x > x_bar] * psi1.

    psi0(x) = x - log x; its -log(gamma_h^2) part is constant in sigma2 and dropped, so zero singular values are
    safe. psi1(x) = log(tau + 1) + alpha * log(tau / alpha + 1) - tau, with tau = tau(x; alpha).
    """
    x = s2 / (M * sigma2)  # (L,)
    psi0 = (x + math.log(M * sigma2)).sum()
    tau = _tau(x[x > x_bar], alpha)
    psi1 = (torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau).sum()
    return float(psi0 + psi1)


def _sigma2_bounds(s2: torch.Tensor, M: int, alpha: float, x_bar: float) -> tuple[float, float]:
    """[N15]'s bounds on the EVB noise variance, with H_bar = ceil(L / (1 + alpha)) - 1 >= the EVB rank.

    lower = max(gamma_{H_bar+1}^2 / (M x_bar), sum_{h > H_bar} gamma_h^2 / (M (L - H_bar))),
    upper = sum_h gamma_h^2 / (L M) = ||V||_F^2 / (L M).
    """
    L = s2.numel()
    h_bar = math.ceil(L / (1 + alpha)) - 1  # 0-based index of gamma_{H_bar+1}
    lower = max(float(s2[h_bar]) / (M * x_bar), float(s2[h_bar:].mean()) / M)
    return lower, float(s2.mean()) / M


def _minimize_bounded(f, lo: float, hi: float, grid: int = 64, iters: int = 80) -> float:
    """Minimise f on [lo, hi]: best point of a log-spaced grid, then golden-section search between its neighbours.

    The grid guards against Omega's several local minima; scipy's bounded Brent (used by the reference code)
    is not a dependency here.
    """
    points = torch.logspace(math.log10(lo), math.log10(hi), grid, dtype=torch.float64).tolist()
    best = min(range(grid), key=lambda i: f(points[i]))
    a, b = points[max(best - 1, 0)], points[min(best + 1, grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return min((points[best], c, d), key=f)


def _estimate_sigma2(s: torch.Tensor, M: int) -> float:
    """EVB noise variance [N15]: argmin of Omega(sigma2) between its bounds; 0 for an all-zero matrix."""
    alpha, s2 = s.numel() / M, s * s
    x_bar = _x_bar(alpha)
    lo, hi = _sigma2_bounds(s2, M, alpha, x_bar)
    if hi <= 0:
        return 0.0
    lo = max(lo, hi * 1e-12)  # an exactly low-rank matrix has lower bound 0
    return _minimize_bounded(lambda v: _omega(v, s2, M, alpha, x_bar), lo, hi)


def _shrink(s: torch.Tensor, M: int, sigma2: float) -> torch.Tensor:
    """EVB posterior-mean singular values [N13]: those with gamma_h > gamma_EVB, shrunk, the others dropped.

    gamma_hat_h = (gamma_h / 2) * (1 - (L + M) sigma2 / gamma_h^2
                  + sqrt((1 - (L + M) sigma2 / gamma_h^2)^2 - 4 L M sigma2^2 / gamma_h^4))
                = gamma_h * tau(x_h; alpha) / x_h.
    """
    alpha = s.numel() / M
    if sigma2 <= 0:
        return s[s > 0]
    x = s * s / (M * sigma2)  # (L,)
    kept = x > _x_bar(alpha)  # gamma_h > sqrt(M sigma2 (1 + tau_bar)(1 + alpha / tau_bar))
    return s[kept] * _tau(x[kept], alpha) / x[kept]


def _singular_values(matrix) -> tuple[torch.Tensor, int]:
    """Singular values (L,) in float64 of the matrix oriented so that L <= M, and M."""
    v = torch.as_tensor(matrix).detach().to(device="cpu", dtype=torch.float64)
    if v.ndim != 2 or v.numel() == 0 or not torch.isfinite(v).all():
        raise ValueError(f"evbmf needs a finite, non-empty 2-D matrix, got shape {tuple(v.shape)}")
    if v.shape[0] > v.shape[1]:
        v = v.T  # the theory assumes L <= M; V and V^T have the same singular values
    return torch.linalg.svdvals(v), v.shape[1]


def evbmf(matrix, sigma2: float | None = None) -> VBMFResult:
    """EVBMF of an L x M real matrix (tensor or array): its rank and posterior-mean singular values.

    ``sigma2`` is the noise variance per entry; None estimates it by minimising [N15]'s Omega.
    """
    s, M = _singular_values(matrix)
    if sigma2 is None:
        sigma2 = _estimate_sigma2(s, M)
    elif not sigma2 > 0:
        raise ValueError(f"sigma2 must be positive, got {sigma2}")
    kept = _shrink(s, M, float(sigma2))
    return VBMFResult(rank=kept.numel(), sigma2=float(sigma2), singular_values=kept)


def _weakened_rank(matrix: torch.Tensor, weakening: float) -> int:
    """EVBMF rank with the threshold set by weakening * (estimated noise variance)."""
    s, M = _singular_values(matrix)
    return _shrink(s, M, weakening * _estimate_sigma2(s, M)).numel()


def tucker2_vbmf_ranks(weight: torch.Tensor, weakening: float = 1.0) -> tuple[int, int]:
    """(R_in, R_out) of a conv weight (Cout, Cin, kh, kw) from EVBMF of its channel-mode unfoldings (Kim et al.).

    ``weakening`` scales the estimated noise variance before the threshold (which is proportional to its square
    root): 1 is plain EVBMF, < 1 keeps at least as many components, > 1 fewer. Ranks may be 0 (pure noise).
    """
    if weight.ndim != 4 or not weakening > 0:
        raise ValueError(
            f"need a (Cout, Cin, kh, kw) weight and weakening > 0, got {tuple(weight.shape)}, {weakening}"
        )
    w = weight.detach()
    rank_in = _weakened_rank(w.transpose(0, 1).flatten(1), weakening)  # (Cin, Cout*kh*kw)
    rank_out = _weakened_rank(w.flatten(1), weakening)  # (Cout, Cin*kh*kw)
    return rank_in, rank_out
