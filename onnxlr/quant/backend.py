"""Calls into ``onnxruntime.quantization``: pre-processing, calibration data, the quantizers.

onnxlr does not quantize anything itself. Static mode runs ``quantize_static`` (QDQ format:
``x -> QuantizeLinear -> DequantizeLinear -> Conv <- DequantizeLinear <- w_int8``, which
onnxruntime fuses into integer kernels and TensorRT reads as explicit precision); dynamic mode
runs ``quantize_dynamic`` (``DynamicQuantizeLinear -> MatMulInteger``). Calibration runs once: its
tensor ranges go to a JSON cache in the work folder, and every later quantization of the same
model (the sensitivity trials) reads them from there instead of running the data again.

``quant_pre_process`` (shape inference + onnxruntime's basic graph optimizations) can also run
symbolic shape inference, which needs ``sympy``: when sympy is not installed that part is skipped
(it matters for transformer models with symbolic dims) and the report says so; onnxlr does not
depend on sympy. Where the symbolic part fails (PP-OCRv6: "Incomplete symbolic shape inference"),
pre-processing runs again without it.

Calibration methods are onnxruntime's at its defaults. Measured on the bundled model: ``entropy``
gives exactly MinMax's ranges there (``quantize_static`` cannot set its histogram size, and at 128
bins for 128 quantized bins the KL search has one candidate, the full range); a 2048-bin entropy
calibration, tried, clipped the logits to an output error of 0.81 (accuracy 99.26% against
99.44%), so onnxlr keeps the defaults.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxlr.quant.config import QuantizeConfig, ort_options

log = logging.getLogger("onnxlr")


def feed_reader(feeds: Sequence[dict[str, np.ndarray]]):
    """An onnxruntime ``CalibrationDataReader`` handing out ``feeds`` once, in order."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

        def __len__(self) -> int:
            return len(feeds)

    return FeedReader()


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Hold back onnxruntime.quantization's advice on the root logger (``logging.warning(...)``:
    "Please consider to run pre-processing", opset notices) while it runs; they go to the onnxlr
    logger at debug level. Restores everything on exit."""
    root = logging.getLogger()
    ort_logger = logging.getLogger("onnxruntime.quantization")

    def divert(record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and record.levelno < logging.ERROR:
            log.debug("onnxruntime: %s", record.getMessage())
            return False
        return True

    level = ort_logger.level
    root.addFilter(divert)
    ort_logger.setLevel(logging.ERROR)
    printed = io.StringIO()  # the histogram calibrators print() their progress
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(divert)
        ort_logger.setLevel(level)
        if printed.getvalue().strip():
            log.debug("onnxruntime printed: %s", printed.getvalue().strip())


def has_sympy() -> bool:
    return importlib.util.find_spec("sympy") is not None


@contextlib.contextmanager
def _working_directory(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def preprocess(src: Path, dst: Path, *, large: bool) -> tuple[bool, str]:
    """``quant_pre_process(src) -> dst``; returns (done, note). Where symbolic shape inference
    fails, it runs again without it (its graph optimization matters more: measured on PP-OCRv6,
    quantized without pre-processing 97.45% character accuracy, with it 98.53%). A failure of
    both is not fatal: the model is quantized without pre-processing (copied to ``dst``) and the
    note says why."""
    symbolic = has_sympy()
    failed = None
    if symbolic:
        try:
            _pre_process(src, dst, large=large, symbolic=True)
            return True, "quant_pre_process: symbolic and ONNX shape inference, graph optimization"
        except Exception as exc:  # noqa: BLE001 -- a third-party step; retried without its symbolic part
            failed = _first_line(exc)
    try:
        _pre_process(src, dst, large=large, symbolic=False)
    except Exception as exc:  # noqa: BLE001 -- a third-party step; quantization goes on without it
        shutil.copyfile(src, dst)
        if large and Path(str(src) + ".data").exists():
            shutil.copyfile(str(src) + ".data", str(dst) + ".data")
        return False, f"onnxruntime's quant_pre_process failed ({_first_line(exc)}); quantized without it"
    why = (f"failed ({failed})" if failed else
           "skipped because sympy is not installed (pip install sympy; it helps models with symbolic dims, "
           "e.g. transformers)")
    return True, f"quant_pre_process: ONNX shape inference and graph optimization; symbolic shape inference {why}"


def _pre_process(src: Path, dst: Path, *, large: bool, symbolic: bool) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # it writes temporary files (sym_shape_infer_temp.onnx, <uuid>.data of big models) into the
    # working directory: run it from dst's (temporary) folder, not the user's
    with quiet_onnxruntime(), _working_directory(dst.parent):
        quant_pre_process(
            str(src),
            str(dst),
            skip_symbolic_shape=not symbolic,
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            external_data_location=dst.name + ".data" if large else None,
        )


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def run_quantizer(
    src: Path,
    dst: Path,
    config: QuantizeConfig,
    *,
    per_channel: bool,
    calib_feeds: Sequence[dict[str, np.ndarray]],
    cache: Path,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    large: bool = False,
) -> Path:
    """Quantize ``src`` into ``dst`` (static or dynamic per ``config``). ``include`` limits the
    quantized nodes to those names, ``exclude`` keeps those names in float."""
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    opts = ort_options(config)
    common = {
        "op_types_to_quantize": list(config.op_types),
        "per_channel": per_channel,
        "reduce_range": config.reduce_range,
        "weight_type": opts["weight_type"],
        "nodes_to_quantize": list(include or []),
        "nodes_to_exclude": list(exclude or []),
        "use_external_data_format": large,
    }
    with quiet_onnxruntime():
        if config.mode == "dynamic":
            quantize_dynamic(str(src), str(dst), **common)
        else:
            quantize_static(
                str(src),
                str(dst),
                calibration_data_reader=None if cache.is_file() else feed_reader(calib_feeds),
                quant_format=QuantFormat.QDQ,
                activation_type=opts["activation_type"],
                calibrate_method=opts["calibrate_method"],
                calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                **common,
            )
    return dst
