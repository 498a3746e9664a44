"""CP (canonical polyadic) decomposition of a conv kernel into separable rank-1 terms.

Math: W[t, s, k_1..k_d] ~= sum_r A_out[t, r] A_in[s, r] A_1[k_1, r] ... A_d[k_d, r].
Fitting ALS on a 512x512x3x3 kernel directly costs seconds per sweep, so the channel modes are
first compressed with the Tucker-2 bases (CANDELINC): W ~= G x_0 U_out x_1 U_in with G of size
min(T, R) x min(S, R) x k. A rank-R CP tensor has mode ranks <= R, so this loses nothing the CP
model could use when W has CP rank R. ALS runs on the small core and the
channel factors are lifted back: A_out = U_out B_out, A_in = U_in B_in. ALS starts from the GEVD
(Jennrich) solution when the core is R x R x k and that fits it (exact for an exact rank-R kernel,
where the SVD start can stall in an ALS swamp), else from the SVD start. Column norms
are spread evenly over the factors so that no factor carries all the scale (fp16-friendly).

Chain (each spatial axis gets its own depthwise conv, carrying only that axis's kernel, stride,
dilation and pads; axes with kernel 1 fold their scalar into the first conv, which then takes
that axis's stride and pads):
    x -Conv 1x1 (S->R)-> -Conv k_1 x 1 (depthwise, group R)-> ... -Conv 1 x k_d (depthwise)->
      -Conv 1x1 (R->T, original bias)-> y
Grouped convs use R terms per group and keep the group structure in every conv of the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import scipy.linalg

from onnxlr.calib import fit
from onnxlr.layers import ConvLayer, ConvStep, Replacement
from onnxlr.methods.base import Fit, Method, each_spec, needs_kxk_conv
from onnxlr.methods.linalg import left_singular, unfold
from onnxlr.methods.tucker import layer_spectra, project
from onnxlr.ranks import RankLog, RankSpec, cp_rank

# (output-mode spectra, input-mode spectra, T_g, S_g, kernel) -> R, one spectrum per group
CpRankChooser = Callable[[list[np.ndarray], list[np.ndarray], int, int, tuple[int, ...]], int]

ALS_MAX_ITER = 300
ALS_TOL = 1e-9
# A GEVD start that fits the core worse than this is dropped for the SVD start.
GEVD_MAX_INIT_ERROR = 1e-2


def cp_factors(weight: np.ndarray, rank: int, seed: int = 0, bases=None) -> list[np.ndarray]:
    """Factor matrices [A_out, A_in, A_1, ..., A_d], each (mode size x rank), balanced norms.

    ``bases``: the (output, input) channel bases from ``left_singular``, when the caller has them.
    """
    w = np.asarray(weight, dtype=np.float64)
    if bases is None:
        bases = left_singular(unfold(w, 0))[1], left_singular(unfold(w, 1))[1]
    u_out = bases[0][:, : min(rank, w.shape[0])]
    u_in = bases[1][:, : min(rank, w.shape[1])]
    core = project(w, u_out, u_in)
    start = gevd_init(core, rank, seed)
    factors = als(core, rank, start[1] if start is not None else svd_init(core, rank, seed))
    factors[0] = u_out @ factors[0]
    factors[1] = u_in @ factors[1]
    return balance(factors)


def svd_init(tensor: np.ndarray, rank: int, seed: int = 0) -> list[np.ndarray]:
    """Leading left singular vectors of each unfolding; random columns where a mode is too small."""
    rng = np.random.default_rng(seed)
    factors = []
    for mode, size in enumerate(tensor.shape):
        basis = left_singular(unfold(tensor, mode))[1][:, :rank]
        if basis.shape[1] < rank:
            basis = np.hstack([basis, rng.standard_normal((size, rank - basis.shape[1]))])
        factors.append(basis)
    return factors


def als(tensor: np.ndarray, rank: int, factors: list[np.ndarray], max_iter: int = ALS_MAX_ITER,
        tol: float = ALS_TOL) -> list[np.ndarray]:
    """Alternating least squares for a CP model of ``tensor``, from the given start.

    Each sweep solves every factor in closed form: A_n = X_(n) KR(others) (Hadamard of the others'
    Gram matrices)^+. The MTTKRP is one einsum per mode. (tensorly's parafac does the same, but
    its generic Khatri-Rao product took ~0.2 s per call on a 128x128x3x3 core here: minutes per
    layer, against seconds for this.)
    """
    factors = [np.array(f, dtype=np.float64) for f in factors]
    order = tensor.ndim
    letters = "abcdefgh"[:order]
    norm_x = np.linalg.norm(tensor)
    previous = np.inf
    for _ in range(max_iter):
        for n in range(order):
            others = [m for m in range(order) if m != n]
            spec = letters + "," + ",".join(f"{letters[m]}r" for m in others) + f"->{letters[n]}r"
            mttkrp = np.einsum(spec, tensor, *(factors[m] for m in others), optimize=True)
            gram = np.ones((rank, rank))
            for m in others:
                gram *= factors[m].T @ factors[m]
            factors[n] = np.linalg.lstsq(gram, mttkrp.T, rcond=None)[0].T
        # ||X - Xhat||^2 = ||X||^2 - 2 <X, Xhat> + ||Xhat||^2, from the last mode's quantities
        inner = np.sum(mttkrp * factors[n])
        model_norm2 = np.sum(gram * (factors[n].T @ factors[n]))
        error = np.sqrt(max(norm_x**2 - 2 * inner + model_norm2, 0.0)) / max(norm_x, 1e-300)
        if abs(previous - error) < tol or error < tol:
            break
        previous = error
    return factors


def gevd_init(core: np.ndarray, rank: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """CP factors of a [R, R, *k] core by simultaneous diagonalization (Jennrich / GEVD), as a start
    for ALS; None when it does not apply or fits worse than GEVD_MAX_INIT_ERROR.

    With X_k = A diag(c_k) B^T (the core's k-th spatial slice), two random mixtures M1, M2 of the
    slices share the eigenvectors V = B^-T of the pencil (M1, M2); X_k V then holds a_r c_kr in its
    columns, a rank-1 matrix per term. On a tensor of exact CP rank R this is exact, where ALS from
    the SVD start can stall in a swamp for thousands of sweeps.
    """
    spatial = core.shape[2:]
    k = int(np.prod(spatial))
    if rank < 2 or core.shape[0] != rank or core.shape[1] != rank or k < 2:
        return None
    x = core.reshape(rank, rank, k)
    rng = np.random.default_rng(seed)
    m1, m2 = x @ rng.standard_normal(k), x @ rng.standard_normal(k)
    try:
        eigenvalues, v = scipy.linalg.eig(m1, m2)
    except (np.linalg.LinAlgError, ValueError):
        return None
    if not np.all(np.isfinite(eigenvalues)) or np.abs(v.imag).max() > 1e-8 * np.abs(v).max():
        return None
    y = np.einsum("ijk,jr->rik", x, v.real)
    a, c = np.empty((rank, rank)), np.empty((k, rank))
    for r in range(rank):
        u, s, vt = np.linalg.svd(y[r], full_matrices=False)
        a[:, r], c[:, r] = u[:, 0] * s[0], vt[0]
    khatri_rao = np.einsum("ir,kr->ikr", a, c).reshape(rank * k, rank)
    b = np.linalg.lstsq(khatri_rao, x.transpose(0, 2, 1).reshape(rank * k, rank), rcond=None)[0].T
    spatial_factors = [np.empty((n, rank)) for n in spatial]
    for r in range(rank):  # best rank-1 fit of each term's kernel over the spatial axes
        taps = c[:, r].reshape(spatial)
        vectors = [left_singular(unfold(taps, m))[1][:, 0] for m in range(len(spatial))]
        scale = taps
        for vector in vectors:
            scale = np.tensordot(vector, scale, axes=([0], [0]))
        for m, vector in enumerate(vectors):
            spatial_factors[m][:, r] = vector * (scale if m == 0 else 1.0)
    factors = [a, b, *spatial_factors]
    error = np.linalg.norm(reconstruct(factors) - core) / max(np.linalg.norm(core), 1e-300)
    if not np.isfinite(error) or error > GEVD_MAX_INIT_ERROR:
        return None
    return np.ones(rank), factors


def balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Give every factor of each rank-1 term the same column norm (their product is unchanged)."""
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])  # modes x R
    total = np.prod(norms, axis=0)
    target = np.where(total > 0, total, 1.0) ** (1.0 / len(factors))
    safe = np.where(norms > 0, norms, 1.0)
    return [f * (target / s)[None, :] for f, s in zip(factors, safe)]


