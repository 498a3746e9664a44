"""Edits of a model in place: replace a node by a chain, expose tensors as outputs, fold constant
weights, drop what nothing reads.

Edits work on the ModelProto directly: the replaced node is swapped for its chain at the same
position in its graph's node list (so topological order holds), new weights become initializers
of that graph, and weights nobody uses any more are dropped. Everything not touched stays exactly
as it was: IR version, opset imports, metadata_props, doc strings, value_info, initializers listed
as inputs (IR < 4), and subgraphs.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlr.model.io import (
    BIG_INITIALIZER,
    DATA_FIELDS,
    append_aligned,
    refer_external,
    tensor_bytes,
    tensor_to_array,
)
from onnxlr.model.query import (
    NameScope,
    all_names,
    constants_in,
    count_uses,
    expose_outputs,
    iter_graphs,
)

# Ops whose result on constants is exact (data movement, fills, dtype casts): evaluating them with
# onnx.reference gives bit for bit what onnxruntime would compute. Arithmetic is left alone.
EXACT_FOLD_OPS = frozenset({
    "Cast", "Concat", "Constant", "ConstantOfShape", "Expand", "Flatten", "Gather", "Identity",
    "Reshape", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze",
})
_LAYER_OPS = ("Conv", "Gemm", "MatMul")


def fold_constant_weights(model: onnx.ModelProto) -> list[str]:
    """Turn each layer weight that exact ops compute from constants into an initializer.

    Only the weight input (input 1) of Conv/Gemm/MatMul nodes is considered, only when it is read
    by that node alone, and only when every node on the way is in ``EXACT_FOLD_OPS``. The folded
    value gets a fresh initializer name, the layer reads it, and the nodes and constants nothing
    reads any more are removed. Nothing else changes: metadata, IR version, opsets, other names.
    A single Transpose of a constant is left for the layer readers (they read through it).
    Returns one note per folded weight.
    """
    notes: list[str] = []
    names = NameScope(all_names(model))
    for graph in iter_graphs(model.graph):
        uses = count_uses(graph)
        constants = {n for n, c in constants_in(graph).items() if not (c.is_graph_input and model.ir_version >= 4)}
        producers = {out: node for node in graph.node for out in node.output if out}
        for node in list(graph.node):
            if node.op_type not in _LAYER_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            weight = node.input[1]
            if weight in constants or weight not in producers or uses.get(weight, 0) != 1:
                continue
            chain = _constant_chain(weight, producers, constants)
            if chain is None or (len(chain) == 1 and chain[0].op_type == "Transpose"):
                continue
            value = _evaluate(model, graph, chain, weight)
            if value is None:
                continue
            folded = names(f"{weight}_folded")
            graph.initializer.append(numpy_helper.from_array(value, folded))
            if model.ir_version < 4:
                graph.input.append(onnx.helper.make_tensor_value_info(folded, graph.initializer[-1].data_type, value.shape))
            node.input[1] = folded
            ops = sorted({n.op_type for n in chain if n.op_type != "Constant"}) or ["Constant"]
            notes.append(
                f"folded the weight of {node.name or node.op_type} (computed by {', '.join(ops)} "
                f"from constants) into initializer {folded}"
            )
            _remove_dead(graph, chain)
            uses = count_uses(graph)
            producers = {out: n for n in graph.node for out in n.output if out}
    return notes


def _constant_chain(name: str, producers, constants) -> list[onnx.NodeProto] | None:
    """The nodes computing ``name`` from constants only, in graph order; None if any input is not
    a constant or any node is not exact."""
    chain: dict[int, onnx.NodeProto] = {}
    stack = [name]
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in constants and producers.get(tensor) is None:
            continue
        node = producers.get(tensor)
        if node is None:
            return None  # a graph input, or a name from an outer scope
        if id(node) in chain:
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in EXACT_FOLD_OPS:
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        chain[id(node)] = node
        stack.extend(node.input)
    return list(chain.values())


def _evaluate(model, graph, chain, output: str) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    order = {id(n): i for i, n in enumerate(graph.node)}
    nodes = sorted(chain, key=lambda n: order[id(n)])
    needed = {i for n in nodes for i in n.input if i}
    inits = [
        numpy_helper.from_array(tensor_to_array(t), t.name) if t.data_location == onnx.TensorProto.EXTERNAL else t
        for t in graph.initializer
        if t.name in needed
    ]
    const_nodes = [n for n in graph.node if n.op_type == "Constant" and n.output[0] in needed and id(n) not in chain]
    mini = onnx.helper.make_model(
        onnx.helper.make_graph(
            const_nodes + nodes, "fold", [], [onnx.helper.make_empty_tensor_value_info(output)], inits
        ),
        opset_imports=list(model.opset_import),
    )
    mini.ir_version = model.ir_version
    try:
        (value,) = ReferenceEvaluator(mini).run(None, {})
    except Exception:  # noqa: BLE001 -- anything odd: leave the graph alone
        return None
    return np.asarray(value)


def _remove_dead(graph: onnx.GraphProto, candidates: list[onnx.NodeProto]) -> None:
    """Remove nodes of ``candidates`` whose outputs nothing reads, then unused constants."""
    removed_inputs: list[str] = []
    changed = True
    while changed:
        changed = False
        uses = count_uses(graph)
        for i in reversed(range(len(graph.node))):
            n = graph.node[i]
            if any(n is c for c in candidates) and all(uses.get(o, 0) == 0 for o in n.output if o):
                removed_inputs.extend(n.input)
                del graph.node[i]
                changed = True
    remove_unused_constants(graph, removed_inputs)


# --- splicing -------------------------------------------------------------------------------


def replace_node(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    new_nodes: list[onnx.NodeProto],
    new_initializers: list[onnx.TensorProto],
    ir_version: int,
) -> None:
    """Swap ``node`` for ``new_nodes`` at its position; add the new weights to ``graph``."""
    index = next(i for i, n in enumerate(graph.node) if n is node)
    old_inputs = [name for name in node.input if name]
    del graph.node[index]
    for offset, new in enumerate(new_nodes):
        graph.node.insert(index + offset, new)
    graph.initializer.extend(new_initializers)
    if ir_version < 4:
        # IR < 4 requires every initializer to be declared as a graph input.
        graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_initializers
        )
    remove_unused_constants(graph, old_inputs)


def remove_unused_constants(graph: onnx.GraphProto, candidates: list[str]) -> None:
    """Drop initializers / Constant nodes among ``candidates`` that nothing reads any more."""
    uses = count_uses(graph)
    dead = {name for name in candidates if uses.get(name, 0) == 0}
    if not dead:
        return
    # Delete in place, by index: rebuilding a repeated field would copy every remaining tensor
    # (and with the upb protobuf backend the arena never gives that memory back).
    removed = False
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in dead:
            del graph.initializer[i]
            removed = True
    if removed:
        for i in reversed(range(len(graph.input))):
            if graph.input[i].name in dead:
                del graph.input[i]
    for i in reversed(range(len(graph.node))):
        n = graph.node[i]
        if n.op_type == "Constant" and n.output[0] in dead:
            del graph.node[i]
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name in dead:
            del graph.value_info[i]


def make_initializer(name: str, array: np.ndarray, onnx_dtype: int) -> onnx.TensorProto:
    """A weight in the model's own dtype (factors are computed in float64)."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_dtype)
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np_dtype), name=name)



