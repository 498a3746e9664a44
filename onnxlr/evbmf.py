"""Rank estimation by Empirical Variational Bayes Matrix Factorization (EVBMF).

Written from Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 14 (2013), with the noise-variance bounds of
Nakajima, Tomioka, Sugiyama and Babacan, "Condition for perfect dimensionality recovery by
variational Bayesian PCA", JMLR 16 (2015).

Model. An observed L x M matrix (L <= M; a tall matrix is transposed, which changes no singular
value) is V = B A^T + E with E i.i.d. N(0, sigma^2). Let gamma_1 >= ... >= gamma_L be the singular
values of V, alpha = L / M and x_h = gamma_h^2 / (M sigma^2).

Threshold. With Phi(z) = log(1 + z) / z - 1/2, tau_ (tau underbar) is the unique zero of
Xi(tau; alpha) = Phi(tau) + Phi(tau / alpha), found here by root finding (public ports use the
approximation 2.5129 sqrt(alpha), exact only at alpha = 1), and

    x_ = (1 + tau_) (1 + alpha / tau_).

The EVB solution keeps component h (a positive shrunk singular value) iff
gamma_h > sigma sqrt(M x_), that is iff x_h > x_. The number of kept components is the EVBMF rank
(``signal_rank``).

Noise variance. sigma^2 minimizes (paper's Omega, times L)

    Omega(sigma^2) = sum_{h=1..L} psi0(x_h) + sum_{h: x_h > x_} psi1(x_h),
    psi0(x) = x - log x,
    psi1(x) = log(tau(x) + 1) + alpha log(tau(x) / alpha + 1) - tau(x),
    tau(x)  = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,

over sigma_^2 <= sigma^2 <= sigma-bar^2 with

    sigma-bar^2 = sum_{h=1..L} gamma_h^2 / (L M),
    sigma_^2    = max(gamma_{H+1}^2 / (M x_), sum_{h=H+1..L} gamma_h^2 / (M (L - H))),
    H           = ceil(L / (1 + alpha)) - 1    (the largest rank EVB can return).

Since -log x_h = -log(gamma_h^2 / M) + log sigma^2, the psi0 sum equals
sum gamma_h^2 / (M sigma^2) + L log sigma^2 up to a constant; that form is what is minimized, so
zero singular values are exact and never produce log(0). psi1 vanishes at x_ (Omega is continuous),
but Omega need not be unimodal: it is evaluated on a log-spaced grid plus every breakpoint
sigma^2 = gamma_h^2 / (M x_) inside the bounds, and the best point is refined by bounded Brent.

Exactly rank-deficient input: singular values with gamma^2 <= max(L, M) eps gamma_1^2 (the accuracy
of a float64 Gram eigendecomposition) are treated as zero. When all of gamma_{H+1..L} are zero the
lower bound is 0 and Omega -> -infinity as sigma^2 -> 0 (its log sigma^2 coefficient near 0 is
L - r (1 + alpha) > 0 for r nonzero values, r <= H), so the EVB noise variance is 0 and every
nonzero singular value is signal.

Weakened EVBMF (MUSCO: Gusak et al., "Automated multi-stage compression of neural networks", ICCV
workshops 2019, and its reference code musco-pytorch ``weaken_rank``): with the full rank
R0 = min(L, M), the EVBMF rank Re and the weakening factor W in (0, 1],

    R_W = floor(R0 - W (R0 - Re)),

so W = 1 is plain EVBMF and smaller W moves the rank toward R0 (monotone in W, never above R0).
Unlike the MUSCO code, Re = 0 is not special-cased: it gives floor((1 - W) R0).

Never zero. Where EVBMF finds signal (Re >= 1) the returned ``rank`` is R_W >= Re >= 1, even when
that is small: the estimate is what it is. Only where it finds none (Re = 0: pure noise, a zero
matrix, or a matrix too small for EVB to keep anything) is the rank max(R_W, no_signal_rank)
(no_signal_rank capped at min(L, M)); when that floor raised it, ``fallback`` is True. ``note``
says which happened.

Singular values. ``singular_values`` returns all min(L, M) singular values without U or V: the
Gram matrix of the short side, accumulated in float64, and its eigenvalues (cost L^2 M + L^3).
Values below about sqrt(eps) gamma_1 are not resolved by that route, which EVBMF never needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.linalg
import scipy.optimize

from onnxlr.methods.linalg import gram

__all__ = [
    "EvbmfEstimate",
    "evbmf_rank",
    "max_evb_rank",
    "singular_values",
    "tau_threshold",
    "weakened_rank",
    "x_threshold",
]

_GRID_POINTS = 256


@dataclass(frozen=True)
class EvbmfEstimate:
    """The rank to use for one matrix, what EVBMF itself found, and why they differ."""

    rank: int  # the rank to use (1 <= rank <= min(shape))
    signal_rank: int  # the rank EVBMF itself found (may be 0)
    sigma2: float  # estimated noise variance
    fallback: bool  # True when EVBMF found no signal and the rank was raised to no_signal_rank
    note: str  # one human sentence for reports


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """All min(shape) singular values of a 2-D matrix, descending, in float64, without U or V.

    Eigenvalues of the float64 Gram matrix of the short side (accumulated in column blocks, so a
    float32 weight is never copied whole to float64); negative round-off is clipped to zero.
    """
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise ValueError(f"singular_values needs a 2-D matrix, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"singular_values needs a non-empty matrix, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"singular_values needs a real numeric matrix, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError("singular_values needs a finite matrix (found NaN or inf)")
    if a.shape[0] > a.shape[1]:
        a = a.T
    eig = scipy.linalg.eigvalsh(gram(a, np.float64), overwrite_a=True, check_finite=False)
    return np.sqrt(np.clip(eig[::-1], 0.0, None))


@lru_cache(maxsize=256)
def tau_threshold(alpha: float) -> float:
    """tau_ (tau underbar): the zero of Phi(tau) + Phi(tau / alpha), Phi(z) = log(1 + z)/z - 1/2."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")

    def phi(z: float) -> float:
        return math.log1p(z) / z - 0.5

    def xi(tau: float) -> float:
        return phi(tau) + phi(tau / alpha)

    # Xi decreases from 1 to -1; its zero lies above sqrt(alpha) (Xi(sqrt(alpha)) > 0).
    lo, hi = math.sqrt(alpha), 3.0 * math.sqrt(alpha)
    while xi(hi) > 0.0:
        hi *= 2.0
    return scipy.optimize.brentq(xi, lo, hi, xtol=1e-14 * hi, rtol=1e-15, maxiter=200)


