"""Find the layers that can be factorized, and say why each other candidate cannot.

A target is a Conv, Gemm or MatMul (in the main graph or any If/Loop/Scan body) whose weight is a
constant only it reads. Everything else that looks like a heavy layer is recorded with the reason
it was left alone: quantized ops, weights that are graph inputs, weights computed by other nodes,
shared weights, depthwise convs, unsupported dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxlr.layers import (
    ConvLayer,
    LinearLayer,
    Replacement,
    chain_conv_macs,
    conv_macs,
    linear_macs,
)
from onnxlr.model.query import ConstantSource, constants_in, count_uses

FACTORIZABLE_OPS = ("Conv", "Gemm", "MatMul")
# Spatial size assumed per axis when neither shape inference nor a run can tell, only to decide
# whether a replacement reduces MACs (the ratio barely depends on it); reports show unknown MACs as null.
NOMINAL_SPATIAL = 16
QUANTIZED_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class GemmAttrs:
    trans_a: int = 0
    alpha: float = 1.0
    beta: float = 1.0
    bias: str | None = None  # the name of C, kept as it is


@dataclass
class Target:
    """One candidate layer: where it is, its weight, and either a plain layer or a skip reason."""

    name: str
    op_type: str
    graph: onnx.GraphProto
    node: onnx.NodeProto
    weight_shape: tuple[int, ...] = ()
    layer: ConvLayer | LinearLayer | None = None
    weight: ConstantSource | None = None
    weight_dtype: int = onnx.TensorProto.FLOAT
    gemm: GemmAttrs | None = None
    # A Transpose that turns a constant into this layer's weight (old PyTorch exports of a
    # bias-free Linear): read through, and removed together with the layer.
    weight_transpose: onnx.NodeProto | None = None
    skip: str | None = None
    # shapes for MAC counting, per sample; None where unknown
    in_spatial: tuple[int | None, ...] | None = None
    out_spatial: tuple[int | None, ...] | None = None
    rows: int | None = None  # linear layers: rows of x per sample
    notes: list[str] = field(default_factory=list)


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def find_targets(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> list[Target]:
    """Every Conv/Gemm/MatMul and quantized layer of the model, in graph order, subgraphs too."""
    uses = count_uses(model.graph)
    found: list[Target] = []
    counter = [0]

    def walk(graph: onnx.GraphProto, visible: dict[str, ConstantSource], producers: dict[str, onnx.NodeProto]):
        scope = dict(visible)
        scope.update(constants_in(graph))
        local_producers = dict(producers)
        real_inputs = {vi.name for vi in graph.input}
        for node in graph.node:
            for out in node.output:
                local_producers[out] = node
        for node in graph.node:
            counter[0] += 1
            if node.domain in ("", "ai.onnx") and node.op_type in FACTORIZABLE_OPS:
                found.append(_read_target(model, graph, node, counter[0], scope, local_producers, real_inputs, uses, shapes))
            elif node.op_type in QUANTIZED_OPS:
                found.append(
                    Target(
                        node_label(node, counter[0]),
                        node.op_type,
                        graph,
                        node,
                        skip=f"quantized layer ({node.op_type}): integer weights are not factorized",
                    )
                )
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    walk(sub, scope, local_producers)

    walk(model.graph, {}, {})
    return found


def _read_target(model, graph, node, index, scope, producers, real_inputs, uses, shapes) -> Target:
    target = Target(node_label(node, index), node.op_type, graph, node)
    weight_index = 1
    if node.op_type == "MatMul" and node.input[0] in scope and node.input[1] not in scope:
        target.skip = "the constant is the first input of MatMul (x @ W with W constant is supported)"
        return target
    weight_name = node.input[weight_index] if len(node.input) > weight_index else ""
    transpose = _constant_transpose(graph, node, weight_name, scope, producers, uses)
    if transpose is not None:
        target.weight_transpose = transpose
        weight_name = transpose.input[0]
    reason = _weight_problem(model, weight_name, scope, producers, real_inputs, uses)
    source = scope.get(weight_name)
    if source is not None:
        target.weight_dtype = source.dtype
        dims = source.initializer.dims if source.initializer is not None else source.constant_node.attribute[0].t.dims
        target.weight_shape = tuple(int(d) for d in dims)
        if transpose is not None:
            target.weight_shape = target.weight_shape[::-1]
    if reason:
        target.skip = reason
        return target
    if target.weight_dtype not in FLOAT_TYPES:
        target.skip = f"weight dtype {helper.tensor_dtype_to_string(target.weight_dtype)} is not a float type"
        return target
    target.weight = source
    reader = {"Conv": _read_conv, "Gemm": _read_gemm, "MatMul": _read_matmul}[node.op_type]
    array = source.to_array()
    reader(target, array.T if transpose is not None else array, shapes)
    return target


def _constant_transpose(graph, node, name, scope, producers, uses) -> onnx.NodeProto | None:
    """The Transpose in ``graph`` that makes a 2-D constant into ``node``'s weight, read by
    ``node`` alone; None when the weight is anything else."""
    producer = producers.get(name)
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    if node.op_type not in ("Gemm", "MatMul") or uses.get(name, 0) != 1:
        return None
    if not any(n is producer for n in graph.node) or producer.input[0] not in scope:
        return None
    source = scope[producer.input[0]]
    dims = source.initializer.dims if source.initializer is not None else source.constant_node.attribute[0].t.dims
    perm = _attr(producer, "perm", None)
    if len(dims) != 2 or (perm is not None and list(perm) != [1, 0]):
        return None
    return producer


def _weight_problem(model, name, scope, producers, real_inputs, uses) -> str | None:
    if not name:
        return "the layer has no weight input"
    source = scope.get(name)
    if source is None:
        producer = producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "quantized weight (behind DequantizeLinear): not factorized"
        if producer is not None:
            return f"weight is computed by a {producer.op_type} node, not a constant"
        if name in real_inputs or any(vi.name == name for vi in model.graph.input):
            return "weight is a graph input (fed at run time), not a constant"
        return "weight is not a constant of this model"
    if source.is_graph_input and model.ir_version >= 4:
        return "weight is an initializer that is also a graph input, so callers may override it"
    if uses.get(name, 0) > 1:
        return f"weight is shared by {uses[name]} consumers; factorizing it for one would change the others"
    return None


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _spatial(shape: list[int | None] | None, start: int) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    return tuple(shape[start:])


def _read_conv(target: Target, weight: np.ndarray, shapes) -> None:
    node = target.node
    if weight.ndim < 3:
        target.skip = f"conv weight has rank {weight.ndim}; expected [T, S/group, *kernel]"
        return
    d = weight.ndim - 2
    group = int(_attr(node, "group", 1))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = tuple(int(p) for p in _attr(node, "pads", [0] * (2 * d)))
    if auto_pad != "NOTSET":
        pads = (0,) * (2 * d)
    layer = ConvLayer(
        weight=weight,
        bias=None,
        group=group,
        strides=tuple(int(s) for s in _attr(node, "strides", [1] * d)),
        dilations=tuple(int(s) for s in _attr(node, "dilations", [1] * d)),
        pads=pads,
        auto_pad=auto_pad,
    )
    if weight.shape[0] % group:
        target.skip = f"output channels {weight.shape[0]} are not divisible by group {group}"
        return
    target.layer = layer  # kept for MAC counts even when skipped below
    target.in_spatial = _spatial(shapes.get(node.input[0]), 2)
    target.out_spatial = _spatial(shapes.get(node.output[0]), 2)
    if target.in_spatial is not None and len(target.in_spatial) != d:
        target.in_spatial = None
    if target.out_spatial is not None and len(target.out_spatial) != d:
        target.out_spatial = None
    if layer.is_depthwise:
        target.skip = "depthwise conv (group == input channels): each filter is already rank 1 in channels"


def _rows_per_sample(shape: list[int | None] | None) -> int | None:
    """Rows of x per sample for x @ W: all dims but the first (batch) and the last."""
    if shape is None or len(shape) < 2:
        return None
    if len(shape) == 2:
        return 1
    middle = shape[1:-1]
    return None if any(m is None for m in middle) else math.prod(middle)


def _read_gemm(target: Target, weight: np.ndarray, shapes) -> None:
    node = target.node
    if weight.ndim != 2:
        target.skip = f"Gemm weight has rank {weight.ndim}; expected 2"
        return
    trans_b = int(_attr(node, "transB", 0))
    alpha = float(_attr(node, "alpha", 1.0))
    matrix = weight.T if trans_b else weight
    target.gemm = GemmAttrs(
        trans_a=int(_attr(node, "transA", 0)),
        alpha=alpha,
        beta=float(_attr(node, "beta", 1.0)),
        bias=node.input[2] if len(node.input) > 2 and node.input[2] else None,
    )
    target.layer = LinearLayer(weight=_as_linear_weight(matrix, alpha))
    target.rows = 1


def _read_matmul(target: Target, weight: np.ndarray, shapes) -> None:
    if weight.ndim != 2:
        target.skip = f"MatMul weight has rank {weight.ndim}; only 2-D weights are factorized"
        return
    target.layer = LinearLayer(weight=_as_linear_weight(weight, 1.0))
    target.rows = _rows_per_sample(shapes.get(target.node.input[0]))


def _as_linear_weight(matrix: np.ndarray, alpha: float) -> np.ndarray:
    """float32 weights stay float32 (the SVD accumulates in float64 block by block), so holding
    every target's weight costs one copy of the model, not two; others become float64."""
    if alpha == 1.0 and matrix.dtype == np.float32:
        return matrix
    return np.asarray(matrix, dtype=np.float64) * alpha


