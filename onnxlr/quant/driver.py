"""``quantize``: a float model and calibration feeds in, an INT8 model and its report out.

    model -> load, check float32 -> name nodes -> opset (13 for per-channel, or per-tensor)
          -> quant_pre_process -> quantize all candidates (calibrates once, cached)
          -> [max_error: sensitivity per layer, keep the worst in float until it holds]
          -> onnx.checker (full) -> onnxruntime loads it -> ModelProto + QuantReport

All files live in a temporary folder (onnxruntime's quantizer works on paths); models of 2 GB
and more are written with external data there, and the returned ModelProto has its tensors in
memory (save it with ``save_as_external_data=True``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxlr.data.feeds import cast_inputs
from onnxlr.errors import OnnxlrError
from onnxlr.quant import backend
from onnxlr.quant import model as qmodel
from onnxlr.quant.config import QuantizeConfig
from onnxlr.quant.sensitivity import exclude_until, output_error
from onnxlr.runtime import input_specs, make_session, run_session

log = logging.getLogger("onnxlr")

Feed = dict[str, np.ndarray]


@dataclass
class KeptFloat:
    """A layer left in float, and why."""

    name: str
    op_type: str
    reason: str
    sensitivity: float | None = None  # output error with only this layer quantized


@dataclass
class QuantReport:
    """What ``quantize`` did; ``to_dict()`` for JSON, ``lines()`` for a terminal."""

    mode: str
    calibrate_method: str | None
    per_channel: bool
    per_channel_note: str
    opset_before: int
    opset_after: int
    preprocessed: bool
    preprocess_note: str
    quantized: list[str] = field(default_factory=list)
    kept_float: list[KeptFloat] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    error: float | None = None  # output error of the returned model on the error feeds
    error_all_quantized: float | None = None  # before any layer was kept in float
    max_error: float | None = None
    error_feeds: str = ""  # which feeds the errors were measured on
    calib_feeds: int = 0
    quantizations: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def max_error_met(self) -> bool | None:
        if self.max_error is None or self.error is None:
            return None
        return self.error <= self.max_error

    def to_dict(self) -> dict:
        out = asdict(self)
        out["max_error_met"] = self.max_error_met
        return out

    def lines(self) -> list[str]:
        weights = "per-channel" if self.per_channel else "per-tensor"
        out = [
            f"int8 {self.mode}"
            + (
                f" ({self.calibrate_method} calibration on {self.calib_feeds} feeds)"
                if self.calibrate_method
                else ""
            )
            + f", {weights} weights: {self.per_channel_note}",
            f"opset {self.opset_before} -> {self.opset_after}; pre-processing: "
            + self.preprocess_note,
            f"quantized {len(self.quantized)} layer(s), kept {len(self.kept_float)} in float",
        ]
        out += [f"  float: {k.name} ({k.op_type}): {k.reason}" for k in self.kept_float]
        if self.error is not None:
            bound = "" if self.max_error is None else f" (max_error {self.max_error:g}: "
            bound += (
                "" if self.max_error is None else ("met)" if self.max_error_met else "NOT met)")
            )
            out.append(f"output error {self.error:.4g} (vs the float model) on {self.error_feeds}{bound}")
        out += [f"note: {n}" for n in self.notes]
        return out


# --- feeds --------------------------------------------------------------------------------------


def _check_feeds(feeds: list, specs, where: str) -> list[Feed]:
    """Each feed holds every model input (extra keys dropped), cast to its dtype (same kind):
    the data layer's rule (onnxlr.data.cast_inputs)."""
    out = []
    for i, feed in enumerate(feeds):
        if not isinstance(feed, dict):
            raise OnnxlrError(f"{where} item {i} is a {type(feed).__name__}; give dicts input name -> array")
        out.append(cast_inputs(feed, specs, f"{where} item {i}"))
    return out


