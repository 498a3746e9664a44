"""Turn a replacement chain (plain steps) into nodes and splice it in place of the layer; biases.

The last node of every chain writes the replaced node's output tensor, so downstream nodes and
per-layer comparisons keep working. New names derive from the replaced node's name. Nodes are
valid at the model's own opset: Gemm before opset 11 needs its C input, before opset 7 its
broadcast attribute.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxlr.layers import ConvStep, LinearStep, Replacement
from onnxlr.model.edit import make_initializer, remove_unused_constants, replace_node, store_weights
from onnxlr.model.query import NameScope, constants_in, count_uses
from onnxlr.model.targets import Target


def splice(target: Target, replacement: Replacement, names: NameScope, opset: int, ir_version: int,
           weights_file: str | None = None) -> list[str]:
    """Replace ``target.node`` by the chain; returns the names of the new nodes. A refitted
    ``replacement.bias`` is written too (see :func:`write_bias`). ``weights_file``: the chain's
    big weights go there as external data instead of into the model's memory."""
    node = target.node
    n_out = int(target.weight_shape[-1]) if target.weight_shape else None
    add = following_add(target, n_out) if target.op_type == "MatMul" and replacement.bias is not None else None
    stem = target.name
    if target.op_type == "Conv":
        nodes, inits = _conv_nodes(node, replacement.steps, target.weight_dtype, names, stem)
    else:
        nodes, inits = _linear_nodes(target, replacement.steps, names, stem, opset)
    if weights_file is not None:
        store_weights(inits, weights_file)
    replace_node(target.graph, node, nodes, inits, ir_version)
    transpose = target.weight_transpose
    if transpose is not None:  # it fed the old weight only: drop it and its constant
        graph = target.graph
        del graph.node[next(i for i, n in enumerate(graph.node) if n is transpose)]
        remove_unused_constants(graph, [transpose.input[0], transpose.output[0]])
    if replacement.bias is not None:  # the graph holds copies of the new nodes: find the last one
        last = next(n for n in target.graph.node if n.name == nodes[-1].name)
        write_bias(target, last, replacement.bias, names, add)
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


# --- biases ---------------------------------------------------------------------------------


def read_bias(target: Target) -> tuple[np.ndarray | None, bool]:
    """(the layer's effective bias [T] or None, whether a new bias can be written)."""
    node = target.node
    constants = constants_in(target.graph)
    if target.op_type == "Conv":
        if len(node.input) > 2 and node.input[2]:
            source = constants.get(node.input[2])
            if source is None:
                return None, False
            return np.asarray(source.to_array(), dtype=np.float64).reshape(-1), True
        return None, True
    if target.gemm is not None and target.gemm.bias is not None:
        source = constants.get(target.gemm.bias)
        n_out = target.layer.weight.shape[1]
        if source is None:
            return None, False
        c = np.asarray(source.to_array(), dtype=np.float64)
        if c.size == 1:
            c = np.full(n_out, float(c.reshape(-1)[0]))
        elif c.shape not in ((n_out,), (1, n_out)):
            return None, False
        return target.gemm.beta * c.reshape(-1), target.gemm.beta != 0
    if target.op_type == "MatMul":  # x @ W followed by Add(bias): the Add's constant is the bias
        found = following_add(target, target.layer.weight.shape[1])
        if found is not None:
            return found[1], True
    return None, False


def following_add(target: Target, n_out: int):
    """(Add node, its constant [n_out] as float64, index of the constant input) when the MatMul's
    only consumer adds a 1-D constant of ``n_out`` values that nothing else reads; else None.
    ``n_out`` is passed in: after splicing, ``target.layer`` has been freed."""
    graph, out = target.graph, target.node.output[0]
    consumers = [n for n in graph.node if out in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "Add" or any(o.name == out for o in graph.output):
        return None
    add = consumers[0]
    other = 1 if add.input[0] == out else 0
    constants = constants_in(graph)
    source = constants.get(add.input[other])
    if source is None or count_uses(graph).get(add.input[other], 0) != 1:
        return None
    value = np.asarray(source.to_array(), dtype=np.float64)
    if value.shape != (n_out,):
        return None
    return add, value, other


def write_bias(target: Target, last, bias: np.ndarray, names: NameScope, add=None) -> None:
    """Give the chain a refitted bias: the last Conv's B, the last Gemm's C (divided by beta), or
    the constant of the Add that follows a MatMul (``add``: :func:`following_add` before the
    splice)."""
    graph = target.graph
    name = names(f"{target.name}_lr_bias")
    if target.op_type == "MatMul":
        if add is None:
            return
        add_node, _, other = add
        graph.initializer.append(make_initializer(name, bias.reshape(-1), target.weight_dtype))
        old = add_node.input[other]
        add_node.input[other] = name
        remove_unused_constants(graph, [old])
        return
    value = bias if target.op_type == "Conv" else bias / target.gemm.beta
    graph.initializer.append(make_initializer(name, value.reshape(-1), target.weight_dtype))
    old = last.input[2] if len(last.input) > 2 else None
    if len(last.input) > 2:
        last.input[2] = name
    else:
        last.input.append(name)
    if old:
        remove_unused_constants(graph, [old])
