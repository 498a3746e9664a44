"""Random valid graphs: compress at full rank either gives a model that computes the same function
(onnxlr.verify at rel. error <= 1e-4) or says why it skipped; never a traceback.

Graphs are chains with branches of Conv, Gemm, MatMul, Relu, Add and Concat, with random
attributes (kernel, stride, padding, dilation, group, auto_pad, transA/transB, alpha, beta, bias)
and dynamic dims (batch, and for 3-D activations the sequence length; for convs the spatial size).
The builder tracks the concrete shape each tensor takes for the feed it will use, so every
generated graph is valid by construction; onnx.checker and onnxruntime confirm it.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.proof.verify import verify


class _Builder:
    def __init__(self, draw, rng):
        self.draw, self.rng = draw, rng
        self.nodes, self.inits = [], []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def weight(self, shape) -> str:
        name = self.name("w")
        scale = 1.0 / np.sqrt(max(1, int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]))
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def node(self, op, inputs, shape, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op + "_"), **attrs))
        self.shapes[out] = tuple(shape)
        return out

    def same_shape(self, shape) -> list[str]:
        return [n for n, s in self.shapes.items() if s == shape]


def _conv(b: _Builder, x: str) -> str:
    draw = b.draw
    n, c, h, w = b.shapes[x]
    groups = [gr for gr in (1, 2, 4) if c % gr == 0]
    group = draw(st.sampled_from(groups))
    out_c = group * draw(st.integers(1, 6))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2)) if k > 1 else 1
    span = dilation * (k - 1) + 1
    attrs = {"kernel_shape": [k, k], "group": group}
    if stride > 1:
        attrs["strides"] = [stride, stride]
    if dilation > 1:
        attrs["dilations"] = [dilation, dilation]
    # onnxruntime rejects dilations with SAME_* padding
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID"] + (["SAME_UPPER"] if dilation == 1 else [])))
    if auto_pad == "NOTSET":
        pads = [draw(st.integers(0, k - 1 if k > 1 else 0)) for _ in range(4)]
        if any(pads):
            attrs["pads"] = pads
        oh = (h + pads[0] + pads[2] - span) // stride + 1
        ow = (w + pads[1] + pads[3] - span) // stride + 1
    elif auto_pad == "SAME_UPPER":
        attrs["auto_pad"] = "SAME_UPPER"
        oh, ow = -(-h // stride), -(-w // stride)
    else:
        attrs["auto_pad"] = "VALID"
        oh, ow = (h - span) // stride + 1, (w - span) // stride + 1
    if oh < 1 or ow < 1:
        return x
    inputs = [x, b.weight((out_c, c // group, k, k))]
    if draw(st.booleans()):
        inputs.append(b.weight((out_c,)))
    return b.node("Conv", inputs, (n, out_c, oh, ow), **attrs)


def _linear(b: _Builder, x: str) -> str:
    draw = b.draw
    shape = b.shapes[x]
    k = shape[-1]
    n_out = draw(st.integers(1, 24))
    if len(shape) == 2 and draw(st.booleans()):
        trans_b = draw(st.booleans())
        attrs = {}
        if trans_b:
            attrs["transB"] = 1
        alpha = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0]))
        if alpha != 1.0:
            attrs["alpha"] = alpha
        inputs = [x, b.weight((n_out, k) if trans_b else (k, n_out))]
        if draw(st.booleans()):
            bias_shape = draw(st.sampled_from([(n_out,), (1, n_out)]))
            inputs.append(b.weight(bias_shape))
            beta = draw(st.sampled_from([1.0, 0.5]))
            if beta != 1.0:
                attrs["beta"] = beta
        return b.node("Gemm", inputs, (shape[0], n_out), **attrs)
    return b.node("MatMul", [x, b.weight((k, n_out))], shape[:-1] + (n_out,))


def _step(b: _Builder, current: str, conv: bool) -> str:
    draw = b.draw
    op = draw(st.sampled_from(["layer", "layer", "Relu", "Add", "Concat", "branch"]))
    if op == "layer":
        return _conv(b, current) if conv else _linear(b, current)
    if op == "Relu":
        return b.node("Relu", [current], b.shapes[current])
    if op == "Add":
        partner = draw(st.sampled_from(b.same_shape(b.shapes[current])))
        return b.node("Add", [current, partner], b.shapes[current])
    if op == "Concat":
        axis = 1 if conv else len(b.shapes[current]) - 1
        shape = b.shapes[current]
        partners = [n for n, s in b.shapes.items()
                    if len(s) == len(shape) and all(s[i] == shape[i] for i in range(len(s)) if i != axis)]
        partner = draw(st.sampled_from(partners))
        out_shape = tuple(shape[i] + b.shapes[partner][i] if i == axis else shape[i] for i in range(len(shape)))
        return b.node("Concat", [current, partner], out_shape, axis=axis)
    # a branch: two layers from the same tensor, joined by Add when their shapes agree
    left = _conv(b, current) if conv else _linear(b, current)
    right = _conv(b, current) if conv else _linear(b, current)
    if b.shapes[left] == b.shapes[right] and left != right:
        return b.node("Add", [left, right], b.shapes[left])
    return left


@st.composite
def graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    b = _Builder(draw, rng)
    conv = draw(st.booleans())
    if conv:
        shape = (2, draw(st.sampled_from([1, 2, 4, 8])), draw(st.integers(3, 9)), draw(st.integers(3, 9)))
        dims = ["N", shape[1], "H", "W"] if draw(st.booleans()) else ["N", *shape[1:]]
    else:
        rank = draw(st.sampled_from([2, 3]))
        shape = (2, 3, draw(st.integers(1, 24)))[-rank:] if rank == 3 else (2, draw(st.integers(1, 24)))
        dims = ["N", "T", shape[-1]] if rank == 3 else ["N", shape[-1]]
    b.shapes["x"] = shape
    current = "x"
    for _ in range(draw(st.integers(1, 6))):
        current = _step(b, current, conv)
    outputs = [current]
    if draw(st.booleans()):  # a second output from the middle of the graph
        middle = [n for n in b.shapes if n not in ("x", current)]
        if middle:
            outputs.append(draw(st.sampled_from(middle)))
    graph = helper.make_graph(
        b.nodes, "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [f"{o}_{i}" for i in range(len(b.shapes[o]))])
         for o in outputs],
        b.inits,
    )
    opset = draw(st.sampled_from([13, 17]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, shape


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(graphs())
def test_random_graph_compresses_or_skips_cleanly(tmp_path_factory, case):
    model, shape = case
    onnx.checker.check_model(model, full_check=True)
    d = tmp_path_factory.mktemp("g")
    src, out = d / "in.onnx", d / "out.onnx"
    onnx.save(model, src)
    try:
        _, report = onnxlr.compress_file(src, out, rank="1.0", force=True, round_to=1)
    except OnnxlrError as exc:  # a clean refusal is allowed; say what it was
        event(f"refused: {str(exc)[:60]}")
        assert "\n" not in str(exc)
        assert not out.exists()
        return
    for layer in report.layers:
        assert layer.skipped is None or isinstance(layer.skipped, str) and layer.skipped
        event(f"{layer.op_type} " + ("replaced" if layer.skipped is None else f"skipped: {layer.skipped[:40]}"))
    result = verify(src, out, shapes={"x": shape}, samples=2, max_rel_error=1e-4)
    assert result, result.to_table()
