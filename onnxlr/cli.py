"""Command-line interface: a thin layer that maps flags onto the Python API.

Every subcommand has one ``_add_<name>`` function declaring its flags and one ``_run_<name>``
function that calls the public API and returns the exit status. User errors (``OnnxlrError``) are
caught once, in ``main``, and printed as a single line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from onnxlr.errors import OnnxlrError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
COMMANDS = ("compress", "inspect", "verify", "bench", "sweep")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise OnnxlrError so they print as one line with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise OnnxlrError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# --- shared argument groups -------------------------------------------------------------------


def _add_selection_options(p) -> None:
    """Method, ranks and which layers: compress and sweep."""
    from onnxlr.config import CompressConfig
    from onnxlr.methods import CHOICES, REGISTRY

    listing = "; ".join(f"{name}: {method.summary}" for name, method in REGISTRY.items())
    p.add_argument("--method", default="auto", choices=CHOICES, help="auto (the default) is svd for Gemm, "
                   f"MatMul and 1x1 convs and tucker for KxK convs; svd on a KxK conv is the channel decomposition. {listing}")
    p.add_argument("--round-to", type=int, default=None, help="round derived ranks (fraction, energy, "
                   "evbmf) up to a multiple of N, capped at the full dimension; integer ranks are kept "
                   f"(default: {CompressConfig().round_to}: onnxruntime CPU's blocked NCHWc convs want "
                   "channel counts in multiples of 8; 1 = no rounding)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="only layers whose name, output tensor or op type matches; repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave layers whose name, output tensor or op type matches; repeatable")


def _add_calib_options(p) -> None:
    """Calibration data: compress and sweep."""
    p.add_argument("--calib", metavar="DATA", help="calibration data: an .npz keyed by input name "
                   "(samples stacked on the batch axis) or a folder of .npz files (each stacked, or one "
                   "feed at the model's exact shapes); refines the factors on it")
    p.add_argument("--calib-loader", metavar="FILE.py[:FN]", help="calibration data from a Python "
                   "function (default name: load_data) returning an iterable of feed dicts, input name "
                   "-> array; called again for every pass")
    p.add_argument("--calib-images", metavar="DIR", help="calibration data from a folder of image files "
                   "(png, jpeg, bmp, ...; needs pip install onnxlr[images]) for the model's one image "
                   "input: resized (aspect kept) to cover --size, center-cropped, x = (pixel / --scale "
                   "- --mean) / --std")
    g = p.add_argument_group("image preprocessing (--calib-images)")
    g.add_argument("--size", metavar="S|H,W", help="crop size (default: the input's fixed height and width)")
    g.add_argument("--resize", type=int, metavar="N", help="resize the shorter side to N before the "
                   "center crop, e.g. 256 for a 224 crop (default: just cover --size)")
    g.add_argument("--mean", metavar="M[,M,M]", help="per-channel mean in --channel-order, in units of "
                   "pixel / --scale, e.g. 0.485,0.456,0.406 (default: 0)")
    g.add_argument("--std", metavar="S[,S,S]", help="per-channel std, e.g. 0.229,0.224,0.225 (default: 1)")
    g.add_argument("--layout", choices=("auto", "NCHW", "NHWC"),
                   help="the input's layout (default auto: from where it has 1 or 3 channels)")
    g.add_argument("--channel-order", choices=("RGB", "BGR"), help="channel order (default: RGB)")
    g.add_argument("--scale", type=float, help="pixels are divided by this first (default: 255)")
    g.add_argument("--input", metavar="NAME", help="the image input (default: the model's only input)")
    p.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help="use at most N calibration samples (default: all)")
    p.add_argument("--calib-mask", default="auto", metavar="INPUT|auto|none",
                   help="input whose zeros mark padding tokens, left out of the calibration "
                        "statistics (default auto: attention_mask if the model has it)")
    p.add_argument("--calib-mode", choices=("asymmetric", "symmetric"), default="asymmetric",
                   help="asymmetric (default): fit each layer to the original outputs from the inputs "
                        "of the model compressed so far; symmetric: from the original inputs")
    p.add_argument("--calib-memory", metavar="SIZE", default=None,
                   help="bound on the calibration statistics held at once, e.g. 4G (default: half the "
                        "memory available); wider layers use a reduced basis or stay data-free, with the reason")
    p.add_argument("--calib-stages", metavar="N|all", default=None,
                   help="asymmetric passes over the data at most (default: 4); 'all': one per layer, "
                        "so each layer sees the compression of every layer before it")


def _add_provider_option(p) -> None:
    from onnxlr.runtime import PROVIDERS

    p.add_argument("--provider", choices=tuple(PROVIDERS), default="cpu",
                   help="onnxruntime execution provider (default: cpu)")


def _add_provider_options_option(p, where: str = "") -> None:
    p.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the --provider's onnxruntime execution provider, repeatable, e.g. "
                        f"use_tf32=0 (CUDA: no TF32 in convs and matmuls){where}; the CPU provider takes none")


def _add_shape_option(p, what: str) -> None:
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                   help=f"shape of an input with dynamic dims, e.g. input:1,3,224,224, {what} "
                        "(repeatable; other dynamic dims are 1)")


def _selection_fields(args) -> dict:
    fields = {"method": args.method, "include": tuple(args.include), "exclude": tuple(args.exclude)}
    if args.round_to is not None:
        fields["round_to"] = args.round_to
    calib = _calib_data(args)
    if calib is not None:
        fields.update(calib=calib, calib_samples=args.calib_samples, calib_mode=args.calib_mode,
                      calib_mask=args.calib_mask, calib_memory=args.calib_memory,
                      calib_stages=args.calib_stages)
    return fields


def _calib_data(args):
    """--calib, --calib-loader or --calib-images (with its preprocessing flags) -> data."""
    from onnxlr.data import image_folder, select_data

    images = image_folder(args.calib_images, size=args.size, resize=args.resize, mean=args.mean, std=args.std,
                          layout=args.layout, channel_order=args.channel_order, scale=args.scale, input=args.input)
    return select_data("--calib", args.calib, loader=args.calib_loader, images=images)


def _inputs_data(args):
    """--inputs (an .npz, a folder, FILE.py[:FN]) or --inputs-loader -> data (None: random)."""
    from onnxlr.data import select_data

    return select_data("--inputs", args.inputs, loader=args.inputs_loader)


# --- compress -------------------------------------------------------------------------------


def _add_compress(sub) -> None:
    from onnxlr.config import CompressConfig

    p = sub.add_parser("compress", help="factorize the heavy layers of an ONNX model")
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    _add_selection_options(p)
    p.add_argument("--rank", default=None, help="N, a fraction F (0.33), energy:E, evbmf or evbmf:W "
                   f"(default: {CompressConfig().rank})")
    p.add_argument("--force", action="store_true", help="replace layers even when MACs do not drop")
    p.add_argument("--target-opset", type=int, default=None,
                   help="convert the model to this opset first (onnx version converter)")
    p.add_argument("--external-data", action="store_true", help="save weights in a .data file beside the model")
    p.add_argument("--overwrite", action="store_true", help="allow the output to replace the input file")
    p.add_argument("--report", metavar="FILE.json", help="write the per-layer report as JSON")
    _add_calib_options(p)
    p.add_argument("--config", metavar="FILE", help="per-layer rules (JSON or YAML): an ordered list of "
                   "{match, method, rank}; the first match wins, --method/--rank are the defaults")
    p.add_argument("--verify", action="store_true", help="then verify the output against the input "
                   "and benchmark both, and print one summary (exit 1 if verification fails)")
    p.add_argument("--bench-runs", type=int, default=50, help="timed runs per model for --verify (default: 50)")
    _add_budget_options(p)
    _add_quantize_options(p)
    _add_check_options(p)
    p.set_defaults(run=_run_compress)


def _add_quantize_options(p) -> None:
    """INT8 after factorizing (onnxlr.quant, onnxruntime's quantizer): compress."""
    from onnxlr.quant.config import CALIBRATE_METHODS, MODES

    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="then quantize the factorized model to INT8 with onnxruntime's quantizer (static QDQ, "
                        "per-channel weights; calibrated on --calib, checked on its held-out samples); the "
                        "factors are balanced first so that they quantize well")
    p.add_argument("--quant-mode", choices=MODES, default="static",
                   help="static (default): QDQ with calibrated activation ranges, needs --calib; dynamic: "
                        "activation ranges at run time (MatMul-heavy transformers)")
    p.add_argument("--quant-calibrate", choices=CALIBRATE_METHODS, default="minmax",
                   help="how static mode turns calibration activations into ranges (default: minmax)")
    p.add_argument("--quant-per-tensor", action="store_true",
                   help="one scale per weight tensor (default: per output channel, upgrading opset < 13)")
    p.add_argument("--quant-max-error", type=float, default=None, metavar="E",
                   help="keep the layers whose quantization costs most in float until the output error "
                        "(relative L2 vs the factorized float model) on held-out --calib samples is at most E")


