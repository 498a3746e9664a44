"""Data-aware refinement of low-rank factors: the math, pure numpy, on streamed input moments.

Every layer onnxlr factorizes is, per group, an affine map of a vector x in R^n: the channel
vector of a Gemm/MatMul row or a 1x1 conv position, or the im2col patch of a KxK conv (input
channels of the group first, then the kernel taps, i.e. the order of ``weight.reshape(T_g, -1)``):

    y = W x + b,         W [T, n], b [T] (zero when the layer has none).

Calibration streams (x_c, x_o) pairs through :class:`Moments`: x_o is the layer's input in the
original model, x_c its input in the model being compressed (the same vector in *symmetric* mode;
the already-compressed upstream model's in *asymmetric* mode). The target is always the original
output y* = W x_o + b; the replacement sees x_c. With means mu and centered covariances
Sigma_cc = Cov(x_c), Sigma_co = Cov(x_c, x_o) and a free bias b', the problem decouples:

    E||y* - W' x_c - b'||^2 = E||(W* - W')(x_c - mu_c)||^2_Sigma_cc + const,
    W* = W Sigma_oc Sigma_cc^{-1} (= W in symmetric mode),     b' = b + W mu_o - W' mu_c.

* **Whitened SVD** (SVD / channel decomposition, SVD-LLM style): with the symmetric square root
  S = Sigma_cc^{1/2} (eigen-sqrt, small relative ridge), the best rank-R W' is
  U_R s_R V_R^T S^{-1} from the SVD W* S = U s V^T (Eckart-Young in the whitened space). The chain
  keeps the shapes of ``decompose/svd.py``: first factor P = sqrt(s_R) V_R^T S^{-1} [R, n], second
  Q = U_R sqrt(s_R) [T, R].
* **Last-factor refit** (Tucker-2, CP): with the first factor(s) and core fixed, the chain up to the
  last 1x1 conv is a linear map z = B x (B [R, n]); the last factor U [T, R] and bias minimize
  E||y* - U B x_c - b'||^2: U = W Sigma_oc B^T (B Sigma_cc B^T)^{-1}.
* **Core refit** (Tucker-2, before the last factor): with U_in and the last factor fixed, the core
  is the least-squares solution of the whitened problem in the projected input; see
  :func:`refit_tucker_core`.

Layers that cannot take a new bias (MatMul, Gemm without a constant C) use uncentered moments and
b' = b: the same formulas with mu = 0. ``output_error`` evaluates E||y* - W' x_c - b'||^2 from the
moments exactly, which is how calibration compares data-free and data-aware factors on held-out
samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

#: Ridge added to the eigenvalues of Sigma_cc, relative to their mean: keeps S^{-1} and the least
#: squares finite when some input directions never vary (dead channels, zero padding).
RIDGE = 1e-5
#: Ridges (relative to the mean eigenvalue) tried in the paired solve of the whitened SVD,
#: W*^T = W^T + (Sigma_cc + a I)^{-1} (Sigma_co - Sigma_cc) W^T: a -> 0 is the full asymmetric
#: correction W Sigma_oc Sigma_cc^{-1}, a large one shrinks it towards W. Directions that barely
#: vary in the calibration data must not get large compensating weights, and with few rows per
#: input dimension (a transformer's 1536-wide FFN input) the full correction overfits; the
#: calibration keeps whichever does best on held-out rows.
PAIRED_RIDGES = (1e-2, 1e-1, 1.0)
PAIRED_RIDGE = PAIRED_RIDGES[0]


@dataclass
class Moments:
    """Streaming sums of x_c, x_o and their products; memory O(n^2), not O(samples).

    ``paired=False`` (symmetric mode) stores one vector per row: x_c is x_o.
    """

    n: int
    paired: bool = False
    count: int = 0
    sum_c: np.ndarray = field(init=False)
    sum_o: np.ndarray | None = field(init=False)
    cc: np.ndarray = field(init=False)
    co: np.ndarray | None = field(init=False)
    oo: np.ndarray | None = field(init=False)
    # Derived results for the rows accumulated so far (see whitening); cleared by add().
    _derived: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        n = self.n
        self.sum_c = np.zeros(n)
        self.cc = np.zeros((n, n))
        self.sum_o = np.zeros(n) if self.paired else None
        self.co = np.zeros((n, n)) if self.paired else None
        self.oo = np.zeros((n, n)) if self.paired else None

    def add(self, x_c: np.ndarray, x_o: np.ndarray | None = None) -> None:
        """Accumulate rows (m x n); ``x_o`` is required in paired mode and ignored otherwise."""
        xc = np.asarray(x_c, dtype=np.float64)
        if xc.shape[0] == 0:
            return
        self._derived.clear()
        self.count += xc.shape[0]
        self.sum_c += xc.sum(axis=0)
        self.cc += xc.T @ xc
        if self.paired:
            xo = np.asarray(x_o, dtype=np.float64)
            self.sum_o += xo.sum(axis=0)
            self.co += xc.T @ xo
            self.oo += xo.T @ xo

    def merged(self, other: Moments | RowMoments) -> Moments:
        # A merge comes once the parts' fits are scored: drop their derived results (whitenings,
        # several n x n arrays each) so that the merged fit's own do not add to the peak memory
        # (VGG-16's 4608-wide convs: about 0.5 GB each). They are recomputed if asked for again.
        self._derived.clear()
        other._derived.clear()
        if isinstance(other, RowMoments):  # held-out rows kept as they are: add them
            out = self.merged(Moments(self.n, self.paired))
            x_c, x_o = other.matrices()
            out.add(x_c, x_o if self.paired else None)
            return out
        out = Moments(self.n, self.paired)
        out.count = self.count + other.count
        out.sum_c = self.sum_c + other.sum_c
        out.cc = self.cc + other.cc
        if self.paired:
            out.sum_o, out.co, out.oo = self.sum_o + other.sum_o, self.co + other.co, self.oo + other.oo
        return out

    def original_view(self) -> Moments:
        """The unpaired moments of x_o alone (a symmetric fit inside asymmetric calibration); the
        same object on every call until more rows are added, so its whitening is computed once."""
        if "original_view" not in self._derived:
            out = Moments(self.n, False)
            out.count, out.sum_c, out.cc = self.count, self.sum_o, self.oo
            self._derived["original_view"] = out
        return self._derived["original_view"]

    def whitening(self, w: np.ndarray, centered: bool, ridge: float = RIDGE) -> tuple[np.ndarray, ...]:
        """(mu_c, mu_o, eigenvalues + ridge, eigenvectors V of Sigma_cc, W V, V^T (Sigma_co - Sigma_cc)
        W^T or None when unpaired) from :meth:`stats` and :func:`_eig`, computed once per (W, centered,
        ridge): every candidate fit of a layer (ranks, ridges, shrinkage) whitens with the same
        covariance. The covariances themselves are not kept (n x n each). Callers must not
        modify the arrays."""
        key = ("whitening", id(w), centered, ridge)
        if key not in self._derived:
            sigma_cc, sigma_co, mu_c, mu_o = self.stats(centered)
            w = np.asarray(w, dtype=np.float64)
            delta_wt = (sigma_co - sigma_cc) @ w.T if self.paired else None
            del sigma_co
            eigenvalues, v = _eig(sigma_cc, ridge)
            del sigma_cc
            self._derived[key] = (mu_c, mu_o, eigenvalues, v, w @ v, None if delta_wt is None else v.T @ delta_wt)
        return self._derived[key]

    def forget(self) -> None:
        """Drop the derived results (whitenings: several n x n arrays) once no more fits use them."""
        self._derived.clear()

    # --- normalized statistics -------------------------------------------------------------

    def stats(self, centered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(Sigma_cc, Sigma_co, mu_c, mu_o): covariances when ``centered``, else raw second
        moments with zero means."""
        if self.count == 0:
            raise ValueError("no calibration rows were accumulated")
        inv = 1.0 / self.count
        mu_c = self.sum_c * inv
        cc = self.cc * inv
        co = (self.co if self.paired else self.cc) * inv
        mu_o = (self.sum_o if self.paired else self.sum_c) * inv
        if centered:
            cc = cc - np.outer(mu_c, mu_c)
            co = co - np.outer(mu_c, mu_o)
        else:
            mu_c, mu_o = np.zeros_like(mu_c), np.zeros_like(mu_o)
        return (cc + cc.T) / 2, co, mu_c, mu_o

    def augmented(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uncentered moments of [x; 1]: (E[x~_c x~_c^T], E[x~_c x~_o^T], E[x~_o x~_o^T]). Unpaired
        moments (one matrix) keep theirs until rows are added: a budget scores every candidate of a
        layer on them. Paired ones (three matrices) recompute: keeping them would add 3 n^2 to the
        peak that the memory schedule plans for."""
        if self.paired:
            return self._augmented()
        if "augmented" not in self._derived:
            self._derived["augmented"] = self._augmented()
        return self._derived["augmented"]

    def _augmented(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, inv = self.n, 1.0 / max(self.count, 1)

        def aug(m, a, b):
            out = np.empty((n + 1, n + 1))
            out[:n, :n], out[:n, n], out[n, :n], out[n, n] = m * inv, a * inv, b * inv, 1.0
            return out

        cc = aug(self.cc, self.sum_c, self.sum_c)
        if not self.paired:
            return cc, cc, cc
        return cc, aug(self.co, self.sum_c, self.sum_o), aug(self.oo, self.sum_o, self.sum_o)


def _eig(sigma: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues + ridge, eigenvectors V) of a symmetric PSD matrix: Sigma_reg = V diag(l) V^T."""
    eigenvalues, vectors = scipy.linalg.eigh(sigma, check_finite=False, driver="evd")
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    eigenvalues = eigenvalues + ridge * max(float(eigenvalues.mean()), np.finfo(np.float64).tiny)
    return eigenvalues, vectors


def shrinkage(moments: Moments) -> float:
    """How far to pull the input covariance towards a multiple of the identity: n / (n + rows).

    With rows not much above the input width n, the sample covariance misses directions that new
    inputs have (it is singular below n rows), and whitening by it fits the layer to the
    calibration subspace alone; shrinking its eigenvalues towards their mean (Ledoit-Wolf style)
    keeps every direction weighted. A rule of thumb, not an estimate: calibration tries the fit
    with and without it and keeps the better one on held-out rows."""
    return moments.n / (moments.n + max(moments.count, 1))


def whitened_svd(
    w: np.ndarray, b: np.ndarray | None, moments: Moments, rank: int, fit_bias: bool, ridge: float = RIDGE,
    paired_ridge: float | None = None, shrink: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(P [R, n], Q [T, R], b') minimizing E||W x_o + b - Q P x_c - b'||^2 over rank R.

    ``fit_bias=False``: b' = b (uncentered moments), for layers that cannot take a new bias.
    ``paired_ridge`` (default ``PAIRED_RIDGE``) is the asymmetric correction's ridge, see
    ``PAIRED_RIDGES``; ``shrink`` in [0, 1] pulls Sigma_cc's eigenvalues towards their mean (see
    :func:`shrinkage`) before whitening.
    With Sigma_cc = V diag(l) V^T and S = V diag(sqrt l) V^T, the SVD of W* S equals that of
    A = (W* V) diag(sqrt l) up to the orthogonal V^T on the right, so S is never formed:
    A = U s Z^T gives Q = U_R sqrt(s_R) and P = sqrt(s_R) Z_R^T diag(1/sqrt l) V^T.
    """
    mu_c, mu_o, eigenvalues, v, wv, vt_delta_wt = moments.whitening(w, fit_bias, ridge)
    if shrink > 0:
        eigenvalues = (1.0 - shrink) * eigenvalues + shrink * float(eigenvalues.mean())
    root = np.sqrt(eigenvalues)
    if moments.paired:  # W*^T = W^T + (Sigma_cc + a I)^{-1} (Sigma_co - Sigma_cc) W^T
        alpha = PAIRED_RIDGE if paired_ridge is None else paired_ridge
        shrunk = eigenvalues + alpha * float(eigenvalues.mean())
        a = (vt_delta_wt / shrunk[:, None]).T  # in place from here: one [T, n] array at a time
        a += wv
        a *= root  # W* V diag(sqrt l)
    else:
        a = wv * root
    u, sv, zt = _leading_svd(a, rank)
    scale = np.sqrt(np.maximum(sv, np.finfo(np.float64).tiny))
    q = u * scale
    p = ((zt * scale[:, None]) / root) @ v.T
    new_bias = b
    if fit_bias:
        base = np.zeros(q.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
        new_bias = base + np.asarray(w, dtype=np.float64) @ mu_o - q @ (p @ mu_c)
    return p, q, new_bias


def _leading_svd(a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U_R, s_R, Z_R^T) of a [T, n] through the eigendecomposition of its smaller Gram matrix:
    measured here (one thread), 6 s against 17 s for a full SVD of a 3072 x 3072 matrix. U_R s_R
    Z_R^T is the best rank-R approximation; at full rank it is a itself (the basis is complete)."""
    transposed = a.shape[0] > a.shape[1]
    work = a.T if transposed else a
    side = work.shape[0]
    rank = min(rank, side)
    if rank < side:  # the leading eigenpairs alone (measured: 4.6 s against 6.2 s at a third of 3072)
        values, vectors = scipy.linalg.eigh(work @ work.T, check_finite=False, driver="evr",
                                            subset_by_index=[side - rank, side - 1])
    else:
        values, vectors = scipy.linalg.eigh(work @ work.T, check_finite=False, driver="evd")
    left = vectors[:, ::-1][:, :rank]
    sv = np.sqrt(np.clip(values[::-1][:rank], 0.0, None))
    live = sv > sv[:1].max(initial=0.0) * 1e-10  # directions of no energy get a zero row, not noise / 0
    right = (left.T @ work) / np.where(live, sv, 1.0)[:, None] * live[:, None]  # [R, cols]
    return (right.T, sv, left.T) if transposed else (left, sv, right)


def refit_last(
    w: np.ndarray, b: np.ndarray | None, chain: np.ndarray, moments: Moments, fit_bias: bool, ridge: float = RIDGE
) -> tuple[np.ndarray, np.ndarray | None]:
    """(U [T, R], b') minimizing E||W x_o + b - U B x_c - b'||^2, with B = ``chain`` [R, n] fixed."""
    zz, zy, chain_mu_c, w_mu_o = chain_stats(moments, chain, w, fit_bias)
    u = scipy.linalg.solve(_ridged(zz, ridge), zy, assume_a="pos", check_finite=False).T
    if not fit_bias:
        return u, b
    base = np.zeros(u.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
    return u, base + w_mu_o - u @ chain_mu_c


def refit_tucker_core(
    w: np.ndarray, u_in: np.ndarray, u_out: np.ndarray, kernel_size: int, moments: Moments, fit_bias: bool,
    ridge: float = RIDGE,
) -> np.ndarray:
    """Core G [R4, R3*k] minimizing E||W* x - U_out G P x||^2 with P = U_in^T (x) I_k fixed and U_out
    orthonormal: G = U_out^T W* Sigma P^T (P Sigma P^T)^{-1} (W* Sigma = W Sigma_oc)."""
    proj = np.kron(u_in.T, np.eye(kernel_size))  # [R3*k, S*k], patch order (s, k)
    zz, zy, _, _ = chain_stats(moments, proj, w, fit_bias)
    wy = u_out.T @ zy.T  # [R4, R3*k]
    return scipy.linalg.solve(_ridged(zz, ridge), wy.T, assume_a="pos", check_finite=False).T


def chain_stats(moments, chain: np.ndarray, w: np.ndarray, centered: bool):
    """(B Sigma_cc B^T [R, R], B Sigma_co W^T [R, T], B mu_c, W mu_o) for a chain B [R, n]: all
    that a least-squares fit behind a fixed B needs (centered: covariances; else raw moments)."""
    if isinstance(moments, ProjectedMoments):
        return moments.chain_stats(chain, centered)
    w = np.asarray(w, dtype=np.float64)
    sigma_cc, sigma_co, mu_c, mu_o = moments.stats(centered)
    return chain @ sigma_cc @ chain.T, chain @ sigma_co @ w.T, chain @ mu_c, w @ mu_o


def _ridged(zz: np.ndarray, ridge: float) -> np.ndarray:
    zz = (zz + zz.T) / 2
    zz[np.diag_indices_from(zz)] += ridge * max(float(np.trace(zz)) / zz.shape[0], np.finfo(np.float64).tiny)
    return zz


def output_error(
    w: np.ndarray, b: np.ndarray | None, w_new: np.ndarray, b_new: np.ndarray | None, moments: Moments
) -> tuple[float, float]:
    """(E||y* - W' x_c - b'||^2, E||y*||^2) per row, exactly, from the moments (under the
    low-rank-plus-isotropic model for :class:`ReducedMoments`)."""
    if isinstance(moments, ReducedMoments | RowMoments):
        return moments.output_error(w, b, w_new, b_new)
    if isinstance(moments, ProjectedMoments):
        return moments.output_error(w, b, dense(w_new), b_new)
    t = w.shape[0]
    a = np.concatenate([np.asarray(w, np.float64), _col(b, t)], axis=1)
    cc, _, _ = moments.augmented()
    ref, a_oc = _reference_terms(a, moments)
    if isinstance(w_new, LowRank):  # [Q P, b'] = [Q, b'] [[P, 0], [0, 1]]: R x n^2, not T x n^2
        q = np.concatenate([np.asarray(w_new.q, np.float64), _col(b_new, t)], axis=1)
        p = np.zeros((q.shape[1], cc.shape[0]))
        p[:-1, :-1], p[-1, -1] = w_new.p, 1.0
        pcc = p @ cc
        cross = float(np.sum(q * (a_oc @ p.T)))
        new = float(np.sum((q.T @ q) * (pcc @ p.T)))
    else:
        a_new = np.concatenate([dense(w_new), _col(b_new, t)], axis=1)
        cross = float(np.sum(a_new * a_oc))
        new = float(np.sum((a_new @ cc) * a_new))
    return max(ref - 2 * cross + new, 0.0), ref


def _reference_terms(a: np.ndarray, moments: Moments) -> tuple[float, np.ndarray]:
    """(E||A x~_o||^2, A E[x~_o x~_c^T]) of the original layer A = [W b]: the same for every
    candidate scored on these moments, so computed once per layer (each is a T x n x n product,
    seconds for a 4608-wide conv)."""
    key = ("reference", hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest())
    if key not in moments._derived:
        _, co, oo = moments.augmented()
        moments._derived[key] = (float(np.sum((a @ oo) * a)), a @ co.T)
    return moments._derived[key]


def _col(b, t) -> np.ndarray:
    return np.zeros((t, 1)) if b is None else np.asarray(b, dtype=np.float64).reshape(t, 1)


def relative_error(w, b, w_new, b_new, moments: Moments) -> float:
    err, ref = output_error(w, b, w_new, b_new, moments)
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


# --- wide inputs: moments in a reduced basis ------------------------------------------------------
#
# A layer whose input is too wide for n x n statistics (VGG-16's 25088-wide classifier: 4.7 GB per
# float64 matrix) keeps the moments of z = B^T x in an orthonormal basis B [n, k] and the total
# variance of x. Its covariance is modelled as
#
#     Sigma ~= B Sigma_z B^T + lam (I - B B^T),   lam = (tr Sigma - tr Sigma_z) / (n - k),
#
# exact inside span(B), isotropic outside it. B is the leading right-singular subspace of W (the
# directions the layer reads most, up to its rank) plus a random complement, so the whitened
# truncation keeps the directions where both the weight and the data are large. Memory is O(k^2 + n), not O(n^2).
# Wide layers fit on the inputs the model being compressed gives them (symmetric statistics).


_BLOCK = 2048  # columns of a float32 weight converted to float64 at a time (blockwise products)


def _times(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """w [T, n] @ x [n, k] in float64 without a float64 copy of w (blocks of its columns)."""
    if w.dtype == np.float64:
        return w @ x
    out = np.zeros((w.shape[0], x.shape[1]))
    for j in range(0, w.shape[1], _BLOCK):
        out += np.asarray(w[:, j : j + _BLOCK], dtype=np.float64) @ x[j : j + _BLOCK]
    return out


def left_times(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [R, T] @ w [T, n] in float64 without a float64 copy of w."""
    if w.dtype == np.float64:
        return x @ w
    out = np.empty((x.shape[0], w.shape[1]))
    for j in range(0, w.shape[1], _BLOCK):
        out[:, j : j + _BLOCK] = x @ np.asarray(w[:, j : j + _BLOCK], dtype=np.float64)
    return out


def squared_norm(w: np.ndarray) -> float:
    """||w||_F^2 accumulated in float64 without a float64 copy of w (VGG-16's fc6: 822 MB)."""
    flat = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    total = 0.0
    for j in range(0, flat.shape[1], _BLOCK):
        block = np.asarray(flat[:, j : j + _BLOCK], dtype=np.float64)
        total += float(np.einsum("ij,ij->", block, block))
    return total


def _gram(w: np.ndarray) -> np.ndarray:
    """w @ w.T in float64, w [T, n] (T <= n), without a float64 copy of w."""
    if w.dtype == np.float64:
        return w @ w.T
    out = np.zeros((w.shape[0], w.shape[0]))
    for j in range(0, w.shape[1], _BLOCK):
        block = np.asarray(w[:, j : j + _BLOCK], dtype=np.float64)
        out += block @ block.T
    return out


class LowRank:
    """A map Q P (Q [T, R], P [R, n]) kept as its factors: a wide layer's fit (VGG-16's 4096 x
    25088 classifier) is never materialized in float64 (822 MB per copy).

    A fit that projects W's outputs, P = M W (M [R, T]), is kept as ``m`` and ``w`` (and W W^T in
    ``gram``): its errors then cost T x T products, not T x n x R ones (139 GFLOP for VGG-16's
    fc6 at rank 1/3), and P is formed only when asked for (the written factor)."""

    def __init__(self, q: np.ndarray, p: np.ndarray | None = None, *, m: np.ndarray | None = None,
                 w: np.ndarray | None = None, gram: np.ndarray | None = None, extra: tuple | None = None):
        # extra = (E [R, k], B [n, k], W B): P = M W + E B^T (a fit of W + C B^T, see rows_whitened_svd)
        self.q, self._p, self.m, self.w, self.gram, self.extra = q, p, m, w, gram, extra

    @property
    def p(self) -> np.ndarray:
        if self._p is None:
            self._p = self.p_as(np.float64)
        return self._p

    def p_as(self, dtype) -> np.ndarray:
        """P in ``dtype``, formed block by block from M and W (no float64 R x n copy on the way)."""
        if self._p is not None:
            return np.asarray(self._p, dtype=dtype)
        out = np.empty((self.m.shape[0], self.w.shape[1]), dtype=dtype)
        for j in range(0, self.w.shape[1], _BLOCK):
            block = self.m @ np.asarray(self.w[:, j : j + _BLOCK], dtype=np.float64)
            if self.extra is not None:
                e, basis, _ = self.extra
                block += e @ basis[j : j + _BLOCK].T
            out[:, j : j + _BLOCK] = block
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], (self.w if self._p is None else self._p).shape[1]

    def dense(self) -> np.ndarray:
        return np.asarray(self.q, np.float64) @ np.asarray(self.p, np.float64)

    def inner_and_norm(self, w: np.ndarray) -> tuple[float, float]:
        """(<W, Q P>, ||Q P||^2) (Frobenius) for the layer's W [T, n]."""
        q = np.asarray(self.q, np.float64)
        if self.m is not None and self.gram is not None and self.w is w:
            # Q P = Q M W + Q E B^T; R x T products only (a T x T one is 134 MB at T = 4096)
            mg = self.m @ self.gram  # M W W^T [R, T]
            inner = float(np.sum(mg * q.T))  # tr(Q M W W^T)
            norm = float(np.sum((mg @ self.m.T) * (q.T @ q)))  # tr((Q^T Q) M W W^T M^T)
            if self.extra is not None:
                e, _, wb = self.extra
                qe = q @ e
                inner += float(np.sum(wb * qe))
                norm += 2 * float(np.sum((q @ (self.m @ wb)) * qe)) + float(np.sum(qe * qe))
            return inner, norm
        p = np.asarray(self.p, np.float64)
        return float(np.sum(left_times(q.T, w) * p)), float(np.sum((q.T @ q) * (p @ p.T)))

    def times(self, x: np.ndarray, wx: np.ndarray | None = None) -> np.ndarray:
        """Q P x for x [n, j]; ``wx`` = W x when the caller has it (then P x = M (W x))."""
        q = np.asarray(self.q, np.float64)
        if self.m is not None and wx is not None:
            px = self.m @ wx
            if self.extra is not None:
                e, basis, _ = self.extra
                px += e @ (basis.T @ x)
            return q @ px
        return q @ (np.asarray(self.p, np.float64) @ x)


def dense(w) -> np.ndarray:
    return w.dense() if isinstance(w, LowRank) else np.asarray(w, dtype=np.float64)


def _key(w: np.ndarray) -> tuple:
    """Identifies a weight by its memory (two views of one array get the same key)."""
    return w.__array_interface__["data"][0], w.shape, w.strides


def reduced_basis(w: np.ndarray, k: int, seed: int = 0, shared: dict | None = None) -> np.ndarray:
    """B [n, k], orthonormal: the top right-singular directions of W [T, n], up to its rank, then
    a seeded Gaussian complement. Exact (the whitened fit equals the full one) once k reaches
    min(T, n), W's whole row space (measured on the real models: tools/bench_reduced_basis.py).
    The Gram matrix is taken of W's shorter side, so a wide output (a vocabulary head) costs n^2;
    ``shared``: a ReducedMoments.shared dict that keeps W W^T for the layer's fits."""
    n = w.shape[1]
    k = min(k, n)
    if w.shape[0] >= n:  # tall: the right vectors are the eigenvectors of W^T W (n x n)
        values, right = scipy.linalg.eigh(_gram(np.ascontiguousarray(w.T)), check_finite=False)
    else:
        gram = _gram(w)
        if shared is not None:  # the layer's fits need W W^T too (ReducedMoments._products)
            shared.clear()
            shared[("gram", _key(w))] = (gram, float(np.trace(gram)))
        values, vectors = scipy.linalg.eigh(gram, check_finite=False)
        right = None
    order = np.argsort(values)[::-1]
    rank = int(np.sum(values > values.max() * 1e-12)) if values.size else 0
    top = order[: min(k, rank)]
    if right is not None:
        directions = right[:, top]
    else:
        directions = left_times(vectors[:, top].T, w)  # [k', n]
        directions /= np.sqrt(values[top])[:, None]  # in place: n x k floats (205 MB for VGG-16's fc6)
        directions = directions.T
    if len(top) == k:  # W's leading right-singular vectors: orthonormal already
        return directions
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.concatenate([directions, rng.standard_normal((n, k - len(top)))], axis=1))
    return basis


@dataclass
class ReducedMoments:
    """Streaming moments of z = B^T x plus sum x and sum ||x||^2 (see the section comment)."""

    basis: np.ndarray  # [n, k]
    count: int = 0
    paired: bool = False
    sum_x: np.ndarray = field(init=False)
    sum_z: np.ndarray = field(init=False)
    zz: np.ndarray = field(init=False)
    sq: float = 0.0
    # W W^T of the layer's W, shared by the fit, held-out and merged moments of one layer (pass
    # the same dict): 420 GFLOP for VGG-16's fc6, computed once.
    shared: dict = field(default_factory=dict, repr=False, compare=False)
    # Results that depend on the rows accumulated (the covariance model, W G, W mu); cleared by add().
    _derived: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        n, k = self.basis.shape
        self.sum_x, self.sum_z, self.zz = np.zeros(n), np.zeros(k), np.zeros((k, k))

    @property
    def n(self) -> int:
        return self.basis.shape[0]

    def add(self, x_c: np.ndarray, x_o: np.ndarray | None = None) -> None:
        x = np.asarray(x_c, dtype=np.float64)
        if x.shape[0] == 0:
            return
        self._derived.clear()
        z = x @ self.basis
        self.count += x.shape[0]
        self.sum_x += x.sum(axis=0)
        self.sum_z += z.sum(axis=0)
        self.zz += z.T @ z
        self.sq += float(np.einsum("ij,ij->", x, x))

    def merged(self, other: ReducedMoments) -> ReducedMoments:
        self._derived.clear()
        other._derived.clear()
        out = ReducedMoments(self.basis, shared=self.shared)
        out.count, out.sq = self.count + other.count, self.sq + other.sq
        out.sum_x, out.sum_z, out.zz = self.sum_x + other.sum_x, self.sum_z + other.sum_z, self.zz + other.zz
        return out

    def forget(self) -> None:
        self._derived.clear()

    def model(self, centered: bool) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """(eigenvalues l [k] of Sigma_z, their vectors V [k, k], lam, mean mu): the covariance's
        eigenvectors in x space are G = B V, never formed here (n x k: 205 MB for VGG-16's fc6)."""
        key = ("model", centered)
        if key in self._derived:
            return self._derived[key]
        if self.count == 0:
            raise ValueError("no calibration rows were accumulated")
        inv = 1.0 / self.count
        mu = self.sum_x * inv if centered else np.zeros(self.n)
        mu_z = self.sum_z * inv if centered else np.zeros(self.basis.shape[1])
        sigma_z = self.zz * inv - np.outer(mu_z, mu_z)
        total = self.sq * inv - float(mu @ mu)
        k = self.basis.shape[1]
        lam = max((total - float(np.trace(sigma_z))) / max(self.n - k, 1), 0.0)
        values, vectors = scipy.linalg.eigh((sigma_z + sigma_z.T) / 2, check_finite=False)
        values = np.clip(values, 0.0, None)
        floor = RIDGE * max(float(values.mean()), lam, np.finfo(np.float64).tiny)
        self._derived[key] = (values + floor, vectors, lam + floor, mu)
        return self._derived[key]

    def _products(self, w: np.ndarray, centered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(W W^T or None when W is tall, W G [T, k], W mean(x) [T], ||W||^2) for the layer's W: the
        same for every fit and error of the layer (W W^T alone is 420 GFLOP for VGG-16's fc6)."""
        key = _key(w)
        if ("gram", key) not in self.shared:
            gram = _gram(w) if w.shape[0] <= w.shape[1] else None
            norm = float(np.trace(gram)) if gram is not None else squared_norm(w)
            self.shared.clear()  # one layer's W at a time
            self.shared[("gram", key)] = (gram, norm)
        gram, norm = self.shared[("gram", key)]
        if ("wb", key) not in self.shared:
            self.shared[("wb", key)] = _times(w, self.basis)  # W B [T, k]
        if ("w_mean", key) not in self._derived:  # W times the mean input (centered or not)
            self._derived[("w_mean", key)] = _times(w, (self.sum_x / max(self.count, 1))[:, None])[:, 0]
        if ("wg", key, centered) not in self._derived:
            self._derived[("wg", key, centered)] = self.shared[("wb", key)] @ self.model(centered)[1]
        return gram, self._derived[("wg", key, centered)], self._derived[("w_mean", key)], norm

    def output_error(self, w, b, w_new, b_new) -> tuple[float, float]:
        """(E||W x + b - W' x - b'||^2, E||W x + b||^2) per row, under the covariance model;
        ``w_new`` dense or a :class:`LowRank` (then nothing T x n is formed)."""
        values, vectors, lam, _ = self.model(centered=False)  # uncentered second moments
        mu = self.sum_x / max(self.count, 1)
        _, wg, wmu, w_norm = self._products(w, False)
        t = w.shape[0]
        if isinstance(w_new, LowRank):
            new_g = w_new.times(self.basis, self.shared[("wb", _key(w))]) @ vectors
            new_mu = w_new.times(mu[:, None], wmu[:, None])[:, 0]
            cross, new_norm = w_new.inner_and_norm(w)  # <W, Q P>, ||Q P||^2
        else:
            dense_new = np.asarray(w_new, dtype=np.float64)
            new_g, new_mu = (dense_new @ self.basis) @ vectors, dense_new @ mu
            cross = float(np.sum(dense_new * w))
            new_norm = float(np.sum(dense_new * dense_new))

        def energy(ag: np.ndarray, a_norm: float, a_mu: np.ndarray, c: np.ndarray | None) -> float:
            quad = float(np.sum(ag * ag * values)) + lam * (a_norm - float(np.sum(ag * ag)))
            if c is not None:
                quad += 2 * float(c @ a_mu) + float(c @ c)
            return quad

        c_ref = None if b is None else np.asarray(b, np.float64).reshape(t)
        c_new = None if b_new is None else np.asarray(b_new, np.float64).reshape(t)
        c_diff = None if c_ref is None and c_new is None else (
            (np.zeros(t) if c_ref is None else c_ref) - (np.zeros(t) if c_new is None else c_new))
        diff_norm = w_norm - 2 * cross + new_norm
        return (max(energy(wg - new_g, diff_norm, wmu - new_mu, c_diff), 0.0),
                energy(wg, w_norm, wmu, c_ref))


def reduced_whitened_svd(w: np.ndarray, b: np.ndarray | None, moments: ReducedMoments, rank: int, fit_bias: bool,
                         shrink: float = 0.0) -> tuple[LowRank, np.ndarray | None]:
    """:func:`whitened_svd` under the reduced covariance model: (the fit Q P as a LowRank, b').

    With Sigma = G diag(l) G^T + lam (I - G G^T) and S = Sigma^(1/2), the truncation of W S = U s
    Z^T gives W' = U_R s_R Z_R^T S^-1 = U_R U_R^T W: the fit projects W's outputs on the leading
    eigenvectors of W Sigma W^T = lam W W^T + (W G) diag(l - lam) (W G)^T (T x T), and P = s_R^-1/2
    U_R^T W, Q = U_R s_R^1/2. Nothing n x n nor a float64 copy of W is formed (W may be float32)."""
    values, _, lam, mu = moments.model(centered=fit_bias)
    n = moments.n
    if shrink > 0:
        mean = (float(values.sum()) + lam * (n - values.size)) / n
        values, lam = (1 - shrink) * values + shrink * mean, (1 - shrink) * lam + shrink * mean
    gram, wg, wmu, _ = moments._products(w, fit_bias)
    if gram is None:  # tall W (T > n): its T x T output covariance is the bigger side
        p, q, new_bias = _tall_reduced_whitened_svd(w, b, moments, rank, fit_bias, values, lam, mu)
        return LowRank(q, p), new_bias
    cov_out = lam * gram
    cov_out += (wg * (values - lam)) @ wg.T
    eigenvalues, vectors = scipy.linalg.eigh(cov_out, check_finite=False, driver="evd", overwrite_a=True)
    rank = min(rank, eigenvalues.size)
    top = vectors[:, ::-1][:, :rank]
    singular = np.sqrt(np.maximum(eigenvalues[::-1][:rank], np.finfo(np.float64).tiny))
    scale = np.sqrt(singular)
    new_bias = b
    if fit_bias:
        base = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
        new_bias = base + wmu - top @ (top.T @ wmu)
    return LowRank(top * scale, m=top.T / scale[:, None], w=w, gram=gram), new_bias


def _tall_reduced_whitened_svd(w, b, moments, rank, fit_bias, values, lam, mu):
    """The T > n case: the SVD of W S (T x n) through its n x n Gram."""
    from onnxlr.methods.linalg import left_singular  # the Gram route: never V of a wide W

    g = moments.basis @ moments.model(centered=fit_bias)[1]
    w = np.asarray(w, dtype=np.float64)
    root, root_lam = np.sqrt(values), np.sqrt(lam)
    ws = root_lam * w + ((w @ g) * (root - root_lam)) @ g.T  # W S
    singular, basis = left_singular(ws.T)  # ws.T = basis diag(s) Z^T
    rank = min(rank, singular.size)
    u = np.asarray(basis[:, :rank], dtype=np.float64)
    s = singular[:rank]
    z_t = (u.T @ ws.T) / np.maximum(s, np.finfo(np.float64).tiny)[:, None]
    u, z_t = z_t.T, u.T  # ws = z_t.T diag(s) u.T
    scale = np.sqrt(np.maximum(s, np.finfo(np.float64).tiny))
    q = u * scale
    zg = z_t @ g
    p = (z_t / root_lam + (zg * (1 / root - 1 / root_lam)) @ g.T) * scale[:, None]  # sqrt(s) Z^T S^-1
    new_bias = b
    if fit_bias:
        base = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
        new_bias = base + (w - q @ p) @ mu
    return p, q, new_bias


def moments_nbytes(n: int, groups: int, paired: bool, reduced: int | None = None) -> int:
    """Bytes the statistics of one layer hold (fit and held-out moments, float64), plus the
    working copies of its solve (an eigendecomposition of the covariance, a copy to whiten)."""
    if reduced:
        return groups * 8 * (2 * (reduced * reduced + reduced + n) + n * reduced + 3 * reduced * reduced)
    mats = 3 if paired else 1
    return groups * 8 * (2 * mats * n * n + 3 * n * n)


# --- chains with a fixed first factor: moments in the chain's input space ----------------------------
#
# Tucker-2 and CP keep their first factor(s) and refit what follows (the core, the last 1x1 conv,
# the bias): every map they can produce reads x only through z = P x, P [m, n] an orthonormal basis
# of the fixed factors' row space (Tucker-2: U_in^T (x) I_k, m = R3 k; CP: the R rows of the chain
# before its last conv). Their fits and output errors need only the moments of z (m x m), the
# cross moments of z with the original output y = W x_o (m x T), and E||y||^2: exact, and far
# smaller than n x n (VGG-16's 4608-wide convs at rank 1/3: 1536 + 512 against 4608 per side).


@dataclass
class ProjectedMoments:
    """Streaming moments of z_c = P x_c (and z_o = P x_o when paired), of y = W x_o, and their
    cross products; exact for every map whose rows lie in P's row space."""

    proj: np.ndarray  # P [m, n], orthonormal rows
    weight: np.ndarray = field(repr=False)  # W [T, n] of the original layer (y = W x_o)
    paired: bool = False
    count: int = 0
    sum_y: np.ndarray = field(init=False)
    sq_y: float = 0.0
    sums: dict = field(init=False)  # "c"/"o" -> sum z
    zz: dict = field(init=False)  # "c"/"o" -> sum z z^T [m, m]
    yz: dict = field(init=False)  # "c"/"o" -> sum y z^T [T, m]

    def __post_init__(self):
        m, t = self.proj.shape[0], self.weight.shape[0]
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.sum_y = np.zeros(t)
        sides = ("c", "o") if self.paired else ("c",)
        self.sums = {s: np.zeros(m) for s in sides}
        self.zz = {s: np.zeros((m, m)) for s in sides}
        self.yz = {s: np.zeros((t, m)) for s in sides}

    @property
    def n(self) -> int:
        return self.proj.shape[1]

    def add(self, x_c: np.ndarray, x_o: np.ndarray | None = None) -> None:
        xc = np.asarray(x_c, dtype=np.float64)
        if xc.shape[0] == 0:
            return
        xo = np.asarray(x_o, dtype=np.float64) if self.paired else xc
        y = xo @ self.weight.T
        self.count += xc.shape[0]
        self.sum_y += y.sum(axis=0)
        self.sq_y += float(np.einsum("ij,ij->", y, y))
        for side, x in (("c", xc), ("o", xo)) if self.paired else (("c", xc),):
            z = x @ self.proj.T
            self.sums[side] += z.sum(axis=0)
            self.zz[side] += z.T @ z
            self.yz[side] += y.T @ z

    def merged(self, other: ProjectedMoments) -> ProjectedMoments:
        out = ProjectedMoments(self.proj, self.weight, self.paired)
        out.count, out.sq_y, out.sum_y = self.count + other.count, self.sq_y + other.sq_y, self.sum_y + other.sum_y
        for side in self.sums:
            out.sums[side] = self.sums[side] + other.sums[side]
            out.zz[side] = self.zz[side] + other.zz[side]
            out.yz[side] = self.yz[side] + other.yz[side]
        return out

    def forget(self) -> None:
        """Nothing derived is kept (see :meth:`Moments.forget`)."""

    def original_view(self) -> ProjectedMoments:
        """The unpaired moments of x_o alone (see :meth:`Moments.original_view`)."""
        out = ProjectedMoments(self.proj, self.weight, False)
        out.count, out.sq_y, out.sum_y = self.count, self.sq_y, self.sum_y
        side = "o" if self.paired else "c"
        out.sums, out.zz, out.yz = {"c": self.sums[side]}, {"c": self.zz[side]}, {"c": self.yz[side]}
        return out

    def coordinates(self, rows: np.ndarray) -> np.ndarray:
        """Rows [R, n] lying in P's row space, in its coordinates [R, m]."""
        return np.asarray(rows, dtype=np.float64) @ self.proj.T

    def chain_stats(self, chain: np.ndarray, centered: bool):
        """:func:`chain_stats` of a chain B [R, n] in P's row space."""
        if self.count == 0:
            raise ValueError("no calibration rows were accumulated")
        c = self.coordinates(chain)
        inv = 1.0 / self.count
        mu_z, mu_y = self.sums["c"] * inv, self.sum_y * inv
        zz, zy = self.zz["c"] * inv, self.yz["c"].T * inv  # E[z z^T], E[z y^T]
        if centered:
            zz, zy = zz - np.outer(mu_z, mu_z), zy - np.outer(mu_z, mu_y)
        else:
            mu_z, mu_y = np.zeros_like(mu_z), np.zeros_like(mu_y)
        return c @ zz @ c.T, c @ zy, c @ mu_z, mu_y

    def output_error(self, w, b, w_new, b_new) -> tuple[float, float]:
        """(E||W x_o + b - W' x_c - b'||^2, E||W x_o + b||^2) per row, for W' in P's row space
        (``w`` is the layer's own W, whose outputs were accumulated)."""
        inv = 1.0 / max(self.count, 1)
        t = self.weight.shape[0]
        a = self.coordinates(w_new)  # [T, m]
        b_ref = np.zeros(t) if b is None else np.asarray(b, np.float64).reshape(t)
        b_out = np.zeros(t) if b_new is None else np.asarray(b_new, np.float64).reshape(t)
        mu_y, mu_z = self.sum_y * inv, self.sums["c"] * inv
        a_mu = a @ mu_z
        ref = self.sq_y * inv + 2 * float(b_ref @ mu_y) + float(b_ref @ b_ref)
        cross = float(np.sum(a * self.yz["c"])) * inv + float(b_out @ mu_y) + float(b_ref @ a_mu) + float(b_ref @ b_out)
        new = float(np.sum((a @ (self.zz["c"] * inv)) * a)) + 2 * float(b_out @ a_mu) + float(b_out @ b_out)
        return max(ref - 2 * cross + new, 0.0), ref


def row_space(rows: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """An orthonormal basis [m, n] of the row space of ``rows`` [R, n] (m <= R)."""
    q, r = np.linalg.qr(np.asarray(rows, dtype=np.float64).T)
    diag = np.abs(np.diag(r))
    keep = diag > tol * max(float(diag.max(initial=0.0)), np.finfo(np.float64).tiny)
    return q[:, keep].T


def projected_nbytes(m: int, t: int, groups: int, paired: bool) -> int:
    """Bytes of a layer's :class:`ProjectedMoments` (fit and held-out, float64) plus their solve."""
    sides = 2 if paired else 1
    return groups * 8 * (2 * sides * (m * m + t * m) + 3 * m * m)


# --- few rows: the rows themselves ------------------------------------------------------------------
#
# A layer that sees fewer rows than its input width (a CNN's classifier: one row per sample; VGG-16's
# 4096-wide fc7 on 64 samples) has a covariance of rank at most rows: its n x n moments (three in
# asymmetric mode, 134 MB each at n = 4096) hold no more than the rows do. RowMoments keeps the rows
# (N x n) and fits in their span B (k <= 2N): every covariance is B Sigma_z B^T exactly, the ridge
# acts as an isotropic floor outside it, and the whitened truncation W' = U_R U_R^T W* (U: the leading
# eigenvectors of W* Sigma W*^T, T x T; W* = W + C B^T the asymmetric correction) costs T x T work,
# not n x n. Errors are evaluated on the rows themselves: exact, no model.


@dataclass
class RowMoments:
    """The rows x_c (and x_o when paired) themselves; see the section comment."""

    n: int
    paired: bool = False
    shared: dict = field(default_factory=dict, repr=False, compare=False)  # W W^T, for all moments of a layer
    rows_c: list = field(default_factory=list, repr=False)
    rows_o: list = field(default_factory=list, repr=False)
    _derived: dict = field(init=False, default_factory=dict, repr=False, compare=False)  # span, W B

    @property
    def count(self) -> int:
        return sum(r.shape[0] for r in self.rows_c)

    def add(self, x_c: np.ndarray, x_o: np.ndarray | None = None) -> None:
        if x_c.shape[0] == 0:
            return
        self._derived.clear()
        self.rows_c.append(np.asarray(x_c, dtype=np.float64))
        if self.paired:
            self.rows_o.append(np.asarray(x_o, dtype=np.float64))

    def merged(self, other: RowMoments) -> RowMoments:
        out = RowMoments(self.n, self.paired, self.shared)
        out.rows_c, out.rows_o = self.rows_c + other.rows_c, self.rows_o + other.rows_o
        return out

    def original_view(self) -> RowMoments:
        out = RowMoments(self.n, False, self.shared)
        out.rows_c = self.rows_o if self.paired else self.rows_c
        return out

    def forget(self) -> None:
        self._derived.clear()

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(X_c [N, n], X_o [N, n]) (the same array when unpaired)."""
        x_c = np.concatenate(self.rows_c) if self.rows_c else np.zeros((0, self.n))
        return x_c, (np.concatenate(self.rows_o) if self.paired else x_c)

    def span(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B [n, k] orthonormal, Z_c = X_c B, Z_o = X_o B): B spans every row."""
        if "span" not in self._derived:
            x_c, x_o = self.matrices()
            basis = row_space(np.concatenate([x_c, x_o]) if self.paired else x_c, tol=1e-12).T
            self._derived["span"] = (basis, x_c @ basis, x_o @ basis)
        return self._derived["span"]

    def weight_products(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W W^T, W B) for the layer's W [T, n]."""
        key = _key(w)
        if ("gram", key) not in self.shared:
            self.shared.clear()
            self.shared[("gram", key)] = _gram(w)
        if ("wb", key) not in self._derived:
            self._derived[("wb", key)] = _times(w, self.span()[0])
        return self.shared[("gram", key)], self._derived[("wb", key)]

    def output_error(self, w, b, w_new, b_new) -> tuple[float, float]:
        """(mean ||W x_o + b - W' x_c - b'||^2, mean ||W x_o + b||^2) over the rows, exactly."""
        x_c, x_o = self.matrices()
        t = w.shape[0]
        y = _times(w, x_o.T)  # [T, N]
        if b is not None:
            y += np.asarray(b, np.float64).reshape(t, 1)
        if isinstance(w_new, LowRank):
            y_new = w_new.times(x_c.T, _times(w, x_c.T) if w_new.m is not None else None)
        else:
            y_new = np.asarray(w_new, np.float64) @ x_c.T
        if b_new is not None:
            y_new += np.asarray(b_new, np.float64).reshape(t, 1)
        rows = max(x_c.shape[0], 1)
        return float(np.sum((y - y_new) ** 2)) / rows, float(np.sum(y * y)) / rows


def rows_whitened_svd(w: np.ndarray, b: np.ndarray | None, moments: RowMoments, rank: int, fit_bias: bool,
                      paired_ridge: float | None = None, shrink: float = 0.0) -> tuple[LowRank, np.ndarray | None]:
    """:func:`whitened_svd` on :class:`RowMoments` (W [T, n] with T <= n, float32 or float64):
    the same fit (the covariance and its ridge as the full moments have them), in the rows' span."""
    basis, z_c, z_o = moments.span()
    n, k = moments.n, basis.shape[1]
    count = max(z_c.shape[0], 1)
    mu_c, mu_o = z_c.mean(axis=0), z_o.mean(axis=0)
    if not fit_bias:
        mu_c, mu_o = np.zeros(k), np.zeros(k)
    zc, zo = z_c - mu_c, z_o - mu_o
    sigma_cc, sigma_co = zc.T @ zc / count, zc.T @ zo / count
    values, vectors = scipy.linalg.eigh((sigma_cc + sigma_cc.T) / 2, check_finite=False)
    values = np.clip(values, 0.0, None)
    floor = RIDGE * max(float(values.sum()) / n, np.finfo(np.float64).tiny)  # as _eig: relative to the mean of n
    inside, outside = values + floor, floor
    mean = (float(inside.sum()) + outside * (n - k)) / n
    if shrink > 0:
        inside, outside = (1 - shrink) * inside + shrink * mean, (1 - shrink) * outside + shrink * mean
        mean = (float(inside.sum()) + outside * (n - k)) / n
    gram, wb = moments.weight_products(w)
    correction = np.zeros((w.shape[0], k))  # C: W* = W + C B^T
    if moments.paired:
        alpha = PAIRED_RIDGE if paired_ridge is None else paired_ridge
        shrunk = inside + alpha * mean
        kernel = vectors @ ((vectors.T @ (sigma_co - sigma_cc)) / shrunk[:, None])  # (Sigma + a)^-1 (Sigma_co - Sigma_cc) in z
        correction = wb @ kernel.T
    star_b = (wb + correction) @ vectors  # W* B V
    # W* Sigma W*^T = c W* W*^T + (W* B V) diag(l - c) (W* B V)^T, built in place: T x T arrays are
    # 134 MB each at T = 4096 (eigh reads the lower triangle: no symmetrized copy either)
    cov_out = gram * outside
    if moments.paired:  # W* W*^T = W W^T + C (W B)^T + (W B) C^T + C C^T
        cross = correction @ wb.T
        cross *= outside
        cov_out += cross
        cov_out += cross.T
        cross = correction @ correction.T
        cross *= outside
        cov_out += cross
        del cross
    cov_out += (star_b * (inside - outside)) @ star_b.T
    side = cov_out.shape[0]
    rank = min(rank, side)
    eigenvalues, top = scipy.linalg.eigh(cov_out, check_finite=False, driver="evr", overwrite_a=True,
                                         subset_by_index=[side - rank, side - 1])
    del cov_out
    top, eigenvalues = top[:, ::-1], eigenvalues[::-1]
    scale = np.sqrt(np.sqrt(np.maximum(eigenvalues, np.finfo(np.float64).tiny)))  # sqrt of the singular values
    m = top.T / scale[:, None]  # P = M W + E B^T
    low = LowRank(top * scale, m=m, w=w, gram=gram, extra=(m @ correction, basis, wb))
    new_bias = b
    if fit_bias:
        base = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
        new_bias = base + wb @ mu_o - top @ (top.T @ ((wb + correction) @ mu_c))
    return low, new_bias
