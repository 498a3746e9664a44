"""Spatial SVD of a KxK conv (Jaderberg, Vedaldi and Zisserman, "Speeding up convolutional neural
networks with low rank expansions", BMVC 2014; the scheme AIMET offers): the kernel is split along
its first spatial axis.

Math: per group, with W [T_g, S_g, k_1, k_2 ...] read as the matrix M[(s, i), (t, j...)] =
W[t, s, i, j...] (i the tap on the first spatial axis, j... the taps on the others), the rank-R
truncated SVD M ~= A B gives

    W[t, s, i, j...] ~= sum_r A[(s, i), r] B[r, (t, j...)],

a conv with kernel (k_1, 1, ...) S->R (weights A) followed by a conv with kernel (1, k_2, ...)
R->T (weights B). The first conv carries the first axis's stride, dilation and pads, the second
those of the other axes; per axis ``auto_pad`` pads the same (SAME pads an axis from its own
kernel, stride and dilation), so it is kept on both. At full rank min(S_g k_1, T_g k_2 ...) the
chain is exact.

Chain (2-D):
    x -Conv k_1 x 1 (S->R, axis-0 stride/dilation/pads)-> -Conv 1 x k_2 (R->T, the rest, bias)-> y

Applies to convs with two or more spatial axes whose first axis and remaining axes both have a
kernel larger than 1 (a 3-D conv splits as k_1 then k_2 x k_3). Ranks: a fraction F means
ceil(F * max(S_g, T_g)) (as CP: F of the channels); energy and EVBMF read the spectrum of M.
Refinement refits the second conv (and the bias) by least squares: the chain up to it is a fixed
linear map of the original im2col patch (taps (i, j...) of channel s).
"""

from __future__ import annotations

import math

import numpy as np

from onnxlr.calib import fit
from onnxlr.layers import ConvLayer, ConvStep, Replacement
from onnxlr.methods.base import Fit, Method, each_spec
from onnxlr.methods.cp import rebuild_last_factor, refit_last_factor
from onnxlr.methods.svd import discarded_energy_error, spectrum_and_factor
from onnxlr.ranks import RankLog, RankSpec, round_up, svd_rank


def check(layer) -> str | None:
    if not isinstance(layer, ConvLayer) or layer.is_pointwise:
        return "spatial-svd applies to KxK convs"
    if layer.spatial_rank < 2:
        return "spatial-svd splits a kernel across two spatial axes; this conv is 1-D"
    kernel = layer.kernel
    if kernel[0] == 1 or math.prod(kernel[1:]) == 1:
        return f"spatial-svd needs a kernel larger than 1 on the first axis and on the others; this one is {kernel}"
    return None


def _matrices(layer: ConvLayer) -> list[np.ndarray]:
    """M_g [(s, i), (t, j...)] per group."""
    out = []
    for w in layer.group_weights():
        t_g, s_g, k1 = w.shape[0], w.shape[1], w.shape[2]
        rest = int(np.prod(w.shape[3:]))
        m = np.asarray(w, dtype=np.float64).reshape(t_g, s_g, k1, rest).transpose(1, 2, 0, 3)
        out.append(m.reshape(s_g * k1, t_g * rest))
    return out


def _rank(layer: ConvLayer, spectra, ranks: RankSpec | dict, round_to: int, log: RankLog) -> int:
    shape = _matrices_shape(layer)
    full = min(shape)
    if isinstance(ranks, dict):
        return min(int(ranks["rank"]), full)
    if ranks.kind == "fraction":
        t_g, s_g = layer.group_weights()[0].shape[:2]
        raw = max(1, math.ceil(ranks.value * max(s_g, t_g)))
        log.raw["rank"] = raw
        return round_up(raw, round_to, full)
    return svd_rank(ranks, spectra, shape, round_to, log)


def _matrices_shape(layer: ConvLayer) -> tuple[int, int]:
    t_g, s_g = layer.group_weights()[0].shape[:2]
    return s_g * layer.kernel[0], t_g * math.prod(layer.kernel[1:])


