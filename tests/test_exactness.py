"""Exactness: full rank reproduces the model; a planted exact low rank is recovered at rank=R.

* rank=1.0 with force=True: Tucker-2 and SVD chains compute the original outputs (FULL_RANK_TOL).
* Weights with a planted exact rank (matrix rank, multilinear rank of the channel modes, CP rank):
  ``rank=R`` recovers them for SVD and Tucker-2 (PLANTED_TOL) and CP (CP_TOL), including grouped
  convs (every group planted) and 1-D/3-D convs.
* fp16 models are factorized in float64 and written back as float16 (FP16_TOL on the outputs).
* Weights held by Constant nodes instead of initializers are factorized the same way.

Every comparison runs the original and the compressed model in onnxruntime on the same seeded
inputs and measures the relative L2 error of the output.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import (
    conv_model,
    exact_cp_kernel,
    exact_rank_matrix,
    exact_tucker_kernel,
    gemm_model,
    grouped,
    matmul_model,
    op_types,
    random_feeds,
    rel_error,
    run_ort,
)
from onnx import TensorProto, numpy_helper

import onnxlr

FULL_RANK_TOL = 1e-4
PLANTED_TOL = 1e-4
CP_TOL = 1e-3
FP16_TOL = 1e-2  # fp16 has ~3 significant digits; the chain adds one or two roundings per step
FLOAT64_WEIGHT_TOL = 1e-9  # weight error of an exact factorization done in float64


def compress(model, **options):
    options = {"force": True, "round_to": 1, **options}
    return onnxlr.compress(model, **options)


def output_error(original: onnx.ModelProto, compressed: onnx.ModelProto, seed: int = 0) -> float:
    feeds = random_feeds(original, seed)
    (expected,) = run_ort(original, feeds)
    (actual,) = run_ort(compressed, feeds)
    return rel_error(actual, expected)


def replaced(report) -> onnxlr.LayerReport:
    (layer,) = report.layers
    assert layer.skipped is None, layer.skipped
    return layer


# --- conv cases: (input shape, weight shape builder, attributes) --------------------------------

CONV_CASES = {
    "2d": {"x": [2, 6, 7, 6], "t": 8, "s": 6, "kernel": (3, 2), "group": 1, "strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 1]},
    "2d-same": {"x": [1, 6, 7, 7], "t": 6, "s": 6, "kernel": (3, 3), "group": 1, "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    "1d": {"x": [2, 5, 11], "t": 6, "s": 5, "kernel": (3,), "group": 1, "strides": [2], "dilations": [2], "pads": [2, 1]},
    "3d": {"x": [1, 4, 5, 4, 6], "t": 6, "s": 4, "kernel": (3, 1, 2), "group": 1, "strides": [1, 2, 1], "pads": [1, 0, 0, 1, 1, 0]},
    "grouped-2d": {"x": [1, 8, 6, 6], "t": 6, "s": 4, "kernel": (3, 3), "group": 2, "strides": [1, 2], "pads": [1, 1, 1, 1]},
    "grouped-1d": {"x": [2, 9, 8], "t": 6, "s": 3, "kernel": (3,), "group": 3, "auto_pad": "SAME_UPPER"},
    "grouped-3d": {"x": [1, 6, 4, 5, 4], "t": 4, "s": 3, "kernel": (2, 3, 2), "group": 2, "auto_pad": "VALID"},
}


def build_conv(case: dict, kernel_fn, seed: int = 0, *, elem_type=TensorProto.FLOAT, weight_as_constant=False):
    """A conv model whose every group's [T_g, S_g, *k] kernel comes from ``kernel_fn(rng, t_g, s_g, k)``."""
    rng = np.random.default_rng(seed)
    group = case["group"]
    t_g = case["t"]
    weight = grouped([kernel_fn(rng, t_g, case["s"], case["kernel"]) for _ in range(group)])
    attrs = {k: case[k] for k in ("strides", "dilations", "pads", "auto_pad") if k in case}
    return conv_model(
        case["x"],
        weight,
        bias=rng.standard_normal(group * t_g),
        group=group,
        elem_type=elem_type,
        weight_as_constant=weight_as_constant,
        **attrs,
    )


def random_kernel(rng, t, s, kernel):
    return rng.standard_normal((t, s, *kernel))


# --- full rank --------------------------------------------------------------------------------


CHAIN_CONVS = {"tucker": 3, "channel": 2, "spatial-svd": 2}