def _split_feeds(
    calib: list[Feed], check: list[Feed] | None, config: QuantizeConfig
) -> tuple[list[Feed], list[Feed], str]:
    """(calibration feeds, error feeds, what the error feeds are)."""
    if check is not None:
        return calib, check, f"{len(check)} check feeds"
    if config.max_error is None:
        return calib, calib, f"the {len(calib)} calibration feeds (in-sample)"
    if len(calib) < 2:
        raise OnnxlrError(
            "max_error needs feeds to measure errors on: give check_feeds, or at least 2 "
            "calibration feeds (a part is held out)"
        )
    held = min(len(calib) - 1, max(1, round(len(calib) * config.held_out)))
    return calib[:-held], calib[-held:], f"{held} held-out calibration feeds"


# --- the pipeline -------------------------------------------------------------------------------


def _opset_plan(
    model: onnx.ModelProto, config: QuantizeConfig
) -> tuple[onnx.ModelProto, bool, str]:
    """The model to quantize, whether per-channel is used, and why."""
    before = qmodel.default_opset(model)
    if not config.per_channel:
        return model, False, "per-tensor as configured"
    if config.mode == "dynamic" or before >= qmodel.PER_CHANNEL_OPSET:
        return model, True, "per-channel as configured"
    target = qmodel.PER_CHANNEL_OPSET
    why = f"per-channel DequantizeLinear needs opset {target} (its axis attribute)"
    if not config.upgrade_opset:
        return (
            model,
            False,
            f"per-tensor: {why}, the model has opset {before} and upgrade_opset is off",
        )
    upgraded, failure = qmodel.upgrade_opset(model, target)
    if upgraded is None:
        return model, False, f"per-tensor: {why} and {failure}; the model keeps opset {before}"
    return (
        upgraded,
        True,
        f"per-channel; opset upgraded {before} -> {target} with onnx's version converter ({why})",
    )


class _Trials:
    """Quantizes the prepared model with a node selection and measures its output error against
    the float model's outputs on the error feeds."""

    def __init__(
        self, work: Path, config, per_channel: bool, large: bool, reference_session
    ) -> None:
        self.work, self.config, self.per_channel, self.large = work, config, per_channel, large
        self.session = reference_session
        self.prepared = work / "prepared.onnx"
        self.cache = work / "calibration.json"
        self.calib: list[Feed] = []
        self.check: list[Feed] = []
        self.reference: list = []
        self.count = 0

    def set_feeds(self, calib: list[Feed], check: list[Feed]) -> None:
        self.calib, self.check = calib, check
        self.reference = [run_session(self.session, f, None, "the float model") for f in check]

    def quantize(self, name: str, *, include=None, exclude=None) -> Path:
        self.count += 1
        return backend.run_quantizer(
            self.prepared,
            self.work / f"{name}.onnx",
            self.config,
            per_channel=self.per_channel,
            calib_feeds=self.calib,
            cache=self.cache,
            include=include,
            exclude=exclude,
            large=self.large,
        )

    def error(self, path: Path) -> float:
        session = make_session(path)
        outputs = [run_session(session, f, None, "the quantized model") for f in self.check]
        return output_error(self.reference, outputs)

    def trial(self, *, include=None, exclude=None) -> float:
        """The error of one selection; its files are removed afterwards."""
        path = self.quantize(f"trial_{self.count}", include=include, exclude=exclude)
        try:
            return self.error(path)
        finally:
            for f in (path, Path(str(path) + ".data")):
                f.unlink(missing_ok=True)