def reconstruct(factors: list[np.ndarray]) -> np.ndarray:
    """The full tensor: A_0 times the Khatri-Rao product of the other factors."""
    rank = factors[0].shape[1]
    khatri_rao = factors[1]
    for f in factors[2:]:
        khatri_rao = np.einsum("ir,jr->ijr", khatri_rao, f).reshape(-1, rank)
    return (factors[0] @ khatri_rao.T).reshape([f.shape[0] for f in factors])


def cp_chain(layer: ConvLayer, choose: CpRankChooser, decompositions: list | None = None) -> Replacement:
    """``decompositions``: the layer's :func:`onnxlr.methods.tucker.layer_spectra`, when the caller has them."""
    groups = [np.asarray(w, dtype=np.float64) for w in layer.group_weights()]
    t_g, s_g = groups[0].shape[:2]
    decompositions = decompositions or layer_spectra(layer)
    spectra = [(out[0], inp[0]) for out, inp in decompositions]
    rank = choose([s[0] for s in spectra], [s[1] for s in spectra], t_g, s_g, layer.kernel)
    per_group = [cp_factors(w, rank, bases=(out[1], inp[1])) for w, (out, inp) in zip(groups, decompositions)]

    d = layer.spatial_rank
    g = layer.group
    strides = layer.strides
    dilations = layer.dilations
    pads = layer.pads
    ones = (1,) * d

    # Axes with a kernel of 1 are a per-term scale: fold it into the input factor.
    real_axes = [a for a in range(d) if layer.kernel[a] > 1]
    first_blocks = []
    for factors in per_group:
        a_in = factors[1].copy()
        for a in range(d):
            if a not in real_axes:
                a_in = a_in * factors[2 + a][0][None, :]
        first_blocks.append(a_in.T)  # [R, S_g]
    first_strides = tuple(strides[a] if a not in real_axes else 1 for a in range(d))
    # With auto_pad, a kernel-1 axis never pads (SAME adds 0 when the kernel is 1).
    first_pads = tuple(pads[a] if (a % d) not in real_axes else 0 for a in range(2 * d))
    steps = [
        ConvStep(
            np.concatenate(first_blocks, axis=0).reshape(g * rank, s_g, *ones),
            group=g,
            strides=first_strides,
            pads=first_pads if any(first_pads) else None,
        )
    ]
    for a in real_axes:
        kernel = [1] * d
        kernel[a] = layer.kernel[a]
        taps = np.concatenate([f[2 + a].T for f in per_group], axis=0)  # [g*R, k_a]
        axis_strides = tuple(strides[a] if b == a else 1 for b in range(d))
        axis_dilations = tuple(dilations[a] if b == a else 1 for b in range(d))
        axis_pads = tuple(pads[b] if b % d == a else 0 for b in range(2 * d))
        steps.append(
            ConvStep(
                taps.reshape(g * rank, 1, *kernel),
                group=g * rank,
                strides=axis_strides,
                dilations=axis_dilations,
                pads=axis_pads if layer.auto_pad == "NOTSET" else None,
                auto_pad=layer.auto_pad,
            )
        )
    last = np.concatenate([f[0] for f in per_group], axis=0)  # [T, R]
    steps.append(ConvStep(last.reshape(layer.out_channels, rank, *ones), bias=layer.bias, group=g))
    reconstruction = np.concatenate([reconstruct(f) for f in per_group], axis=0)
    return Replacement(method="cp", steps=steps, ranks={"rank": rank}, reconstruction=reconstruction)


