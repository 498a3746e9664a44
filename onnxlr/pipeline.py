"""The compress pipeline: targets -> decisions -> factorize -> refine -> splice -> check.

    model.onnx -> fold constant weights -> find targets (model.targets) -> select (config)
      -> decisions: per target a method and ranks, from --method/--rank/--config, or from a
         budget (onnxlr.budget), whose decisions carry the replacements it refined and measured
      -> factorize (methods) -> refine on calibration data (calib) -> splice (model.splice)
      -> check (onnx.checker) -> out.onnx
      [--quantize int8: chains balanced before splicing (onnxlr.quant.balance_chain), then the
       factorized model quantized on the --calib samples (every 5th held out for its checks)]

A :class:`Decision` names its target by position (the order of ``find_targets``) and output
tensor, never by a pattern on its name: node names need not be unique, and may be empty.
``compress`` works on a copy of the model (the caller's model and file are never modified) and
returns the new model with a report that says, for every candidate layer, what was done or why
nothing was.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from onnxlr import methods
from onnxlr import model as m
from onnxlr.config import CompressConfig, apply_filters
from onnxlr.decisions import Decision, rule_decisions
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, conv_macs, linear_macs
from onnxlr.methods.linalg import single_threaded_blas
from onnxlr.model.edit import detach_weights
from onnxlr.model.io import track_temp, untrack_temp
from onnxlr.model.splice import splice
from onnxlr.model.targets import Target, fill_runtime_shapes, find_targets, layer_macs
from onnxlr.ranks import RankSpec
from onnxlr.report.compress import CompressReport, LayerReport, format_ranks, human
from onnxlr.report.progress import Progress
from onnxlr.runtime import trim_heap

log = logging.getLogger("onnxlr")


def compress(model: onnx.ModelProto | str | os.PathLike, config: CompressConfig | None = None, **options):
    """Factorize the model's heavy layers. Returns (new ModelProto, CompressReport).

    ``options`` are CompressConfig fields (method, rank, include, exclude, rules, force, round_to,
    calib, target_speedup, ...) for callers who do not build a config themselves.
    """
    config = replace(config, **options) if config is not None else CompressConfig(**options)
    if isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()
        work.CopyFrom(model)
    else:
        work = m.load_model(model)  # our own copy: no second one needed
    return compress_model(work, config)


def compress_model(work: onnx.ModelProto, config: CompressConfig, *, check_output: bool = True,
                   float_path: str | os.PathLike | None = None, weights_file: str | None = None):
    """compress() on a model the caller hands over: ``work`` is modified in place.

    ``check_output=False``: the caller checks the saved file instead (cheaper than serializing a
    big model for the in-memory checker). ``float_path``: with ``config.quantize``, the factorized
    float model is also saved there (before quantization), e.g. to compare the steps.
    ``weights_file``: the new layers' big weights are appended to this file (external data) instead
    of held in memory; the caller removes it once the model is saved."""
    m.check_runtime_opset(work, config.target_opset)
    if config.quantize is not None:
        from onnxlr.quant.model import check_float32

        check_float32(work, config.quantize.op_types)  # refuse fp16 layers before any work
    if config.target_opset is not None:
        work = m.convert_opset(work, config.target_opset)
    report = CompressReport()
    report.model_notes.extend(m.fold_constant_weights(work))
    targets = prepare_targets(work, config, report)
    if m.has_lazy_tensors(work) and (config.budgeted or config.quantize is not None):
        m.materialize_external(work)  # budgets and quantization run the model in memory (calibration need not)
    started = time.perf_counter()
    if config.budgeted:
        from onnxlr.budget.allocate import plan_decisions

        decisions = plan_decisions(work, targets, config, report)
    else:
        decisions = rule_decisions(targets, config)
    calibrator, prepared = None, {}
    if config.calib is not None and any(d.replacement is None for d in decisions):
        from onnxlr.calib.collect import Calibrator

        by_target = {id(targets[d.index]): d for d in decisions}

        def replacement_for(target):  # data-free factors, computed once: calibration sizes its statistics by them
            if id(target) not in prepared:
                prepared[id(target)] = factorize(target, by_target[id(target)].method, by_target[id(target)].ranks,
                                                 config.round_to)
            return prepared[id(target)][0]

        with single_threaded_blas():
            calibrator = Calibrator(
                work, [targets[d.index] for d in decisions], config.calib, config.calib_samples, config.calib_mode,
                config.calib_mask, memory=config.calib_memory, stages=config.calib_stages,
                whitened={id(targets[d.index]): methods.get(d.method).whitened for d in decisions},
                replacement_for=replacement_for)
    with single_threaded_blas():
        apply_decisions(work, targets, decisions, config, report, calibrator, prepared, weights_file)
    if calibrator is not None:
        report.model_notes.append(calibrator.summary())
    if not targets:
        report.model_notes.append("the model has no Conv, Gemm or MatMul layer: nothing to factorize")
    log.info("factorized %d of %d layers in %.1f s", len(report.replaced), len(targets), time.perf_counter() - started)
    if check_output:
        _check_output(work)
    if config.quantize is not None:
        work = quantize_factorized(work, config, report, float_path)
    return work, report


def quantize_factorized(work: onnx.ModelProto, config: CompressConfig, report: CompressReport,
                        float_path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """The factorized model quantized (onnxlr.quant) on the --calib samples, its report in
    ``report.quantization``; the float model is saved to ``float_path`` first when given."""
    from onnxlr.quant import quantize_on

    if float_path is not None:
        m.save_model_atomic(work, Path(float_path))
    started = time.perf_counter()
    quantized, quant_report = quantize_on(work, config.quantize, config.calib, config.calib_samples)
    report.quantization = quant_report
    log.info("quantized to int8 in %.1f s", time.perf_counter() - started)
    return quantized


def prepare_targets(work: onnx.ModelProto, config: CompressConfig, report: CompressReport) -> list[Target]:
    """Every candidate layer, sized (shape inference, then one run on a real or --shape feed where
    it stops), with --include/--exclude applied."""
    targets = find_targets(work, m.infer_shapes(work))
    fill_runtime_shapes(work, targets, sizing_feed(work, config))
    apply_filters(targets, config, report)
    return targets


def sizing_feed(work: onnx.ModelProto, config: CompressConfig) -> dict | None:
    """One feed to size layers with: the first calibration sample, or a random one at --shape
    shapes; None when neither is given (then a batch-1 run on zeros where only batch is dynamic)."""
    if config.calib is None and not config.shapes:
        return None
    if m.has_lazy_tensors(work) or work.ByteSize() > m.query.RUNTIME_SHAPES_MAX_BYTES:
        return None
    from onnxlr import data

    specs = data.model_input_specs(work)
    source = data.open_source(config.calib, specs, shapes=None if config.calib is not None else config.shapes,
                              samples=1, what="--calib")
    return next(iter(source), None)


def apply_decisions(work, targets, decisions, config, report, calibrator=None, prepared=None,
                    weights_file: str | None = None) -> None:
    """Factorize (where no replacement is given), refine, check the MACs and splice, in graph
    order; every target gets a row in the report. ``prepared``: id(target) -> (Replacement,
    RankLog) already factorized (for the calibrator), used instead of factorizing again."""
    prepared = {} if prepared is None else prepared
    by_index = {d.index: d for d in decisions}
    names = m.NameScope(m.all_names(work))
    opset = m.default_opset(work)
    progress = Progress("factorizing", len(decisions), unit="layers")
    done = 0
    for i, target in enumerate(targets):
        decision = by_index.get(i)
        if decision is None:
            report.layers.append(skipped_report(target, target.skip or "kept"))
            continue
        t0 = time.perf_counter()
        layer_report = _apply_one(target, decision, config, names, opset, work.ir_version, calibrator,
                                  prepared.pop(id(target), None), weights_file)
        report.layers.append(layer_report)
        target.layer = None  # drop this weight's arrays now: peak memory stays near one model
        done += 1
        progress.update(done, target.name)
        log.info("[%d/%d] %s %s: %s %s (%.1f s)", done, len(decisions), target.op_type, target.name,
                 layer_report.method or "kept", layer_report.ranks or layer_report.skipped, time.perf_counter() - t0)
    progress.close()


def factorize(target: Target, method_name: str, ranks: RankSpec | dict, round_to: int):
    """(Replacement, RankLog) of one target by one method."""
    return methods.get(method_name).factorize(target.layer, ranks, round_to)


def _apply_one(target: Target, decision: Decision, config: CompressConfig, names, opset: int, ir_version: int,
               calibrator=None, prepared=None, weights_file: str | None = None) -> LayerReport:
    replacement, raw = decision.replacement, None
    if replacement is None:
        replacement, rank_log = prepared or factorize(target, decision.method, decision.ranks, config.round_to)
        replacement.notes.extend(decision.notes + rank_log.notes)
        raw = rank_log.raw
        macs_before, macs_after = layer_macs(target, replacement, nominal=True)
        if macs_after >= macs_before and not config.force:
            return skipped_report(target, (
                f"{decision.method} at ranks {format_ranks(replacement.ranks)} would not reduce MACs "
                f"({human(macs_before)} -> {human(macs_after)} per sample); use --force to replace anyway"))
        if calibrator is not None:  # data-aware factor values at the same ranks (onnxlr.calib)
            replacement = calibrator.refine(target, replacement)
        if config.quantize is not None:  # a budget's replacements come balanced: it measured them so
            from onnxlr.quant import balance_replacement

            replacement = balance_replacement(replacement)
    else:
        replacement.notes.extend(decision.notes)
    original = target.layer.weight
    macs_before, macs_after = layer_macs(target, replacement)
    error = replacement.weight_rel_error
    if error is None:
        error = float(np.linalg.norm(replacement.low_rank_weight() - original) / max(np.linalg.norm(original), 1e-30))
    report = LayerReport(
        name=target.name, op_type=target.op_type, method=replacement.method, ranks=dict(replacement.ranks),
        raw_ranks=raw, weight_shape=list(target.weight_shape), params_before=int(original.size),
        params_after=sum(int(step.weight.size) for step in replacement.steps), macs_before=macs_before,
        macs_after=macs_after, weight_rel_error=error, skipped=None, output=target.node.output[0],
        notes=list(replacement.notes),
    )
    del original
    target.layer = None  # the original weight is not needed to splice: free it first (peak memory)
    splice(target, replacement, names, opset, ir_version, weights_file)
    return report


def skipped_report(target: Target, reason: str) -> LayerReport:
    size = int(np.prod(target.weight_shape)) if target.weight_shape else 0
    macs = None
    if target.layer is not None:
        if isinstance(target.layer, ConvLayer):
            macs = conv_macs(target.layer.weight.shape, target.layer.group, target.out_spatial)
        else:
            macs = linear_macs([target.layer.weight], target.rows)
    return LayerReport(
        name=target.name, op_type=target.op_type, method=None, ranks=None, weight_shape=list(target.weight_shape),
        params_before=size, params_after=size, macs_before=macs, macs_after=macs, weight_rel_error=None,
        skipped=reason, output=target.node.output[0] if target.node.output else None,
    )


def _check_output(model: onnx.ModelProto) -> None:
    """Our output must pass the checker; a failure here is a bug in onnxlr, not the user's.

    Models over 2 GB or with weights still on disk are checked by path once saved (compress_file).
    """
    if model.ByteSize() < m.PROTOBUF_LIMIT and not m.has_lazy_tensors(model):
        onnx.checker.check_model(model, full_check=True)


# --- files ----------------------------------------------------------------------------------


def compress_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompressConfig | None = None,
    *,
    overwrite: bool = False,
    external_data: bool | None = None,
    report_path: str | os.PathLike | None = None,
    float_path: str | os.PathLike | None = None,
    **options,
):
    """compress() from a file to a file; the input is never modified, the output is atomic.

    With ``config.quantize`` the output is the INT8 model; ``float_path`` also keeps the factorized
    float model it was quantized from (for ``onnxlr.proof.steps.compare_steps``).

    An input with external data gives an output with external data (``<output>.data``) unless
    ``external_data=False``; the returned model's tensors then point at that file.
    """
    config = replace(config, **options) if config is not None else CompressConfig(**options)
    input_path, output_path = Path(input_path), Path(output_path)
    _check_output_path(input_path, output_path, overwrite)
    if report_path is not None:
        _check_output_path(input_path, Path(report_path), overwrite=False)
    data_files: list[Path] = []
    # External weights stay on disk (memory-mapped when factorized, streamed when saved), and the
    # model is compressed in place: peak memory stays well under the model's size.
    model = m.load_model(input_path, data_files=data_files, lazy_external=True)
    weights_file = None
    if _calibrating_lazily(model, config, _file_bytes(input_path, data_files)):
        # Calibration runs the model in passes while it is compressed: with its weights, and the
        # new layers' weights, in a temporary file, memory-mapped, they are not held twice (a numpy
        # array per layer beside the protobuf's bytes; VGG-16: 553 MB more at every pass; a 2 GB
        # decoder's factors: 1.3 GB by its last pass). Beside the model's own external data when
        # that folder is writable: calibration's session files then refer to it without a copy.
        weights_file = _temp_weights_file(m.writable_data_folder(model))
        if not m.has_lazy_tensors(model):
            model = detach_weights(model, weights_file)
            trim_heap()
    try:
        compressed, report = compress_model(model, config, check_output=False, float_path=float_path,
                                            weights_file=weights_file)
        del model
        if external_data is None and data_files:
            external_data = True  # the input kept its weights beside it: so does the output
        if weights_file is not None and not external_data:
            m.materialize_external(compressed)  # the model returned must not refer to the temporary file
        _save_and_check(compressed, input_path, output_path, external_data, data_files, report, report_path)
    finally:
        if weights_file is not None:
            Path(weights_file).unlink(missing_ok=True)
            untrack_temp(weights_file)
    return compressed, report


#: An inline model at least this big is calibrated with its weights in a temporary file.
DETACH_BYTES = 64 * 2**20


def _calibrating_lazily(model: onnx.ModelProto, config: CompressConfig, file_bytes: int) -> bool:
    """Whether to keep the weights of ``model`` (an inline one of DETACH_BYTES or more is moved
    there first) and the new layers' weights in a temporary file while compressing it: calibrated
    without a budget or quantization (those run the model in memory), with external data or big.
    The size is the files' (ByteSize would serialize the model: 1 GB more for VGG-16)."""
    return (config.calib is not None and not config.budgeted and config.quantize is None
            and (m.has_lazy_tensors(model) or file_bytes >= DETACH_BYTES))