def _add_budget_options(p, goals: bool = True) -> None:
    """Budgeted allocation (onnxlr.budget): per-layer method and rank chosen to meet one goal."""
    from onnxlr.budget.damage import ESTIMATORS

    if goals:
        p.add_argument("--target-speedup", type=float, default=None, metavar="X",
                       help="choose per-layer methods/ranks so the model runs X times faster (measured on "
                            "--provider), with the least damage; overrides --rank")
        p.add_argument("--target-macs", type=float, default=None, metavar="F",
                       help="like --target-speedup, for a fraction F of the original MACs")
        p.add_argument("--max-error", type=float, default=None, metavar="E",
                       help="the fastest model whose relative output error on held-out --calib samples "
                            "(random inputs without it) is at most E")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="per-layer latency cache (default: $ONNXLR_CACHE_DIR or ~/.cache/onnxlr)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads the model will run with: every timing of the plan uses them "
                        "(default: $ONNXLR_BENCH_THREADS or the number of cores)")
    p.add_argument("--damage", choices=ESTIMATORS, default="auto",
                   help="with --calib, how a candidate's damage is found: full (one model pass per "
                        "candidate), sensitivity (its layer-output error times the layer's sensitivity, "
                        "one pass per layer), auto (full when it fits the time, the default), shipped "
                        "(with --quantize int8: each candidate's int8 model quantized and measured)")
    p.add_argument("--plan-time", type=float, default=None, metavar="SECONDS",
                   help="bound on the damage phase: cheaper estimators take over when it would be passed")
    p.add_argument("--search-time", type=float, default=None, metavar="SECONDS",
                   help="with --calib, seconds per goal for swapping steps between layers, each swap measured "
                        "on the whole model (default 60; 0: keep the greedy allocation)")


