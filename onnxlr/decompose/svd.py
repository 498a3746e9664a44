"""Truncated SVD of a weight matrix, and the chains it gives for Gemm/MatMul and Conv.

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

from typing import Callable

import numpy as np

from onnxlr.decompose.linalg import left_singular, working_dtype
from onnxlr.layers import ConvLayer, ConvStep, LinearLayer, LinearStep, Replacement

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


def truncated(matrix: np.ndarray, choose: RankChooser) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, Q, singular values) for one matrix with the rank picked by ``choose``."""
    singular_values, factor = spectrum_and_factor(matrix)
    rank = choose([singular_values], min(matrix.shape))
    first, second = factor(rank)
    return first, second, singular_values


# Above this many weight entries the reconstruction is not materialized (a 25088 x 4096 FC
# would need another 800 MB); its error is exact from the spectrum anyway.
MAX_RECONSTRUCTION_SIZE = 1 << 24


def discarded_energy_error(singular_values: np.ndarray, rank: int) -> float:
    """||W - W_R|| / ||W|| of the best rank-R approximation, from the singular values."""
    power = singular_values.astype(np.float64) ** 2
    total = power.sum()
    return float(np.sqrt(power[rank:].sum() / total)) if total > 0 else 0.0


def linear_chain(layer: LinearLayer, choose: RankChooser) -> Replacement:
    first, second, singular_values = truncated(layer.weight, choose)
    rank = first.shape[1]
    small = layer.weight.size <= MAX_RECONSTRUCTION_SIZE
    return Replacement(
        method="svd",
        steps=[LinearStep(first), LinearStep(second)],
        ranks={"rank": rank},
        reconstruction=first.astype(np.float64) @ second.astype(np.float64) if small else None,
        weight_rel_error=discarded_energy_error(singular_values, rank),
    )


def conv_chain(layer: ConvLayer, choose: RankChooser) -> Replacement:
    """SVD of each group's [T_g, S_g * prod(kernel)] matrix; the first conv keeps the kernel."""
    groups = layer.group_weights()
    matrices = [w.reshape(w.shape[0], -1).T for w in groups]  # [S_g*k, T_g]: y = x @ M
    spectra_and_factors = [spectrum_and_factor(m) for m in matrices]
    full = min(matrices[0].shape)
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
