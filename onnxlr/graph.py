"""The only module that touches the ONNX IR: load, look up constants, splice, save.

Splicing works on the ModelProto directly, in place: the replaced node is swapped for its chain at
the same position in its graph's node list (so topological order holds), new weights become
initializers of that graph, and weights nobody uses any more are dropped. Working on the proto
keeps everything we do not touch exactly as it was: IR version, opset imports, metadata_props, doc
strings, value_info, initializers listed as inputs (IR < 4), and subgraphs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlr.errors import OnnxlrError

PROTOBUF_LIMIT = 2**31 - 1
# Models above this many bytes are saved with external data (tests lower it).
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT
# Initializers above this size have their bytes set aside during shape inference.
_BIG_TENSOR_BYTES = 1024


# --- loading --------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data; every way it can fail is an OnnxlrError."""
    path = Path(path)
    if not path.exists():
        raise OnnxlrError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise OnnxlrError(f"{path}: is a directory; give the path of an .onnx file")
    if path.stat().st_size == 0:
        raise OnnxlrError(f"{path}: the file is empty; re-export the model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError ...
        raise OnnxlrError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); the file is corrupt, "
            "truncated or not ONNX: re-export it"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise OnnxlrError(f"{path}: parsed as ONNX but holds no graph; the file is not an ONNX model")
    if check:
        check_model(str(path), str(path))
    _load_external_data(model, path.parent)
    return model


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in iter_tensors_with_external_data(model):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = base_dir / info.get("location", "")
        if not location.is_file():
            raise OnnxlrError(
                f"external data file {location} for tensor {tensor.name!r} is missing; "
                "keep the data file next to the model"
            )
        offset = int(info.get("offset", 0))
        expected = _tensor_nbytes(tensor)
        length = int(info.get("length", expected))
        if location.stat().st_size < offset + length:
            raise OnnxlrError(
                f"external data file {location} is truncated: tensor {tensor.name!r} needs bytes "
                f"{offset}..{offset + length} of a {location.stat().st_size}-byte file; re-export the model"
            )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    except Exception as exc:
        raise OnnxlrError(f"cannot read the model's external data: {exc}") from None


def iter_tensors_with_external_data(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
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
        text = str(exc).strip()
        first = text.splitlines()[0] if text else "invalid model"
        raise OnnxlrError(f"{where} fails onnx.checker: {first}; fix or re-export the model") from None


class without_tensor_data:
    """Context manager: set aside the bytes of big initializers (e.g. for shape inference).

    Shape inference and the checker only need dims and dtypes; without the bytes they neither copy
    hundreds of MB nor hit the 2 GB protobuf limit.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.stash: list[tuple[onnx.TensorProto, bytes]] = []

    def __enter__(self) -> onnx.ModelProto:
        for tensor in _all_initializers(self.model.graph):
            if tensor.HasField("raw_data") and len(tensor.raw_data) > _BIG_TENSOR_BYTES:
                self.stash.append((tensor, tensor.raw_data))
                tensor.ClearField("raw_data")
                return self.model

    def __exit__(self, *exc) -> None:
        for tensor, data in self.stash:
            tensor.raw_data = data
        self.stash.clear()


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
    with without_tensor_data(model):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:
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
            return numpy_helper.to_array(self.initializer)
        attr = self.constant_node.attribute[0]
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
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
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            if node.attribute[0].name == "value":
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
    keep_init = [t for t in graph.initializer if t.name not in dead]
    if len(keep_init) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
        keep_inputs = [v for v in graph.input if v.name not in dead]
        del graph.input[:]
        graph.input.extend(keep_inputs)
    for i in reversed(range(len(graph.node))):
        n = graph.node[i]
        if n.op_type == "Constant" and n.output[0] in dead:
            del graph.node[i]
    keep_vi = [v for v in graph.value_info if v.name not in dead]
    if len(keep_vi) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep_vi)


def make_initializer(name: str, array: np.ndarray, onnx_dtype: int) -> onnx.TensorProto:
    """A weight in the model's own dtype (factors are computed in float64)."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_dtype)
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np_dtype), name=name)


# --- saving ---------------------------------------------------------------------------------


def save_model_atomic(
    model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None
) -> Path:
    """Write ``model`` so that ``path`` is either absent/unchanged or complete.

    Everything goes to temporary files in the destination directory, is fsynced, then renamed
    into place (external data first, then the model that refers to it). ``external_data=None``
    chooses external data only when the model would exceed the 2 GB protobuf limit.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxlrError(f"cannot write {path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK):
        raise OnnxlrError(f"cannot write {path}: directory {directory} is not writable; choose another output path")
    if path.is_dir():
        raise OnnxlrError(f"cannot write {path}: it is a directory; give a file name ending in .onnx")
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD

    tmp_model = _temp_path(directory, path.name)
    tmp_data = None
    try:
        if external_data:
            data_name = path.name + ".data"
            tmp_data = _temp_path(directory, data_name)
            _write_external_data(model, tmp_data, data_name)
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        if tmp_data is not None:
            os.replace(tmp_data, directory / data_name)
            tmp_data = None
        os.replace(tmp_model, path)
        _fsync_dir(directory)
    except BaseException:
        for leftover in (tmp_model, tmp_data):
            if leftover is not None and leftover.exists():
                leftover.unlink()
        raise
    return path


def _temp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


def _write_external_data(model: onnx.ModelProto, data_path: Path, location: str) -> None:
    """Move every big initializer's bytes into one data file; the proto refers to ``location``."""
    offset = 0
    with open(data_path, "wb") as f:
        for tensor in _all_initializers(model.graph):
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < _BIG_TENSOR_BYTES:
                continue
            data = tensor.raw_data
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            f.write(data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(data)
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
