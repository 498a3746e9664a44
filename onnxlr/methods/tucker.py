"""Tucker-2 decomposition of a conv kernel on its two channel modes.

Math: W [T, S, *k] ~= G x_0 U_out x_1 U_in with U_out (T x R4) and U_in (S x R3) orthonormal and
core G [R4, R3, *k] = W x_0 U_out^T x_1 U_in^T. The bases start as the leading eigenvectors of the
mode-0 and mode-1 Gram matrices (HOSVD; only T x T and S x S matrices, never a full SVD), then a
few HOOI sweeps refine each basis against the other projected tensor. The spectra used to choose
ranks are those of the two unfoldings. At full rank the bases are complete and the chain is exact.

Chain (the stride, dilation and pads belong to the core conv only):
    x -Conv 1x1 (S->R3)-> -Conv k (R3->R4, original kernel/strides/dilations/pads)->
      -Conv 1x1 (R4->T, original bias)-> y
Grouped convs are decomposed per group; every conv of the chain keeps the group count, so the
block-diagonal structure survives (R3 and R4 are then per group).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from onnxlr.calib import fit
from onnxlr.layers import ConvLayer, ConvStep, Replacement
from onnxlr.methods.base import Fit, Method, each_spec, needs_kxk_conv
from onnxlr.methods.linalg import left_singular, unfold
from onnxlr.ranks import RankLog, RankSpec, tucker_ranks

# (output-mode spectra, input-mode spectra, T_g, S_g) -> (R4, R3), one spectrum per group
TuckerRankChooser = Callable[[list[np.ndarray], list[np.ndarray], int, int], tuple[int, int]]

HOOI_SWEEPS = 2


def channel_spectra(weight: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(singular values, basis) of the output-channel and input-channel unfoldings."""
    return left_singular(unfold(weight, 0)), left_singular(unfold(weight, 1))


