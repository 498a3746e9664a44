"""Splice identity, as property tests over the whole attribute space of Conv, Gemm and MatMul.

For every method and random ranks, the compressed model must compute exactly what the original
model computes once its weight is replaced by the low-rank reconstruction
(``Replacement.reconstruction``): the chain is an exact re-expression of the truncated weight,
whatever the strides, dilations, pads, auto_pad, groups, bias, Gemm flags or MatMul input rank.
Both sides run in onnxruntime in fp32; SPLICE_TOL bounds their relative L2 distance.

Also checked for every case: the chain's node count and op types, onnx.checker (full_check) on the
output model, and that the replaced node's output tensor keeps its name (on the chain's last node).
"""

from __future__ import annotations

import importlib
from unittest import mock

import numpy as np
import onnx
import pytest
from builders import (
    conv_model,
    gemm_model,
    matmul_model,
    op_types,
    producer_of,
    random_feeds,
    rel_error,
    run_ort,
    with_initializer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxlr
from onnxlr.methods.cp import reconstruct as cp_reconstruct

_pipeline = importlib.import_module("onnxlr.pipeline")
_real_factorize = _pipeline.factorize

SPLICE_TOL = 1e-5
# CP terms may cancel (over-complete fits); the fp32 error then grows with the cancellation factor
# (see cp_cancellation). Up to this factor, SPLICE_TOL applies unchanged.
CP_CANCELLATION_SLACK = 10.0
PROPERTY = settings(
    deadline=None,
    derandomize=True,  # same cases on every run: CI is stable
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def compress_one(model: onnx.ModelProto, method: str, rank: int):
    """Compress the model's single layer; returns (model, layer report, the Replacement spliced).

    The Replacement is captured from ``onnxlr.pipeline.factorize`` during the call, so the
    reference uses the very reconstruction whose factors were spliced (CP runs ALS only once).
    """
    captured = []

    def spy(*args, **kwargs):
        result = _real_factorize(*args, **kwargs)
        captured.append(result[0])
        return result

    with mock.patch.object(_pipeline, "factorize", spy):
        compressed, report = onnxlr.compress(model, method=method, rank=rank, force=True, round_to=1)
    (layer,) = report.layers
    (replacement,) = captured
    assert layer.skipped is None, layer.skipped
    assert layer.method == replacement.method and layer.ranks == replacement.ranks
    onnx.checker.check_model(compressed, full_check=True)
    # The replaced node's output name survives, written by the chain's last node; graph outputs
    # are untouched.
    assert layer.output == "y"
    assert [o.name for o in compressed.graph.output] == ["y"]
    assert producer_of(compressed, "y") is compressed.graph.node[-1]
    # The old weight is gone.
    assert "W" not in {t.name for t in compressed.graph.initializer}
    return compressed, layer, replacement


def assert_splice_identity(original, compressed, reference_weight, feeds, tol=SPLICE_TOL):
    reference = with_initializer(original, "W", reference_weight)
    (expected,) = run_ort(reference, feeds)
    (actual,) = run_ort(compressed, feeds)
    error = rel_error(actual, expected)
    assert error <= tol, f"compressed vs reconstructed-weight model: rel error {error:.3g} > {tol:.3g}"


def cp_cancellation(replacement, group: int) -> float:
    """||sum_r |term_r||| / ||sum_r term_r|| of a CP chain's rank-1 terms, worst group.

    The chain adds R rank-1 terms in fp32, so its rounding error scales with the terms' own size;
    when an over-complete CP fit has terms that cancel, that exceeds the weight's size by this
    factor (1 when no term cancels another). SVD and Tucker chains use orthonormal bases: no factor.
    """
    first, *taps, last = [step.weight for step in replacement.steps]
    r = replacement.ranks["rank"]
    worst = 1.0
    t_g = last.shape[0] // group
    for g in range(group):
        rows = slice(g * r, (g + 1) * r)
        factors = [last[g * t_g : (g + 1) * t_g].reshape(t_g, r), first[rows].reshape(r, -1).T]
        factors += [tap[rows].reshape(r, -1).T for tap in taps]
        signed = cp_reconstruct(factors)
        # The terms read back from the chain are those of the reconstruction (kernel-1 axes are
        # folded into the first conv, so compare without them).
        expected = replacement.reconstruction[g * t_g : (g + 1) * t_g].reshape(signed.shape)
        np.testing.assert_allclose(signed, expected, rtol=0, atol=1e-9 * max(np.abs(expected).max(), 1.0))
        magnitude = np.linalg.norm(cp_reconstruct([np.abs(f) for f in factors]))
        worst = max(worst, magnitude / max(np.linalg.norm(signed), 1e-30))
    return worst


# --- Conv -------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    d = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    s_g = draw(st.integers(2 if group > 1 else 1, 4))  # S_g == 1 with group > 1 is depthwise
    t_g = draw(st.integers(1, 4))
    max_k = 3 if d < 3 else 2
    kernel = [draw(st.integers(1, max_k)) for _ in range(d)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    strides = [draw(st.integers(1, 2)) for _ in range(d)]
    # onnxruntime rejects dilation > 1 with SAME_* even for the unmodified model.
    dilations = [1 if auto_pad.startswith("SAME") else draw(st.integers(1, 2)) for _ in range(d)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * d)] if auto_pad == "NOTSET" else None
    spatial = []
    for a in range(d):
        extent = dilations[a] * (kernel[a] - 1) + 1
        pad_total = pads[a] + pads[a + d] if pads else 0
        low = max(1, extent - pad_total)
        spatial.append(draw(st.integers(low, low + (4 if d < 3 else 2))))
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((group * t_g, s_g, *kernel)).astype(np.float32)
    bias = rng.standard_normal(group * t_g).astype(np.float32) if draw(st.booleans()) else None
    model = conv_model(
        [batch, group * s_g, *spatial],
        weight,
        bias=bias,
        group=group,
        strides=strides if draw(st.booleans()) or any(s != 1 for s in strides) else None,
        dilations=dilations if any(x != 1 for x in dilations) or draw(st.booleans()) else None,
        pads=pads,
        auto_pad=auto_pad,
    )
    method = draw(st.sampled_from(["svd", "tucker", "cp", "spatial-svd"]))
    rank = draw(st.integers(1, 6))
    return model, method, rank, {"d": d, "group": group, "kernel": kernel, "auto_pad": auto_pad, "seed": seed}


def expected_method(method: str, kernel: list[int]) -> str:
    """A pointwise conv is always an SVD; svd on a KxK conv is the channel decomposition;
    spatial-svd needs a kernel > 1 on the first axis and on the others, else tucker takes it."""
    if all(k == 1 for k in kernel):
        return "svd"
    if method == "svd":
        return "channel"
    if method == "spatial-svd" and (len(kernel) < 2 or kernel[0] == 1 or int(np.prod(kernel[1:])) == 1):
        return "tucker"
    return method


def expected_conv_ops(method: str, kernel: list[int]) -> int:
    if method in ("svd", "channel", "spatial-svd"):
        return 2
    if method == "tucker":
        return 3
    return 2 + sum(k > 1 for k in kernel)  # cp: 1x1, one depthwise conv per real axis, 1x1


@settings(PROPERTY, max_examples=300)
@given(conv_cases())
def test_conv_splice_identity(case):
    model, method, rank, info = case
    compressed, layer, replacement = compress_one(model, method, rank)
    resolved = layer.method
    assert resolved == expected_method(method, info["kernel"])
    if resolved != method and method != "svd":
        assert any("applies to KxK convs" in n or "spatial-svd" in n for n in layer.notes), layer.notes

    n = expected_conv_ops(resolved, info["kernel"])
    assert op_types(compressed) == ["Conv"] * n, op_types(compressed)
    nodes = list(compressed.graph.node)
    group_attr = lambda node: next((a.i for a in node.attribute if a.name == "group"), 1)
    if resolved == "cp":
        r = replacement.ranks["rank"]
        for node in nodes[1:-1]:  # depthwise convs, one per axis with a kernel > 1
            kshape = next(a.ints for a in node.attribute if a.name == "kernel_shape")
            assert sum(k > 1 for k in kshape) == 1, list(kshape)
            assert group_attr(node) == info["group"] * r
    for node in (nodes[0], nodes[-1]):
        assert group_attr(node) == info["group"]
    # The bias (if any) is read by the last node only.
    assert all(len(node.input) == 2 for node in nodes[:-1])

    assert replacement.reconstruction.shape == tuple(model.graph.initializer[0].dims)
    # rel_error also checks that both outputs have the same shape.
    tol = SPLICE_TOL
    if resolved == "cp":  # measured: error <= 1.4e-7 * cancellation; allow 1e-6 * cancellation
        tol *= max(1.0, cp_cancellation(replacement, info["group"]) / CP_CANCELLATION_SLACK)
    assert_splice_identity(model, compressed, replacement.reconstruction, random_feeds(model, seed=info["seed"]), tol)


# --- Gemm -------------------------------------------------------------------------------------


@st.composite
def gemm_cases(draw):
    m, k, n = draw(st.integers(1, 5)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    alpha = draw(st.sampled_from([1.0, 0.5, -1.5, 2.25]))
    beta = draw(st.sampled_from([1.0, 0.0, 0.75, -2.0]))
    opset = draw(st.sampled_from([9, 11, 13, 17]))
    c_kind = draw(st.sampled_from(["none", "scalar", "N", "1N", "MN"] if opset >= 11 else ["scalar", "N", "1N", "MN"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c_shape = {"none": None, "scalar": (), "N": (n,), "1N": (1, n), "MN": (m, n)}[c_kind]
    c = None if c_shape is None else rng.standard_normal(c_shape).astype(np.float32)
    a_shape = (k, m) if trans_a else (m, k)
    model = gemm_model(a_shape, b, c=c, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, opset=opset)
    rank = draw(st.integers(1, 8))
    return model, rank, {"trans_a": trans_a, "trans_b": trans_b, "alpha": alpha, "c": c_kind, "opset": opset, "seed": seed}


@settings(PROPERTY, max_examples=120)
@given(gemm_cases())
def test_gemm_splice_identity(case):
    model, rank, info = case
    compressed, layer, replacement = compress_one(model, "svd", rank)
    assert layer.method == "svd"

    ops = op_types(compressed)
    first = ["Gemm"] if info["trans_a"] and info["opset"] >= 11 else (["Transpose", "MatMul"] if info["trans_a"] else ["MatMul"])
    last = ["Gemm"] if info["c"] != "none" else ["MatMul"]
    assert ops == first + last, ops
    if info["c"] != "none":
        assert compressed.graph.node[-1].input[2] == "C"

    # reconstruction is alpha * op(B) in [K, N]: undo both to get a B for the reference Gemm.
    weight = replacement.reconstruction / info["alpha"]
    if info["trans_b"]:
        weight = weight.T
    assert_splice_identity(model, compressed, weight, random_feeds(model, seed=info["seed"]))


# --- MatMul -----------------------------------------------------------------------------------


@st.composite
def matmul_cases(draw):
    x_rank = draw(st.integers(2, 4))
    lead = [draw(st.integers(1, 3)) for _ in range(x_rank - 1)]
    k, n = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    weight = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    model = matmul_model([*lead, k], weight)
    return model, draw(st.integers(1, 8)), seed


@settings(PROPERTY, max_examples=80)
@given(matmul_cases())
def test_matmul_splice_identity(case):
    model, rank, seed = case
    compressed, layer, replacement = compress_one(model, "auto", rank)
    assert layer.method == "svd"
    assert op_types(compressed) == ["MatMul", "MatMul"]
    assert_splice_identity(model, compressed, replacement.reconstruction, random_feeds(model, seed=seed))


def test_conv_reference_construction_can_fail():
    """The identity test is not vacuous: a wrong reconstruction is caught at SPLICE_TOL."""
    rng = np.random.default_rng(1)
    model = conv_model([1, 4, 6, 6], rng.standard_normal((4, 4, 3, 3)).astype(np.float32), pads=[1, 0, 0, 1])
    compressed, _, replacement = compress_one(model, "tucker", 2)
    feeds = random_feeds(model)
    with pytest.raises(AssertionError):
        assert_splice_identity(model, compressed, replacement.reconstruction * (1 + 1e-3), feeds)
    with pytest.raises(AssertionError):  # the original weight is not the rank-2 reconstruction
        assert_splice_identity(model, compressed, onnx.numpy_helper.to_array(model.graph.initializer[0]), feeds)
