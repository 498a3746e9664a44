"""The compress pipeline: find targets -> choose ranks -> factorize -> splice -> check.

``compress`` works on a ModelProto (a copy: the caller's model and file are never modified) and
returns the new model with a report that says, for every candidate layer, what was done or why
nothing was.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxlr import graph as g
from onnxlr.decompose import cp, svd, tucker
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, Replacement, chain_conv_macs, conv_macs, linear_macs
from onnxlr.ranks import RankLog, RankSpec, cp_rank, parse_rank, svd_rank, tucker_ranks
from onnxlr.report import CompressReport, LayerReport
from onnxlr.splice import default_opset, splice
from onnxlr.targets import Target, fill_runtime_shapes, find_targets

log = logging.getLogger("onnxlr")

METHODS = ("auto", "svd", "tucker", "cp")
# Spatial size assumed per axis when shape inference cannot tell, only to decide whether a
# replacement reduces MACs (the ratio barely depends on it); reports show unknown MACs as null.
NOMINAL_SPATIAL = 16


@dataclass(frozen=True)
class Rule:
    """One per-layer rule: layers whose name or op type matches ``match`` use this method/rank."""

    match: str
    method: str | None = None
    rank: RankSpec | None = None


@dataclass(frozen=True)
class CompressConfig:
    method: str = "auto"
    rank: RankSpec = field(default_factory=lambda: parse_rank("0.5"))
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    force: bool = False
    round_to: int = 8  # measured by tools/bench_round_to.py: ORT CPU's NCHWc convs
    target_opset: int | None = None
    # Data-aware refinement (onnxlr.calibrate): an .npz or a folder of them, keyed by input name.
    calib: str | os.PathLike | None = None
    calib_samples: int | None = None
    calib_mode: str = "asymmetric"
    # Input whose zeros mark padding tokens to leave out of the statistics: "auto" (attention_mask
    # when the model has it), "none", or an input name.
    calib_mask: str = "auto"
    # Budgeted allocation (onnxlr.budget): at most one goal; per-layer method/rank chosen to meet it.
    target_speedup: float | None = None
    target_macs: float | None = None
    max_error: float | None = None
    provider: str = "cpu"  # execution provider the budget's latencies are measured on
    cache_dir: str | os.PathLike | None = None  # latency cache (default ~/.cache/onnxlr)

    def __post_init__(self):
        if self.method not in METHODS:
            raise OnnxlrError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        object.__setattr__(self, "rank", parse_rank(self.rank))
        if int(self.round_to) < 1:
            raise OnnxlrError(f"--round-to must be an integer >= 1, got {self.round_to}")
        for pattern in self.include + self.exclude:
            _compile(pattern)
        for i, rule in enumerate(self.rules):
            if rule.method is not None and rule.method not in METHODS:
                raise OnnxlrError(f"rule {i + 1} ({rule.match!r}): unknown method {rule.method!r}; choose one of {', '.join(METHODS)}")
            _compile(rule.match, f"rule {i + 1}")
        if self.target_opset is not None and self.target_opset < 1:
            raise OnnxlrError(f"--target-opset must be a positive opset number, got {self.target_opset}")
        if self.calib_mode not in ("asymmetric", "symmetric"):
            raise OnnxlrError(f"unknown --calib-mode {self.calib_mode!r}: choose one of asymmetric, symmetric")
        if self.calib_samples is not None and int(self.calib_samples) < 1:
            raise OnnxlrError(f"--calib-samples must be an integer >= 1, got {self.calib_samples}")
        _check_budget(self)


def _check_budget(config: CompressConfig) -> None:
    goals = [n for n in ("target_speedup", "target_macs", "max_error") if getattr(config, n) is not None]
    if len(goals) > 1:
        raise OnnxlrError(f"give one budget goal, not {' and '.join('--' + n.replace('_', '-') for n in goals)}")
    if config.target_speedup is not None and not float(config.target_speedup) > 1:
        raise OnnxlrError(f"--target-speedup must be a number > 1, got {config.target_speedup}")
    if config.target_macs is not None and not 0 < float(config.target_macs) < 1:
        raise OnnxlrError(f"--target-macs must be a fraction in (0, 1), got {config.target_macs}")
    if config.max_error is not None and not float(config.max_error) > 0:
        raise OnnxlrError(f"--max-error must be a number > 0, got {config.max_error}")


def _compile(pattern: str, where: str = "pattern") -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise OnnxlrError(f"{where}: invalid regular expression {pattern!r}: {exc}") from None


def compress(model: onnx.ModelProto | str | os.PathLike, config: CompressConfig | None = None, **options):
    """Factorize the model's heavy layers. Returns (new ModelProto, CompressReport).

    ``options`` are CompressConfig fields (method, rank, include, exclude, rules, force, round_to,
    target_opset) for callers who do not build a config themselves.
    """
    config = replace(config, **options) if config is not None else CompressConfig(**options)
    if isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()
        work.CopyFrom(model)
    else:
        work = g.load_model(model)  # our own copy: no second one needed
    return _compress_model(work, config)


def _compress_model(work: onnx.ModelProto, config: CompressConfig, *, check_output: bool = True):
    """compress() on a model the caller hands over: ``work`` is modified in place.

    ``check_output=False``: the caller checks the saved file instead (cheaper than serializing a
    big model for the in-memory checker)."""
    g.check_runtime_opset(work, config.target_opset)
    if config.target_opset is not None:
        work = _convert_opset(work, config.target_opset)

    report = CompressReport()
    report.model_notes.extend(g.fold_constant_weights(work))
    shapes = g.infer_shapes(work)
    targets = find_targets(work, shapes)
    fill_runtime_shapes(work, targets)
    _apply_filters(targets, config, report)
    runs_model = config.calib is not None or config.target_speedup is not None or config.target_macs is not None
    if g.has_lazy_tensors(work) and (runs_model or config.max_error is not None):
        g.materialize_external(work)  # calibration and budgets run the model in memory
    if config.target_speedup is not None or config.target_macs is not None or config.max_error is not None:
        from onnxlr.budget import apply_budget  # measures candidates, pins per-layer rules

        config = apply_budget(work, targets, config, report)
    names = g.NameScope(g.all_names(work))
    opset = default_opset(work)
    todo = [t for t in targets if t.skip is None]
    started = time.perf_counter()
    calibrator = None
    if config.calib is not None:
        from onnxlr.calibrate import Calibrator

        calibrator = Calibrator(work, todo, config.calib, config.calib_samples, config.calib_mode,
                                config.calib_mask)
    with single_threaded_blas():
        _factorize_all(targets, todo, config, names, opset, work.ir_version, report, calibrator)
    if calibrator is not None:
        masked = f", padding rows left out by input {calibrator.mask_input!r}" if calibrator.mask_input else ""
        report.model_notes.append(f"calibrated ({config.calib_mode}) on {calibrator.total} samples "
                                  f"in {calibrator.n_stages} pass(es), {calibrator.seconds:.1f} s{masked}")
    if not targets:
        report.model_notes.append("the model has no Conv, Gemm or MatMul layer: nothing to factorize")
    log.info("factorized %d of %d layers in %.1f s", len(report.replaced), len(targets), time.perf_counter() - started)
    if check_output:
        _check_output(work)
    return work, report


def single_threaded_blas():
    """Factorize with one BLAS thread.

    Measured on this 2-core machine under load: scipy's eigh of a 2048 Gram took 9 s with one
    OpenBLAS thread and 30-47 s with two (numpy's SVD showed the same, 0.8 s vs 14 s); on a quiet
    machine two threads win little. One thread is the robust choice.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _factorize_all(targets, todo, config, names, opset, ir_version, report, calibrator=None) -> None:
    show_progress = sys.stderr.isatty() and not log.isEnabledFor(logging.INFO)
    for target in targets:
        if target.skip is not None:
            report.layers.append(_skipped_report(target))
            continue
        position = todo.index(target) + 1
        if show_progress:
            print(f"\r\033[Konnxlr: factorizing [{position}/{len(todo)}] {target.name}", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        layer_report = _factorize_one(target, config, names, opset, ir_version, calibrator)
        report.layers.append(layer_report)
        target.layer = None  # drop this weight's arrays now: peak memory stays near one model
        log.info(
            "[%d/%d] %s %s: %s %s (%.1f s)",
            position, len(todo), target.op_type, target.name, layer_report.method or "kept",
            layer_report.ranks or layer_report.skipped, time.perf_counter() - t0,
        )
    if show_progress and todo:
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def _convert_opset(model: onnx.ModelProto, target_opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    current = default_opset(model)
    if current == target_opset:
        return model
    try:
        converted = version_converter.convert_version(model, target_opset)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrError(
            f"cannot convert the model from opset {current} to {target_opset}: {first}; try another --target-opset"
        ) from None
    _raise_ir_version(converted)
    return converted


def _raise_ir_version(model: onnx.ModelProto) -> None:
    """The version converter keeps the old IR version; stamp the one the new opset needs.

    Crossing IR 4 changes what an initializer listed in graph.input means (a constant before, an
    overridable default after), so those weights leave graph.input: they were constants.
    """
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version >= needed:
        return
    if model.ir_version < 4 <= needed:
        for graph in g.iter_graphs(model.graph):
            weights = {t.name for t in graph.initializer}
            kept = [vi for vi in graph.input if vi.name not in weights]
            del graph.input[:]
            graph.input.extend(kept)
    model.ir_version = needed


def _apply_filters(targets: list[Target], config: CompressConfig, report: CompressReport) -> None:
    def matches(pattern: str, target: Target) -> bool:
        regex = _compile(pattern)
        return bool(regex.search(target.name) or regex.fullmatch(target.op_type))

    for pattern in config.include:
        if not any(matches(pattern, t) for t in targets):
            report.warnings.append(f"--include {pattern!r} matches no layer")
    for pattern in config.exclude:
        if not any(matches(pattern, t) for t in targets):
            report.warnings.append(f"--exclude {pattern!r} matches no layer")
    for target in targets:
        if target.skip is not None:
            continue
        if config.include and not any(matches(p, target) for p in config.include):
            target.skip = "not selected by --include"
        excluded = [p for p in config.exclude if matches(p, target)]
        if excluded:
            target.skip = f"excluded by --exclude {excluded[0]!r}"
    for warning in report.warnings:
        log.warning(warning)


def _rule_for(target: Target, config: CompressConfig) -> tuple[str, RankSpec]:
    for rule in config.rules:
        regex = _compile(rule.match)
        if regex.search(target.name) or regex.fullmatch(target.op_type):
            return rule.method or config.method, rule.rank or config.rank
    return config.method, config.rank


def method_for(target: Target, requested: str) -> tuple[str, str | None]:
    """The method a layer gets, and a note when the requested one does not apply to it."""
    layer = target.layer
    if isinstance(layer, ConvLayer) and not layer.is_pointwise:
        return ("tucker" if requested == "auto" else requested), None
    if requested in ("auto", "svd"):
        return "svd", None
    return "svd", f"{requested} applies to KxK convs; this layer uses svd"


def decompose(target: Target, method: str, spec: RankSpec, round_to: int) -> tuple[Replacement, RankLog]:
    rank_log = RankLog()
    layer = target.layer
    if isinstance(layer, ConvLayer):
        group_shape = layer.group_weights()[0].shape
        if method == "tucker":
            choose = lambda out, inp, t, s: tucker_ranks(spec, out, inp, group_shape, round_to, rank_log)  # noqa: E731
            return tucker.tucker2_chain(layer, choose), rank_log
        if method == "cp":
            choose = lambda out, inp, t, s, k: cp_rank(spec, out, inp, group_shape, round_to, rank_log)  # noqa: E731
            return cp.cp_chain(layer, choose), rank_log
        matrix_shape = (int(np.prod(group_shape[1:])), group_shape[0])
        choose = lambda spectra, full: svd_rank(spec, spectra, matrix_shape, round_to, rank_log)  # noqa: E731
        return svd.conv_chain(layer, choose), rank_log
    choose = lambda spectra, full: svd_rank(spec, spectra, layer.weight.shape, round_to, rank_log)  # noqa: E731
    return svd.linear_chain(layer, choose), rank_log


def _factorize_one(target: Target, config: CompressConfig, names: g.NameScope, opset: int, ir_version: int,
                   calibrator=None) -> LayerReport:
    requested, spec = _rule_for(target, config)
    method, note = method_for(target, requested)
    replacement, rank_log = decompose(target, method, spec, config.round_to)
    if calibrator is not None:  # data-aware factor values at the same ranks (onnxlr.calibrate)
        replacement = calibrator.refine(target, replacement)
    if note:
        replacement.notes.append(note)
    replacement.notes.extend(rank_log.notes)
    original = target.layer.weight
    params_before = int(original.size)
    params_after = sum(int(step.weight.size) for step in replacement.steps)
    macs_before, macs_after = layer_macs(target, replacement)
    nominal_before, nominal_after = layer_macs(target, replacement, nominal=True)
    error = replacement.weight_rel_error
    if error is None:
        error = float(np.linalg.norm(replacement.reconstruction - original) / max(np.linalg.norm(original), 1e-30))
    report = LayerReport(
        name=target.name,
        op_type=target.op_type,
        method=method,
        ranks=replacement.ranks,
        raw_ranks=rank_log.raw,
        weight_shape=list(target.weight_shape),
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        weight_rel_error=error,
        skipped=None,
        output=target.node.output[0],
        notes=replacement.notes,
    )
    if nominal_after >= nominal_before and not config.force:
        report.skipped = (
            f"{method} at ranks {replacement.ranks} would not reduce MACs "
            f"({nominal_before} -> {nominal_after} per sample); use --force to replace anyway"
        )
        report.params_after, report.macs_after = params_before, macs_before
        report.method, report.weight_rel_error = None, None
        return report
    del original
    target.layer = None  # the original weight is not needed to splice: free it first (peak memory)
    new_nodes = splice(target, replacement, names, opset, ir_version)
    if calibrator is not None:
        calibrator.attach(target, new_nodes, names)
    return report


def layer_macs(target: Target, replacement: Replacement, nominal: bool = False) -> tuple[int | None, int | None]:
    """(before, after) MACs per sample; ``nominal`` fills unknown sizes with a stand-in."""
    layer = target.layer
    if isinstance(layer, ConvLayer):
        out_spatial, in_spatial = target.out_spatial, target.in_spatial
        if nominal and (out_spatial is None or None in out_spatial or in_spatial is None or None in in_spatial):
            out_spatial = (NOMINAL_SPATIAL,) * layer.spatial_rank
            in_spatial = tuple(NOMINAL_SPATIAL * s for s in layer.strides)
            before = conv_macs(layer.weight.shape, layer.group, out_spatial)
            return before, chain_conv_macs(replacement.steps, in_spatial, None)
        before = conv_macs(layer.weight.shape, layer.group, out_spatial)
        after = chain_conv_macs(replacement.steps, in_spatial, out_spatial) if before is not None else None
        return before, after
    rows = target.rows if target.rows is not None or not nominal else 1
    weights = [step.weight for step in replacement.steps]
    return linear_macs([layer.weight], rows), linear_macs(weights, rows)


def _skipped_report(target: Target) -> LayerReport:
    weight = target.layer.weight if target.layer is not None else None
    size = int(np.prod(target.weight_shape)) if target.weight_shape else 0
    macs = None
    if target.layer is not None:
        if isinstance(target.layer, ConvLayer):
            macs = conv_macs(target.layer.weight.shape, target.layer.group, target.out_spatial)
        else:
            macs = linear_macs([weight], target.rows)
    return LayerReport(
        name=target.name,
        op_type=target.op_type,
        method=None,
        ranks=None,
        weight_shape=list(target.weight_shape),
        params_before=size,
        params_after=size,
        macs_before=macs,
        macs_after=macs,
        weight_rel_error=None,
        skipped=target.skip,
        output=target.node.output[0] if target.node.output else None,
    )


def _check_output(model: onnx.ModelProto) -> None:
    """Our output must pass the checker; a failure here is a bug in onnxlr, not the user's.

    Models over 2 GB or with weights still on disk are checked by path once saved (compress_file).
    """
    if model.ByteSize() < g.PROTOBUF_LIMIT and not g.has_lazy_tensors(model):
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
    **options,
):
    """compress() from a file to a file; the input is never modified, the output is atomic.

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
    model = g.load_model(input_path, data_files=data_files, lazy_external=True)
    compressed, report = _compress_model(model, config, check_output=False)
    del model
    if external_data is None and data_files:
        external_data = True  # the input kept its weights beside it: so does the output
    replacing_input = output_path.exists() and os.path.samefile(input_path, output_path)
    protected = () if replacing_input else data_files  # --overwrite may replace the input's data
    g.save_model_atomic(compressed, output_path, external_data=external_data, protected=protected)
    # Our output must pass the checker (a failure is an onnxlr bug, not the user's). Checking the
    # file by path handles external data and > 2 GB, and never serializes the model in memory.
    onnx.checker.check_model(str(output_path), full_check=True)
    if report_path is not None:
        write_text_atomic(Path(report_path), report.to_json())
    return compressed, report


def _check_output_path(input_path: Path, output_path: Path, overwrite: bool) -> None:
    if output_path.exists() and input_path.exists() and os.path.samefile(input_path, output_path) and not overwrite:
        raise OnnxlrError(f"output {output_path} is the input file; choose another output path or pass --overwrite")
    if output_path.is_dir():
        raise OnnxlrError(f"output {output_path} is a directory; give a file name")
    g.check_writable(output_path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = g._temp_path(path.parent if str(path.parent) else Path("."), path.name)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
