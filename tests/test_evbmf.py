"""EVBMF rank estimation against planted low-rank data, edge cases and the paper's objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr.evbmf import (
    EvbmfEstimate,
    evbmf_rank,
    max_evb_rank,
    singular_values,
    tau_threshold,
    weakened_rank,
    x_threshold,
)
import itertools

SIGMA2_RTOL = 0.1  # estimated noise variance vs the planted one, at high SNR
SV_RTOL = 1e-7  # Gram-route singular values vs LAPACK's, relative to the largest


def orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


def planted(shape, rank, noise, seed=0, strength=4.0, spread=3.0):
    """Rank-`rank` matrix whose singular values run from spread*s to s, s = strength * noise edge,
    plus i.i.d. N(0, noise^2). The noise edge is the largest singular value of unit noise."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    edge = math.sqrt(rows) + math.sqrt(cols)
    s = strength * edge * np.linspace(spread, 1.0, rank)
    signal = (orthonormal(rng, rows, rank) * s) @ orthonormal(rng, cols, rank).T
    return signal + noise * rng.standard_normal(shape)


def estimate(matrix, **kwargs) -> EvbmfEstimate:
    return evbmf_rank(singular_values(matrix), matrix.shape, **kwargs)


# --- planted rank -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, rank, seed",
    [
        *(((64, 576), 8, seed) for seed in (0, 1)),
        *(((576, 64), 8, seed) for seed in (0, 1)),
        *(((128, 128), 16, seed) for seed in (0, 1)),
        ((300, 40), 5, 0),
        ((512, 4608), 40, 0),  # a 512@3x3 conv's mode-0 unfolding
    ],
)
def test_high_snr_recovers_planted_rank(shape, rank, seed):
    noise = 0.5
    est = estimate(planted(shape, rank, noise, seed=seed))
    assert est.rank == rank
    assert est.signal_rank == rank
    assert not est.fallback
    assert est.sigma2 == pytest.approx(noise**2, rel=SIGMA2_RTOL)


@pytest.mark.parametrize("shape, rank", [((64, 576), 12), ((576, 64), 12), ((128, 128), 24)])
def test_rank_degrades_gracefully_as_noise_grows(shape, rank):
    """Same signal and noise draw, noise scaled up: rank never rises, never 0, never > min dim."""
    rng = np.random.default_rng(7)
    signal = planted(shape, rank, 0.0, seed=3, strength=1.0, spread=4.0)
    unit_noise = rng.standard_normal(shape)
    ranks = []
    for level in np.geomspace(0.05, 20.0, 12):
        est = estimate(signal + level * unit_noise)
        assert 1 <= est.rank <= min(shape)
        ranks.append(est.rank)
    assert ranks[0] == rank
    assert all(a >= b for a, b in itertools.pairwise(ranks)), ranks
    assert ranks[-1] < rank // 2, ranks  # it does degrade
    assert len(set(ranks)) >= 3, ranks  # ... through intermediate ranks, not a cliff


def test_exactly_low_rank_matrix_without_noise():
    est = estimate(planted((96, 200), 7, 0.0))
    assert (est.rank, est.signal_rank, est.sigma2, est.fallback) == (7, 7, 0.0, False)


@pytest.mark.parametrize(
    "t, s, k, r_out, r_in", [(64, 32, 3, 12, 6), (32, 64, 3, 5, 20), (48, 48, 5, 10, 10)]
)
def test_conv_tensor_recovers_multilinear_rank(t, s, k, r_out, r_in):
    """W = G x0 U_out x1 U_in + noise; the mode-0 / mode-1 unfoldings have ranks r_out / r_in."""
    rng = np.random.default_rng(11)
    core = rng.standard_normal((r_out, r_in, k, k))
    u_out, u_in = orthonormal(rng, t, r_out), orthonormal(rng, s, r_in)
    weight = np.einsum("abxy,ta,sb->tsxy", core, u_out, u_in)
    weight /= np.abs(weight).max()
    noise = 1e-3
    weight = weight + noise * rng.standard_normal(weight.shape)
    mode0 = weight.reshape(t, -1)  # T x (S k k)
    mode1 = np.moveaxis(weight, 1, 0).reshape(s, -1)  # S x (T k k)
    est0, est1 = estimate(mode0), estimate(mode1)
    assert (est0.rank, est1.rank) == (r_out, r_in)
    assert not (est0.fallback or est1.fallback)
    assert est0.sigma2 == pytest.approx(noise**2, rel=SIGMA2_RTOL)