def x_threshold(alpha: float) -> float:
    """x_ = (1 + tau_)(1 + alpha / tau_): component h is signal iff gamma_h^2 / (M sigma^2) > x_."""
    tau = tau_threshold(alpha)
    return (1.0 + tau) * (1.0 + alpha / tau)


def max_evb_rank(shape: tuple[int, int]) -> int:
    """H = ceil(L / (1 + alpha)) - 1 = ceil(L M / (L + M)) - 1: EVB never keeps more components."""
    small, large = sorted(int(s) for s in shape)
    return -(-(small * large) // (small + large)) - 1


def weakened_rank(signal_rank: int, full_rank: int, weaken: float) -> int:
    """MUSCO's weakened rank floor(R0 - W (R0 - Re)); W = 1 gives Re, W -> 0 gives R0."""
    _check_weaken(weaken)
    value = full_rank - weaken * (full_rank - signal_rank)
    return int(min(full_rank, max(signal_rank, math.floor(value + 1e-9))))


def _check_weaken(weaken: float) -> None:
    if not isinstance(weaken, (int, float, np.floating, np.integer)) or isinstance(weaken, bool):
        raise ValueError(f"weaken must be a number in (0, 1], got {weaken!r}")
    if not 0.0 < float(weaken) <= 1.0:
        raise ValueError(f"weaken must be in (0, 1] (1 = plain EVBMF), got {weaken!r}")


def _check_inputs(
    values: np.ndarray, shape: tuple[int, int], no_signal_rank: int
) -> tuple[int, int]:
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape)
    ):
        raise ValueError(f"shape must be a pair of positive ints (L, M), got {shape!r}")
    small, large = sorted(int(s) for s in shape)
    if small < 1:
        raise ValueError(f"shape must be a pair of positive ints (L, M), got {tuple(shape)}")
    if values.ndim != 1 or values.size != small:
        raise ValueError(
            f"singular_values must be the {small} singular values of a {shape[0]}x{shape[1]} "
            f"matrix (all min(shape) of them), got an array of shape {values.shape}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("singular_values must be finite (found NaN or inf)")
    if np.any(values < 0):
        raise ValueError("singular_values must be non-negative (clip Gram round-off to 0 first)")
    if np.any(np.diff(values) > 0):
        raise ValueError("singular_values must be in descending order")
    if (
        isinstance(no_signal_rank, bool)
        or not isinstance(no_signal_rank, (int, np.integer))
        or no_signal_rank < 1
    ):
        raise ValueError(f"no_signal_rank must be an int >= 1, got {no_signal_rank!r}")
    return small, large


def _noise_variance(gamma2: np.ndarray, small: int, large: int, x_bar: float) -> float:
    """The EVB noise variance: the minimizer of Omega over [sigma_^2, sigma-bar^2]."""
    L, M = small, large
    alpha = L / M
    total = float(gamma2.sum())
    upper = total / (L * M)
    if upper == 0.0:
        return 0.0
    h_bar = max_evb_rank((L, M))
    tail = gamma2[h_bar:]
    lower = max(float(tail[0]) / (M * x_bar), float(tail.sum()) / (M * (L - h_bar)))
    if lower == 0.0:
        return 0.0  # noiseless: Omega -> -inf as sigma^2 -> 0 (see module docstring)
    if lower >= upper:
        return upper

    def omega(log_s2: np.ndarray) -> np.ndarray:
        s2 = np.exp(np.atleast_1d(log_s2))
        x = gamma2[None, :] / (M * s2[:, None])
        active = x > x_bar
        xa = np.where(active, x, x_bar + 1.0)
        d = xa - (1.0 + alpha)
        tau = 0.5 * (d + np.sqrt(d * d - 4.0 * alpha))
        psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
        return total / (M * s2) + L * np.log(s2) + np.where(active, psi1, 0.0).sum(axis=1)

    t_lo, t_hi = math.log(lower), math.log(upper)
    breaks = np.log(gamma2[gamma2 > 0] / (M * x_bar))
    grid = np.unique(
        np.concatenate(
            [np.linspace(t_lo, t_hi, _GRID_POINTS), breaks[(breaks > t_lo) & (breaks < t_hi)]]
        )
    )
    values = omega(grid)
    best = int(np.argmin(values))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    t_best, f_best = float(grid[best]), float(values[best])
    if b > a:
        res = scipy.optimize.minimize_scalar(
            lambda t: float(omega(t)[0]), bounds=(a, b), method="bounded",
            options={"xatol": 1e-10 * max(1.0, abs(t_best))},
        )
        if res.success and float(res.fun) < f_best:
            t_best = float(res.x)
    return min(max(math.exp(t_best), lower), upper)


def evbmf_rank(
    singular_values: np.ndarray,
    shape: tuple[int, int],
    *,
    weaken: float = 1.0,
    no_signal_rank: int = 1,
) -> EvbmfEstimate:
    """EVBMF rank of an L x M matrix from all min(L, M) of its singular values (descending).

    ``shape`` may be tall, wide or square. ``weaken`` (W in (0, 1]) applies MUSCO's weakened EVBMF,
    rank = floor(R0 - W (R0 - Re)) with R0 = min(shape); W = 1 is plain EVBMF. Where EVBMF finds
    signal (Re >= 1) that is the rank. Where it finds none (Re = 0) the rank is at least
    ``no_signal_rank`` (capped at min(shape)), so it is never 0; when that floor raised it,
    ``fallback`` is True.
    """
    values = np.asarray(singular_values, dtype=np.float64)
    small, large = _check_inputs(values, shape, no_signal_rank)
    _check_weaken(weaken)
    weaken = float(weaken)
    floor_rank = min(int(no_signal_rank), small)

    gamma2 = values * values
    if gamma2.size and gamma2[0] > 0:
        gamma2 = np.where(gamma2 <= large * np.finfo(np.float64).eps * gamma2[0], 0.0, gamma2)

    alpha = small / large
    x_bar = x_threshold(alpha)
    sigma2 = _noise_variance(gamma2, small, large, x_bar)
    if sigma2 == 0.0:
        signal = int(np.count_nonzero(gamma2))
    else:
        signal = int(np.count_nonzero(gamma2 > large * x_bar * sigma2))
    signal = min(signal, max_evb_rank((small, large)))

    weak = weakened_rank(signal, small, weaken)
    fallback = signal == 0 and weak < floor_rank
    rank = floor_rank if fallback else weak
    return EvbmfEstimate(
        rank=rank,
        signal_rank=signal,
        sigma2=float(sigma2),
        fallback=fallback,
        note=_note(signal, weak, rank, small, weaken, sigma2, fallback, floor_rank, no_signal_rank),
    )


def _note(
    signal: int, weak: int, rank: int, full: int, weaken: float, sigma2: float,
    fallback: bool, floor_rank: int, no_signal_rank: int,
) -> str:
    if sigma2 == 0.0 and signal == 0:
        found = "The matrix is zero"
    elif signal == 0:
        found = f"EVBMF found no signal above the noise (sigma^2 = {sigma2:.3g})"
    elif sigma2 == 0.0:
        found = f"The matrix is exactly rank {signal} with no noise"
    else:
        found = f"EVBMF found rank {signal} of {full} (sigma^2 = {sigma2:.3g})"
    if weaken < 1.0:
        found += f", weakened with W = {weaken:g} to rank {weak}"
    if fallback:
        capped = (
            f" (no_signal_rank {no_signal_rank} capped at the full rank)"
            if floor_rank < no_signal_rank else ""
        )
        return f"{found}; using the no-signal floor, rank {rank}{capped}."
    return f"{found}; using rank {rank}."
