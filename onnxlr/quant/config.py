"""What to quantize and how: one frozen, validated config (every bad choice lists the valid ones).

The names are onnxlr's; :func:`ort_options` maps them onto onnxruntime's enums at the last moment,
so that importing this module (and building a config from CLI flags) does not import onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from onnxlr.errors import OnnxlrError

MODES = ("static", "dynamic")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("uint8", "int8")
#: Op types onnxlr lets onnxruntime quantize: the layers onnxlr factorizes (and their chains).
OP_TYPES = ("Conv", "Gemm", "MatMul")


def _choice(field: str, value, choices) -> None:
    if value not in choices:
        raise OnnxlrError(
            f"unknown {field} {value!r}; choose one of: {', '.join(map(str, choices))}"
        )


@dataclass(frozen=True)
class QuantizeConfig:
    """INT8 quantization with onnxruntime's tooling.

    mode: ``static`` (QDQ: QuantizeLinear/DequantizeLinear pairs around float ops, activation
        ranges calibrated on data; the form TensorRT consumes) or ``dynamic`` (weights quantized
        ahead, activation ranges computed at run time: MatMulInteger/ConvInteger; for MatMul-heavy
        transformers, needs no calibration data).
    per_channel: one weight scale per output channel (needs opset 13: the model is upgraded, or
        falls back to per-tensor when it cannot be; the report says which).
    calibrate_method: how static mode turns calibration activations into ranges.
    activation_type, weight_type: ``uint8`` or ``int8`` (dynamic mode: activations are uint8).
    op_types: the op types to quantize; everything else stays in float.
    max_error: the largest output error (relative L2, worst output) allowed on the check feeds;
        the layers whose quantization costs most are kept in float until it holds. None: quantize
        every layer of ``op_types``.
    reduce_range: 7-bit weights, for CPUs without VNNI (see onnxruntime's docs).
    preprocess: run onnxruntime's ``quant_pre_process`` (shape inference and graph optimization)
        first.
    upgrade_opset: allow upgrading an opset < 13 model to 13 for per-channel weights.
    held_out: with ``max_error`` and no check feeds, this fraction of the calibration feeds (the
        last ones) is held out to measure errors instead.
    """

    mode: str = "static"
    per_channel: bool = True
    calibrate_method: str = "minmax"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    op_types: tuple[str, ...] = OP_TYPES
    max_error: float | None = None
    reduce_range: bool = False
    preprocess: bool = True
    upgrade_opset: bool = True
    held_out: float = 0.25

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("calibrate_method", self.calibrate_method, CALIBRATE_METHODS)
        _choice("activation_type", self.activation_type, QUANT_TYPES)
        _choice("weight_type", self.weight_type, QUANT_TYPES)
        if isinstance(self.op_types, str):
            object.__setattr__(self, "op_types", (self.op_types,))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        if not self.op_types:
            raise OnnxlrError(f"op_types is empty; choose some of: {', '.join(OP_TYPES)}")
        for op in self.op_types:
            _choice("op type", op, OP_TYPES)
        if self.mode == "static" and (self.activation_type, self.weight_type) == ("int8", "uint8"):
            raise OnnxlrError(
                "onnxruntime cannot quantize int8 activations with uint8 weights; use "
                "weight_type='int8' (or activation_type='uint8')"
            )
        if self.mode == "dynamic" and self.activation_type != "uint8":
            raise OnnxlrError(
                "dynamic quantization computes uint8 activations at run time; use "
                "activation_type='uint8' or mode='static'"
            )
        if self.max_error is not None and not (
            isinstance(self.max_error, (int, float))
            and math.isfinite(self.max_error)
            and self.max_error >= 0
        ):
            raise OnnxlrError(f"max_error must be a number >= 0 (or None), got {self.max_error!r}")
        if not 0 < self.held_out < 1:
            raise OnnxlrError(f"held_out must be a fraction between 0 and 1, got {self.held_out!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["op_types"] = list(self.op_types)
        return out


def ort_options(config: QuantizeConfig) -> dict:
    """onnxruntime's enums for ``config``: quant types and (static) calibration method."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    return {
        "activation_type": types[config.activation_type],
        "weight_type": types[config.weight_type],
        "calibrate_method": methods[config.calibrate_method],
    }