def _compress_config(args):
    from onnxlr.config import CompressConfig
    from onnxlr.data import parse_shapes

    fields = {**_selection_fields(args), "force": args.force, "target_opset": args.target_opset,
              "shapes": parse_shapes(args.shape)}
    if args.config:
        from onnxlr.config import load_rules

        fields["rules"] = load_rules(args.config)
    if args.rank is not None:
        fields["rank"] = args.rank
    for name in ("target_speedup", "target_macs", "max_error", "cache_dir", "provider", "threads", "damage",
                 "plan_time", "search_time"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "quantize", None) is not None:
        from onnxlr.quant.config import QuantizeConfig

        fields["quantize"] = QuantizeConfig(mode=args.quant_mode, calibrate_method=args.quant_calibrate,
                                            per_channel=not args.quant_per_tensor, max_error=args.quant_max_error)
    return CompressConfig(**fields)


def _run_compress(args) -> int:
    import tempfile
    from pathlib import Path

    from onnxlr.pipeline import compress_file

    config = _compress_config(args)
    if args.provider_option:  # checked before compressing, not after
        if not args.verify:
            raise OnnxlrError("compress: --provider-option applies to --verify; add --verify or drop it")
        from onnxlr.runtime import resolve_provider

        resolve_provider(args.provider, args.provider_option)
    steps = args.verify and config.quantize is not None  # keep the factorized float model to compare
    with tempfile.TemporaryDirectory(prefix="onnxlr-float-") as tmp:
        float_path = Path(tmp) / "factorized_fp32.onnx" if steps else None
        _, report = compress_file(
            args.model,
            args.output,
            config,
            overwrite=args.overwrite,
            external_data=True if args.external_data else None,
            report_path=args.report,
            float_path=float_path,
        )
        print(report.to_table())
        print(f"wrote {args.output}")
        if not args.verify:
            return EXIT_OK
        if steps:
            return _verify_steps(args, config, report, float_path)
        return _verify_and_bench(args, report)


