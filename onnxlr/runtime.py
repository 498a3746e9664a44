"""onnxruntime plumbing shared by ``verify``, ``bench`` and calibration.

Three jobs, all plain functions:

* **Sessions** -- :func:`make_session` opens a model (path, ``ModelProto`` or bytes) on one of the
  providers named in :data:`PROVIDERS`, with every graph optimization on, an explicit intra-op
  thread count, and thread spinning *off* (idle sessions that spin inflate the timings of the
  others: see ``shared/reference/measuring.md``). Load failures become one-line ``OnnxlrError``\\ s
  that name the problem and the fix.
* **Input specs** -- :func:`input_specs` reads each graph input's name, dtype and declared shape
  from the session; :func:`resolve_shapes` turns declared shapes into concrete ones (``--shape``
  overrides, a dynamic batch dim set to ``batch``, any other dynamic dim set to 1).
* **Data** -- a data set is a dict ``name -> array`` holding the samples stacked along each input's
  first (batch) axis. :func:`random_inputs` draws one seeded, :func:`load_npz` reads one from a
  file, and :func:`iter_feeds` cuts it into the feeds a model accepts: one batch of ``B`` rows at a
  time when the model fixes its batch dim to ``B`` (1 for most exports), chunks of up to ``chunk``
  rows when the batch dim is dynamic. Rank-0 inputs have no batch axis and go whole into every feed.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError

log = logging.getLogger("onnxlr")

ModelLike = str | os.PathLike | onnx.ModelProto | bytes

#: CLI/API provider names -> onnxruntime execution providers, most specific first. The fallbacks
#: after the first entry take the nodes the first one cannot run, as onnxruntime intends.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

_TWO_GB = 2**31


def model_label(model: ModelLike) -> str:
    """A short name for messages and tables: the path, or ``<ModelProto graph-name>``."""
    if isinstance(model, onnx.ModelProto):
        return f"<ModelProto {model.graph.name or 'unnamed'}>"
    if isinstance(model, bytes):
        return "<model bytes>"
    return str(model)


def default_threads() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- providers and sessions -----------------------------------------------------------------


def resolve_provider(name: str) -> list[str]:
    """``"cpu"|"cuda"|"tensorrt"`` -> the onnxruntime provider list, checked against this build."""
    import onnxruntime as ort

    if name not in PROVIDERS:
        raise OnnxlrError(f"unknown provider {name!r}; choose one of: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[name][0]
    if wanted not in available:
        short = {v[0]: k for k, v in PROVIDERS.items()}
        listed = ", ".join(f"{short[p]} ({p})" if p in short else p for p in available)
        raise OnnxlrError(
            f"provider {name!r} ({wanted}) is not available in this onnxruntime "
            f"{ort.__version__} build; available: {listed}. Install the matching onnxruntime "
            f"package (e.g. onnxruntime-gpu) or pick an available provider"
        )
    return [p for p in PROVIDERS[name] if p in available]


def session_options(threads: int | None = None, *, verbose: bool = False):
    """SessionOptions: ORT_ENABLE_ALL, ``threads`` intra-op threads (default: all cores), one
    inter-op thread (sequential execution) and no thread spinning anywhere."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 2 if verbose else 4  # warnings with -v; failures raise anyway
    return opts


def make_session(
    model: ModelLike, provider: str = "cpu", *, threads: int | None = None, providers=None
):
    """Open ``model`` in an InferenceSession; every load failure is an ``OnnxlrError``.

    ``providers`` (an already resolved list from :func:`resolve_provider`) skips the check. A
    session that did not get the first provider asked for (onnxruntime falls back to the next one
    when, say, the CUDA or TensorRT libraries cannot be loaded) is an ``OnnxlrError`` too: a
    silent fallback would report CPU figures as GPU ones.
    """
    import onnxruntime as ort

    providers = providers or resolve_provider(provider)
    if providers[0] != "CPUExecutionProvider":
        preload_gpu_libraries()
    label = model_label(model)
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= _TWO_GB:
            raise OnnxlrError(
                f"{label} is over 2 GB and cannot be passed in memory; save it with external "
                f"data (onnx.save_model(..., save_as_external_data=True)) and pass the path"
            )
        source = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        path = Path(model)
        if not path.exists():
            raise OnnxlrError(f"{path}: no such file; check the path")
        if not path.is_file():
            raise OnnxlrError(f"{path}: not a file; pass the path of an .onnx model")
        source = str(path)
    opts = session_options(threads, verbose=log.isEnabledFor(logging.INFO))
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's pybind errors subclass Exception
        raise OnnxlrError(_explain_load_failure(label, exc)) from None
    check_provider_started(providers[0], session.get_providers())
    return session


