"""Tiny ONNX models built inline with onnx.helper, and helpers to run and compare them.

Every builder returns a checked ``ModelProto`` whose weight initializer is called ``W`` (Conv, Gemm,
MatMul) so tests can swap it (``with_initializer``) for a reference model. Import from test files
as ``from builders import ...`` (pytest puts ``tests/`` on ``sys.path``: the folder has no
``__init__.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 17
IR_VERSION = 8  # onnxruntime accepts it for every opset we build


def _np_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def _make_model(nodes, inputs, outputs, initializers, opset: int, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxlr-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _constant_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(array, name))


def conv_model(
    x_shape: Sequence[int],
    weight: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    group: int = 1,
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
    opset: int = DEFAULT_OPSET,
    elem_type: int = TensorProto.FLOAT,
    weight_as_constant: bool = False,
    name: str = "conv",
) -> onnx.ModelProto:
    """x -> Conv(W[, B]) -> y, any spatial rank; attributes left out when None/NOTSET."""
    dtype = _np_dtype(elem_type)
    weight = np.asarray(weight, dtype=dtype)
    attrs = {"kernel_shape": list(weight.shape[2:])}
    if group != 1:
        attrs["group"] = int(group)
    if strides is not None:
        attrs["strides"] = [int(s) for s in strides]
    if dilations is not None:
        attrs["dilations"] = [int(d) for d in dilations]
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif pads is not None:
        attrs["pads"] = [int(p) for p in pads]
    inputs = ["x", "W"] + (["B"] if bias is not None else [])
    nodes, inits = [], []
    consts = [("W", weight)] + ([("B", np.asarray(bias, dtype=dtype))] if bias is not None else [])
    for const_name, array in consts:
        if weight_as_constant:
            nodes.append(_constant_node(const_name, array))
        else:
            inits.append(numpy_helper.from_array(array, const_name))
    nodes.append(helper.make_node("Conv", inputs, ["y"], name=name, **attrs))
    return _make_model(
        nodes,
        [helper.make_tensor_value_info("x", elem_type, list(x_shape))],
        [helper.make_tensor_value_info("y", elem_type, [None] * len(x_shape))],
        inits,
        opset,
        "conv_graph",
    )


def gemm_model(
    a_shape: Sequence[int],
    b: np.ndarray,
    *,
    c: np.ndarray | None = None,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    opset: int = DEFAULT_OPSET,
    elem_type: int = TensorProto.FLOAT,
    weight_as_constant: bool = False,
    name: str = "gemm",
) -> onnx.ModelProto:
    """a -> Gemm(a, W[, C]) -> y; ``a_shape`` is A's shape as fed (already transposed if transA)."""
    dtype = _np_dtype(elem_type)
    consts = [("W", np.asarray(b, dtype=dtype))]
    inputs = ["a", "W"]
    if c is not None:
        consts.append(("C", np.asarray(c, dtype=dtype)))
        inputs.append("C")
    nodes, inits = [], []
    for const_name, array in consts:
        if weight_as_constant:
            nodes.append(_constant_node(const_name, array))
        else:
            inits.append(numpy_helper.from_array(array, const_name))
    attrs = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    if alpha != 1.0:
        attrs["alpha"] = float(alpha)
    if beta != 1.0:
        attrs["beta"] = float(beta)
    nodes.append(helper.make_node("Gemm", inputs, ["y"], name=name, **attrs))
    return _make_model(
        nodes,
        [helper.make_tensor_value_info("a", elem_type, list(a_shape))],
        [helper.make_tensor_value_info("y", elem_type, [None, None])],
        inits,
        opset,
        "gemm_graph",
    )


def matmul_model(
    x_shape: Sequence[int],
    weight: np.ndarray,
    *,
    opset: int = DEFAULT_OPSET,
    elem_type: int = TensorProto.FLOAT,
    weight_as_constant: bool = False,
    name: str = "matmul",
) -> onnx.ModelProto:
    """x (rank 2..4, last dim K) -> MatMul(x, W [K, N]) -> y."""
    dtype = _np_dtype(elem_type)
    array = np.asarray(weight, dtype=dtype)
    nodes = [_constant_node("W", array)] if weight_as_constant else []
    inits = [] if weight_as_constant else [numpy_helper.from_array(array, "W")]
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name=name))
    return _make_model(
        nodes,
        [helper.make_tensor_value_info("x", elem_type, list(x_shape))],
        [helper.make_tensor_value_info("y", elem_type, [None] * len(x_shape))],
        inits,
        opset,
        "matmul_graph",
    )