# --- the method -----------------------------------------------------------------------------


def factorize(layer: ConvLayer, ranks: RankSpec | dict, round_to: int,
              decompositions: list | None = None) -> tuple[Replacement, RankLog]:
    log = RankLog()
    group_shape = layer.group_weights()[0].shape

    def choose(out, inp, t, s, k):
        if isinstance(ranks, dict):
            return int(ranks["rank"])
        return cp_rank(ranks, out, inp, group_shape, round_to, log)

    return cp_chain(layer, choose, decompositions), log


def factorize_many(layer: ConvLayer, specs: list, round_to: int) -> list:
    decompositions = layer_spectra(layer)
    return each_spec(lambda spec: factorize(layer, spec, round_to, decompositions), specs)


def chain_maps(layer: ConvLayer, replacement: Replacement) -> list[np.ndarray]:
    """B_g [R, n] per group: the chain up to its last 1x1 conv, as a map of the im2col patch."""
    g_, steps = layer.group, replacement.steps
    s_g, kernel = layer.weight.shape[1], layer.kernel
    rank = steps[-1].weight.shape[1]
    first = steps[0].weight.reshape(g_ * rank, s_g)
    real_axes = [a for a in range(layer.spatial_rank) if kernel[a] > 1]
    taps = {a: steps[1 + i].weight.reshape(g_ * rank, kernel[a]) for i, a in enumerate(real_axes)}
    maps = []
    for gi in range(g_):
        rows = slice(gi * rank, (gi + 1) * rank)
        b = first[rows].astype(np.float64)
        for a in range(layer.spatial_rank):
            t = taps[a][rows] if a in taps else np.ones((rank, 1))
            b = b[..., None] * t.reshape((rank,) + (1,) * (b.ndim - 1) + (t.shape[1],))
        maps.append(b.reshape(rank, -1))
    return maps