def _verify_steps(args, config, report, float_path) -> int:
    from onnxlr.data import parse_int_range, parse_shapes
    from onnxlr.proof.steps import compare_steps
    from onnxlr.report.compress import compress_summary

    steps = compare_steps(
        args.model, str(float_path), args.output, quantize=config.quantize, calib=config.calib,
        calib_samples=config.calib_samples, inputs=_inputs_data(args), shapes=parse_shapes(args.shape),
        samples=args.samples, seed=args.seed, int_range=parse_int_range(args.int_range), provider=args.provider,
        provider_options=args.provider_option or None,
        runs=args.bench_runs, max_rel_error=args.max_rel_error, min_top1=args.min_top1,
    )
    print()
    print(compress_summary(report, steps.verification, steps.timing, steps))
    for failure in steps.verification.failures:
        print(f"onnxlr: FAILED: {failure}", file=sys.stderr)
    return EXIT_OK if steps else EXIT_FAIL


def _verify_and_bench(args, report) -> int:
    from onnxlr.data import parse_int_range, parse_shapes
    from onnxlr.proof.bench import bench
    from onnxlr.proof.verify import verify
    from onnxlr.report.compress import compress_summary

    shapes, inputs = parse_shapes(args.shape), _inputs_data(args)
    result = verify(
        args.model, args.output, inputs=inputs, shapes=shapes if inputs is None else None,
        samples=args.samples, seed=args.seed, int_range=parse_int_range(args.int_range), provider=args.provider,
        max_rel_error=args.max_rel_error, min_top1=args.min_top1, provider_options=args.provider_option or None,
    )
    timing = bench([args.model, args.output], provider=args.provider, runs=args.bench_runs,
                   provider_options=args.provider_option or None,
                   shapes=shapes or None, seed=args.seed, int_range=parse_int_range(args.int_range))
    print()
    print(compress_summary(report, result, timing))
    for failure in result.failures:
        print(f"onnxlr: FAILED: {failure}", file=sys.stderr)
    return EXIT_OK if result else EXIT_FAIL


# --- inspect --------------------------------------------------------------------------------


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list the model's Conv/Gemm/MatMul layers, their cost, and suggested ranks")
    p.add_argument("model", help=".onnx model")
    p.add_argument("--round-to", type=int, default=8, help="round suggested ranks up to a multiple of N, "
                   "capped at the full dimension (default: 8, for onnxruntime CPU's NCHWc convs)")
    _add_shape_option(p, "to size layers the model leaves dynamic")
    p.add_argument("--inputs", metavar="DATA", help="size dynamic layers from the first sample of this data "
                   "(an .npz keyed by input name, or a folder of them)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
    from onnxlr.data import parse_shapes
    from onnxlr.inspect import inspect
    from onnxlr.model import write_text_atomic

    result = inspect(args.model, round_to=args.round_to, shapes=parse_shapes(args.shape), inputs=args.inputs)
    if args.json:
        write_text_atomic(args.json, result.to_json())
    print(result.to_table())
    return EXIT_OK


# --- verify ---------------------------------------------------------------------------------


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="compare a candidate model's outputs with its reference's",
                       description="Exit 0 when within tolerance, 1 when not, 2 on bad input.")
    p.add_argument("reference", help="the original .onnx model")
    p.add_argument("candidate", help="the model to check, e.g. the compressed one")
    _add_check_options(p)
    p.add_argument("--per-layer", action="store_true",
                   help="also report the error of each replaced layer's output, in graph order")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(run=_run_verify)