def cnn_model(
    seed: int = 0,
    *,
    channels: tuple[int, int, int] = (3, 16, 16),
    spatial: int = 8,
    classes: int = 10,
    depthwise: bool = False,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """A small chain: x -> conv1 (3x3) -> Relu -> [dw (3x3 depthwise) ->] conv2 (3x3) -> Relu
    -> Flatten -> fc (Gemm, transB) -> logits. Layer names: conv1, dw, conv2, fc."""
    rng = np.random.default_rng(seed)
    c0, c1, c2 = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c1, c0, 3, 3)).astype(np.float32), "conv1_w"),
        numpy_helper.from_array(rng.standard_normal(c1).astype(np.float32), "conv1_b"),
        numpy_helper.from_array(rng.standard_normal((c2, c1, 3, 3)).astype(np.float32), "conv2_w"),
        numpy_helper.from_array(rng.standard_normal((classes, c2 * spatial * spatial)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1_w", "conv1_b"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    current = "r1"
    if depthwise:
        inits.append(numpy_helper.from_array(rng.standard_normal((c1, 1, 3, 3)).astype(np.float32), "dw_w"))
        nodes.append(
            helper.make_node("Conv", [current, "dw_w"], ["d1"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c1)
        )
        current = "d1"
    nodes += [
        helper.make_node("Conv", [current, "conv2_w"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c0, spatial, spatial])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        inits,
        opset,
        "cnn",
    )


# --- editing, running, comparing -------------------------------------------------------------


def with_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer (or Constant node output) ``name`` holds ``array``,
    cast to the tensor's own dtype."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name == name:
            dtype = _np_dtype(init.data_type)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
            return out
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            tensor = node.attribute[0].t
            dtype = _np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
            return out
    raise KeyError(f"no initializer or Constant named {name!r}")


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs for every graph input that is not an initializer (static shapes)."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = _np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` on CPU with onnxruntime (no graph optimizations, one thread): all outputs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Relative L2 error ||actual - expected|| / ||expected||, computed in float64.

    The denominator is floored at 1e-30 so an all-zero reference gives a huge error for any
    nonzero difference rather than a division by zero (and 0 for an exact match).
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def producer_of(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    matches = [node for node in model.graph.node if tensor in node.output]
    assert len(matches) == 1, f"{tensor!r} is written by {len(matches)} nodes"
    return matches[0]


# --- planted low-rank tensors ----------------------------------------------------------------


def exact_rank_matrix(rows: int, cols: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """A rows x cols matrix of exact rank ``rank`` with well-spread singular values."""
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))


def exact_tucker_kernel(t: int, s: int, kernel: Sequence[int], r_out: int, r_in: int, rng) -> np.ndarray:
    """A [t, s, *kernel] tensor of multilinear rank (r_out, r_in) on its channel modes."""
    core = rng.standard_normal((r_out, r_in, *kernel))
    u_out = rng.standard_normal((t, r_out))
    u_in = rng.standard_normal((s, r_in))
    return np.einsum("rq...,tr,sq->ts...", core, u_out, u_in)


def exact_cp_kernel(t: int, s: int, kernel: Sequence[int], rank: int, rng) -> np.ndarray:
    """A [t, s, *kernel] tensor that is a sum of ``rank`` rank-1 terms."""
    factors = [rng.standard_normal((n, rank)) for n in (t, s, *kernel)]
    letters = "abcdefgh"[: len(factors)]
    return np.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)


def grouped(kernels: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-group kernels [T_g, S_g, *k] into a grouped conv weight [G*T_g, S_g, *k]."""
    return np.concatenate(list(kernels), axis=0)


def steady_budget(monkeypatch) -> None:
    """A budget whose choice does not hang on timing noise: every candidate saves time, smaller
    ranks more, and the held-out check set of 40 calibration samples is 8 of them."""
    from onnxlr.budget import latency, planning

    monkeypatch.setattr(planning, "CHECK_SAMPLES", 32)
    monkeypatch.setattr(planning, "MAX_LAYER_DAMAGE", 10.0)

    def time_layer(target, input_shape, shapes, candidates, *args, **kwargs):
        params = [sum(step.weight.size for step in c.steps) for c in candidates]
        return 1.0, [0.1 + 0.8 * p / max(params) for p in params]

    monkeypatch.setattr(latency, "time_layer", time_layer)


def check_budget_wrote_what_it_measured(tmp_path, x: np.ndarray, out, report: dict) -> dict:
    """``verify`` of the written model on the samples a budget held out (every 5th of ``x``, the
    model at tmp_path/m.onnx) gives the report's measured error, and every chosen layer has its
    method and ranks in the report; returns the report's layer rows by output tensor."""
    import json

    from onnxlr import data
    from onnxlr.cli import main

    chosen = report["budget"]["chosen"]
    assert chosen, report["notes"]
    held = np.stack([x[i] for i in range(len(x)) if data.is_held_out(i)])
    assert len(held) == report["budget"]["check_samples"] == 8
    np.savez(tmp_path / "held.npz", x=held)
    assert main(["verify", str(tmp_path / "m.onnx"), str(out), "--inputs", str(tmp_path / "held.npz"),
                 "--max-rel-error", "none", "--json", str(tmp_path / "v.json")]) == 0
    (verified,) = json.loads((tmp_path / "v.json").read_text())["outputs"]
    measured = report["budget"]["measured_error"]
    assert measured > 0 and abs(verified["rel_error"] - measured) <= 1e-6 * measured
    rows = {row["output"]: row for row in report["layers"]}
    for choice in chosen:
        row = rows[choice["output"]]
        assert row["method"] == choice["method"] and row["ranks"] == choice["ranks"]
    return rows