# --- fallback ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (128, 128), (7, 1000)])
def test_pure_noise_falls_back_to_the_no_signal_floor(shape):
    est = estimate(np.random.default_rng(5).standard_normal(shape), no_signal_rank=4)
    assert est.signal_rank == 0
    assert (est.rank, est.fallback) == (4, True)
    assert est.sigma2 == pytest.approx(1.0, rel=SIGMA2_RTOL)
    assert "no signal" in est.note and "no-signal floor, rank 4" in est.note


def test_zero_matrix_falls_back():
    est = estimate(np.zeros((16, 40), dtype=np.float32), no_signal_rank=3)
    assert (est.rank, est.signal_rank, est.sigma2, est.fallback) == (3, 0, 0.0, True)
    assert "zero" in est.note


def test_constant_matrix_is_rank_one():
    est = estimate(np.full((20, 30), 0.25))
    assert (est.rank, est.signal_rank, est.sigma2, est.fallback) == (1, 1, 0.0, False)
    # the floor is for no signal only: a found rank 1 stays 1
    same = estimate(np.full((20, 30), 0.25), no_signal_rank=8)
    assert (same.rank, same.signal_rank, same.fallback) == (1, 1, False)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 2)])
def test_tiny_matrices_fall_back(shape):
    est = estimate(np.random.default_rng(2).standard_normal(shape) + 3.0, no_signal_rank=2)
    assert est.rank == min(2, min(shape))
    assert est.signal_rank == 0  # ceil(L M / (L + M)) - 1 == 0 here: EVB cannot keep anything
    assert est.fallback
    assert math.isfinite(est.sigma2) and est.sigma2 > 0


def test_two_row_matrix_sees_a_strong_offset_but_not_noise():
    noise = np.random.default_rng(2).standard_normal((2, 50))
    assert estimate(noise, no_signal_rank=2).signal_rank == 0
    offset = estimate(noise + 3.0, no_signal_rank=2)
    assert (offset.signal_rank, offset.rank, offset.fallback) == (1, 1, False)


def test_single_nonzero_singular_value():
    est = evbmf_rank(np.array([5.0, 0.0, 0.0, 0.0]), (4, 10))
    assert (est.rank, est.signal_rank, est.sigma2) == (1, 1, 0.0)


