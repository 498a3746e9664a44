"""The only module that touches the ONNX IR: load, look up constants, splice, save.

Splicing works on the ModelProto directly, in place: the replaced node is swapped for its chain at
the same position in its graph's node list (so topological order holds), new weights become
initializers of that graph, and weights nobody uses any more are dropped. Working on the proto
keeps everything we do not touch exactly as it was: IR version, opset imports, metadata_props, doc
strings, value_info, initializers listed as inputs (IR < 4), and subgraphs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlr.errors import OnnxlrError

PROTOBUF_LIMIT = 2**31 - 1
# Models above this size are not run by runtime_shapes (MACs then stay unknown where inference stops).
RUNTIME_SHAPES_MAX_BYTES = 256 * 2**20
# Inline model files above this size are checked before they are parsed (see load_model).
CHECK_FIRST_BYTES = 64 * 2**20
# Models above this many bytes are saved with external data (tests lower it).
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT
# Initializers above this size have their bytes set aside during shape inference.
_BIG_TENSOR_BYTES = 1024
_COPY_CHUNK = 16 * 2**20


# --- loading --------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    *,
    check: bool = True,
    data_files: list[Path] | None = None,
    lazy_external: bool = False,
) -> onnx.ModelProto:
    """Load an ONNX model with its external data; every way it can fail is an OnnxlrError.

    The checker runs on the file path (so it handles external data and models over 2 GB) after
    the external data files are known to exist and be long enough. ``data_files``, when given, is
    filled with the external data files the model reads (so that callers never overwrite them).

    ``lazy_external=True`` leaves external tensors on disk: their locations become absolute paths,
    ``tensor_to_array`` maps them read-only (np.memmap) and ``save_model_atomic`` copies their
    bytes into the new data file. Peak memory then stays far below the model's size. Such a model
    must be saved with ``save_model_atomic`` (onnx.save would write absolute locations).
    """
    path = Path(path)
    if not path.exists():
        raise OnnxlrError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise OnnxlrError(f"{path}: is a directory; give the path of an .onnx file")
    if not path.is_file():
        raise OnnxlrError(f"{path}: not a regular file; give the path of an .onnx file")
    if path.stat().st_size == 0:
        raise OnnxlrError(f"{path}: the file is empty; re-export the model")
    checked = False
    if check and path.stat().st_size > CHECK_FIRST_BYTES:
        # The checker reads its own copy of the file: run it before Python holds the model, so
        # the two copies never coexist (peak memory). A failure is re-raised below, after parsing,
        # so that a file that is not ONNX at all gets its own message.
        try:
            check_model(str(path), str(path))
            checked = True
        except Exception:  # noqa: BLE001
            pass
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- protobuf raises DecodeError, RuntimeWarning, ValueError ...
        raise OnnxlrError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); the file is corrupt, "
            "truncated or not ONNX: re-export it"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise OnnxlrError(f"{path}: parsed as ONNX but holds no graph; the file is not an ONNX model")
    files = _check_external_data(model, path.parent)
    if data_files is not None:
        data_files.extend(files)
    if check and not checked:
        check_model(str(path), str(path))
    if lazy_external:
        base = path.parent.resolve()
        for tensor in iter_tensors_with_external_data(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = str(base / entry.value)
        return model
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # noqa: BLE001 -- OSError, ValueError, onnx's own checks
        raise OnnxlrError(f"{path}: cannot read the model's external data: {exc}") from None
    return model


def has_lazy_tensors(model: onnx.ModelProto) -> bool:
    """Whether some tensor still lives in an external file (a ``lazy_external`` load)."""
    return next(iter_tensors_with_external_data(model), None) is not None


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(info.get("offset", 0))
    length = int(info.get("length", _tensor_nbytes(tensor)))
    return info["location"], offset, length


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, except that a lazily loaded external tensor is memory-mapped."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    location, offset, length = _external_info(tensor)
    if not os.path.isabs(location):
        raise OnnxlrError(f"tensor {tensor.name!r} refers to external data that was not loaded")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape)) if shape else 1
    if dtype.kind in "fiub" and dtype.isbuiltin and count * dtype.itemsize == length:
        if count == 0:
            return np.zeros(shape, dtype)
        return np.asarray(np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=shape))
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.ClearField("external_data")
    copy.data_location = onnx.TensorProto.DEFAULT
    copy.raw_data = _read_range(location, offset, length)
    return numpy_helper.to_array(copy)


def _read_range(location: str, offset: int, length: int) -> bytes:
    with open(location, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OnnxlrError(f"external data file {location} is truncated; re-export the model")
    return data


def materialize_external(model: onnx.ModelProto) -> None:
    """Read every lazily loaded external tensor into the model (before an in-memory use)."""
    for tensor in list(iter_tensors_with_external_data(model)):
        location, offset, length = _external_info(tensor)
        tensor.raw_data = _read_range(location, offset, length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Every external data file exists, stays inside the model's folder and is long enough."""
    files: list[Path] = []
    for tensor in iter_tensors_with_external_data(model):
        info = {entry.key: entry.value for entry in tensor.external_data}
        name = info.get("location", "")
        location = base_dir / name
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise OnnxlrError(
                f"tensor {tensor.name!r} points to external data location {name!r} outside the "
                "model's folder; keep the data file next to the model"
            )
        if not location.is_file():
            raise OnnxlrError(
                f"external data file {location} for tensor {tensor.name!r} is missing; "
                "keep the data file next to the model"
            )
        try:
            offset = int(info.get("offset", 0))
            expected = _tensor_nbytes(tensor)
            length = int(info.get("length", expected))
        except ValueError:
            raise OnnxlrError(
                f"tensor {tensor.name!r} has a malformed external data entry {info}; re-export the model"
            ) from None
        size = location.stat().st_size
        if size < offset + length:
            raise OnnxlrError(
                f"external data file {location} is truncated: tensor {tensor.name!r} needs bytes "
                f"{offset}..{offset + length} of a {size}-byte file; re-export the model"
            )
        if location not in files:
            files.append(location)
    return files