def _add_check_options(p) -> None:
    """Data, provider and tolerance flags shared by `verify` and `compress --verify`."""
    from onnxlr.proof.verify import DEFAULT_MAX_REL_ERROR, DEFAULT_SAMPLES, parse_tolerance

    p.add_argument("--inputs", metavar="DATA",
                   help="real data: an .npz keyed by input name with samples stacked on the batch axis, "
                        "or a folder of .npz files (each stacked, or one feed at exact shapes), or "
                        "FILE.py[:FN], a Python data loader; default: seeded random data")
    _add_inputs_loader_option(p)
    _add_shape_option(p, "for random inputs")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"random samples to draw (default: {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--int-range", default="0:100", metavar="LO:HI",
                   help="range [LO, HI) of random integer inputs, e.g. token ids (default: 0:100)")
    _add_provider_option(p)
    _add_provider_options_option(p, " (compress: for --verify; budget timings use the defaults)")
    p.add_argument("--max-rel-error", type=parse_tolerance, default=DEFAULT_MAX_REL_ERROR,
                   metavar="E", help="largest relative L2 error allowed on any output, or 'none' "
                                     f"(default: {DEFAULT_MAX_REL_ERROR:g})")
    p.add_argument("--min-top1", type=float, metavar="A",
                   help="smallest top-1 agreement allowed on [N, C] outputs, a fraction "
                        "(default: not checked)")


def _add_inputs_loader_option(p) -> None:
    p.add_argument("--inputs-loader", metavar="FILE.py[:FN]", help="real data from a Python function "
                   "(default name: load_data) returning an iterable of feed dicts, input name -> array")


def _run_verify(args) -> int:
    from onnxlr.data import parse_int_range, parse_shapes
    from onnxlr.proof.verify import verify, write_json

    result = verify(
        args.reference, args.candidate, inputs=_inputs_data(args), shapes=parse_shapes(args.shape),
        samples=args.samples, seed=args.seed, int_range=parse_int_range(args.int_range),
        provider=args.provider, max_rel_error=args.max_rel_error, min_top1=args.min_top1,
        per_layer=args.per_layer, provider_options=args.provider_option or None,
    )
    if args.json:
        write_json(args.json, result.to_dict())
    print(result.to_table())
    for failure in result.failures:
        print(f"onnxlr: FAILED: {failure}", file=sys.stderr)
    return EXIT_OK if result else EXIT_FAIL


# --- bench ----------------------------------------------------------------------------------