def _file_bytes(path: Path, data_files: list[Path]) -> int:
    return sum(p.stat().st_size for p in [path, *data_files])


def _temp_weights_file(folder: str | None) -> str:
    fd, path = tempfile.mkstemp(prefix=".onnxlr-weights-", suffix=".data", dir=folder)
    os.close(fd)
    track_temp(path)  # an interruption removes it
    return path


def _save_and_check(compressed, input_path, output_path, external_data, data_files, report, report_path) -> None:
    replacing_input = output_path.exists() and os.path.samefile(input_path, output_path)
    protected = () if replacing_input else data_files  # --overwrite may replace the input's data
    m.save_model_atomic(compressed, output_path, external_data=external_data, protected=protected)
    # Our output must pass the checker (a failure is an onnxlr bug, not the user's). Checking the
    # file by path handles external data and > 2 GB, and never serializes the model in memory.
    onnx.checker.check_model(str(output_path), full_check=True)
    if report_path is not None:
        m.write_text_atomic(Path(report_path), report.to_json())


def _check_output_path(input_path: Path, output_path: Path, overwrite: bool) -> None:
    if output_path.exists() and input_path.exists() and os.path.samefile(input_path, output_path) and not overwrite:
        raise OnnxlrError(f"output {output_path} is the input file; choose another output path or pass --overwrite")
    if output_path.is_dir():
        raise OnnxlrError(f"output {output_path} is a directory; give a file name")
    m.check_writable(output_path)
