"""Truncated SVD of a weight matrix: the chains it gives for Gemm/MatMul, 1x1 Conv, and (as the
channel decomposition, :mod:`onnxlr.methods.channel`) KxK Conv.

Math: W (K x N, y = x W) is approximated by its best rank-R approximation in the Frobenius norm,
W ~= P Q with P = U_R sqrt(S_R) (K x R) and Q = sqrt(S_R) V_R^T (R x N). Here P and Q come from the
eigenbasis of the smaller Gram matrix: with U_R the leading left basis, W ~= U_R (U_R^T W), which
is exact at full rank whatever the conditioning; the columns are then rebalanced by sqrt(sigma) so
neither factor carries all the scale (friendly to fp16).

Chains:
    Gemm / MatMul:   x -[x P]-> h (R wide) -[h Q (+C)]-> y
    1x1 Conv:        x -Conv 1x1 (S->R, the original strides and pads)-> -Conv 1x1 (R->T, bias)-> y
    KxK Conv ("channel decomposition", Zhang et al. 2016):
                     x -Conv KxK (S->R, the original kernel, strides, dilations, pads)->
                       -Conv 1x1 (R->T, bias)-> y
Grouped convs are factorized per group and keep their block-diagonal structure: both convs of the
chain use the original group count, with R channels per group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from onnxlr.calib import fit
from onnxlr.layers import ConvLayer, ConvStep, LinearLayer, LinearStep, Replacement
from onnxlr.methods.base import Fit, Method, each_spec, fixed_or_chosen
from onnxlr.methods.linalg import left_singular, working_dtype
from onnxlr.ranks import RankLog, RankSpec, svd_rank

RankChooser = Callable[[list[np.ndarray], int], int]  # (spectra per group, full rank) -> rank


def spectrum_and_factor(matrix: np.ndarray) -> tuple[np.ndarray, Callable[[int], tuple[np.ndarray, np.ndarray]]]:
    """Singular values of ``matrix`` and a function rank -> (P, Q) with matrix ~= P @ Q."""
    transposed = matrix.shape[0] > matrix.shape[1]
    work = matrix.T if transposed else matrix  # work is the wide orientation: rows <= cols
    singular_values, basis = left_singular(work)

    dtype = working_dtype(work.shape[0])

    def factor(rank: int) -> tuple[np.ndarray, np.ndarray]:
        left = basis[:, :rank]
        right = left.T.astype(dtype) @ np.asarray(work, dtype=dtype)  # rank x cols, row norms = sigma
        scale = np.sqrt(np.maximum(singular_values[:rank], np.finfo(np.float64).tiny))
        scale = np.where(singular_values[:rank] > singular_values[0] * 1e-12, scale, 1.0)
        left = left * scale
        right /= scale[:, None].astype(right.dtype)  # in place: right can be hundreds of MB
        if transposed:  # matrix = work.T ~= right.T @ left.T
            return right.T, left.T
        return left, right

    return singular_values, factor


def decompositions(layer: ConvLayer | LinearLayer) -> list:
    """Per group, (singular values, rank -> (P, Q)) of the matrix the SVD is taken of: the
    expensive part, which every rank of the layer shares."""
    if isinstance(layer, LinearLayer):
        return [spectrum_and_factor(layer.weight)]
    return [spectrum_and_factor(w.reshape(w.shape[0], -1).T) for w in layer.group_weights()]  # [S_g*k, T_g]


# Above this many weight entries the reconstruction is not materialized (a 25088 x 4096 FC
# would need another 800 MB); its error is exact from the spectrum anyway.
MAX_RECONSTRUCTION_SIZE = 1 << 22


def discarded_energy_error(singular_values: np.ndarray, rank: int) -> float:
    """||W - W_R|| / ||W|| of the best rank-R approximation, from the singular values."""
    power = singular_values.astype(np.float64) ** 2
    total = power.sum()
    return float(np.sqrt(power[rank:].sum() / total)) if total > 0 else 0.0


def linear_chain(layer: LinearLayer, choose: RankChooser, decomposed: list | None = None) -> Replacement:
    singular_values, factor = (decomposed or decompositions(layer))[0]
    first, second = factor(choose([singular_values], min(layer.weight.shape)))
    rank = first.shape[1]
    small = layer.weight.size <= MAX_RECONSTRUCTION_SIZE
    return Replacement(
        method="svd",
        steps=[LinearStep(first), LinearStep(second)],
        ranks={"rank": rank},
        reconstruction=first.astype(np.float64) @ second.astype(np.float64) if small else None,
        weight_rel_error=discarded_energy_error(singular_values, rank),
    )


def conv_chain(layer: ConvLayer, choose: RankChooser, decomposed: list | None = None) -> Replacement:
    """SVD of each group's [T_g, S_g * prod(kernel)] matrix; the first conv keeps the kernel."""
    groups = layer.group_weights()
    spectra_and_factors = decomposed or decompositions(layer)  # of M [S_g*k, T_g]: y = x @ M
    full = min(matrix_shape(layer))
    rank = choose([sv for sv, _ in spectra_and_factors], full)
    firsts, seconds = zip(*(factor(rank) for _, factor in spectra_and_factors))
    in_per_group = layer.weight.shape[1]
    kernel = layer.kernel
    # first: [S_g*k, R] -> conv weight [R, S_g, *k] ; second: [R, T_g] -> [T_g, R, 1...]
    first_w = np.concatenate([f.T.reshape(rank, in_per_group, *kernel) for f in firsts], axis=0)
    ones = (1,) * layer.spatial_rank
    second_w = np.concatenate([s.T.reshape(s.shape[1], rank, *ones) for s in seconds], axis=0)
    steps = [
        ConvStep(
            first_w,
            group=layer.group,
            strides=layer.strides,
            dilations=layer.dilations,
            pads=layer.pads,
            auto_pad=layer.auto_pad,
        ),
        ConvStep(second_w, bias=layer.bias, group=layer.group),
    ]
    reconstruction = np.concatenate(
        [(f @ s).T.reshape(w.shape) for f, s, w in zip(firsts, seconds, groups)], axis=0
    )
    return Replacement(method="svd", steps=steps, ranks={"rank": rank}, reconstruction=reconstruction)