def quantize(
    model: onnx.ModelProto | str | os.PathLike,
    calib_feeds: Iterable[Feed] | None,
    config: QuantizeConfig | None = None,
    *,
    check_feeds: Iterable[Feed] | None = None,
) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize ``model`` (a ModelProto or a path) to INT8 with onnxruntime's quantizer.

    ``calib_feeds``: feed dicts (input name -> array at the model's shapes) to calibrate activation
    ranges on (static mode; dynamic mode needs none). ``check_feeds``: feeds to measure the output
    error on (and the layer sensitivities, with ``config.max_error``); without them a held-out part
    of the calibration feeds serves when ``max_error`` is set, else the error is in-sample.
    Returns the quantized model (checked with onnx.checker full_check, loaded by onnxruntime) and
    a :class:`QuantReport`. User errors raise one-line ``OnnxlrError``\\ s.
    """
    config = config or QuantizeConfig()
    start = time.perf_counter()
    source = qmodel.load(model)
    qmodel.check_float32(source, config.op_types)
    renamed = qmodel.name_nodes(source)
    opset_before = qmodel.default_opset(source)
    working, per_channel, pc_note = _opset_plan(source, config)
    large = qmodel.is_large(working)
    calib = list(calib_feeds) if calib_feeds is not None else []
    if config.mode == "static" and not calib:
        raise OnnxlrError(
            "static quantization needs calibration feeds (none given); pass some, or use "
            "mode='dynamic'"
        )

    with tempfile.TemporaryDirectory(prefix="onnxlr-quant-") as tmp:
        work = Path(tmp)
        raw = qmodel.save(working, work / "input.onnx", large=large)
        if config.preprocess:
            preprocessed, pre_note = backend.preprocess(raw, work / "pre.onnx", large=large)
            prepared = qmodel.load(work / "pre.onnx")
            renamed += qmodel.name_nodes(prepared)
        else:
            preprocessed, pre_note, prepared = False, "skipped (preprocess=False)", working
        qmodel.save(prepared, work / "prepared.onnx", large=large)
        cands = qmodel.candidates(prepared, config.op_types)

        session = make_session(work / "prepared.onnx")
        specs = input_specs(session)
        calib = _check_feeds(calib, specs, "calib_feeds")
        check = (
            _check_feeds(list(check_feeds), specs, "check_feeds")
            if check_feeds is not None
            else None
        )
        calib, check, error_feeds = _split_feeds(calib, check, config)
        if not check:
            error_feeds = "no feeds"
        trials = _Trials(work, config, per_channel, large, session)
        trials.set_feeds(calib, check)

        full = trials.quantize("all")
        all_error = trials.error(full) if check else None
        excluded, error, sensitivity = [], all_error, {}
        if config.max_error is not None and all_error is not None:
            search = exclude_until(
                [n for n, _ in cands],
                config.max_error,
                all_error,
                error_only=lambda n: trials.trial(include=[n]),
                error_without=lambda names: trials.trial(exclude=names),
            )
            excluded, error, sensitivity = search.excluded, search.error, search.sensitivity
        final = trials.quantize("final", exclude=excluded) if excluded else full
        onnx.checker.check_model(str(final), full_check=True)
        make_session(final)  # onnxruntime loads it
        result = onnx.load(str(final))

    done = qmodel.quantized_names(result, cands, config.mode)
    kept = _kept_float(cands, done, excluded, sensitivity, config)
    kept += [
        KeptFloat(
            name,
            op,
            f"inside a subgraph of {owner!r}: onnxruntime's quantizer only "
            f"quantizes the main graph",
        )
        for name, op, owner in qmodel.subgraph_layers(prepared, config.op_types)
    ]
    report = QuantReport(
        mode=config.mode,
        calibrate_method=config.calibrate_method if config.mode == "static" else None,
        per_channel=per_channel,
        per_channel_note=pc_note,
        opset_before=opset_before,
        opset_after=qmodel.default_opset(result),
        preprocessed=preprocessed,
        preprocess_note=pre_note,
        quantized=[n for n, _ in cands if n in done],
        kept_float=kept,
        sensitivity=sensitivity,
        error=error,
        error_all_quantized=all_error,
        max_error=config.max_error,
        error_feeds=error_feeds,
        calib_feeds=len(calib) if config.mode == "static" else 0,
        quantizations=trials.count,
        seconds=time.perf_counter() - start,
        notes=[f"named {renamed} unnamed or duplicate-named node(s) for onnxruntime"]
        if renamed
        else [],
    )
    return result, report


def _kept_float(cands, done, excluded, sensitivity, config) -> list[KeptFloat]:
    out = []
    for name, op_type in cands:
        if name in excluded:
            reason = (
                f"sensitivity {sensitivity[name]:.3g} (output error with only this layer "
                f"quantized); "
                f"kept in float to meet max_error {config.max_error:g}"
            )
            out.append(KeptFloat(name, op_type, reason, sensitivity[name]))
        elif name not in done:
            out.append(
                KeptFloat(
                    name,
                    op_type,
                    "onnxruntime's quantizer left it in float (no constant weight, or an input it "
                    "cannot quantize)",
                    sensitivity.get(name),
                )
            )
    return out
