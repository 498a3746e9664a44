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

    def merged(self, other: Moments) -> Moments:
        # A merge comes once the parts' fits are scored: drop their derived results (whitenings,
        # several n x n arrays each) so that the merged fit's own do not add to the peak memory
        # (VGG-16's 4608-wide convs: about 0.5 GB each). They are recomputed if asked for again.
        self._derived.clear()
        other._derived.clear()
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

    def whitening(self, centered: bool, ridge: float = RIDGE) -> tuple[np.ndarray, ...]:
        """(Sigma_cc, Sigma_co, mu_c, mu_o, eigenvalues + ridge, eigenvectors) of :meth:`stats`
        and :func:`_eig`, computed once per (centered, ridge): every candidate fit of a layer
        (ranks, methods, ridges, shrinkage) whitens with the same covariance. Callers must not
        modify the arrays."""
        key = ("whitening", centered, ridge)
        if key not in self._derived:
            sigma_cc, sigma_co, mu_c, mu_o = self.stats(centered)
            self._derived[key] = (sigma_cc, sigma_co, mu_c, mu_o, *_eig(sigma_cc, ridge))
        return self._derived[key]

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
    w = np.asarray(w, dtype=np.float64)
    sigma_cc, sigma_co, mu_c, mu_o, eigenvalues, v = moments.whitening(fit_bias, ridge)
    if shrink > 0:
        eigenvalues = (1.0 - shrink) * eigenvalues + shrink * float(eigenvalues.mean())
    root = np.sqrt(eigenvalues)
    if moments.paired:  # W*^T = W^T + (Sigma_cc + a I)^{-1} (Sigma_co - Sigma_cc) W^T
        alpha = PAIRED_RIDGE if paired_ridge is None else paired_ridge
        shrunk = eigenvalues + alpha * float(eigenvalues.mean())
        w_star = w + (v @ ((v.T @ ((sigma_co - sigma_cc) @ w.T)) / shrunk[:, None])).T
    else:
        w_star = w
    a = (w_star @ v) * root
    u, sv, zt = scipy.linalg.svd(a, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    rank = min(rank, sv.size)
    scale = np.sqrt(np.maximum(sv[:rank], np.finfo(np.float64).tiny))
    q = u[:, :rank] * scale
    p = ((zt[:rank] * scale[:, None]) / root) @ v.T
    return p, q, _new_bias(w, b, q @ p, mu_c, mu_o, fit_bias)


def refit_last(
    w: np.ndarray, b: np.ndarray | None, chain: np.ndarray, moments: Moments, fit_bias: bool, ridge: float = RIDGE
) -> tuple[np.ndarray, np.ndarray | None]:
    """(U [T, R], b') minimizing E||W x_o + b - U B x_c - b'||^2, with B = ``chain`` [R, n] fixed."""
    w = np.asarray(w, dtype=np.float64)
    sigma_cc, sigma_co, mu_c, mu_o = moments.stats(centered=fit_bias)
    zz = chain @ sigma_cc @ chain.T
    zy = chain @ sigma_co @ w.T  # [R, T]
    zz = (zz + zz.T) / 2
    zz[np.diag_indices_from(zz)] += ridge * max(float(np.trace(zz)) / zz.shape[0], np.finfo(np.float64).tiny)
    u = scipy.linalg.solve(zz, zy, assume_a="pos", check_finite=False).T
    return u, _new_bias(w, b, u @ chain, mu_c, mu_o, fit_bias)


def refit_tucker_core(
    w: np.ndarray, u_in: np.ndarray, u_out: np.ndarray, kernel_size: int, moments: Moments, fit_bias: bool,
    ridge: float = RIDGE,
) -> np.ndarray:
    """Core G [R4, R3*k] minimizing E||W* x - U_out G P x||^2 with P = U_in^T (x) I_k fixed and U_out
    orthonormal: G = U_out^T W* Sigma P^T (P Sigma P^T)^{-1} (W* Sigma = W Sigma_oc)."""
    w = np.asarray(w, dtype=np.float64)
    sigma_cc, sigma_co, _, _ = moments.stats(centered=fit_bias)
    s_in = u_in.shape[0]
    proj = np.kron(u_in.T, np.eye(kernel_size))  # [R3*k, S*k], patch order (s, k)
    zz = proj @ sigma_cc @ proj.T
    zz = (zz + zz.T) / 2
    zz[np.diag_indices_from(zz)] += ridge * max(float(np.trace(zz)) / zz.shape[0], np.finfo(np.float64).tiny)
    wy = u_out.T @ w @ sigma_co.T @ proj.T  # [R4, R3*k]
    assert proj.shape[1] == s_in * kernel_size
    return scipy.linalg.solve(zz, wy.T, assume_a="pos", check_finite=False).T


def _new_bias(w, b, w_new, mu_c, mu_o, fit_bias) -> np.ndarray | None:
    if not fit_bias:
        return b
    base = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
    return base + w @ mu_o - w_new @ mu_c


def output_error(
    w: np.ndarray, b: np.ndarray | None, w_new: np.ndarray, b_new: np.ndarray | None, moments: Moments
) -> tuple[float, float]:
    """(E||y* - W' x_c - b'||^2, E||y*||^2) per row, exactly, from the moments (under the
    low-rank-plus-isotropic model for :class:`ReducedMoments`)."""
    if isinstance(moments, ReducedMoments):
        return moments.output_error(w, b, w_new, b_new)
    t = w.shape[0]
    a = np.concatenate([np.asarray(w, np.float64), _col(b, t)], axis=1)
    a_new = np.concatenate([np.asarray(w_new, np.float64), _col(b_new, t)], axis=1)
    cc, _, _ = moments.augmented()
    ref, a_oc = _reference_terms(a, moments)
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


def reduced_basis(w: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """B [n, k], orthonormal: the top right-singular directions of W [T, n], up to its rank, then
    a seeded Gaussian complement. Exact (the whitened fit equals the full one) once k reaches
    min(T, n), W's whole row space (measured on the real models: tools/bench_reduced_basis.py).
    The Gram matrix is taken of W's shorter side, so a wide output (a vocabulary head) costs n^2."""
    n = w.shape[1]
    k = min(k, n)
    w = np.asarray(w, dtype=np.float64)
    if w.shape[0] >= n:  # tall: the right vectors are the eigenvectors of W^T W (n x n)
        values, right = scipy.linalg.eigh(w.T @ w, check_finite=False)
    else:
        values, vectors = scipy.linalg.eigh(w @ w.T, check_finite=False)
        right = None
    order = np.argsort(values)[::-1]
    rank = int(np.sum(values > values.max() * 1e-12)) if values.size else 0
    top = order[: min(k, rank)]
    if right is not None:
        directions = right[:, top]
    else:
        directions = (w.T @ vectors[:, top]) / np.sqrt(values[top])
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
        z = x @ self.basis
        self.count += x.shape[0]
        self.sum_x += x.sum(axis=0)
        self.sum_z += z.sum(axis=0)
        self.zz += z.T @ z
        self.sq += float(np.einsum("ij,ij->", x, x))

    def merged(self, other: ReducedMoments) -> ReducedMoments:
        out = ReducedMoments(self.basis)
        out.count, out.sq = self.count + other.count, self.sq + other.sq
        out.sum_x, out.sum_z, out.zz = self.sum_x + other.sum_x, self.sum_z + other.sum_z, self.zz + other.zz
        return out

    def model(self, centered: bool) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """(eigenvalues l [k] of Sigma_z, their vectors in x space G = B V [n, k], lam, mean mu)."""
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
        return values + floor, self.basis @ vectors, lam + floor, mu

    def output_error(self, w, b, w_new, b_new) -> tuple[float, float]:
        """(E||W x + b - W' x - b'||^2, E||W x + b||^2) per row, under the covariance model."""
        values, g, lam, _ = self.model(centered=False)  # uncentered second moments
        mu = self.sum_x / max(self.count, 1)

        def energy(a: np.ndarray, c: np.ndarray | None) -> float:
            ag = a @ g
            quad = float(np.sum(ag * ag * values)) + lam * (float(np.sum(a * a)) - float(np.sum(ag * ag)))
            if c is not None:
                quad += 2 * float(c @ (a @ mu)) + float(c @ c)
            return quad

        w = np.asarray(w, dtype=np.float64)
        d = w - np.asarray(w_new, dtype=np.float64)
        t = w.shape[0]
        c_ref = None if b is None else np.asarray(b, np.float64).reshape(t)
        c_new = None if b_new is None else np.asarray(b_new, np.float64).reshape(t)
        c_diff = None if c_ref is None and c_new is None else (
            (np.zeros(t) if c_ref is None else c_ref) - (np.zeros(t) if c_new is None else c_new))
        return max(energy(d, c_diff), 0.0), energy(w, c_ref)


def reduced_whitened_svd(w: np.ndarray, b: np.ndarray | None, moments: ReducedMoments, rank: int, fit_bias: bool,
                         shrink: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`whitened_svd` under the reduced covariance model: (P [R, n], Q [T, R], b').

    With Sigma = G diag(l) G^T + lam (I - G G^T), S = Sigma^(1/2) = sqrt(lam) I + G diag(sqrt(l) -
    sqrt(lam)) G^T; W S is T x n (the size of W), truncated by its SVD; P = sqrt(s_R) Z_R^T S^-1."""
    from onnxlr.methods.linalg import left_singular  # noqa: PLC0415 -- the Gram route, never V of a wide W

    w = np.asarray(w, dtype=np.float64)
    values, g, lam, mu = moments.model(centered=fit_bias)
    if shrink > 0:
        mean = (float(values.sum()) + lam * (moments.n - values.size)) / moments.n
        values, lam = (1 - shrink) * values + shrink * mean, (1 - shrink) * lam + shrink * mean
    root, root_lam = np.sqrt(values), np.sqrt(lam)
    wg = w @ g
    ws = root_lam * w + (wg * (root - root_lam)) @ g.T  # W S
    transposed = ws.shape[0] > ws.shape[1]
    work = ws.T if transposed else ws
    singular, basis = left_singular(work)  # work = basis diag(s) Z^T
    rank = min(rank, singular.size)
    u = np.asarray(basis[:, :rank], dtype=np.float64)
    s = singular[:rank]
    z_t = (u.T @ work) / np.maximum(s, np.finfo(np.float64).tiny)[:, None]  # [R, cols]
    if transposed:  # ws.T = u diag(s) z_t: ws = z_t.T diag(s) u.T
        u, z_t = z_t.T, u.T
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