# --- the method -----------------------------------------------------------------------------


def matrix_shape(layer: ConvLayer | LinearLayer) -> tuple[int, int]:
    """(K, N) of the matrix whose SVD is taken: per group [S_g * prod(kernel), T_g] for convs."""
    if isinstance(layer, LinearLayer):
        return tuple(layer.weight.shape)
    group_shape = layer.group_weights()[0].shape
    return int(np.prod(group_shape[1:])), int(group_shape[0])


def factorize(layer: ConvLayer | LinearLayer, ranks: RankSpec | dict, round_to: int,
              decomposed: list | None = None) -> tuple[Replacement, RankLog]:
    log = RankLog()
    shape = matrix_shape(layer)

    def choose(spectra, full):
        return fixed_or_chosen(ranks, "rank", lambda: svd_rank(ranks, spectra, shape, round_to, log))

    if isinstance(layer, LinearLayer):
        return linear_chain(layer, choose, decomposed), log
    return conv_chain(layer, choose, decomposed), log


def factorize_many(layer: ConvLayer | LinearLayer, specs: list, round_to: int) -> list:
    decomposed = decompositions(layer)
    return each_spec(lambda spec: factorize(layer, spec, round_to, decomposed), specs)


def check(layer) -> str | None:
    if isinstance(layer, ConvLayer) and not layer.is_pointwise:
        return "svd applies to Gemm, MatMul and 1x1 convs (KxK convs: the channel decomposition)"
    return None


def refit(layer, replacement: Replacement, weights, biases, moments, fit_bias: bool,
          paired_ridge: float | None = None, shrink: bool = False) -> Fit:
    """Activation-aware truncation at the same rank (calib.fit.whitened_svd), per group."""
    rank = replacement.ranks["rank"]
    parts = []  # per group (LowRank Q P, b')
    for w, b, m in zip(weights, biases, moments):
        amount = fit.shrinkage(m) if shrink else 0.0
        if isinstance(m, fit.ReducedMoments):
            parts.append(fit.reduced_whitened_svd(w, b, m, rank, fit_bias, shrink=amount))
        elif isinstance(m, fit.RowMoments):
            parts.append(fit.rows_whitened_svd(w, b, m, rank, fit_bias, paired_ridge=paired_ridge, shrink=amount))
        else:
            p, q, new_bias = fit.whitened_svd(w, b, m, rank, fit_bias, paired_ridge=paired_ridge, shrink=amount)
            parts.append((fit.LowRank(q, p), new_bias))
    return Fit([low for low, _ in parts], [nb for _, nb in parts], parts)


def rebuild(layer, replacement: Replacement, refitted: Fit) -> Replacement:
    """The chain with the refitted factors P [R, n] (first step) and Q [T_g, R] (second)."""
    if isinstance(layer, LinearLayer):
        low = refitted.parts[0][0]
        big = layer.weight.size > MAX_RECONSTRUCTION_SIZE
        p, q = low.p_as(layer.weight.dtype if big else np.float64), low.q  # a big P is formed once, in its dtype
        steps = [LinearStep(p.T), LinearStep(q.T)]
        if big:  # its error from the factors, as factorize does
            w = low.w if low.w is not None else layer.weight.T  # [T, n], no copy
            w_norm = fit.squared_norm(w)
            cross, new_norm = low.inner_and_norm(w)
            error = float(np.sqrt(max(w_norm - 2 * cross + new_norm, 0.0) / max(w_norm, 1e-300)))
            return replace(replacement, steps=steps, reconstruction=None, weight_rel_error=error,
                           notes=list(replacement.notes))
        reconstruction = (q @ p).T
    else:
        parts = [(low.p, low.q, low) for low, _ in refitted.parts]
        g_, kernel, s_g = layer.group, layer.kernel, layer.weight.shape[1]
        t_g, ones = layer.out_channels // g_, (1,) * layer.spatial_rank
        rank = replacement.ranks["rank"]
        first = np.concatenate([p.reshape(rank, s_g, *kernel) for p, _, _ in parts], axis=0)
        second = np.concatenate([q.reshape(t_g, rank, *ones) for _, q, _ in parts], axis=0)
        steps = [replace(replacement.steps[0], weight=first), replace(replacement.steps[1], weight=second)]
        reconstruction = np.concatenate([(q @ p).reshape(t_g, s_g, *kernel) for p, q, _ in parts], axis=0)
    return replace(replacement, steps=steps, reconstruction=reconstruction, weight_rel_error=None,
                   notes=list(replacement.notes))


METHOD = Method(
    name="svd",
    summary="Gemm/MatMul: x @ P (R wide) @ Q (+C); 1x1 conv: 1x1 S->R, 1x1 R->T (bias)",
    check=check, factorize=factorize, refit=refit, rebuild=rebuild, whitened=True, factorize_many=factorize_many,
)
