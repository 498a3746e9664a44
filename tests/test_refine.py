"""The data-aware math of onnxlr.calib.fit against closed forms and direct least squares."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlr.calib import fit as refine
from onnxlr.methods.svd import spectrum_and_factor

# The ridge (1e-5 of the mean eigenvalue) moves the optimum by about that much, relatively.
OPTIMAL_RTOL = 1e-4
EXACT_RTOL = 1e-8


def anisotropic_inputs(rows: int, n: int, rng, spread: float = 4.0, mean: float = 0.0) -> np.ndarray:
    """Rows whose covariance has eigenvalues spread over 10^spread, in a random basis."""
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    scales = np.logspace(0, -spread / 2, n)
    return (rng.standard_normal((rows, n)) * scales) @ basis.T + mean * rng.standard_normal(n)


def moments_of(x_c, x_o=None, chunk: int = 97) -> refine.Moments:
    m = refine.Moments(x_c.shape[1], paired=x_o is not None)
    for start in range(0, x_c.shape[0], chunk):  # streamed, in uneven chunks
        m.add(x_c[start : start + chunk], None if x_o is None else x_o[start : start + chunk])
    return m


def mse(y_ref, y) -> float:
    return float(np.mean(np.sum((y_ref - y) ** 2, axis=1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [2, 8, 16])
def test_whitened_svd_reaches_the_closed_form_minimum_and_beats_plain_svd(seed, rank):
    rng = np.random.default_rng(seed)
    n, t = 32, 24
    x = anisotropic_inputs(4000, n, rng)
    w = rng.standard_normal((t, n))
    m = moments_of(x)
    p, q, bias = refine.whitened_svd(w, None, m, rank, fit_bias=False)
    assert p.shape == (rank, n) and q.shape == (t, rank) and bias is None
    achieved = mse(x @ w.T, x @ (q @ p).T)

    # Closed form: min over rank-R W' of E||(W - W') x||^2 = sum_{i>R} s_i^2 of W C^{1/2}.
    c = x.T @ x / x.shape[0]
    evals, evecs = np.linalg.eigh(c)
    root = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    s = np.linalg.svd(w @ root, compute_uv=False)
    optimum = float(np.sum(s[rank:] ** 2))
    assert achieved == pytest.approx(optimum, rel=OPTIMAL_RTOL)

    # Plain truncated SVD of the weight at the same rank (what onnxlr does without data).
    _, factor = spectrum_and_factor(w.T)
    first, second = factor(rank)
    plain = mse(x @ w.T, x @ first @ second)
    assert achieved < 0.75 * plain  # measured 0.53 at rank 2, far less at higher ranks


def test_whitened_svd_fits_the_bias_when_inputs_have_a_mean():
    rng = np.random.default_rng(3)
    n, t, rank = 20, 16, 4
    x = anisotropic_inputs(3000, n, rng, mean=2.0)
    w, b = rng.standard_normal((t, n)), rng.standard_normal(t)
    m = moments_of(x)
    p, q, b_new = refine.whitened_svd(w, b, m, rank, fit_bias=True)
    with_bias = mse(x @ w.T + b, x @ (q @ p).T + b_new)
    # Closed form with a free bias: the same minimum on the centered inputs.
    xc = x - x.mean(axis=0)
    evals, evecs = np.linalg.eigh(xc.T @ xc / x.shape[0])
    s = np.linalg.svd(w @ (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T, compute_uv=False)
    assert with_bias == pytest.approx(float(np.sum(s[rank:] ** 2)), rel=OPTIMAL_RTOL)
    p0, q0, _ = refine.whitened_svd(w, b, m, rank, fit_bias=False)
    assert with_bias <= mse(x @ w.T + b, x @ (q0 @ p0).T + b) * (1 + 1e-9)


def test_asymmetric_full_rank_is_least_squares_and_truncation_adds_the_whitened_tail(monkeypatch):
    monkeypatch.setattr(refine, "PAIRED_RIDGE", 0.0)  # the exact least squares, without shrinkage
    rng = np.random.default_rng(4)
    n, t = 16, 12
    x_o = anisotropic_inputs(5000, n, rng, spread=2)
    x_c = x_o @ (np.eye(n) + 0.2 * rng.standard_normal((n, n))) + 0.05 * rng.standard_normal((5000, n))
    w, b = rng.standard_normal((t, n)), rng.standard_normal(t)
    m = moments_of(x_c, x_o)
    y = x_o @ w.T + b
    design = np.hstack([x_c, np.ones((x_c.shape[0], 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    best = mse(y, design @ coef)
    p, q, b_new = refine.whitened_svd(w, b, m, n, fit_bias=True)
    assert mse(y, x_c @ (q @ p).T + b_new) == pytest.approx(best, rel=OPTIMAL_RTOL)
    rank = 5
    p, q, b_new = refine.whitened_svd(w, b, m, rank, fit_bias=True)
    fitted = design @ coef - y.mean(axis=0)  # the least-squares prediction, centered
    xc0 = x_c - x_c.mean(axis=0)
    evals, evecs = np.linalg.eigh(xc0.T @ xc0 / x_c.shape[0])
    w_star = coef[:n].T
    s = np.linalg.svd(w_star @ (evecs * np.sqrt(evals)) @ evecs.T, compute_uv=False)
    assert mse(y, x_c @ (q @ p).T + b_new) == pytest.approx(best + float(np.sum(s[rank:] ** 2)), rel=1e-3)
    assert np.isfinite(fitted).all()


@pytest.mark.parametrize("paired", [False, True])
def test_refit_last_matches_direct_least_squares(paired):
    rng = np.random.default_rng(5)
    n, t, r = 18, 10, 4
    x_o = anisotropic_inputs(3000, n, rng, mean=1.0)
    x_c = x_o + 0.1 * rng.standard_normal(x_o.shape) if paired else x_o
    w, b = rng.standard_normal((t, n)), rng.standard_normal(t)
    chain = rng.standard_normal((r, n))
    m = moments_of(x_c, x_o if paired else None)
    u, b_new = refine.refit_last(w, b, chain, m, fit_bias=True)
    y = x_o @ w.T + b
    z = np.hstack([x_c @ chain.T, np.ones((x_c.shape[0], 1))])
    coef = np.linalg.lstsq(z, y, rcond=None)[0]
    assert mse(y, x_c @ (u @ chain).T + b_new) == pytest.approx(mse(y, z @ coef), rel=OPTIMAL_RTOL)


def test_output_error_and_moments_are_exact():
    rng = np.random.default_rng(6)
    n, t = 9, 7
    x_o = rng.standard_normal((500, n)) + 0.5
    x_c = x_o + 0.3 * rng.standard_normal((500, n))
    w, b = rng.standard_normal((t, n)), rng.standard_normal(t)
    w2, b2 = rng.standard_normal((t, n)), rng.standard_normal(t)
    m = moments_of(x_c, x_o, chunk=33)
    err, ref = refine.output_error(w, b, w2, b2, m)
    assert err == pytest.approx(mse(x_o @ w.T + b, x_c @ w2.T + b2), rel=EXACT_RTOL)
    assert ref == pytest.approx(float(np.mean(np.sum((x_o @ w.T + b) ** 2, axis=1))), rel=EXACT_RTOL)
    halves = moments_of(x_c[:200], x_o[:200]).merged(moments_of(x_c[200:], x_o[200:]))
    assert np.allclose(halves.co, m.co) and halves.count == m.count == 500


def test_refit_tucker_core_is_least_squares_given_the_bases():
    rng = np.random.default_rng(7)
    t, s, k, r4, r3 = 8, 6, 4, 3, 2
    x = anisotropic_inputs(4000, s * k, rng, spread=2)
    w = rng.standard_normal((t, s * k))
    u_in, _ = np.linalg.qr(rng.standard_normal((s, r3)))
    u_out, _ = np.linalg.qr(rng.standard_normal((t, r4)))
    m = moments_of(x)
    core = refine.refit_tucker_core(w, u_in, u_out, k, m, fit_bias=False)
    proj = np.kron(u_in.T, np.eye(k))
    z = x @ proj.T
    target = x @ w.T @ u_out
    best = np.linalg.lstsq(z, target, rcond=None)[0].T
    assert np.allclose(core, best, rtol=1e-3, atol=1e-3 * np.abs(best).max())


def test_paired_ridge_shrinks_the_asymmetric_correction_towards_the_original_weight():
    """A huge ridge leaves W* = W: the fit is then the symmetric one in x_c's whitened space, and
    the full-strength correction does at least as well on the data it was fitted on."""
    rng = np.random.default_rng(7)
    n, t, rank = 12, 10, 4
    x_o = anisotropic_inputs(3000, n, rng, spread=2)
    x_c = x_o @ (np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    w, b = rng.standard_normal((t, n)), rng.standard_normal(t)
    paired, unpaired = moments_of(x_c, x_o), moments_of(x_c)
    p_big, q_big, _ = refine.whitened_svd(w, b, paired, rank, fit_bias=True, paired_ridge=1e12)
    p_sym, q_sym, _ = refine.whitened_svd(w, b, unpaired, rank, fit_bias=True)
    np.testing.assert_allclose(q_big @ p_big, q_sym @ p_sym, rtol=1e-6, atol=1e-8)
    errors = [refine.relative_error(w, b, *_fit(w, b, paired, rank, a), paired) for a in (1e-6, 1.0, 1e12)]
    assert errors[0] <= errors[1] <= errors[2], errors


def _fit(w, b, moments, rank, ridge):
    p, q, b_new = refine.whitened_svd(w, b, moments, rank, fit_bias=True, paired_ridge=ridge)
    return q @ p, b_new


def test_shrunk_covariance_generalizes_when_rows_are_few_for_the_input_width():
    """40 rows for 64 inputs: whitening by the singular sample covariance fits the calibration
    subspace alone; shrinking it towards its mean eigenvalue does better on new inputs."""
    rng = np.random.default_rng(0)
    n, t, rank = 64, 32, 16
    w, b = rng.standard_normal((t, n)) * np.logspace(0, -1, n), rng.standard_normal(t)
    # One distribution, split. Measured over seeds 0-2: shrunk / plain = 0.65-0.72 here; with
    # 100 rows or strongly anisotropic inputs shrinking can lose, hence the held-out choice.
    rows = anisotropic_inputs(40 + 4000 + 20000, n, rng, spread=1)
    fit, held, many = rows[:40], rows[40:4040], rows[4040:]
    m = moments_of(fit)
    assert 0.5 < refine.shrinkage(m) < 1  # 64 / (64 + 40)
    errors = {}
    for shrink in (0.0, refine.shrinkage(m)):
        p, q, b_new = refine.whitened_svd(w, b, m, rank, fit_bias=True, shrink=shrink)
        errors[shrink] = mse(held @ w.T + b, held @ (q @ p).T + b_new)
    plain, shrunk = errors.values()
    assert shrunk < 0.8 * plain, errors
    assert refine.shrinkage(moments_of(many)) < 0.01  # plenty of rows: next to no shrinkage


def test_every_candidate_of_a_layer_shares_one_eigendecomposition(monkeypatch):
    """Calibration tries up to eight fits per layer and budgets one per rank: the covariance is
    decomposed once per moments (and once more after new rows arrive)."""
    calls = []
    real = refine._eig
    monkeypatch.setattr(refine, "_eig", lambda sigma, ridge=refine.RIDGE: calls.append(1) or real(sigma, ridge))
    rng = np.random.default_rng(3)
    x_o = anisotropic_inputs(500, 10, rng)
    m = moments_of(x_o + 0.1 * rng.standard_normal(x_o.shape), x_o)
    w, b = rng.standard_normal((6, 10)), rng.standard_normal(6)
    first = refine.whitened_svd(w, b, m, 3, fit_bias=True)
    for rank, ridge, shrink in [(2, 0.1, 0.0), (4, 1.0, 0.5), (3, None, 0.0)]:
        refine.whitened_svd(w, b, m, rank, fit_bias=True, paired_ridge=ridge, shrink=shrink)
    refine.whitened_svd(w, b, m.original_view(), 3, fit_bias=True)
    refine.whitened_svd(w, b, m.original_view(), 2, fit_bias=True)
    assert len(calls) == 2  # the pairs' covariance, then the original view's
    again = refine.whitened_svd(w, b, m, 3, fit_bias=True)
    assert all(np.array_equal(p, q) for p, q in zip(first, again))
    m.add(x_o[:50], x_o[:50])  # new rows: decomposed afresh
    refine.whitened_svd(w, b, m, 3, fit_bias=True)
    assert len(calls) == 3


# --- projected statistics: exact for the methods that keep their first factors -----------------

from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr import methods
from onnxlr.calib.collect import refine_replacement
from onnxlr.layers import ConvLayer
from onnxlr.methods.base import layer_matrices
from onnxlr.ranks import RankSpec


@settings(max_examples=40, deadline=None, derandomize=True)
@given(method=st.sampled_from(["tucker", "cp", "spatial-svd"]), group=st.sampled_from([1, 2]),
       kernel=st.sampled_from([(3, 3), (3, 1), (2, 3), (1, 3)]), fraction=st.sampled_from([0.25, 0.5, 1.0]),
       paired=st.booleans(), fit_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_projected_statistics_give_the_fit_of_full_statistics(method, group, kernel, fraction, paired, fit_bias, seed):
    """Tucker-2, CP and spatial SVD refit only what follows their first factors: calibration keeps
    the moments of P x (P: those factors' row space) instead of n x n ones, and must get the same
    refit, the same held-out errors and the same choice (to float64 round-off)."""
    rng = np.random.default_rng(seed)
    s_in, t_out = 8, 12
    layer = ConvLayer(rng.standard_normal((t_out, s_in // group, *kernel)).astype(np.float32),
                      rng.standard_normal(t_out).astype(np.float32), group, (1, 1), (1, 1), (0, 0, 0, 0))
    chosen = methods.get(method)
    if chosen.check(layer) is not None:
        return
    replacement, _ = chosen.factorize(layer, RankSpec("fraction", fraction), 1)
    weights, spaces = layer_matrices(layer), chosen.input_space(layer, replacement)
    n = weights[0].shape[1]
    full = [[refine.Moments(n, paired) for _ in range(group)] for _ in range(2)]
    projected = [[refine.ProjectedMoments(p, w, paired) for p, w in zip(spaces, weights)] for _ in range(2)]
    for part in range(2):
        for gi in range(group):
            x_o = anisotropic_inputs(300 if part == 0 else 80, n, rng, mean=0.5)
            x_c = x_o + 0.3 * rng.standard_normal(x_o.shape)
            for moments in (full[part][gi], projected[part][gi]):
                moments.add(x_c, x_o if paired else None)
    bias = layer.bias if fit_bias else None
    results = [refine_replacement(layer, bias, fit_bias, replacement, *stats, errors=(errors := {})) + (errors,)
               for stats in (full, projected)]
    (new_full, note_full, err_full), (new_proj, note_proj, err_proj) = results
    assert spaces[0].shape[0] <= n
    np.testing.assert_allclose(new_proj.low_rank_weight(), new_full.low_rank_weight(), rtol=1e-7, atol=1e-9)
    assert err_proj["before"] == pytest.approx(err_full["before"], rel=1e-7, abs=1e-6)
    assert err_proj["after"] == pytest.approx(err_full["after"], rel=1e-7, abs=1e-6)
    assert note_proj.split("(")[0] == note_full.split("(")[0]


@pytest.mark.parametrize("paired", [False, True])
def test_errors_of_factored_maps_equal_those_of_their_product(paired):
    """Whitened fits are scored as their factors Q P (never T x n in float64): the same errors."""
    rng = np.random.default_rng(3)
    n, t, r = 40, 30, 7
    x_o = anisotropic_inputs(500, n, rng, mean=0.3)
    moments = moments_of(x_o + 0.1 * rng.standard_normal(x_o.shape), x_o if paired else None)
    w, b = rng.standard_normal((t, n)), rng.standard_normal(t)
    q, p, b_new = rng.standard_normal((t, r)), rng.standard_normal((r, n)), rng.standard_normal(t)
    for bias in (b, None):
        dense = refine.output_error(w, bias, q @ p, b_new, moments)
        factored = refine.output_error(w, bias, refine.LowRank(q, p), b_new, moments)
        np.testing.assert_allclose(factored, dense, rtol=1e-10)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("fit_bias", [False, True])
@pytest.mark.parametrize("shrink", [0.0, 0.4])
def test_few_rows_kept_themselves_give_the_fit_of_full_moments(paired, fit_bias, shrink):
    """A layer with fewer rows than inputs keeps the rows (RowMoments): the same whitened fit, bias
    and output errors as n x n moments, at every paired ridge."""
    rng = np.random.default_rng(4)
    n, t, rows = 200, 60, 40
    x_o = rng.standard_normal((rows, n)) @ rng.standard_normal((n, n)) * 0.1 + 0.3
    x_c = x_o + 0.2 * rng.standard_normal(x_o.shape)
    w, b = rng.standard_normal((t, n)).astype(np.float32), rng.standard_normal(t)
    full, kept = refine.Moments(n, paired), refine.RowMoments(n, paired)
    for moments in (full, kept):
        for start in range(0, rows, 15):
            moments.add(x_c[start : start + 15], x_o[start : start + 15] if paired else None)
    for ridge in refine.PAIRED_RIDGES:
        p, q, new_bias = refine.whitened_svd(w.T.T, b, full, 10, fit_bias, paired_ridge=ridge, shrink=shrink)
        low, new_bias2 = refine.rows_whitened_svd(w.T.T, b, kept, 10, fit_bias, paired_ridge=ridge, shrink=shrink)
        np.testing.assert_allclose(low.dense(), q @ p, rtol=1e-9, atol=1e-9 * np.abs(q @ p).max())
        np.testing.assert_allclose(new_bias2, new_bias, rtol=1e-9, atol=1e-9)
        expected = refine.output_error(w, b, q @ p, new_bias, full)
        np.testing.assert_allclose(refine.output_error(w, b, low, new_bias2, kept), expected, rtol=1e-9)


@pytest.mark.parametrize("paired", [False, True])
def test_held_out_rows_kept_themselves_score_and_merge_as_moments(paired):
    """Held-out rows only score candidates (and join the final fit): kept as rows (RowMoments) they
    give the same choice, errors and refit as n x n moments."""
    from onnxlr.layers import LinearLayer

    rng = np.random.default_rng(5)
    n, t, rows = 80, 30, 400
    layer = LinearLayer(rng.standard_normal((n, t)).astype(np.float32))
    replacement, _ = methods.get("svd").factorize(layer, RankSpec("fraction", 0.25), 1)
    x_o = anisotropic_inputs(rows, n, rng, mean=0.2)
    x_c = x_o + 0.1 * rng.standard_normal(x_o.shape)
    fit_part = refine.Moments(n, paired)
    fit_part.add(x_c[:320], x_o[:320] if paired else None)
    results = []
    for held in (refine.Moments(n, paired), refine.RowMoments(n, paired)):
        held.add(x_c[320:], x_o[320:] if paired else None)
        part = refine.Moments(n, paired)
        part.add(x_c[:320], x_o[:320] if paired else None)
        new, note = refine_replacement(layer, None, False, replacement, [part], [held], errors=(errors := {}))
        results.append((new.low_rank_weight(), note, errors))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-9, atol=1e-12)
    assert results[1][1] == results[0][1]
    assert results[1][2] == pytest.approx(results[0][2], rel=1e-9)
