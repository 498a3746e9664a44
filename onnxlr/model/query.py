"""Read-only queries on a model: graphs and subgraphs, constants, uses, names, shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxlr.model.io import BIG_TENSOR_BYTES, has_lazy_tensors, iter_graphs, tensor_to_array

# Models above this size are not run by runtime_shapes (MACs then stay unknown where inference stops).
RUNTIME_SHAPES_MAX_BYTES = 256 * 2**20

def _is_repeated(descriptor) -> bool:
    repeated = getattr(descriptor, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return descriptor.label == descriptor.LABEL_REPEATED


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose big main-graph initializers keep their name, dtype and dims but
    no data: enough for shape inference, without copying the weights.

    (Clearing and restoring ``raw_data`` in place would not do: with the upb protobuf backend the
    model's arena keeps every byte ever assigned, so each restore grows it by the model's size.)
    """
    skel = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            if _is_repeated(descriptor):
                getattr(skel, descriptor.name).extend(value)
            elif descriptor.message_type is not None:
                getattr(skel, descriptor.name).CopyFrom(value)
            else:
                setattr(skel, descriptor.name, value)
    graph = model.graph
    for descriptor, value in graph.ListFields():
        if descriptor.name == "initializer":
            continue
        if _is_repeated(descriptor):
            getattr(skel.graph, descriptor.name).extend(value)
        else:
            setattr(skel.graph, descriptor.name, value)
    for tensor in graph.initializer:
        if tensor.ByteSize() > BIG_TENSOR_BYTES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            skel.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            skel.graph.initializer.add().CopyFrom(tensor)
    return skel



def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static shapes of every tensor we can infer: name -> dims (None where unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 -- shapes are a nicety: without them MACs are unknown
        return {}
    shapes: dict[str, list[int | None]] = {}
    for graph in iter_graphs(inferred.graph):
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                shapes[vi.name] = dims
        for init in graph.initializer:
            shapes[init.name] = list(init.dims)
    return shapes


# --- constants ------------------------------------------------------------------------------


@dataclass
class ConstantSource:
    """Where a constant tensor lives: an initializer or a Constant node of some graph."""

    graph: onnx.GraphProto
    initializer: onnx.TensorProto | None = None
    constant_node: onnx.NodeProto | None = None
    is_graph_input: bool = False  # also listed in graph.input

    def to_array(self) -> np.ndarray:
        if self.initializer is not None:
            return tensor_to_array(self.initializer)
        attr = self.constant_node.attribute[0]
        if attr.name == "value":
            return tensor_to_array(attr.t)
        return onnx.helper.get_attribute_value(attr) and np.asarray(onnx.helper.get_attribute_value(attr))

    @property
    def dtype(self) -> int:
        if self.initializer is not None:
            return self.initializer.data_type
        attr = self.constant_node.attribute[0]
        return attr.t.data_type if attr.name == "value" else onnx.TensorProto.FLOAT


def constants_in(graph: onnx.GraphProto) -> dict[str, ConstantSource]:
    """Constant tensors defined directly in ``graph`` (not its subgraphs)."""
    input_names = {vi.name for vi in graph.input}
    found = {
        init.name: ConstantSource(graph, initializer=init, is_graph_input=init.name in input_names)
        for init in graph.initializer
    }
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
        ):
            found[node.output[0]] = ConstantSource(graph, constant_node=node)
    return found


def count_uses(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs (in this graph and its subgraphs) and graph outputs read each name."""
    uses: dict[str, int] = {}
    for g in iter_graphs(graph):
        for node in g.node:
            for name in node.input:
                if name:
                    uses[name] = uses.get(name, 0) + 1
        for out in g.output:
            uses[out.name] = uses.get(out.name, 0) + 1
    return uses


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every node and tensor name in the model, to make new names unique."""
    names: set[str] = set()
    for g in iter_graphs(model.graph):
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
    names.discard("")
    return names


class NameScope:
    """Hands out names derived from a stem that are unique within the model."""

    def __init__(self, taken: set[str]):
        self.taken = taken

    def __call__(self, stem: str) -> str:
        name, i = stem, 1
        while name in self.taken:
            name = f"{stem}_{i}"
            i += 1
        self.taken.add(name)
        return name




def expose_outputs(model: onnx.ModelProto, tensors: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph also outputs ``tensors`` (name -> element type;
    0 = look it up in value_info/inputs/outputs, else float). Names already outputs stay once."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    declared = {o.name for o in graph.output}
    known = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    for name, elem_type in tensors.items():
        if name in declared:
            continue
        elem_type = elem_type or known.get(name) or onnx.TensorProto.FLOAT
        graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        declared.add(name)
    return copy


def runtime_shapes(model: onnx.ModelProto, wanted: dict[str, int], feed: dict | None = None) -> dict[str, list[int]]:
    """Shapes onnxruntime really produces for the main-graph tensors ``wanted`` (name -> elem
    type), running the model once on ``feed``, or on zeros with a batch of 1.

    For models whose shape inference stops early (pads computed by subgraphs, as in some torch
    exports) but whose inputs are static apart from the batch. Best effort: {} when the inputs
    have other dynamic dims (the sizes are then genuinely unknown), the model is too big to copy,
    or onnxruntime cannot run it.
    """
    import onnxruntime as ort

    weights = {t.name for t in model.graph.initializer}
    feeds = dict(feed or {})
    for vi in model.graph.input if feed is None else ():
        if vi.name in weights:
            continue
        tensor_type = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            return {}
        shape = [1 if d is None else d for d in dims]
        feeds[vi.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    # The probe copies the model and onnxruntime loads a third copy: only worth it for models
    # small enough that this stays far below the compress step's own peak.
    if not wanted or model.ByteSize() > RUNTIME_SHAPES_MAX_BYTES or has_lazy_tensors(model):
        return {}
    names = list(wanted)
    probe = expose_outputs(model, wanted)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception:
        return {}
    return {n: list(v.shape) for n, v in zip(names, values)}