@pytest.mark.parametrize("shape, rank", [((64, 576), 2), ((576, 64), 3), ((256, 384), 12)])
def test_found_rank_below_the_floor_is_used(shape, rank):
    # the floor replaces "no signal" only; a small rank EVBMF finds is the answer (issue 12)
    est = estimate(planted(shape, rank, 0.5), no_signal_rank=min(shape) // 8)
    assert (est.rank, est.signal_rank, est.fallback) == (rank, rank, False)
    assert f"found rank {rank} of {min(shape)}" in est.note and f"using rank {rank}." in est.note


def test_no_signal_rank_is_capped_at_full_rank():
    est = estimate(np.random.default_rng(0).standard_normal((3, 8)), no_signal_rank=8)
    assert est.rank == 3 and est.fallback and "capped" in est.note


# --- weakened EVBMF (MUSCO) ----------------------------------------------------------------------


def test_weakened_rank_formula_matches_musco():
    # R_W = floor(R0 - W (R0 - Re)), e.g. R0 = 16, Re = 8
    assert [weakened_rank(8, 16, w) for w in (1.0, 0.5, 0.25, 1e-9)] == [8, 12, 14, 15]
    assert weakened_rank(0, 64, 0.5) == 32
    assert weakened_rank(10, 64, 0.7) == 26  # 64 - 0.7 * 54 = 26.2


def test_weaken_one_is_plain_and_smaller_weaken_is_gentler():
    matrix = planted((64, 576), 10, 0.5)
    sv = singular_values(matrix)
    plain = evbmf_rank(sv, matrix.shape)
    assert evbmf_rank(sv, matrix.shape, weaken=1.0) == plain
    weakens = (1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.01)
    ranks = [evbmf_rank(sv, matrix.shape, weaken=w).rank for w in weakens]
    assert ranks[0] == plain.rank == 10
    assert all(a <= b for a, b in itertools.pairwise(ranks)), ranks
    assert ranks[-1] > ranks[0] and max(ranks) <= 64
    weak = evbmf_rank(sv, matrix.shape, weaken=0.5)
    assert (weak.signal_rank, weak.rank) == (10, 37) and "W = 0.5" in weak.note


def test_weakening_can_lift_a_fallback():
    sv = singular_values(np.random.default_rng(1).standard_normal((64, 576)))
    est = evbmf_rank(sv, (64, 576), weaken=0.5, no_signal_rank=8)
    assert (est.signal_rank, est.rank, est.fallback) == (0, 32, False)


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weaken", [0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True])
def test_weaken_outside_unit_interval_is_rejected(weaken):
    with pytest.raises(ValueError, match="weaken"):
        evbmf_rank(np.ones(4), (4, 8), weaken=weaken)


@pytest.mark.parametrize(
    "values, shape, no_signal_rank, match",
    [
        (np.ones(3), (4, 8), 1, "singular values"),
        (np.ones((2, 2)), (2, 8), 1, "singular values"),
        (np.array([1.0, 2.0]), (2, 8), 1, "descending"),
        (np.array([1.0, -0.1]), (2, 8), 1, "non-negative"),
        (np.array([np.nan, 1.0]), (2, 8), 1, "finite"),
        (np.ones(2), (2,), 1, "shape"),
        (np.ones(2), (0, 8), 1, "shape"),
        (np.ones(2), (2.0, 8), 1, "shape"),
        (np.ones(2), (2, 8), 0, "no_signal_rank"),
        (np.ones(2), (2, 8), 1.5, "no_signal_rank"),
    ],
)
def test_bad_inputs_are_rejected(values, shape, no_signal_rank, match):
    with pytest.raises(ValueError, match=match):
        evbmf_rank(values, shape, no_signal_rank=no_signal_rank)


@pytest.mark.parametrize(
    "matrix", [np.ones(5), np.ones((2, 2, 2)), np.zeros((0, 3)), np.array([[np.inf, 1.0]])]
)
def test_singular_values_rejects_bad_matrices(matrix):
    with pytest.raises(ValueError):
        singular_values(matrix)


# --- the pieces against the paper ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (50, 50), (1, 5), (9, 1), (96, 864)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_singular_values_match_lapack(shape, dtype):
    matrix = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    got = singular_values(matrix)
    want = scipy.linalg.svdvals(matrix.astype(np.float64))
    assert got.shape == (min(shape),) and got.dtype == np.float64
    assert np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=SV_RTOL * want[0])


def test_tau_threshold_solves_the_paper_equation():
    # alpha = 1: log(1 + tau) / tau = 1/2, tau = 2.5129 (the constant quoted in the paper)
    assert tau_threshold(1.0) == pytest.approx(2.5129, abs=1e-4)
    phi = lambda z: math.log1p(z) / z - 0.5
    for alpha in (1e-4, 0.01, 0.111, 0.5, 0.9):
        tau = tau_threshold(alpha)
        assert phi(tau) + phi(tau / alpha) == pytest.approx(0.0, abs=1e-12)
        assert tau > math.sqrt(alpha)
        # the threshold lies above the Marchenko-Pastur edge (1 + sqrt(alpha))^2
        assert x_threshold(alpha) > (1 + math.sqrt(alpha)) ** 2


