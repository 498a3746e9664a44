"""Calibration data for ``quantize``, from anything ``--calib`` takes, split as compress splits it.

    --calib DATA -> samples (at most --calib-samples) -> every 5th held out (onnxlr.data)
        fitting samples  -> feeds to calibrate activation ranges on
        held-out samples -> check feeds: the output error and the sensitivity exclusion

The same split as refinement and budgets use, so that the errors quantization reports are measured
on samples no step fitted on. Samples are stacked into feeds as ``onnxlr.data.batches`` stacks them
(up to 16 per run where the batch axis is dynamic; exactly the model's fixed batch otherwise).
"""

from __future__ import annotations

import onnx

from onnxlr import data
from onnxlr.errors import OnnxlrError
from onnxlr.quant.config import QuantizeConfig
from onnxlr.quant.driver import QuantReport, quantize


def calibration_feeds(model: onnx.ModelProto, calib, samples: int | None = None) -> tuple[list[dict], list[dict] | None]:
    """(calibration feeds, check feeds or None when fewer than 5 samples leave none held out)."""
    specs = data.model_input_specs(model)
    source = data.open_source(calib, specs, samples=1, what="--calib")
    loaded = list(data.limited(source, samples))
    if not loaded:
        raise OnnxlrError(f"{source.label} holds no samples to calibrate the quantization on")
    fit = list(data.batches(data.split_held_out(loaded, False), specs))
    held = list(data.batches(data.split_held_out(loaded, True), specs))
    return fit, held or None


def quantize_on(model: onnx.ModelProto, config: QuantizeConfig, calib=None,
                samples: int | None = None) -> tuple[onnx.ModelProto, QuantReport]:
    """``quantize`` with calibration and check feeds cut from ``calib`` (None: dynamic mode, no
    feeds; static mode refuses in one line)."""
    if calib is None:
        if config.mode == "static":
            raise OnnxlrError("static INT8 quantization needs calibration data to set activation ranges: "
                              "pass --calib DATA, or use --quant-mode dynamic")
        return quantize(model, None, config)
    fit, held = calibration_feeds(model, calib, samples)
    return quantize(model, fit, config, check_feeds=held)