def iter_tensors_with_external_data(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # noqa: BLE001 -- an unknown dtype: count bytes
        itemsize = 1
    return count * itemsize


def check_model(model: onnx.ModelProto | str, where: str = "model") -> None:
    """onnx.checker with full_check; a failure is the user's model, not our bug.

    Pass a path for models with external data or over 2 GB: the checker then reads the data
    files itself instead of needing every byte in one protobuf.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        text = " ".join(str(exc).split()) or "invalid model"
        if len(text) > 300:
            text = text[:297] + "..."
        raise OnnxlrError(f"{where} fails onnx.checker: {text}; fix or re-export the model") from None


_OPSET_PROBE = 10_000


@functools.cache
def runtime_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime accepts (probed once).

    onnxruntime rejects a model whose opset is newer than it knows, saying "... support for domain
    ai.onnx is till opset M"; a tiny Identity model at an absurd opset makes it say M. If the
    message ever changes, fall back to the onnx package's own newest opset.
    """
    import onnxruntime as ort

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", _OPSET_PROBE)])
    probe.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        found = re.search(r"till opset (\d+)", str(exc))
        if found:
            return int(found.group(1))
    return onnx.defs.onnx_opset_version()


def check_runtime_opset(model: onnx.ModelProto, target_opset: int | None = None) -> None:
    """Refuse what the installed onnxruntime could not load: the model's default-domain opset or,
    when the model is to be converted first, the target opset."""
    import onnxruntime as ort

    top = runtime_max_opset()
    if target_opset is not None:
        if target_opset > top:
            raise OnnxlrError(
                f"--target-opset {target_opset} is newer than onnxruntime {ort.__version__} "
                f"supports (up to {top}): use --target-opset {top} or upgrade onnxruntime"
            )
        return
    used = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), None)
    if used is not None and used > top:
        raise OnnxlrError(
            f"the model uses opset {used}; onnxruntime {ort.__version__} supports up to {top}: "
            f"use --target-opset {top} or upgrade onnxruntime"
        )


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
        if tensor.ByteSize() > _BIG_TENSOR_BYTES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            skel.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            skel.graph.initializer.add().CopyFrom(tensor)
    return skel


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


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


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and all its subgraphs (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


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


# --- folding weights computed from constants --------------------------------------------------

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


# --- saving ---------------------------------------------------------------------------------


def save_model_atomic(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected: list[Path] | tuple[Path, ...] = (),
) -> Path:
    """Write ``model`` so that ``path`` is either absent/unchanged or complete.

    Everything goes to temporary files in the destination directory, is fsynced, then renamed
    into place (external data first, then the model that refers to it). ``external_data=None``
    chooses external data only when the model would exceed ``EXTERNAL_DATA_THRESHOLD``. With
    external data the weights go to ``<name>.data`` beside the model; an existing output model is
    removed before its data file is replaced, so an interruption leaves no output rather than an
    old model reading new data. ``protected`` files (the input's own data files) are never
    replaced. With external data, ``model``'s tensors end up pointing at the data file.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxlrError(f"cannot write {path}: directory {directory} does not exist; create it first")
    if path.is_dir():
        raise OnnxlrError(f"cannot write {path}: it is a directory; give a file name ending in .onnx")
    if external_data is None:
        external_data = has_lazy_tensors(model) or model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    data_path = directory / data_name
    if external_data and any(_same_path(data_path, p) for p in protected):
        raise OnnxlrError(
            f"cannot write {path}: its weights would go to {data_path}, which holds the input "
            "model's external data; choose another output name"
        )

    if not external_data and has_lazy_tensors(model):
        materialize_external(model)
    tmp_model = tmp_data = None
    placed_data = False  # the new data file is (maybe) in place but its model is not yet
    try:
        tmp_model = _temp_path(directory, path.name)
        if external_data:
            tmp_data = _temp_path(directory, data_name)
            _write_external_data(model, tmp_data, data_name)
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        if tmp_data is not None:
            if path.exists():
                path.unlink()  # never leave an old model next to new data
            with signals_deferred():
                placed_data = True
                os.replace(tmp_data, data_path)
                _forget_temp(tmp_data)
                tmp_data = None
        with signals_deferred():  # the model in place and the flag cleared, or neither
            os.replace(tmp_model, path)
            _forget_temp(tmp_model)
            tmp_model, placed_data = None, False
        _fsync_dir(directory)
    except BaseException as exc:
        for leftover in (tmp_model, tmp_data, data_path if placed_data else None):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
                _forget_temp(leftover)
        if isinstance(exc, OSError):
            raise OnnxlrError(
                f"cannot write {path}: {exc.strerror or exc}; free some space or choose another output path"
            ) from None
        raise
    return path


# --- interruptions --------------------------------------------------------------------------
# A signal handler (the CLI's, for SIGTERM and SIGINT) calls ``interrupt``: outside a critical
# section it raises at once; inside one it is held until the section ends. Critical sections are
# the few steps that must not be split: creating a temp file and recording it, renaming a file
# into place and recording that. ``remove_temp_files`` deletes what an interruption left behind.

_critical_depth = 0
_pending: list[BaseException] = []
_live_temps: set[Path] = set()


@contextlib.contextmanager
def signals_deferred():
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if _critical_depth == 0 and _pending:
            exc = _pending.pop()
            _pending.clear()
            raise exc


def interrupt(exc: BaseException) -> None:
    """Raise ``exc`` now, or at the end of the current critical section."""
    if _critical_depth:
        _pending.append(exc)
        return
    raise exc


def remove_temp_files() -> None:
    """Delete every temp file this process created and has not renamed or deleted yet."""
    for tmp in list(_live_temps):
        tmp.unlink(missing_ok=True)
        _live_temps.discard(tmp)


def _forget_temp(tmp: Path) -> None:
    _live_temps.discard(tmp)


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before any work, when ``path`` cannot be created: try a temporary file there.

    Permission bits are not enough (root ignores them; read-only and special file systems do not).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise OnnxlrError(f"cannot write {path}: {directory} is a file, not a directory; choose another output path")
    if not directory.is_dir():
        raise OnnxlrError(f"cannot write {path}: directory {directory} does not exist; create it first")
    if path.is_dir():
        raise OnnxlrError(f"cannot write {path}: it is a directory; give a file name")
    with signals_deferred():
        probe = _temp_path(directory, path.name)
        probe.unlink()
        _forget_temp(probe)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False


def _temp_path(directory: Path, name: str) -> Path:
    """An empty temporary file in ``directory`` with the permissions a new file would get."""
    with signals_deferred():  # created and recorded, or neither
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise OnnxlrError(
                f"cannot write {directory / name}: directory {directory} is not writable "
                f"({exc.strerror or exc}); choose another output path"
            ) from None
        _live_temps.add(Path(tmp))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_external_data(model: onnx.ModelProto, data_path: Path, location: str) -> None:
    """Move every big initializer's bytes into one data file; the proto refers to ``location``.

    Tensors still on disk (a ``lazy_external`` load) are copied over in chunks, never whole.
    """
    offset = 0

    def refer(tensor: onnx.TensorProto, start: int, length: int) -> None:
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL

    with open(data_path, "wb") as f:

        def align() -> int:
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            return offset + pad

        for tensor in list(iter_tensors_with_external_data(model)):
            source, start, length = _external_info(tensor)
            offset = align()
            with open(source, "rb") as src:
                src.seek(start)
                left = length
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OnnxlrError(f"external data file {source} is truncated; re-export the model")
                    f.write(chunk)
                    left -= len(chunk)
            refer(tensor, offset, length)
            offset += length
        for tensor in _all_initializers(model.graph):
            if not tensor.HasField("raw_data") or tensor.ByteSize() < _BIG_TENSOR_BYTES:
                continue
            data = tensor.raw_data
            offset = align()
            f.write(data)
            tensor.ClearField("raw_data")
            refer(tensor, offset, len(data))
            offset += len(data)
            del data
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def runtime_shapes(model: onnx.ModelProto, wanted: dict[str, int]) -> dict[str, list[int]]:
    """Shapes onnxruntime really produces for the main-graph tensors ``wanted`` (name -> elem
    type), running the model once on zeros with a batch of 1.

    For models whose shape inference stops early (pads computed by subgraphs, as in some torch
    exports) but whose inputs are static apart from the batch. Best effort: {} when the inputs
    have other dynamic dims (the sizes are then genuinely unknown), the model is too big to copy,
    or onnxruntime cannot run it.
    """
    import onnxruntime as ort

    weights = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
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
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    names = list(wanted)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, wanted[n], None) for n in names if n not in declared
    )
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception:
        return {}
    return {n: list(v.shape) for n, v in zip(names, values)}