def prune_to_outputs(model: onnx.ModelProto, tensors: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose only outputs are ``tensors`` (name -> element type, as for
    :func:`expose_outputs`) and whose main graph keeps only the nodes they need: a prefix of the
    model, which onnxruntime runs in a fraction of the whole model's time (it does not prune an
    unneeded tail by itself). Graph inputs stay declared, used or not, so every feed still fits.
    Only the initializers the prefix reads are copied (a big model is never copied whole)."""
    copy = expose_outputs(copy_without_initializers(model), tensors)
    graph = copy.graph
    kept_outputs = [o for o in graph.output if o.name in tensors]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    needed, stack = set(), list(tensors)
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in needed:
            continue
        needed.add(index)
        stack.extend(_reads(graph.node[index]))
    for i in reversed(range(len(graph.node))):
        if i not in needed:
            del graph.node[i]
    reads = {name for node in graph.node for name in _reads(node)} | set(tensors)
    graph.initializer.extend(t for t in model.graph.initializer if t.name in reads)
    remove_unused_constants(graph, [t.name for t in graph.initializer])  # graph inputs stay
    return copy


def copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph has no initializers (everything else is copied)."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip=("graph",))
    copy_fields(model.graph, copy.graph, skip=("initializer",))
    return copy


def detach_weights(model: onnx.ModelProto, location: str | os.PathLike) -> onnx.ModelProto:
    """A copy of ``model`` whose big in-memory initializers live in the file ``location`` (an
    absolute path, written here) as external data, read back memory-mapped (a lazily loaded model,
    see onnxlr.model.io.load_model): ``model`` can then be freed. Tensors already external are
    referred to where they are. The caller removes the file once nothing refers to it."""
    location = str(location)
    copy = copy_without_initializers(model)
    with open(location, "wb") as f:
        for tensor in model.graph.initializer:
            new = copy.graph.initializer.add()
            if not _stored_apart(tensor):
                new.CopyFrom(tensor)
                continue
            copy_fields(tensor, new, skip=DATA_FIELDS)
            refer_external(new, location, *append_aligned(f, tensor_bytes(tensor)))
    return copy


def store_weights(tensors: list[onnx.TensorProto], location: str | os.PathLike) -> None:
    """Move the big in-memory data of ``tensors`` (new ones, not yet in a model: a protobuf keeps
    a cleared field's memory as long as it lives) to the end of the file ``location``, as
    external data (see :func:`detach_weights`)."""
    location = str(location)
    with open(location, "ab") as f:
        for tensor in tensors:
            if _stored_apart(tensor):
                refer_external(tensor, location, *append_aligned(f, tensor_bytes(tensor)))


def _stored_apart(tensor: onnx.TensorProto) -> bool:
    """Whether a weights file takes ``tensor``: big, in memory, not strings."""
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() >= BIG_INITIALIZER
            and tensor.data_type != onnx.TensorProto.STRING)


def copy_fields(source, target, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of protobuf message ``source`` into ``target`` except ``skip``."""
    for fd, value in source.ListFields():
        if fd.name in skip:
            continue
        repeated = getattr(fd, "is_repeated", None)
        if repeated is None:  # protobuf before 5.28
            repeated = fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(target, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(target, fd.name).CopyFrom(value)
        else:
            setattr(target, fd.name, value)


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and, for If/Loop/Scan, what its bodies read from the
    enclosing scope."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            inner = {o for n in body.node for o in n.output} | {i.name for i in body.input} | {
                t.name for t in body.initializer}
            for n in body.node:
                names.extend(name for name in _reads(n) if name not in inner)
    return names
