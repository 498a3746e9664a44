"""onnxruntime plumbing shared by verify, bench, calibration and budgets: sessions and timing.

* **Sessions** -- :func:`make_session` opens a model (path, ``ModelProto`` or bytes) on one of the
  providers named in :data:`PROVIDERS`, with every graph optimization on, an explicit intra-op
  thread count, and thread spinning *off* (idle sessions that spin inflate the timings of the
  others 1.5-5x, measured here). Load failures become one-line ``OnnxlrError``\\ s that name the
  problem and the fix.
* **Input specs** -- :func:`input_specs` reads each graph input's name, dtype, declared shape and
  dim names from a session (the data layer, :mod:`onnxlr.data`, turns them into feeds).
* **Timing** -- :func:`timed_runner` and :func:`interleaved`: every model once per round, the
  order flipped every round.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
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


#: Provider options whose values onnxlr checks (boolean, "0"/"1"; on/off, true/false accepted);
#: other keys go to onnxruntime as given, which refuses unknown ones when the session starts.
BOOLEAN_PROVIDER_OPTIONS: dict[str, frozenset[str]] = {
    "CUDAExecutionProvider": frozenset({"use_tf32", "enable_cuda_graph", "prefer_nhwc",
                                        "cudnn_conv_use_max_workspace", "do_copy_in_default_stream"}),
    "TensorrtExecutionProvider": frozenset({"trt_fp16_enable", "trt_int8_enable", "trt_engine_cache_enable"}),
}
_BOOLEAN_VALUES = {"1": "1", "on": "1", "true": "1", "yes": "1", "0": "0", "off": "0", "false": "0", "no": "0"}


def parse_provider_options(items: Sequence[str] | Mapping[str, object] | None) -> dict[str, str]:
    """``["use_tf32=0", ...]`` (``--provider-option KEY=VALUE``) or a mapping -> ``{key: value}``,
    values as strings (onnxruntime's provider options are strings)."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            key, eq, value = str(item).partition("=")
            if not eq or not key.strip() or not value.strip():
                raise OnnxlrError(f"--provider-option {item!r}: expected KEY=VALUE, e.g. use_tf32=0")
            if key.strip() in dict(pairs):
                raise OnnxlrError(f"--provider-option {key.strip()!r} is given twice")
            pairs.append((key.strip(), value.strip()))
    return {k: str(int(v) if isinstance(v, bool) else v) for k, v in pairs}


def _check_provider_options(wanted: str, name: str, options: Mapping[str, str]) -> dict[str, str]:
    if wanted == "CPUExecutionProvider":
        raise OnnxlrError(
            f"provider options ({', '.join(f'{k}={v}' for k, v in options.items())}) apply to a GPU "
            f"provider; the CPU provider takes none: drop --provider-option or use --provider cuda"
        )
    checked = {}
    for key, value in options.items():
        if key in BOOLEAN_PROVIDER_OPTIONS.get(wanted, ()):
            if value.lower() not in _BOOLEAN_VALUES:
                raise OnnxlrError(f"provider option {key}={value!r} of {name!r} ({wanted}) is a boolean: "
                                  f"use 0 or 1 (off/on)")
            value = _BOOLEAN_VALUES[value.lower()]
        checked[key] = value
    return checked


def provider_names(providers: Sequence) -> list[str]:
    """The names in a provider list that may hold ``(name, options)`` entries."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def resolve_provider(name: str, options: Mapping[str, object] | Sequence[str] | None = None) -> list:
    """``"cpu"|"cuda"|"tensorrt"`` -> the onnxruntime provider list, checked against this build.

    ``options`` (e.g. ``{"use_tf32": "0"}``) go to the first provider, the one named: its entry is
    then ``(provider, options)``, onnxruntime's own form. The CPU provider takes none (an error).
    """
    import onnxruntime as ort

    options = parse_provider_options(options)
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
    providers: list = [p for p in PROVIDERS[name] if p in available]
    if options:
        providers[0] = (wanted, _check_provider_options(wanted, name, options))
    return providers


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere).

    Measured on a VGG-16-sized model: after an onnxruntime session of it is deleted, glibc keeps
    about 200 MB of freed memory mapped (and more after many numpy temporaries); a long
    calibration, which opens two sessions per pass, would hold it all along."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def session_options(threads: int | None = None, *, verbose: bool = False, arena: bool = True):
    """SessionOptions: ORT_ENABLE_ALL, ``threads`` intra-op threads (default: all cores), one
    inter-op thread (sequential execution) and no thread spinning anywhere. ``arena=False``: no
    CPU memory arena (activations are freed after each run instead of kept for the next)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 2 if verbose else 4  # warnings with -v; failures raise anyway
    return opts


def make_session(
    model: ModelLike, provider: str = "cpu", *, threads: int | None = None, providers=None, arena: bool = True
):
    """Open ``model`` in an InferenceSession; every load failure is an ``OnnxlrError``.

    ``providers`` (an already resolved list from :func:`resolve_provider`, provider options
    included) skips the check. A
    session that did not get the first provider asked for (onnxruntime falls back to the next one
    when, say, the CUDA or TensorRT libraries cannot be loaded) is an ``OnnxlrError`` too: a
    silent fallback would report CPU figures as GPU ones.
    """
    import onnxruntime as ort

    providers = providers or resolve_provider(provider)
    names = provider_names(providers)
    if names[0] != "CPUExecutionProvider":
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
    opts = session_options(threads, verbose=log.isEnabledFor(logging.INFO), arena=arena)
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's pybind errors subclass Exception
        raise OnnxlrError(_explain_load_failure(label, exc)) from None
    check_provider_started(names[0], session.get_providers())
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
    dim_names: tuple[str | None, ...] = ()  # the symbolic name of each dynamic dim, if any

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
        names = tuple(d if isinstance(d, str) and d else None for d in shape)
        specs.append(InputSpec(i.name, i.type, dims, names))
    return specs


def check_same_inputs(reference: list[InputSpec], other: list[InputSpec], label: str) -> None:
    """Models compared or benchmarked together must take the same inputs by name."""
    ref, oth = {s.name for s in reference}, {s.name for s in other}
    if ref != oth:
        raise OnnxlrError(
            f"{label} takes inputs {sorted(oth)} but the first model takes {sorted(ref)}; "
            f"the models must have the same input names"
        )


def interleaved(runners, warmup: int, runs: int) -> np.ndarray:
    """Seconds per call of each runner (:func:`timed_runner`), shape [models, runs]: round r calls
    every runner once, in order on even rounds and in reverse on odd ones, so that going first or
    last favours no model."""
    import time

    times = np.empty((len(runners), runs))
    clock = time.perf_counter
    order = list(enumerate(runners))
    for r in range(-warmup, runs):
        for i, run in order if r % 2 == 0 else order[::-1]:
            start = clock()
            run()
            if r >= 0:
                times[i, r] = clock() - start
    return times