def factorize(layer: ConvLayer, ranks: RankSpec | dict, round_to: int,
              decompositions: list | None = None) -> tuple[Replacement, RankLog]:
    """``decompositions``: :func:`spectrum_and_factor` of each group's M, when the caller has them."""
    log = RankLog()
    decompositions = decompositions or [spectrum_and_factor(m) for m in _matrices(layer)]
    rank = _rank(layer, [sv for sv, _ in decompositions], ranks, round_to, log)
    g_, d = layer.group, layer.spatial_rank
    t_g, s_g = layer.group_weights()[0].shape[:2]
    k1, rest = layer.kernel[0], layer.kernel[1:]
    firsts, seconds = [], []
    for _, factor in decompositions:
        a, b = factor(rank)  # a [(s, i), R], b [R, (t, j...)]
        firsts.append(np.asarray(a, dtype=np.float64).T.reshape(rank, s_g, k1, *([1] * (d - 1))))
        seconds.append(np.asarray(b, dtype=np.float64).reshape(rank, t_g, *rest).swapaxes(0, 1)
                       .reshape(t_g, rank, 1, *rest))
    first_pads = (layer.pads[0],) + (0,) * (d - 1) + (layer.pads[d],) + (0,) * (d - 1)
    second_pads = (0,) + tuple(layer.pads[1:d]) + (0,) + tuple(layer.pads[d + 1 :])
    steps = [
        ConvStep(np.concatenate(firsts, axis=0), group=g_,
                 strides=(layer.strides[0],) + (1,) * (d - 1),
                 dilations=(layer.dilations[0],) + (1,) * (d - 1),
                 pads=first_pads, auto_pad=layer.auto_pad),
        ConvStep(np.concatenate(seconds, axis=0), bias=layer.bias, group=g_,
                 strides=(1,) + tuple(layer.strides[1:]),
                 dilations=(1,) + tuple(layer.dilations[1:]),
                 pads=second_pads, auto_pad=layer.auto_pad),
    ]
    reconstruction = np.concatenate([_reconstruct(f, s) for f, s in zip(firsts, seconds)], axis=0)
    errors = [discarded_energy_error(sv, rank) for sv, _ in decompositions]
    return Replacement(method="spatial-svd", steps=steps, ranks={"rank": rank}, reconstruction=reconstruction,
                       weight_rel_error=float(np.sqrt(np.mean(np.square(errors))))), log


def factorize_many(layer: ConvLayer, specs: list, round_to: int) -> list:
    decompositions = [spectrum_and_factor(m) for m in _matrices(layer)]
    return each_spec(lambda spec: factorize(layer, spec, round_to, decompositions), specs)


def _reconstruct(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """W_g [T_g, S_g, k_1, rest...] from the two conv weights of one group."""
    a = first.reshape(first.shape[0], first.shape[1], first.shape[2])  # [R, S, k1]
    b = second.reshape(second.shape[0], second.shape[1], -1)  # [T, R, rest]
    w = np.einsum("rsi,trj->tsij", a, b, optimize=True)  # a BLAS product: the C loop took 1.3 s on 512x512x3x3
    return w.reshape(second.shape[0], first.shape[1], first.shape[2], *second.shape[3:])


def chain_maps(layer: ConvLayer, replacement: Replacement) -> list[np.ndarray]:
    """C_g [(r, j...), n]: the first conv's outputs at the second conv's taps, as a map of the
    im2col patch (channel s, then taps (i, j...)): C[(r, j), (s, i, j')] = A[r, s, i] delta(j, j')."""
    g_, first = layer.group, replacement.steps[0].weight
    rank = first.shape[0] // g_
    s_g, k1 = first.shape[1], first.shape[2]
    rest = math.prod(layer.kernel[1:])
    eye = np.eye(rest)
    maps = []
    for gi in range(g_):
        a = np.asarray(first[gi * rank : (gi + 1) * rank], dtype=np.float64).reshape(rank, s_g, k1)
        maps.append(np.einsum("rsi,jl->rjsil", a, eye).reshape(rank * rest, s_g * k1 * rest))
    return maps


def refit(layer: ConvLayer, replacement: Replacement, weights, biases, moments, fit_bias: bool,
          paired_ridge: float | None = None, shrink: bool = False) -> Fit:
    return refit_last_factor(layer, replacement, chain_maps(layer, replacement), weights, biases,
                             moments, fit_bias)


def input_space(layer: ConvLayer, replacement: Replacement) -> list[np.ndarray]:
    """Per group, the row space of the chain before the second conv (the refit keeps it)."""
    return [fit.row_space(c) for c in chain_maps(layer, replacement)]


METHOD = Method(
    name="spatial-svd",
    summary="KxK conv: Kx1 S->R (first axis), 1xK R->T (the other axes, bias)",
    check=check, factorize=factorize, refit=refit, rebuild=rebuild_last_factor, input_space=input_space,
    factorize_many=factorize_many,
)