def _add_bench(sub) -> None:
    from onnxlr.proof.bench import DEFAULT_RUNS, DEFAULT_WARMUP

    p = sub.add_parser("bench", help="time models in onnxruntime, interleaved, with speedups",
                       description="Speedups are relative to the first model.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help=".onnx models (the first is the baseline)")
    _add_provider_option(p)
    _add_provider_options_option(p)
    p.add_argument("--threads", type=int, help="intra-op threads (default: number of cores)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed runs per model (default: {DEFAULT_WARMUP})")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                   help=f"timed runs per model (default: {DEFAULT_RUNS})")
    _add_shape_option(p, "overriding --batch for that input")
    p.add_argument("--batch", type=int, default=1,
                   help="size of a dynamic batch dim (default: 1; other dynamic dims are 1)")
    p.add_argument("--int-range", default="0:100", metavar="LO:HI",
                   help="range of random integer inputs such as token ids (default: 0:100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.add_argument("--inputs", metavar="DATA", help="time the first --batch samples of real data (an .npz, "
                   "a folder of them, or FILE.py[:FN]) instead of random inputs")
    _add_inputs_loader_option(p)
    p.add_argument("--host-io", action="store_true",
                   help="on a GPU provider, time numpy inputs and outputs, host<->device copies "
                        "included (default: inputs bound on the device once, outputs kept there)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from onnxlr.data import parse_int_range, parse_shapes
    from onnxlr.proof.bench import bench
    from onnxlr.proof.verify import write_json

    result = bench(
        args.models, provider=args.provider, provider_options=args.provider_option or None,
        threads=args.threads, warmup=args.warmup,
        runs=args.runs, shapes=parse_shapes(args.shape), batch=args.batch, seed=args.seed,
        int_range=parse_int_range(args.int_range), host_io=args.host_io, inputs=_inputs_data(args),
    )
    if args.json:
        write_json(args.json, result.to_dict())
    print(result.to_table())
    return EXIT_OK


# --- sweep ----------------------------------------------------------------------------------


def _add_sweep(sub) -> None:
    from onnxlr.budget.sweep import DEFAULT_TARGETS, DEFAULT_UNIFORM

    p = sub.add_parser("sweep", help="measure the speed/error frontier of budgeted allocation against uniform ranks")
    p.add_argument("model", help=".onnx model")
    p.add_argument("--targets", default=",".join(f"{x:g}" for x in DEFAULT_TARGETS), metavar="X,Y,...",
                   help="target speedups, one frontier point each (default: %(default)s)")
    p.add_argument("--uniform", default=",".join(f"{x:g}" for x in DEFAULT_UNIFORM), metavar="F,G,...",
                   help="uniform rank fractions to compare with, or 'none' (default: %(default)s)")
    _add_selection_options(p)
    _add_calib_options(p)
    _add_provider_option(p)
    _add_budget_options(p, goals=False)
    p.add_argument("--plot", metavar="FILE.png", help="write the frontier plot")
    p.add_argument("--json", metavar="FILE", help="write the points as JSON")
    p.set_defaults(run=_run_sweep)


def _run_sweep(args) -> int:
    from onnxlr.budget.sweep import parse_floats, sweep
    from onnxlr.config import CompressConfig
    from onnxlr.model import write_text_atomic

    fields = {**_selection_fields(args), "provider": args.provider, "cache_dir": args.cache_dir,
              "threads": args.threads, "damage": args.damage, "plan_time": args.plan_time,
              "search_time": args.search_time}
    targets = parse_floats(args.targets, "--targets")
    uniform = () if str(args.uniform).strip().lower() == "none" else parse_floats(args.uniform, "--uniform")
    result = sweep(args.model, targets, uniform=uniform, config=CompressConfig(**fields))
    print(result.to_table())
    if args.json:
        write_text_atomic(args.json, result.to_json())
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return EXIT_OK


# --- entry point ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from onnxlr import __version__

    parser = _Parser(prog="onnxlr", description="Compress ONNX models by low-rank factorization, and prove the result.")
    parser.add_argument("--version", action="version", version=f"onnxlr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for add in (_add_compress, _add_inspect, _add_verify, _add_bench, _add_sweep):
        add(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that ``finally`` blocks remove temporary files."""


def _on_signal(signum, frame) -> None:
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt; held during the few steps of a save
    that must not be split (see ``onnxlr.model.io.signals_deferred``)."""
    import signal

    from onnxlr.model import io

    io.interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


def _remove_temp_files() -> None:
    from onnxlr.model import io

    io.remove_temp_files()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            raise OnnxlrError(f"give a command: {', '.join(COMMANDS)} (see `onnxlr --help`)")
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="onnxlr: %(message)s",
        )
        return args.run(args)
    except OnnxlrError as exc:
        print(f"onnxlr: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:  # numpy says what it needed: "Unable to allocate 4.69 GiB for an array with shape ..."
        _remove_temp_files()
        what = " ".join(str(exc).split()) or "an allocation failed"
        print(f"onnxlr: error: out of memory: {what}; lower --calib-memory or --calib-samples, compress fewer "
              "layers at once (--include), or free memory; nothing was written", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _remove_temp_files()
        print("onnxlr: interrupted; no partial output is left behind", file=sys.stderr)
        return 130
    except Terminated:
        _remove_temp_files()
        print("onnxlr: terminated (SIGTERM); no partial output is left behind", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