def project(weight: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    """Core G = W x_0 U_out^T x_1 U_in^T."""
    flat = weight.reshape(weight.shape[0], weight.shape[1], -1)
    core = np.einsum("tsk,tr,sq->rqk", flat, u_out, u_in, optimize=True)
    return core.reshape(u_out.shape[1], u_in.shape[1], *weight.shape[2:])


def hooi(weight: np.ndarray, u_out: np.ndarray, u_in: np.ndarray, sweeps: int = HOOI_SWEEPS):
    """Alternate: best U_out for the tensor projected on U_in, then best U_in given U_out."""
    w = np.asarray(weight, dtype=np.float64)
    r4, r3 = u_out.shape[1], u_in.shape[1]
    if r4 == w.shape[0] and r3 == w.shape[1]:
        return u_out, u_in  # complete bases: nothing to refine
    for _ in range(sweeps):
        partial_in = np.einsum("ts...,sq->tq...", w, u_in, optimize=True)
        u_out = left_singular(unfold(partial_in, 0))[1][:, :r4]
        partial_out = np.einsum("ts...,tr->rs...", w, u_out, optimize=True)
        u_in = left_singular(unfold(partial_out, 1))[1][:, :r3]
    return u_out, u_in


def layer_spectra(layer: ConvLayer) -> list:
    """Per group, :func:`channel_spectra`: the part every rank of the layer shares."""
    return [channel_spectra(np.asarray(w, dtype=np.float64)) for w in layer.group_weights()]


def tucker2_chain(layer: ConvLayer, choose: TuckerRankChooser, spectra: list | None = None) -> Replacement:
    groups = [np.asarray(w, dtype=np.float64) for w in layer.group_weights()]
    spectra = spectra or layer_spectra(layer)
    t_g, s_g = groups[0].shape[:2]
    r4, r3 = choose([s[0][0] for s in spectra], [s[1][0] for s in spectra], t_g, s_g)

    firsts, cores, lasts, reconstructions = [], [], [], []
    for w, ((_, basis_out), (_, basis_in)) in zip(groups, spectra):
        u_out, u_in = hooi(w, basis_out[:, :r4], basis_in[:, :r3])
        core = project(w, u_out, u_in)
        firsts.append(u_in.T)  # [R3, S_g]
        cores.append(core)  # [R4, R3, *k]
        lasts.append(u_out)  # [T_g, R4]
        reconstructions.append(np.einsum("rq...,tr,sq->ts...", core, u_out, u_in, optimize=True))

    ones = (1,) * layer.spatial_rank
    first_w = np.concatenate(firsts, axis=0).reshape(layer.group * r3, s_g, *ones)
    core_w = np.concatenate(cores, axis=0)
    last_w = np.concatenate(lasts, axis=0).reshape(layer.out_channels, r4, *ones)
    steps = [
        ConvStep(first_w, group=layer.group),
        ConvStep(
            core_w,
            group=layer.group,
            strides=layer.strides,
            dilations=layer.dilations,
            pads=layer.pads,
            auto_pad=layer.auto_pad,
        ),
        ConvStep(last_w, bias=layer.bias, group=layer.group),
    ]
    return Replacement(
        method="tucker",
        steps=steps,
        ranks={"rank_in": r3, "rank_out": r4},
        reconstruction=np.concatenate(reconstructions, axis=0),
    )


# --- the method -----------------------------------------------------------------------------


def factorize(layer: ConvLayer, ranks: RankSpec | dict, round_to: int,
              spectra: list | None = None) -> tuple[Replacement, RankLog]:
    log = RankLog()
    group_shape = layer.group_weights()[0].shape

    def choose(out, inp, t, s):
        if isinstance(ranks, dict):
            return int(ranks["rank_out"]), int(ranks["rank_in"])
        return tucker_ranks(ranks, out, inp, group_shape, round_to, log)

    return tucker2_chain(layer, choose, spectra), log


def factorize_many(layer: ConvLayer, specs: list, round_to: int) -> list:
    spectra = layer_spectra(layer)
    return each_spec(lambda spec: factorize(layer, spec, round_to, spectra), specs)


def refit(layer: ConvLayer, replacement: Replacement, weights, biases, moments, fit_bias: bool,
          paired_ridge: float | None = None, shrink: bool = False) -> Fit:
    """Core refit (whitened least squares given U_in and U_out), then the last factor and bias."""
    g_, steps = layer.group, replacement.steps
    s_g, k = layer.weight.shape[1], int(np.prod(layer.kernel))
    first, last = steps[0].weight, steps[2].weight
    r3, r4 = first.shape[0] // g_, last.shape[1]
    t_g = weights[0].shape[0]
    parts = []
    for gi, (w, b, m) in enumerate(zip(weights, biases, moments)):
        u_in = first[gi * r3 : (gi + 1) * r3].reshape(r3, s_g).T.astype(np.float64)
        u_out = last[gi * t_g : (gi + 1) * t_g].reshape(t_g, r4).astype(np.float64)
        q, _ = np.linalg.qr(u_out)
        core = fit.refit_tucker_core(w, u_in, q, k, m, fit_bias)  # [R4, R3*k]
        chain = np.einsum("rqk,qs->rsk", core.reshape(r4, r3, k), u_in.T).reshape(r4, -1)
        u, new_bias = fit.refit_last(w, b, chain, m, fit_bias)
        parts.append((u, chain, new_bias, core.reshape(r4, r3, *layer.kernel)))
    return Fit([u @ chain for u, chain, _, _ in parts], [nb for _, _, nb, _ in parts], parts)


def input_space(layer: ConvLayer, replacement: Replacement) -> list[np.ndarray]:
    """Per group, U_in^T (x) I_k orthonormalized: the refit keeps U_in (the first 1x1 conv)."""
    r3, s_g = replacement.steps[0].weight.shape[0] // layer.group, layer.weight.shape[1]
    first = replacement.steps[0].weight.reshape(layer.group * r3, s_g).astype(np.float64)
    eye = np.eye(int(np.prod(layer.kernel)))
    return [fit.row_space(np.kron(first[gi * r3 : (gi + 1) * r3], eye)) for gi in range(layer.group)]


def rebuild(layer: ConvLayer, replacement: Replacement, refitted: Fit) -> Replacement:
    steps, parts = replacement.steps, refitted.parts
    g_, kernel, s_g = layer.group, layer.kernel, layer.weight.shape[1]
    t_g, ones = layer.out_channels // g_, (1,) * layer.spatial_rank
    r4 = steps[2].weight.shape[1]
    core_w = np.concatenate([core for _, _, _, core in parts], axis=0)
    last = np.concatenate([u.reshape(t_g, r4, *ones) for u, _, _, _ in parts], axis=0)
    new_steps = [steps[0], replace(steps[1], weight=core_w), replace(steps[2], weight=last)]
    reconstruction = np.concatenate([(u @ chain).reshape(t_g, s_g, *kernel) for u, chain, _, _ in parts], axis=0)
    return replace(replacement, steps=new_steps, reconstruction=reconstruction, weight_rel_error=None,
                   notes=list(replacement.notes))


METHOD = Method(
    name="tucker",
    summary="KxK conv: 1x1 S->R3, KxK R3->R4 (original attributes), 1x1 R4->T (bias)",
    check=needs_kxk_conv("tucker"), factorize=factorize, refit=refit, rebuild=rebuild, input_space=input_space,
    factorize_many=factorize_many,
)