_GPU_LIBRARIES_PRELOADED = False


def preload_gpu_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip packages (``onnxruntime-gpu[cuda,cudnn]``, or
    PyTorch's) put in site-packages, so that the CUDA provider finds them without
    LD_LIBRARY_PATH. Once per process; a no-op for onnxruntime builds without ``preload_dlls``."""
    global _GPU_LIBRARIES_PRELOADED
    import onnxruntime as ort

    if _GPU_LIBRARIES_PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    _GPU_LIBRARIES_PRELOADED = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 -- missing libraries show up when the session starts
        log.info("onnxruntime.preload_dlls failed: %s", exc)


def check_provider_started(wanted: str, started: Sequence[str]) -> None:
    """Raise when onnxruntime started a session without the provider asked for."""
    if wanted in started:
        return
    import onnxruntime as ort

    try:
        from onnxruntime.capi import build_and_package_info as info

        needs = f" (this build wants CUDA {info.cuda_version}, cuDNN {info.cudnn_version})"
    except (ImportError, AttributeError):
        needs = ""
    short = {v[0]: k for k, v in PROVIDERS.items()}.get(wanted, wanted)
    fix = {
        "TensorrtExecutionProvider": "install TensorRT 10 (pip install tensorrt) so that libnvinfer "
        "is on the library path, or use --provider cuda",
    }.get(wanted, "install onnxruntime-gpu[cuda,cudnn] (pip-installed CUDA and cuDNN) or put the "
                  "CUDA and cuDNN libraries on LD_LIBRARY_PATH")
    raise OnnxlrError(
        f"onnxruntime {ort.__version__} could not start {wanted} and fell back to "
        f"{'+'.join(started) or 'nothing'}{needs}: its libraries did not load; {fix}, or use "
        f"another provider than {short!r}"
    )


def timed_runner(session, feed: Mapping[str, np.ndarray], *, host_io: bool = False):
    """A zero-argument callable that runs ``session`` once on ``feed`` and returns its outputs,
    for timing.

    On a GPU provider the inputs are copied to the device once and the outputs stay there
    (onnxruntime's IOBinding; the call returns them as device-side ``OrtValue``\\ s), so that a
    timing measures the model rather than host<->device copies, which are the same for every
    model compared. ``host_io`` times plain ``run`` calls with numpy arrays instead (copies
    included). Either way a call returns when the work is done: onnxruntime synchronizes the
    device at the end of a run.
    """
    device = session_device(session)
    if host_io or device == "cpu":
        return lambda: session.run(None, feed)
    return _bound_runner(session, feed, device)


def _bound_runner(session, feed: Mapping[str, np.ndarray], device: str):
    import onnxruntime as ort

    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, device, 0)

    def run():
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    return run


def session_device(session) -> str:
    """onnxruntime's device name for the memory of ``session``'s first provider."""
    first = session.get_providers()[0]
    return "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


def _clean_ort_message(exc: Exception) -> str:
    """onnxruntime's message without its error-code prefix, C++ source location and signature."""
    msg = str(exc)
    msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", msg)
    msg = re.sub(r"\S+\.(?:h|cc|cpp):\d+ [^(]*\([^)]*\)\s*", "", msg)
    return " ".join(msg.split())


def _explain_load_failure(label: str, exc: Exception) -> str:
    import onnxruntime as ort

    kind = type(exc).__name__
    msg = _clean_ort_message(exc)
    where = f"onnxruntime {ort.__version__} cannot load {label}"
    opset = re.search(r"Opset (\d+) is under development.*domain (\S+) is till opset (\d+)", msg)
    if opset:
        used, domain, top = opset.groups()
        return (
            f"{where}: it uses opset {used} of {domain}, and this onnxruntime supports up to "
            f"opset {top}; re-export the model with opset <= {top} (or convert it with "
            f"onnx.version_converter), or upgrade onnxruntime"
        )
    if kind == "InvalidProtobuf" or "No graph was found" in msg:
        return f"{label} is not an ONNX model ({msg.rpartition(':')[2]}); pass a .onnx file"
    if "is not a registered function/op" in msg:
        return (
            f"{where}: {msg}; the model uses an operator this onnxruntime does not implement "
            f"(a custom op, or a newer opset): register its library or re-export the model"
        )
    if kind == "NoSuchFile":
        return f"{where}: {msg}; if the model has external data, keep its files beside it"
    return f"{where}: {msg}"


def run_session(session, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None, label: str):
    """``session.run`` whose failures (bad input shapes or dtypes) are ``OnnxlrError``\\ s."""
    try:
        return session.run(None if outputs is None else list(outputs), dict(feed))
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's pybind errors subclass Exception
        raise OnnxlrError(f"onnxruntime failed to run {label}: {_clean_ort_message(exc)}") from None


# --- input specs and shapes -----------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One graph input as onnxruntime declares it: dims are ints (fixed) or None (dynamic)."""

    name: str
    type: str  # onnxruntime's type string, e.g. "tensor(float)"
    dims: tuple[int | None, ...]

    @property
    def dtype(self) -> np.dtype:
        if self.type not in _ORT_DTYPES:
            raise OnnxlrError(
                f"input {self.name!r} has type {self.type}, which onnxlr cannot generate or "
                f"convert; supported: {', '.join(t[7:-1] for t in _ORT_DTYPES)}"
            )
        return np.dtype(_ORT_DTYPES[self.type])

    @property
    def fixed_batch(self) -> int | None:
        """The fixed size of the first (batch) axis, or None when it is dynamic or absent."""
        return self.dims[0] if self.dims and self.dims[0] is not None else None


def input_specs(session) -> list[InputSpec]:
    specs = []
    for i in session.get_inputs():
        shape = i.shape if isinstance(i.shape, (list, tuple)) else []
        dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
        specs.append(InputSpec(i.name, i.type, dims))
    return specs


def check_same_inputs(reference: list[InputSpec], other: list[InputSpec], label: str) -> None:
    """Models compared or benchmarked together must take the same inputs by name."""
    ref, oth = {s.name for s in reference}, {s.name for s in other}
    if ref != oth:
        raise OnnxlrError(
            f"{label} takes inputs {sorted(oth)} but the first model takes {sorted(ref)}; "
            f"the models must have the same input names"
        )


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input:1,3,224,224"`` -> ``("input", (1, 3, 224, 224))``; the name may contain ':'."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise OnnxlrError(f"bad shape {text!r}; write NAME:DIMS, e.g. input:1,3,224,224")
    return name, shape


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Repeated ``--shape NAME:DIMS`` flags -> ``{name: dims}`` (a later flag wins)."""
    return dict(parse_shape(item) for item in items)


def parse_int_range(text: str) -> tuple[int, int]:
    """``"LO:HI"`` -> ``(lo, hi)``, the half-open range of random integer inputs."""
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise OnnxlrError(f"bad integer range {text!r}; write LO:HI, e.g. 0:30522") from None


def resolve_shapes(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for one feed: ``shapes`` overrides, a dynamic batch dim becomes ``batch``
    (when given), every other dynamic dim 1. A fixed dim that disagrees is an ``OnnxlrError``."""
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise OnnxlrError(
            f"--shape names unknown input(s) {', '.join(unknown)}; the model's inputs are: "
            f"{', '.join(s.name for s in specs)}"
        )
    out = {}
    for spec in specs:
        if spec.name in shapes:
            shape = tuple(int(d) for d in shapes[spec.name])
            if len(shape) != len(spec.dims):
                raise OnnxlrError(
                    f"--shape gives input {spec.name!r} {len(shape)} dims but the model declares "
                    f"{len(spec.dims)}: {_fmt_dims(spec.dims)}"
                )
            for given, declared in zip(shape, spec.dims):
                if declared is not None and given != declared:
                    raise OnnxlrError(
                        f"--shape {spec.name}:{','.join(map(str, shape))} disagrees with the "
                        f"model's fixed shape {_fmt_dims(spec.dims)}"
                    )
        else:
            shape = tuple(1 if d is None else d for d in spec.dims)
            if batch is not None and spec.dims:
                if spec.dims[0] is None:
                    shape = (batch,) + shape[1:]
                elif spec.dims[0] != batch:
                    raise OnnxlrError(
                        f"--batch {batch} but input {spec.name!r} has a fixed batch of "
                        f"{spec.dims[0]} ({_fmt_dims(spec.dims)}); use --batch {spec.dims[0]}"
                    )
        out[spec.name] = shape
    return out


def _fmt_dims(dims: Sequence[int | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


# --- data sets ------------------------------------------------------------------------------


def random_inputs(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, tuple[int, ...]],
    samples: int = 1,
    *,
    seed: int = 0,
    int_range: tuple[int, int] = (0, 100),
) -> dict[str, np.ndarray]:
    """``samples`` seeded draws of each input's feed shape, stacked along the batch axis.

    Floats are standard normal, integers uniform in ``[lo, hi)`` (``int_range``), bools fair
    coins. Rank-0 inputs are drawn once.
    """
    lo, hi = int_range
    if hi <= lo:
        raise OnnxlrError(f"bad integer range {lo}:{hi}; write LO:HI with LO < HI, e.g. 0:30522")
    if samples < 1:
        raise OnnxlrError(f"samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    data = {}
    for spec in specs:
        shape = tuple(shapes[spec.name])
        if shape:
            shape = (shape[0] * samples,) + shape[1:]
        dtype = spec.dtype
        if dtype.kind == "f":
            data[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            if lo < info.min or hi - 1 > info.max:
                raise OnnxlrError(
                    f"integer range {lo}:{hi} does not fit input {spec.name!r} of type {dtype}"
                )
            data[spec.name] = rng.integers(lo, hi, size=shape).astype(dtype)
        else:  # bool
            data[spec.name] = rng.random(shape) < 0.5
    return data


def load_npz(path: str | os.PathLike, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Read an .npz keyed by input name; arrays are cast to each input's dtype (same kind only)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxlrError(f"{path}: no such file; pass an .npz keyed by input name")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise OnnxlrError(f"{path} is not a readable .npz file; save the arrays with numpy.savez, "
                          f"keyed by input name") from None
    return check_data(arrays, specs, str(path))


def check_data(
    arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str = "inputs"
) -> dict[str, np.ndarray]:
    """Check a data set (samples stacked on axis 0) against the inputs; cast to their dtypes
    (same kind only: float to float, int to int)."""
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise OnnxlrError(
            f"{where} has no array for input(s) {', '.join(missing)} (it has: "
            f"{', '.join(sorted(arrays)) or 'nothing'}); key each array by the input's name"
        )
    extra = sorted(set(arrays) - {s.name for s in specs})
    if extra:
        log.warning("ignoring arrays %s in %s: the model has no such inputs", extra, where)
    data = {}
    for spec in specs:
        arr, want = np.asarray(arrays[spec.name]), spec.dtype
        same_kind = arr.dtype.kind == want.kind or {arr.dtype.kind, want.kind} <= set("iu")
        if not same_kind:
            raise OnnxlrError(
                f"{where}: array {spec.name!r} has dtype {arr.dtype} but the model wants {want}"
            )
        if arr.ndim != len(spec.dims):
            raise OnnxlrError(
                f"{where}: array {spec.name!r} has shape {list(arr.shape)} but the model's input "
                f"is {_fmt_dims(spec.dims)} (stack the samples along the first axis)"
            )
        for axis, (got, declared) in enumerate(zip(arr.shape, spec.dims)):
            if axis > 0 and declared is not None and got != declared:
                raise OnnxlrError(
                    f"{where}: array {spec.name!r} has shape {list(arr.shape)} but the model's "
                    f"input is {_fmt_dims(spec.dims)}"
                )
        data[spec.name] = arr.astype(want, copy=False)
    return data


def feed_rows(specs_per_model: Sequence[Sequence[InputSpec]], chunk: int) -> tuple[int, bool]:
    """How many samples go into one feed, and whether that count is exact: the models' fixed
    batch size (exact), else up to ``chunk`` (the last feed may be smaller)."""
    fixed = {s.fixed_batch for specs in specs_per_model for s in specs if s.fixed_batch}
    if len(fixed) > 1:
        raise OnnxlrError(
            f"the inputs fix different batch sizes {sorted(fixed)}; onnxlr cannot split samples "
            f"across them"
        )
    return (fixed.pop(), True) if fixed else (max(1, chunk), False)


def iter_feeds(
    data: Mapping[str, np.ndarray], rows: int, exact: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Cut a data set (samples stacked along axis 0) into feeds of ``rows`` samples each."""
    lengths = {name: a.shape[0] for name, a in data.items() if a.ndim > 0}
    if len(set(lengths.values())) > 1:
        raise OnnxlrError(
            "the inputs hold different numbers of samples along their first axis: "
            + ", ".join(f"{k}={v}" for k, v in lengths.items())
        )
    total = next(iter(lengths.values()), 1)
    if total == 0:
        raise OnnxlrError("the input data holds no samples (its first axis has length 0)")
    if exact and total % rows:
        raise OnnxlrError(
            f"{total} samples cannot be fed in the model's fixed batches of {rows}; "
            f"give a multiple of {rows} samples"
        )
    for start in range(0, total, rows):
        yield {k: (a[start : start + rows] if a.ndim else a) for k, a in data.items()}