def fill_runtime_shapes(model: onnx.ModelProto, targets: list[Target], feed: dict | None = None) -> None:
    """Size the main-graph layers that shape inference could not, from one onnxruntime run on
    ``feed`` (a real sample, or one at --shape shapes), else on zeros where only batch is dynamic."""
    from onnxlr.model.query import runtime_shapes

    unsized = [
        t for t in targets
        if t.layer is not None and t.graph is model.graph
        and (t.rows is None if isinstance(t.layer, LinearLayer)
             else t.out_spatial is None or None in t.out_spatial or t.in_spatial is None or None in t.in_spatial)
    ]
    wanted = {}
    for t in unsized:
        wanted[t.node.input[0]] = t.weight_dtype
        wanted[t.node.output[0]] = t.weight_dtype
    shapes = runtime_shapes(model, wanted, feed)
    for t in unsized:
        x, y = shapes.get(t.node.input[0]), shapes.get(t.node.output[0])
        if x is None or y is None:
            continue
        if isinstance(t.layer, LinearLayer):
            t.rows = _rows_per_sample(x)
        elif len(x) == len(y) == t.layer.spatial_rank + 2:
            t.in_spatial, t.out_spatial = tuple(x[2:]), tuple(y[2:])


def layer_macs(target: Target, replacement: Replacement, nominal: bool = False) -> tuple[int | None, int | None]:
    """(before, after) MACs per sample; ``nominal`` fills unknown sizes with a stand-in."""
    layer = target.layer
    if isinstance(layer, ConvLayer):
        out_spatial, in_spatial = target.out_spatial, target.in_spatial
        if nominal and (out_spatial is None or None in out_spatial or in_spatial is None or None in in_spatial):
            out_spatial = (NOMINAL_SPATIAL,) * layer.spatial_rank
            in_spatial = tuple(NOMINAL_SPATIAL * s for s in layer.strides)
            before = conv_macs(layer.weight.shape, layer.group, out_spatial)
            return before, chain_conv_macs(replacement.steps, in_spatial, None)
        before = conv_macs(layer.weight.shape, layer.group, out_spatial)
        after = chain_conv_macs(replacement.steps, in_spatial, out_spatial) if before is not None else None
        return before, after
    rows = target.rows if target.rows is not None or not nominal else 1
    weights = [step.weight for step in replacement.steps]
    return linear_macs([layer.weight], rows), linear_macs(weights, rows)
