"""Model files: load (lazy external data), check, and save atomically; temp files and signals.

Loading turns every way a file can be bad into one ``OnnxlrError`` line. Saving writes temporary
files in the destination directory, fsyncs and renames them, so an interruption leaves no output
or a complete one; signal handlers call :func:`interrupt`, which waits for the critical section
(create a temp file and record it, rename a file into place and record that) to end.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlr.errors import OnnxlrError

PROTOBUF_LIMIT = 2**31 - 1
# Inline model files above this size are checked before they are parsed (see load_model).
CHECK_FIRST_BYTES = 64 * 2**20
# Models above this many bytes are saved with external data (tests lower it).
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT
# Initializers above this size go to the external data file.
BIG_TENSOR_BYTES = 1024
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


def writable_data_folder(model: onnx.ModelProto) -> str | None:
    """The folder of the model's external data (of a ``lazy_external`` load) when it is writable:
    temporary files there can refer to that data by name. None otherwise."""
    for tensor in iter_tensors_with_external_data(model):
        folder = os.path.dirname(external_info(tensor)[0])
        if os.path.isabs(folder) and os.access(folder, os.W_OK):
            return folder
        break
    return None


def external_info(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(info.get("offset", 0))
    length = int(info.get("length", _tensor_nbytes(tensor)))
    return info["location"], offset, length


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, except that a lazily loaded external tensor is memory-mapped."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    location, offset, length = external_info(tensor)
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
    copy.raw_data = read_range(location, offset, length)
    return numpy_helper.to_array(copy)


#: Initializers at least this big (serialized) go to a weights file (see onnxlr.model.edit.detach_weights).
BIG_INITIALIZER = 1024
DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
               "external_data", "data_location")


def tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's raw little-endian bytes (raw_data, or its typed fields converted)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def append_aligned(f, data: bytes) -> tuple[int, int]:
    """Write ``data`` at the next 4 kB boundary of ``f`` (onnxruntime memory-maps aligned external
    data); returns (offset, length)."""
    offset = f.tell()
    pad = (-offset) % 4096
    f.write(b"\0" * pad)
    f.write(data)
    return offset + pad, len(data)


def refer_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``tensor`` at ``location`` (its bytes at offset, length there), dropping in-memory data."""
    for name in DATA_FIELDS:
        tensor.ClearField(name)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def read_range(location: str, offset: int, length: int) -> bytes:
    with open(location, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OnnxlrError(f"external data file {location} is truncated; re-export the model")
    return data


def materialize_external(model: onnx.ModelProto) -> None:
    """Read every lazily loaded external tensor into the model (before an in-memory use)."""
    for tensor in list(iter_tensors_with_external_data(model)):
        location, offset, length = external_info(tensor)
        tensor.raw_data = read_range(location, offset, length)
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


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for g in iter_graphs(graph):
        yield from g.initializer


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
        tmp_model = temp_path(directory, path.name)
        if external_data:
            tmp_data = temp_path(directory, data_name)
            _write_external_data(model, tmp_data, data_name)
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        if tmp_data is not None and path.exists():
            path.unlink()  # never leave an old model next to new data
        # Both renames back to back (a SIGKILL between them, which nothing can defer, leaves the
        # new data without its model: the window is two system calls), the flags cleared after.
        with signals_deferred():
            if tmp_data is not None:
                placed_data = True
                os.replace(tmp_data, data_path)
            os.replace(tmp_model, path)
            for done in (tmp_data, tmp_model):
                if done is not None:
                    _forget_temp(done)
            tmp_model = tmp_data = None
            placed_data = False
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


def track_temp(path: str | os.PathLike) -> None:
    """Have :func:`remove_temp_files` (an interruption) delete ``path`` unless
    :func:`untrack_temp` comes first: for temporary files made by name, not by temp_path."""
    _live_temps.add(Path(path))


def untrack_temp(path: str | os.PathLike) -> None:
    _live_temps.discard(Path(path))


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
        probe = temp_path(directory, path.name)
        probe.unlink()
        _forget_temp(probe)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False


def temp_path(directory: Path, name: str) -> Path:
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
            source, start, length = external_info(tensor)
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
        for tensor in all_initializers(model.graph):
            if not tensor.HasField("raw_data") or tensor.ByteSize() < BIG_TENSOR_BYTES:
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



def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a report, JSON) atomically: complete or not at all."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxlrError(f"cannot write {path}: directory {directory} does not exist; create it first")
    tmp = temp_path(directory, path.name)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        with signals_deferred():
            os.replace(tmp, path)
            _forget_temp(tmp)
    except OSError as exc:
        raise OnnxlrError(f"cannot write {path}: {exc.strerror or exc}; check the path") from None
    finally:
        if tmp.exists():
            tmp.unlink()
            _forget_temp(tmp)
