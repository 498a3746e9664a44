"""Eigendecompositions of Gram matrices: the cheap road to leading singular subspaces.

For a matrix A (m x n, m <= n) the left singular vectors of A are the eigenvectors of A A^T and
its singular values the square roots of the eigenvalues. Forming A A^T costs m^2 n and its
eigendecomposition m^3, against the m n min(m, n) of a full SVD with both factors, and it never
materializes V. The Gram is accumulated in float64 in column blocks, so a float32 weight never
needs a full float64 copy.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

_BLOCK_COLUMNS = 8192


def gram(matrix: np.ndarray) -> np.ndarray:
    """matrix @ matrix.T in float64, accumulated over column blocks."""
    rows, cols = matrix.shape
    out = np.zeros((rows, rows), dtype=np.float64)
    for start in range(0, cols, _BLOCK_COLUMNS):
        block = np.asarray(matrix[:, start : start + _BLOCK_COLUMNS], dtype=np.float64)
        out += block @ block.T
    return out


def left_singular(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All singular values (descending) and the full left basis U (m x m) of ``matrix``."""
    eigenvalues, eigenvectors = scipy.linalg.eigh(gram(matrix), overwrite_a=True, check_finite=False)
    order = np.argsort(eigenvalues)[::-1]
    singular_values = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    return singular_values, eigenvectors[:, order]


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: that axis first, the rest flattened."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)