@pytest.mark.parametrize("method", ["tucker", "svd", "spatial-svd"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_full_rank_conv_reproduces_outputs(case, method):
    """svd on a KxK conv is the channel decomposition; spatial-svd where it does not apply (1-D
    convs) hands the layer to tucker and says why."""
    model = build_conv(CONV_CASES[case], random_kernel)
    # spatial-svd's fraction is of max(S, T): an integer rank, capped at the full rank, is exact
    compressed, report = compress(model, method=method, rank=10**6 if method == "spatial-svd" else 1.0, force=True)
    layer = replaced(report)
    expected = "channel" if method == "svd" else method
    if method == "spatial-svd" and layer.method != method:
        expected = "tucker"
        assert any("spatial-svd splits a kernel" in n for n in layer.notes), layer.notes
    assert layer.method == expected
    assert op_types(compressed) == ["Conv"] * CHAIN_CONVS[expected]
    assert layer.weight_rel_error <= FLOAT64_WEIGHT_TOL
    assert output_error(model, compressed) <= FULL_RANK_TOL


LINEAR_CASES = {
    "gemm": lambda rng: gemm_model([3, 7], rng.standard_normal((7, 5))),
    "gemm-all-attrs": lambda rng: gemm_model(
        [7, 3], rng.standard_normal((5, 7)), c=rng.standard_normal((3, 5)), trans_a=1, trans_b=1, alpha=-0.7, beta=1.9
    ),
    "gemm-bias-row": lambda rng: gemm_model([2, 6], rng.standard_normal((6, 9)), c=rng.standard_normal((1, 9)), alpha=2.5),
    "matmul-2d": lambda rng: matmul_model([4, 6], rng.standard_normal((6, 8))),
    "matmul-4d": lambda rng: matmul_model([2, 3, 2, 6], rng.standard_normal((6, 5))),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_full_rank_linear_reproduces_outputs(case):
    model = LINEAR_CASES[case](np.random.default_rng(0))
    compressed, report = compress(model, method="svd", rank=1.0)
    layer = replaced(report)
    assert len(compressed.graph.node) == 2
    assert layer.weight_rel_error <= FLOAT64_WEIGHT_TOL
    assert output_error(model, compressed) <= FULL_RANK_TOL


# --- planted low rank -------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_planted_multilinear_rank_recovered_by_tucker(case):
    rank = 2
    model = build_conv(CONV_CASES[case], lambda rng, t, s, k: exact_tucker_kernel(t, s, k, rank, rank, rng))
    compressed, report = compress(model, method="tucker", rank=rank)
    layer = replaced(report)
    assert layer.ranks == {"rank_in": rank, "rank_out": rank}
    assert layer.params_after < layer.params_before
    assert layer.weight_rel_error <= 1e-6
    assert output_error(model, compressed) <= PLANTED_TOL


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_planted_matrix_rank_recovered_by_svd_conv(case):
    """SVD factorizes each group's [T_g, S_g * prod(k)] matrix: plant rank 2 there."""
    rank = 2

    def kernel(rng, t, s, k):
        return exact_rank_matrix(t, s * int(np.prod(k)), rank, rng).reshape(t, s, *k)

    model = build_conv(CONV_CASES[case], kernel)
    compressed, report = compress(model, method="svd", rank=rank)
    layer = replaced(report)
    assert layer.ranks == {"rank": rank}
    assert layer.weight_rel_error <= 1e-6
    assert output_error(model, compressed) <= PLANTED_TOL


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_planted_matrix_rank_recovered_by_svd_linear(case):
    rank = 2
    rng = np.random.default_rng(3)
    model = LINEAR_CASES[case](rng)
    (w,) = [t for t in model.graph.initializer if t.name == "W"]
    planted = exact_rank_matrix(*w.dims, rank, rng)
    w.CopyFrom(numpy_helper.from_array(planted.astype(np.float32), "W"))
    compressed, report = compress(model, method="svd", rank=rank)
    layer = replaced(report)
    assert layer.ranks == {"rank": rank}
    assert layer.weight_rel_error <= 1e-6
    assert output_error(model, compressed) <= PLANTED_TOL


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_planted_cp_rank_recovered_by_cp(case):
    rank = 3
    model = build_conv(CONV_CASES[case], lambda rng, t, s, k: exact_cp_kernel(t, s, k, rank, rng), seed=1)
    compressed, report = compress(model, method="cp", rank=rank)
    layer = replaced(report)
    assert layer.method == "cp" and layer.ranks == {"rank": rank}
    kernel = CONV_CASES[case]["kernel"]
    assert len(compressed.graph.node) == 2 + sum(k > 1 for k in kernel)
    assert layer.weight_rel_error <= CP_TOL
    assert output_error(model, compressed) <= CP_TOL


def test_truncation_below_planted_rank_is_not_exact():
    """Guard against vacuous passes: one rank short of the planted rank must show a real error."""
    case = CONV_CASES["2d"]
    tucker_model = build_conv(case, lambda rng, t, s, k: exact_tucker_kernel(t, s, k, 3, 3, rng))
    compressed, report = compress(tucker_model, method="tucker", rank=2)
    assert replaced(report).weight_rel_error > 1e-2
    assert output_error(tucker_model, compressed) > PLANTED_TOL
    cp_model = build_conv(case, lambda rng, t, s, k: exact_cp_kernel(t, s, k, 3, rng))
    compressed, report = compress(cp_model, method="cp", rank=2)
    assert output_error(cp_model, compressed) > CP_TOL


# --- fp16 -------------------------------------------------------------------------------------


def _new_initializer_types(original: onnx.ModelProto, compressed: onnx.ModelProto) -> set[int]:
    before = {t.name for t in original.graph.initializer}
    new = [t for t in compressed.graph.initializer if t.name not in before]
    assert new, "no new initializer"
    return {t.data_type for t in new}


@pytest.mark.parametrize(
    "case,method",
    [("2d", "tucker"), ("grouped-1d", "svd"), ("3d", "tucker"), ("2d", "cp")],
)
def test_fp16_conv_written_back_as_fp16(case, method):
    rank = 2

    def kernel(rng, t, s, k):
        if method == "cp":
            return exact_cp_kernel(t, s, k, rank, rng) / 2
        if method == "svd":
            return exact_rank_matrix(t, s * int(np.prod(k)), rank, rng).reshape(t, s, *k) / 2
        return exact_tucker_kernel(t, s, k, rank, rank, rng) / 2

    model = build_conv(CONV_CASES[case], kernel, elem_type=TensorProto.FLOAT16)
    compressed, report = compress(model, method=method, rank=rank)
    layer = replaced(report)
    assert _new_initializer_types(model, compressed) == {TensorProto.FLOAT16}
    onnx.checker.check_model(compressed, full_check=True)
    # The fp16 weight is only approximately low rank (rounding); the factorization itself is
    # float64, so its weight error is at the fp16 rounding level, not worse.
    assert layer.weight_rel_error <= 2e-3
    feeds = random_feeds(model)
    (expected,) = run_ort(model, feeds)
    (actual,) = run_ort(compressed, feeds)
    assert actual.dtype == np.float16
    assert rel_error(actual, expected) <= FP16_TOL


@pytest.mark.parametrize("case", ["gemm-all-attrs", "matmul-4d"])
def test_fp16_linear_full_rank_written_back_as_fp16(case):
    rng = np.random.default_rng(0)
    builder = {
        "gemm-all-attrs": lambda: gemm_model(
            [7, 3], rng.standard_normal((5, 7)), c=rng.standard_normal((3, 5)), trans_a=1, trans_b=1, alpha=-0.7,
            beta=1.9, elem_type=TensorProto.FLOAT16,
        ),
        "matmul-4d": lambda: matmul_model([2, 3, 2, 6], rng.standard_normal((6, 5)), elem_type=TensorProto.FLOAT16),
    }[case]
    model = builder()
    compressed, report = compress(model, method="svd", rank=1.0)
    layer = replaced(report)
    assert _new_initializer_types(model, compressed) <= {TensorProto.FLOAT16}
    assert layer.weight_rel_error <= FLOAT64_WEIGHT_TOL
    assert output_error(model, compressed) <= FP16_TOL


# --- Constant-node weights --------------------------------------------------------------------


def test_conv_weight_in_constant_node():
    rank = 2
    model = build_conv(
        CONV_CASES["grouped-2d"],
        lambda rng, t, s, k: exact_tucker_kernel(t, s, k, rank, rank, rng),
        weight_as_constant=True,
    )
    assert not model.graph.initializer and op_types(model) == ["Constant", "Constant", "Conv"]
    compressed, report = compress(model, method="tucker", rank=rank)
    layer = replaced(report)
    assert layer.ranks == {"rank_in": rank, "rank_out": rank}
    # The Constant that held W is gone (nothing reads it); the bias Constant stays.
    assert op_types(compressed) == ["Constant", "Conv", "Conv", "Conv"]
    assert compressed.graph.node[0].output[0] == "B"
    onnx.checker.check_model(compressed, full_check=True)
    assert output_error(model, compressed) <= PLANTED_TOL


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_linear_weight_in_constant_node(kind):
    rng = np.random.default_rng(5)
    w = exact_rank_matrix(6, 8, 2, rng)
    if kind == "gemm":
        model = gemm_model([3, 6], w, c=rng.standard_normal(8), alpha=0.5, weight_as_constant=True)
    else:
        model = matmul_model([2, 3, 6], w, weight_as_constant=True)
    compressed, report = compress(model, method="svd", rank=2)
    assert replaced(report).ranks == {"rank": 2}
    assert "W" not in {n.output[0] for n in compressed.graph.node}
    onnx.checker.check_model(compressed, full_check=True)
    assert output_error(model, compressed) <= PLANTED_TOL
