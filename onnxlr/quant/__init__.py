"""INT8 quantization of (factorized) models with onnxruntime's own quantizer, and factor balancing.

onnxlr writes no quantizer: static mode runs ``onnxruntime.quantization.quantize_static`` (QDQ
format, per-channel int8 weights, uint8 activations, MinMax/Entropy/Percentile calibration),
dynamic mode ``quantize_dynamic`` (for MatMul-heavy transformers). What onnxlr adds is what a user
doing it by hand gets wrong or cannot see:

* **Opsets.** Per-channel QDQ writes ``DequantizeLinear(..., axis)``, which needs opset 13. An
  older model is upgraded with onnx's version converter, or falls back to per-tensor weights when
  it cannot be; the report says which.
* **Pre-processing** (``quant_pre_process``) runs without forcing a dependency: its symbolic shape
  inference needs sympy, and is skipped (and reported) when sympy is not installed or when it
  fails; then the rest of pre-processing still runs.
* **Sensitivity.** With ``max_error``, each layer's output error when quantized alone is measured
  on held-out feeds, and the worst layers stay in float until the quantized model's measured
  output error (relative L2, worst output) is within the bound (``sensitivity`` module).
* **Factor balancing** for replacement chains: intermediate channel r of a chain is divided by s_r
  in one factor and multiplied by s_r in the next (no nonlinearity between them, so the product
  is unchanged), with s_r chosen so that both factors have equal per-channel ranges (cross-layer
  equalization); depthwise steps pass the scale through (``balance`` module).
* **Proof.** Every model returned passed ``onnx.checker.check_model(full_check=True)`` and was
  loaded by onnxruntime; the report carries the measured output error.

API::

    from onnxlr.quant import QuantizeConfig, quantize, balance_chain, chain_ranges

    config = QuantizeConfig(                    # frozen, validated; bad values list the choices
        mode="static",                          # "static" (QDQ) | "dynamic"
        per_channel=True,                       # per-tensor when False (or when opset < 13 stays)
        calibrate_method="minmax",              # "minmax" | "entropy" | "percentile"
        activation_type="uint8", weight_type="int8",
        op_types=("Conv", "Gemm", "MatMul"),
        max_error=None,                         # e.g. 0.02: keep sensitive layers in float
    )
    qmodel, report = quantize(model_or_path, calib_feeds, config, check_feeds=None)
    report.to_dict(); report.lines()            # per-channel or not and why, opsets, preprocessing,
                                                # layers kept in float (and why), output error

    steps = balance_chain(replacement.steps)    # same product, balanced per-channel ranges
    before, after = chain_ranges(replacement.steps), chain_ranges(steps)

``quantize_on(model, config, calib, samples)`` cuts both from anything ``--calib`` takes, as
compress does (every 5th sample held out for checks; ``feeds`` module).

``calib_feeds`` and ``check_feeds`` are iterables of feed dicts (input name -> array at the
model's own shapes, as ``onnxlr.runtime.iter_feeds`` cuts them); both are read into memory.
Without ``check_feeds`` and with ``max_error``, the last ``held_out`` fraction of the calibration
feeds measures the errors instead; without either, the error is reported in-sample.

Bad input is one ``OnnxlrError`` line: fp16 (or double) layers ("quantize a float32 export"), a
ModelProto whose external data is not loaded, missing feeds or inputs. Layers inside If/Loop/Scan
bodies stay in float (onnxruntime's static quantizer only quantizes the main graph) and are listed
as such; models of 2 GB and more are quantized with external data.
"""

from onnxlr.quant.balance import (
    StepRanges,
    apply_scales,
    balance_chain,
    balance_replacement,
    balance_scales,
    chain_ranges,
    fake_quantize,
    fake_quantize_chain,
    step_ranges,
)
from onnxlr.quant.config import CALIBRATE_METHODS, MODES, OP_TYPES, QUANT_TYPES, QuantizeConfig
from onnxlr.quant.driver import KeptFloat, QuantReport, quantize
from onnxlr.quant.feeds import calibration_feeds, quantize_on
from onnxlr.quant.sensitivity import output_error

__all__ = [
    "CALIBRATE_METHODS",
    "MODES",
    "OP_TYPES",
    "QUANT_TYPES",
    "KeptFloat",
    "QuantReport",
    "QuantizeConfig",
    "StepRanges",
    "apply_scales",
    "balance_chain",
    "balance_replacement",
    "balance_scales",
    "calibration_feeds",
    "chain_ranges",
    "fake_quantize",
    "fake_quantize_chain",
    "output_error",
    "quantize",
    "quantize_on",
    "step_ranges",
]
