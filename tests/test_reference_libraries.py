"""onnxlr's own decompositions against tensorly's, and its output graphs through onnx-graphsurgeon.

onnxlr does not call tensorly at run time (its Gram-matrix Tucker-2 and its einsum ALS were
measured 10-100x faster on 512-channel kernels here), so tensorly serves as an independent
reference: on the same tensors, our fits must be as good as its. onnx-graphsurgeon is what
TensorRT pipelines use to edit graphs: our outputs must survive its import/export unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import tensorly as tl
from builders import cnn_model, exact_cp_kernel, random_feeds, rel_error, run_ort
from tensorly.decomposition import parafac, partial_tucker

import onnxlr
from onnxlr.layers import ConvLayer
from onnxlr.methods.cp import cp_factors, reconstruct
from onnxlr.methods.tucker import tucker2_chain

tl.set_backend("numpy")


def _conv(weight: np.ndarray) -> ConvLayer:
    return ConvLayer(weight, None, 1, (1, 1), (1, 1), (1, 1, 1, 1))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ranks", [(4, 3), (8, 6), (12, 10)])
def test_tucker2_fits_as_well_as_tensorly(seed, ranks):
    rng = np.random.default_rng(seed)
    # a decaying spectrum, like trained kernels, so the subspaces matter
    weight = rng.standard_normal((16, 12, 3, 3)) * (0.7 ** np.arange(16))[:, None, None, None]
    r_out, r_in = ranks
    ours = tucker2_chain(_conv(weight), lambda *args: (r_out, r_in)).reconstruction
    (core, factors), _ = partial_tucker(weight, rank=[r_out, r_in], modes=[0, 1], n_iter_max=200, tol=1e-10)
    theirs = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    error_ours = np.linalg.norm(ours - weight) / np.linalg.norm(weight)
    error_theirs = np.linalg.norm(theirs - weight) / np.linalg.norm(weight)
    assert error_ours <= error_theirs * 1.01 + 1e-12


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")
@pytest.mark.parametrize("seed", range(3))
def test_cp_fits_as_well_as_tensorly(seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((12, 10, 3, 3))
    rank = 8
    ours = reconstruct(cp_factors(weight, rank, seed=seed))
    cp = parafac(weight, rank=rank, init="svd", n_iter_max=300, tol=1e-9, random_state=seed)
    theirs = tl.cp_to_tensor(cp)
    error_ours = np.linalg.norm(ours - weight) / np.linalg.norm(weight)
    error_theirs = np.linalg.norm(theirs - weight) / np.linalg.norm(weight)
    # ALS finds local optima: ours (on the compressed core) must not be meaningfully worse
    assert error_ours <= error_theirs * 1.05


def test_cp_recovers_planted_rank_like_tensorly():
    rng = np.random.default_rng(7)
    weight = exact_cp_kernel(16, 12, (3, 3), 6, rng)
    ours = reconstruct(cp_factors(weight, 6))
    assert np.linalg.norm(ours - weight) / np.linalg.norm(weight) < 1e-6


def test_compressed_model_round_trips_through_graphsurgeon():
    model = cnn_model(seed=3)
    compressed, report = onnxlr.compress(model, method="auto", rank="0.5", round_to=1, force=True)
    assert report.replaced
    exported = gs.export_onnx(gs.import_onnx(compressed).cleanup().toposort())
    onnx.checker.check_model(exported, full_check=True)
    feeds = random_feeds(model)
    assert rel_error(run_ort(exported, feeds)[0], run_ort(compressed, feeds)[0]) < 1e-6
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in compressed.graph.node]