@pytest.mark.parametrize(
    "shape, h_bar",
    [((64, 576), 57), ((576, 64), 57), ((128, 128), 63), ((3, 3), 1), ((2, 2), 0), ((1, 9), 0),
     ((2, 50), 1)],
)
def test_max_evb_rank_is_largest_integer_below_l_over_1_plus_alpha(shape, h_bar):
    assert max_evb_rank(shape) == h_bar


def paper_omega(sigma2: float, gamma: np.ndarray, L: int, M: int) -> float:
    """The paper's objective written literally: psi0 = x - log x on every h, psi1 above x_."""
    alpha, x_bar = L / M, x_threshold(L / M)
    x = gamma**2 / (M * sigma2)
    total = np.sum(x - np.log(x))
    for xh in x[x > x_bar]:
        tau = 0.5 * (xh - (1 + alpha) + math.sqrt((xh - (1 + alpha)) ** 2 - 4 * alpha))
        total += math.log(tau + 1) + alpha * math.log(tau / alpha + 1) - tau
    return total / L


@pytest.mark.parametrize(
    "shape, rank, noise", [((40, 90), 6, 1.0), ((60, 60), 4, 2.0), ((20, 300), 3, 3.0)]
)
def test_sigma2_is_the_global_minimizer_of_the_paper_objective(shape, rank, noise):
    matrix = planted(shape, rank, noise, strength=1.0, seed=9)
    gamma = singular_values(matrix)
    L, M = sorted(shape)
    est = evbmf_rank(gamma, shape)
    h = max_evb_rank(shape)
    lower = max(gamma[h] ** 2 / (M * x_threshold(L / M)), np.sum(gamma[h:] ** 2) / (M * (L - h)))
    upper = np.sum(gamma**2) / (L * M)
    assert lower <= est.sigma2 <= upper
    grid = np.geomspace(lower, upper, 4000)
    best_on_grid = min(paper_omega(s2, gamma, L, M) for s2 in grid)
    assert paper_omega(est.sigma2, gamma, L, M) <= best_on_grid + 1e-9
    # and the rank is the count above the EVB threshold sigma sqrt(M x_)
    assert est.signal_rank == np.sum(gamma > math.sqrt(est.sigma2 * M * x_threshold(L / M)))


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 70),
    rank_fraction=st.floats(0.0, 1.0),
    noise=st.sampled_from([0.0, 1e-6, 0.01, 0.3, 1.0, 10.0]),
    strength=st.floats(0.0, 20.0),
    no_signal_rank=st.integers(1, 10),
    weaken=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_rank_is_always_in_range(
    rows, cols, rank_fraction, noise, strength, no_signal_rank, weaken, seed
):
    rank = round(rank_fraction * min(rows, cols))
    rng = np.random.default_rng(seed)
    matrix = noise * rng.standard_normal((rows, cols))
    if rank:
        matrix += planted((rows, cols), rank, 0.0, seed=seed, strength=strength)
    sv = singular_values(matrix)
    est = evbmf_rank(sv, (rows, cols), weaken=weaken, no_signal_rank=no_signal_rank)
    assert 1 <= est.rank <= min(rows, cols)
    assert 0 <= est.signal_rank <= max(max_evb_rank((rows, cols)), 0)
    assert math.isfinite(est.sigma2) and est.sigma2 >= 0
    floor_rank = min(no_signal_rank, rows, cols)
    weak = weakened_rank(est.signal_rank, min(rows, cols), weaken)
    if est.signal_rank:
        assert (est.rank, est.fallback) == (weak, False)
    else:
        assert est.rank == max(weak, floor_rank)
        assert est.fallback == (weak < floor_rank)
    assert est.note
    # orientation does not matter
    assert evbmf_rank(sv, (cols, rows), weaken=weaken, no_signal_rank=no_signal_rank) == est