def refit_last_factor(layer: ConvLayer, replacement: Replacement, maps, weights, biases, moments,
                      fit_bias: bool) -> Fit:
    """The last 1x1 conv and the bias by least squares, the chain before it (``maps``) fixed."""
    parts = [(*fit.refit_last(w, b, bm, m, fit_bias), bm) for w, b, bm, m in zip(weights, biases, maps, moments)]
    return Fit([u @ bm for u, _, bm in parts], [nb for _, nb, _ in parts], parts)


def rebuild_last_factor(layer: ConvLayer, replacement: Replacement, refitted: Fit) -> Replacement:
    """The chain with its last step's weight [T, R_in/group, 1...] replaced by the refitted U_g."""
    steps = list(replacement.steps)
    g_, kernel, s_g = layer.group, layer.kernel, layer.weight.shape[1]
    t_g = layer.out_channels // g_
    last_shape = steps[-1].weight.shape
    last = np.concatenate([u.reshape(t_g, *last_shape[1:]) for u, _, _ in refitted.parts], axis=0)
    steps[-1] = replace(steps[-1], weight=last)
    reconstruction = np.concatenate([(u @ bm).reshape(t_g, s_g, *kernel) for u, _, bm in refitted.parts], axis=0)
    return replace(replacement, steps=steps, reconstruction=reconstruction, weight_rel_error=None,
                   notes=list(replacement.notes))


def refit(layer: ConvLayer, replacement: Replacement, weights, biases, moments, fit_bias: bool,
          paired_ridge: float | None = None, shrink: bool = False) -> Fit:
    return refit_last_factor(layer, replacement, chain_maps(layer, replacement), weights, biases,
                             moments, fit_bias)


def input_space(layer: ConvLayer, replacement: Replacement) -> list[np.ndarray]:
    """Per group, the row space of the chain before the last 1x1 conv (the refit keeps it)."""
    return [fit.row_space(b) for b in chain_maps(layer, replacement)]


METHOD = Method(
    name="cp",
    summary="KxK conv: 1x1 S->R, depthwise Kx1 and 1xK (group R), 1x1 R->T (bias)",
    check=needs_kxk_conv("cp"), factorize=factorize, refit=refit, rebuild=rebuild_last_factor,
    input_space=input_space, factorize_many=factorize_many,
)
