"""Turn a replacement chain (plain steps) into nodes and splice it in place of the layer.

The last node of every chain writes the replaced node's output tensor, so downstream nodes and
per-layer comparisons keep working. New names derive from the replaced node's name. Nodes are
valid at the model's own opset: Gemm before opset 11 needs its C input, before opset 7 its
broadcast attribute.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxlr.graph import NameScope, make_initializer, remove_unused_constants, replace_node
from onnxlr.layers import ConvStep, LinearStep, Replacement
from onnxlr.targets import Target


def splice(target: Target, replacement: Replacement, names: NameScope, opset: int, ir_version: int) -> list[str]:
    """Replace ``target.node`` by the chain; returns the names of the new nodes."""
    node = target.node
    stem = target.name
    if target.op_type == "Conv":
        nodes, inits = _conv_nodes(node, replacement.steps, target.weight_dtype, names, stem)
    else:
        nodes, inits = _linear_nodes(target, replacement.steps, names, stem, opset)
    replace_node(target.graph, node, nodes, inits, ir_version)
    transpose = target.weight_transpose
    if transpose is not None:  # it fed the old weight only: drop it and its constant
        graph = target.graph
        del graph.node[next(i for i, n in enumerate(graph.node) if n is transpose)]
        remove_unused_constants(graph, [transpose.input[0], transpose.output[0]])
    return [n.name for n in nodes]


def _conv_nodes(node, steps: list[ConvStep], dtype: int, names: NameScope, stem: str):
    nodes, inits = [], []
    current = node.input[0]
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        weight_name = names(f"{stem}_lr{i}_weight")
        inits.append(make_initializer(weight_name, step.weight, dtype))
        inputs = [current, weight_name]
        if last and bias_name:
            inputs.append(bias_name)
        output = node.output[0] if last else names(f"{stem}_lr{i}_out")
        attrs = {"kernel_shape": list(step.weight.shape[2:])}
        if step.group != 1:
            attrs["group"] = step.group
        if step.strides and any(s != 1 for s in step.strides):
            attrs["strides"] = list(step.strides)
        if step.dilations and any(s != 1 for s in step.dilations):
            attrs["dilations"] = list(step.dilations)
        if step.auto_pad != "NOTSET":
            attrs["auto_pad"] = step.auto_pad
        elif step.pads and any(step.pads):
            attrs["pads"] = list(step.pads)
        nodes.append(helper.make_node("Conv", inputs, [output], name=names(f"{stem}_lr{i}"), **attrs))
        current = output
    return nodes, inits


def _linear_nodes(target: Target, steps: list[LinearStep], names: NameScope, stem: str, opset: int):
    node = target.node
    dtype = target.weight_dtype
    first, second = steps
    w1, w2 = names(f"{stem}_lr0_weight"), names(f"{stem}_lr1_weight")
    inits = [make_initializer(w1, first.weight, dtype), make_initializer(w2, second.weight, dtype)]
    hidden = names(f"{stem}_lr0_out")
    nodes = []
    x = node.input[0]
    gemm = target.gemm
    if gemm is not None and gemm.trans_a:
        if opset >= 11:
            nodes.append(helper.make_node("Gemm", [x, w1], [hidden], name=names(f"{stem}_lr0"), transA=1))
        else:
            transposed = names(f"{stem}_lr0_xT")
            nodes.append(helper.make_node("Transpose", [x], [transposed], name=names(f"{stem}_lr0_T"), perm=[1, 0]))
            nodes.append(helper.make_node("MatMul", [transposed, w1], [hidden], name=names(f"{stem}_lr0")))
    else:
        nodes.append(helper.make_node("MatMul", [x, w1], [hidden], name=names(f"{stem}_lr0")))
    if gemm is not None and gemm.bias is not None:
        attrs = {"beta": gemm.beta}
        broadcast = [a for a in node.attribute if a.name == "broadcast"]
        second_node = helper.make_node(
            "Gemm", [hidden, w2, gemm.bias], [node.output[0]], name=names(f"{stem}_lr1"), **attrs
        )
        second_node.attribute.extend(broadcast)
        nodes.append(second_node)
    else:
        nodes.append(helper.make_node("MatMul", [hidden, w2], [node.output[0]], name=names(f"{stem}_lr1")))
    return nodes, inits


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1
