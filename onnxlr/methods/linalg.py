"""Eigendecompositions of Gram matrices: the cheap road to leading singular subspaces.

For a matrix A (m x n, m <= n) the left singular vectors of A are the eigenvectors of A A^T and
its singular values the square roots of the eigenvalues. Forming A A^T costs m^2 n and its
eigendecomposition m^3, against the m n min(m, n) of a full SVD with both factors, and it never
materializes V. The Gram is accumulated in column blocks, so a weight never needs a full copy in
the working dtype.

Precision: Gram matrices up to ``FLOAT64_MAX_SIDE`` rows are formed and decomposed in float64. Past
that (the 4096-wide FC layers of VGG-style models) float32 is used: measured here, float32 halves
the time of the 4096 x 4096 eigendecomposition, and squaring the spectrum in float32 only blurs
singular values below ~3e-4 of the largest, far under any rank a user keeps. At full rank the
basis is complete and orthogonal to float32 precision, so reconstructions stay exact to ~1e-6.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

_BLOCK_COLUMNS = 8192
FLOAT64_MAX_SIDE = 1024


def working_dtype(rows: int) -> type:
    return np.float64 if rows <= FLOAT64_MAX_SIDE else np.float32


def gram(matrix: np.ndarray, dtype=np.float64) -> np.ndarray:
    """matrix @ matrix.T in ``dtype``, accumulated over column blocks."""
    rows, cols = matrix.shape
    if matrix.dtype == dtype and matrix.flags.c_contiguous:
        return matrix @ matrix.T  # no conversion needed: one BLAS call, no block copies
    out = np.zeros((rows, rows), dtype=dtype)
    for start in range(0, cols, _BLOCK_COLUMNS):
        block = np.asarray(matrix[:, start : start + _BLOCK_COLUMNS], dtype=dtype)
        out += block @ block.T
    return out


def left_singular(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All singular values (descending) and the full left basis U (m x m) of ``matrix``."""
    dtype = working_dtype(matrix.shape[0])
    eigenvalues, eigenvectors = scipy.linalg.eigh(
        gram(matrix, dtype), overwrite_a=True, check_finite=False, driver="evd"
    )
    # eigh returns ascending eigenvalues: reversed views, no copy (the basis stays in the working
    # dtype: a float64 copy of a 4096-wide basis would be another 134 MB at the peak)
    singular_values = np.sqrt(np.clip(eigenvalues[::-1].astype(np.float64), 0.0, None))
    return singular_values, eigenvectors[:, ::-1]


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: that axis first, the rest flattened."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def single_threaded_blas():
    """Factorize with one BLAS thread.

    Measured on this 2-core machine under load: scipy's eigh of a 2048 Gram took 9 s with one
    OpenBLAS thread and 30-47 s with two (numpy's SVD showed the same, 0.8 s vs 14 s); on a quiet
    machine two threads win little. One thread is the robust choice.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
