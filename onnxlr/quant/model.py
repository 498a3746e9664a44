"""The protobuf side of quantization: loading, checking, naming, opsets, saving.

onnxruntime's quantizer works on files, finds layers by node name and writes what the model's
opset allows; these helpers get a model into a state it quantizes correctly and read back what it
did. Why per-channel needs opset 13: per-channel QDQ writes ``DequantizeLinear(w_q, scale[T],
zero_point[T], axis=0)``, and ``axis`` only exists from opset 13; at opset 12 onnx.checker rejects
the node and onnxruntime refuses the file (INVALID_GRAPH).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from onnxlr.errors import OnnxlrError
from onnxlr.model.query import iter_graphs

#: Models at least this big (bytes) are written with external data, and quantized with
#: ``use_external_data_format`` (protobuf cannot serialize 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000
#: The opset whose DequantizeLinear takes a per-channel ``axis``.
PER_CHANNEL_OPSET = 13
SUBGRAPH_OPS = ("If", "Loop", "Scan")


def load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A ModelProto with every tensor in memory; a path's external data is read from its folder."""
    if isinstance(model, onnx.ModelProto):
        missing = [t.name for t in _tensors(model.graph) if _is_external(t)]
        if missing:
            raise OnnxlrError(
                f"the ModelProto keeps {len(missing)} tensor(s) in external data not loaded "
                f"(first: {missing[0]!r}); pass the model's path, or load it with onnx.load(path) "
                f"(load_external_data=True)"
            )
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    path = Path(model)
    if not path.is_file():
        raise OnnxlrError(f"{path}: no such file; pass the path of an .onnx model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError and onnx's own errors
        raise OnnxlrError(f"{path} is not a readable ONNX model ({exc}); check the file") from None
    for tensor in _tensors(proto.graph):
        if _is_external(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if not (path.parent / location).is_file():
                raise OnnxlrError(
                    f"{path}: its external data file {location!r} is missing (tensor "
                    f"{tensor.name!r}); keep the data file next to the model, as it was saved"
                )
    onnx.load_external_data_for_model(proto, str(path.parent))
    return proto


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    for g in iter_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def byte_size(model: onnx.ModelProto) -> int:
    """The serialized size, or the tensor bytes when protobuf cannot count past 2 GiB."""
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 -- some protobuf builds refuse sizes over 2 GiB
        return sum(len(t.raw_data) for t in _tensors(model.graph))


def is_large(model: onnx.ModelProto) -> bool:
    return byte_size(model) >= EXTERNAL_DATA_BYTES


def save(model: onnx.ModelProto, path: Path, *, large: bool) -> Path:
    """Write ``model``; a large one with its tensors in ``<name>.data`` next to it."""
    if large:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise OnnxlrError(
        "the model imports no default (ai.onnx) opset; it is not a standard ONNX model"
    )


def upgrade_opset(
    model: onnx.ModelProto, target: int = PER_CHANNEL_OPSET
) -> tuple[onnx.ModelProto | None, str]:
    """``model`` converted to opset ``target`` by onnx's version converter and checked, or None
    and why not."""
    if is_large(model):
        return None, "onnx's version converter works in memory and the model is over 2 GB"
    try:
        upgraded = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(upgraded, full_check=True)
    except Exception as exc:  # noqa: BLE001 -- the converter raises plain RuntimeErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"onnx's version converter failed: {first}"
    return upgraded, ""


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed or duplicate-named main-graph node a unique name (onnxruntime's quantizer
    selects and excludes nodes by name); returns how many were renamed."""
    taken = Counter(n.name for n in model.graph.node if n.name)
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if node.name and (taken[node.name] == 1 or node.name not in seen):
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken or name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


def candidates(model: onnx.ModelProto, op_types: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, op_type) of the main-graph nodes onnxruntime may quantize."""
    return [(n.name, n.op_type) for n in model.graph.node if n.op_type in op_types]


def subgraph_layers(
    model: onnx.ModelProto, op_types: tuple[str, ...]
) -> list[tuple[str, str, str]]:
    """(name, op_type, owner) of the layers inside If/Loop/Scan bodies: onnxruntime's static
    quantizer leaves them in float."""
    out = []
    for node in model.graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                for g in iter_graphs(body):
                    out += [
                        (n.name or n.op_type, n.op_type, node.name)
                        for n in g.node
                        if n.op_type in op_types
                    ]
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.attribute
            and node.attribute[0].type == onnx.AttributeProto.TENSOR
        ):
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def check_float32(model: onnx.ModelProto, op_types: tuple[str, ...]) -> None:
    """Refuse layers that compute in another float type: onnxruntime's quantizer writes float32
    scales, which an fp16 (or double) graph cannot take (onnx.checker rejects the result)."""
    inferred = model
    if not is_large(model):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 -- fall back to the types the model declares
            inferred = model
    types = _elem_types(inferred)
    for node in model.graph.node:  # by node, not by name: names may be empty or repeat here
        if node.op_type not in op_types:
            continue
        name, op_type = node.name or node.output[0], node.op_type
        for tensor in node.input[:2]:
            t = types.get(tensor)
            if t is not None and t != TensorProto.FLOAT:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t)
                raise OnnxlrError(
                    f"{op_type} {name!r} computes in {dtype} ({tensor!r}); onnxruntime's quantizer "
                    f"only takes float32 layers: quantize a float32 export of the model"
                )


def quantized_names(qmodel: onnx.ModelProto, cands: list[tuple[str, str]], mode: str) -> set[str]:
    """The candidates onnxruntime quantized: static, the node reads a DequantizeLinear output;
    dynamic, the node was replaced (its name is gone from the float op type)."""
    producers = {out: n.op_type for n in qmodel.graph.node for out in n.output}
    nodes = {n.name: n for n in qmodel.graph.node}
    done = set()
    for name, op_type in cands:
        node = nodes.get(name)
        if mode == "static":
            if node is not None and any(
                producers.get(i) == "DequantizeLinear" for i in node.input[:2]
            ):
                done.add(name)
        elif node is None or node.op_type != op_type:
            done.add(name)
    return done
