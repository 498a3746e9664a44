"""Evaluation suite: compress every model at a grid of settings and measure what it cost and gained.

For each model (the bundled ``digits_vgg`` and the three real models of ``tools/real_models``) and
each setting of the grid, the suite

1. compresses the original with ``onnxlr.compress`` (the compressed file goes to a cache folder,
   never to the repository),
2. counts whole-model parameters (initializers) and MACs (Conv/Gemm/MatMul, from the tensor shapes
   onnxruntime actually produces for one sample of the evaluation data),
3. checks output agreement with ``onnxlr.verify`` on held-out evaluation samples (relative L2 error
   of the output, top-1 agreement for classifiers),
4. scores the task metric on the held-out evaluation set (the original is the baseline row), and
5. times the original and every compressed model of that model together with ``onnxlr.bench``
   (interleaved rounds, one sample per run, thread spinning off); speedup = median over rounds of
   t_original / t_compressed, with the p10-p90 of those per-round ratios.

Outputs (``--out``, default ``docs/eval``): ``results.json`` (everything, including per-setting
skip reasons), ``README.md`` (one table per model) and ``<model>.png`` (speedup against the task
metric, one labelled point per setting, the original marked). Running a subset of models
(``--models``) merges into an existing ``results.json``, so the tables always cover every model
measured so far.

    python -m tools.eval_suite                       # full grid, all models
    python -m tools.eval_suite --data-free           # without the (slow) calibrated rows
    python -m tools.eval_suite --quick               # a few settings, fewer samples and rounds
    python -m tools.eval_suite --models digits_vgg --settings "auto 0.5" "cp 0.25"
    python -m tools.eval_suite --retime              # time the cached models again, nothing else
    python -m tools.eval_suite --render              # redraw README.md and plots from the JSON
    python -m tools.eval_suite --list                # the grid and the models
    python -m tools.eval_suite --budget              # budget sweeps -> docs/budget/, then render

Budget frontier: ``--budget`` runs ``tools/bench_budget.py`` for each model (targets and uniform
fractions from ``BUDGET`` below; ``ONNXLR_BENCH_THREADS`` defaults to 1 there; one plan per model, every point built, measured, scored on the
same task metric and re-timed in one interleaved run) and writes ``docs/budget/<model>.json``.
Rendering reads those files: each model's table gets the budget rows and the uniform-rank rows of
that sweep (ranks refined on the same calibration data), and its plot both frontiers as lines.

Run time on the shared 2-core machine (load average 12-16 from other jobs): the full grid took
about 11 min (EfficientNet), 18 min (PP-OCR), 16 min (MiniLM) and 25 min (digits); the
data-aware rows are about half of it (calibration: 1.5-8 min per row).

The grid is ``GRID`` below: one ``Setting`` per row, whose ``options`` are passed to
``onnxlr.compress`` as they are; ``data_aware=True`` adds ``calib=<the model's calibration set>``
(disjoint from the evaluation data). Adding a row type is adding one entry.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tools.real_models.common import count_macs

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / ".cache" / "real-models"
CACHE = ROOT / ".cache" / "eval-suite"


# --------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Setting:
    """One row of the grid: ``options`` go to ``onnxlr.compress`` unchanged."""

    label: str
    options: dict
    kinds: tuple[str, ...] = ("cnn", "transformer")  # model kinds it applies to
    data_aware: bool = False  # add calib=<model's calibration set>
    quick: bool = False  # part of --quick
    models: tuple[str, ...] | None = None  # only these models (None: every model of its kinds)


NO_FC = {"exclude": ("Gemm", "MatMul")}  # keep fully connected layers: compress only the convs
# Data-aware rows calibrate on every sample of the model's calibration set (180-200 here; 1-2 min
# per row for the real models). Fewer starve the held-out check: with 64 samples it judges a layer
# on 12, and the bundled model's last Gemm then took a fit that cost 2.8 points of accuracy.
CALIB: dict = {}

GRID: tuple[Setting, ...] = (
    Setting("auto 0.25", {"method": "auto", "rank": "0.25"}),
    Setting("auto 0.33", {"method": "auto", "rank": "0.33"}),
    Setting("auto 0.5", {"method": "auto", "rank": "0.5"}, quick=True),
    Setting("auto 0.75", {"method": "auto", "rank": "0.75"}),
    Setting("auto energy:0.9", {"method": "auto", "rank": "energy:0.9"}, quick=True),
    Setting("auto energy:0.99", {"method": "auto", "rank": "energy:0.99"}),
    Setting("auto evbmf", {"method": "auto", "rank": "evbmf"}),
    Setting("tucker 0.5, convs only", {"method": "tucker", "rank": "0.5", **NO_FC}, kinds=("cnn",)),
    Setting("cp 0.25", {"method": "cp", "rank": "0.25"}, kinds=("cnn",)),
    # the bundled model: where does 2x at <= 1 pt lie?
    Setting("tucker 0.75, convs only", {"method": "tucker", "rank": "0.75", **NO_FC},
            models=("digits_vgg",)),
    Setting("tucker 0.375, convs only", {"method": "tucker", "rank": "0.375", **NO_FC},
            models=("digits_vgg",)),
    Setting("cp 0.5, convs only", {"method": "cp", "rank": "0.5", **NO_FC}, models=("digits_vgg",)),
    # data-aware rows: the same ranks, factors refined on the calibration set
    Setting("auto 0.5 +calib", {"method": "auto", "rank": "0.5", **CALIB}, data_aware=True,
            quick=True),
    Setting("auto 0.75 +calib", {"method": "auto", "rank": "0.75", **CALIB}, data_aware=True),
    Setting("tucker 0.5, convs only +calib", {"method": "tucker", "rank": "0.5", **NO_FC},
            data_aware=True, models=("digits_vgg",)),
    Setting("tucker 0.375, convs only +calib", {"method": "tucker", "rank": "0.375", **NO_FC},
            data_aware=True, models=("digits_vgg",)),
)


# ------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    kind: str  # "cnn" or "transformer"
    eval_set: Path  # inputs onnxlr.verify compares on (held-out)
    calib: Path  # calibration inputs (disjoint from every evaluation set)
    metrics: Callable[[Path], dict]  # onnx path -> {"set.metric": value}
    primary: str  # the metric plotted and judged ("set.metric")
    primary_label: str
    shown: tuple[str, ...] = ()  # further metrics for the table
    classifier: bool = True  # top-1 agreement is meaningful for its output
    int_range: tuple[int, int] = (0, 100)  # integer inputs of the timing runs: [lo, hi)
    verify_samples: int = 64

    def exists(self) -> bool:
        return self.path.exists() and self.eval_set.exists()


def _real_metrics(name: str) -> Callable[[Path], dict]:
    def run(path: Path) -> dict:
        from tools.real_models import tasks

        result = tasks.evaluate(name, path, REAL)
        return {f"{s}.{k}": v for s, d in result.items() for k, v in d.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return run


def _digits_metrics(path: Path) -> dict:
    from tools.real_models import common

    data = np.load(ROOT / "models" / "digits_vgg_test.npz")
    sess = common.session(path)
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: data["input"]})[0]
    correct = int((logits.argmax(1) == data["labels"]).sum())
    return {"test.accuracy": correct / len(data["labels"]), "test.correct": correct,
            "test.n": len(data["labels"])}


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("digits_vgg", ROOT / "models" / "digits_vgg.onnx", "cnn",
              ROOT / "models" / "digits_vgg_test.npz", ROOT / "models" / "digits_vgg_calib.npz",
              _digits_metrics, "test.accuracy", "test accuracy (540 held-out digits)",
              verify_samples=540),
    ModelSpec("efficientnet-lite0", REAL / "efficientnet-lite0" / "model.onnx", "cnn",
              REAL / "efficientnet-lite0" / "eval_crops.npz", REAL / "efficientnet-lite0" / "calib.npz",
              _real_metrics("efficientnet-lite0"), "eval_crops.top1_agreement",
              "top-1 agreement with the original (300 held-out crops)",
              shown=("eval_imagenet.top1", "eval_imagenet.top5")),
    ModelSpec("ppocr-v6-rec", REAL / "ppocr-v6-rec" / "model.onnx", "cnn",
              REAL / "ppocr-v6-rec" / "eval.npz", REAL / "ppocr-v6-rec" / "calib.npz",
              _real_metrics("ppocr-v6-rec"), "eval.char_accuracy",
              "character accuracy (300 held-out text lines)", shown=("eval.line_accuracy",),
              classifier=False, verify_samples=32),
    ModelSpec("all-minilm-l6-v2", REAL / "all-minilm-l6-v2" / "model.onnx", "transformer",
              REAL / "all-minilm-l6-v2" / "eval.npz", REAL / "all-minilm-l6-v2" / "calib.npz",
              _real_metrics("all-minilm-l6-v2"), "eval.knn_top1",
              "1-NN topic accuracy (159 held-out sentences)",
              shown=("eval.mean_cosine", "eval.min_cosine"), classifier=False, verify_samples=159,
              int_range=(0, 2)),  # token_type_ids must be 0 or 1
)}


# ----------------------------------------------------------------------------- budget frontier
BUDGET_DIR = ROOT / "docs" / "budget"
# per model: tools/bench_budget.py name, target speedups it can reach, uniform rank fractions;
# calib_samples 200: all of a real model's calibration samples (64 until 2026-11-28: the planner on 64
# stayed below the earlier frontier at two targets, on 1000 fresh samples too; docs/budget/README.md)
BUDGET: dict[str, dict] = {  # int8_targets: the int8-aware budget's, against the fp32 original
    "digits_vgg": {"name": "digits", "targets": "1.5,2,3,5,8", "uniform": "0.125,0.25,0.5", "calib_samples": 32,
                   "int8_targets": "4,5,6,8", "int8_goal": ("fp32 original", 5.0, 0.0)},
    "efficientnet-lite0": {"name": "efficientnet-lite0", "targets": "1.05,1.1,1.2", "uniform": "0.5,0.75",
                           "calib_samples": 200,
                           "int8_targets": "1.5,2,2.5", "int8_goal": ("int8 original", 1.3, 0.01)},
    "ppocr-v6-rec": {"name": "ppocr-v6-rec", "targets": "1.1,1.2,1.3,1.5",
                     "uniform": "0.25,0.375,0.5,0.625,0.75", "int8_targets": "1.8,2,2.2", "calib_samples": 200,
                     "int8_goal": ("int8 original", 1.3, 0.01)},
    "all-minilm-l6-v2": {"name": "all-minilm-l6-v2", "targets": "1.1,1.2,1.3,1.5",
                         "uniform": "0.25,0.375,0.5,0.625,0.75", "int8_targets": "1.5,2,2.5", "calib_samples": 200},
}


def budget_file(model: str, folder: Path = BUDGET_DIR) -> Path:
    return folder / f"{BUDGET[model]['name']}.json" if model in BUDGET else folder / f"{model}.json"


def run_budget(model: str, folder: Path = BUDGET_DIR, int8: bool = True) -> None:
    """``tools/bench_budget.py`` for one model with its ``BUDGET`` settings."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_budget

    b = BUDGET[model]
    argv = [b["name"], "--out", str(folder), "--targets", b["targets"], "--uniform", b["uniform"]]
    if "calib_samples" in b:
        argv += ["--calib-samples", str(b["calib_samples"])]
    if int8 and "int8_targets" in b:  # the four curves: fp32 budget, int8 original, uniform + int8, int8 budget
        argv += ["--int8", "--int8-targets", b["int8_targets"]]
    bench_budget.main(argv)


def budget_points(res: dict, folder: Path = BUDGET_DIR) -> dict | None:
    """The budget sweep of ``res``'s model as plot/table rows in the suite's primary metric:
    ``{"budget": [...], "uniform": [...], "meta": {...}}``, or None without a sweep file (or
    without the primary metric in it)."""
    path = budget_file(res["model"], folder)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    key = res["primary"]
    base_metrics = data.get("baseline_metrics") or {}
    single = data.get("baseline_metric")  # bench_budget's own metric: the primary one?
    primary_is_single = key in (f"{s}.{m}" for s, m in [_budget_metric(res["model"])])

    def metric(p: dict) -> float | None:
        if key in (p.get("metrics") or {}):
            return p["metrics"][key]
        return p.get("metric") if primary_is_single else None

    rows = {kind: [] for kind in BUDGET_KINDS}
    for p in data["points"]:
        m = metric(p)
        if m is None:
            return None
        b = p.get("bench")
        rows[p["kind"]].append({
            "label": _budget_label(p),
            "setting": p["setting"], "layers": p["layers_replaced"], "macs_fraction": p["macs_fraction"],
            "macs_fewer": data["baseline_macs"] / p["macs"] if p.get("macs") and data.get("baseline_macs") else None,
            "predicted": p.get("predicted_speedup"), "sweep_speedup": p["measured_speedup"],
            "speedup": b["speedup"] if b else p["measured_speedup"],
            "p10": b["speedup_p10"] if b else None, "p90": b["speedup_p90"] if b else None,
            "error": p["error"], "metric": m, "metrics": p.get("metrics") or {}})
    for pts in rows.values():
        pts.sort(key=lambda r: r["speedup"])
    base = base_metrics.get(key, single if primary_is_single else None)
    sha = data.get("model_sha256")
    return {**rows, "meta": {
        "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "baseline_metric": base, "date": data.get("date"), "threads": data.get("threads"),
        "load_average": data.get("load_average"), "retimed": "bench" in data,
        "retime_load_average": (data.get("bench") or {}).get("load_average"),
        "seconds": data.get("seconds"),
        "same_model": None if sha is None else sha == res["baseline"].get("sha256")}}


#: Kinds of bench_budget points, in table order: the fp32 budget and uniform sweep, then (``--int8``)
#: the int8 original, uniform ranks + int8 and the int8-aware budget; speedups against the fp32 original.
BUDGET_KINDS = ("budget", "uniform", "int8-original", "int8-uniform", "int8-budget")


def _budget_label(p: dict) -> str:
    kind, setting = p["kind"], p["setting"]
    return {"budget": f"budget {setting:g}x", "uniform": f"uniform {setting:g} +calib",
            "int8-original": "int8 original", "int8-uniform": f"uniform {setting:g} +calib, int8",
            "int8-budget": f"int8-aware budget {setting:g}x, int8"}[kind]


def _budget_metric(model: str) -> tuple[str, str]:
    if model == "digits_vgg":
        return ("test", "accuracy")
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_budget import METRIC

    return METRIC.get(model, ("?", "?"))


# ------------------------------------------------------------------------------------ progress
_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ measurements
def load_subset(path: Path, n: int) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k][:n] for k in data.files}


def params(model: onnx.ModelProto) -> int:
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    total += int(np.prod(a.t.dims))
    return total


def skip_reasons(report) -> dict[str, int]:
    """Skipped layers grouped by the reason's gist (numbers and names dropped)."""
    import re

    counts: Counter = Counter()
    for layer in report.layers:
        if layer.skipped:
            gist = re.sub(r"\{.*?\}|\(.*?\)|\d+", "#", layer.skipped.split(";")[0])
            counts[f"{layer.op_type}: {gist.strip()}"] += 1
    return dict(counts)


def compress_setting(spec: ModelSpec, setting: Setting, out_path: Path) -> dict:
    import onnxlr

    options = dict(setting.options)
    if setting.data_aware:
        options["calib"] = str(spec.calib)
    t0 = time.perf_counter()
    model, report = onnxlr.compress(spec.path, **options)
    seconds = time.perf_counter() - t0
    onnx.save(model, out_path)
    totals = report.totals
    return {
        "compress_seconds": round(seconds, 2),
        "layers_replaced": totals["layers_replaced"],
        "layers_skipped": totals["layers_skipped"],
        "target_params_before": totals["params_before"],
        "target_params_after": totals["params_after"],
        "skipped": skip_reasons(report),
        "methods": dict(Counter(layer.method for layer in report.replaced)),
        "notes": list(report.model_notes) + list(report.warnings),
        # replaced layers only (the skipped ones are counted by reason above): name -> ranks
        "replaced": {x.name: {"method": x.method, **(x.ranks or {}),
                              "weight_rel_error": round(x.weight_rel_error, 4)}
                     for x in report.replaced},
    }, model


def agreement(spec: ModelSpec, reference: Path, candidate: Path, data: dict) -> dict:
    from onnxlr.proof.verify import verify

    result = verify(reference, candidate, inputs=data, max_rel_error=None)
    out = result.outputs[0]
    return {
        "verify_samples": int(next(iter(data.values())).shape[0]),
        "output": out.name,
        "rel_error": out.rel_error,
        "cosine": out.cosine,
        "top1": out.top1 if spec.classifier else None,
    }


def timing(paths: list[Path], shapes: dict, runs: int, warmup: int,
           int_range: tuple[int, int] = (0, 100)) -> list[dict]:
    from onnxlr.proof.bench import bench

    result = bench([str(p) for p in paths], shapes=shapes, runs=runs, warmup=warmup, batch=1,
                   int_range=tuple(int_range))
    rows = result.to_dict()["models"]
    return [{k: rows[i][k] for k in ("median_ms", "p10_ms", "p90_ms", "speedup", "speedup_p10",
                                     "speedup_p90")} for i in range(len(paths))], result


# ----------------------------------------------------------------------------------- the suite
def settings_for(spec: ModelSpec, quick: bool, only: list[str] | None) -> list[Setting]:
    chosen = [s for s in GRID if spec.kind in s.kinds and (s.models is None or spec.name in s.models)]
    if only:
        chosen = [s for s in chosen if s.label in only]
    elif quick:
        chosen = [s for s in chosen if s.quick]
    return chosen


def run_model(spec: ModelSpec, settings: list[Setting], args) -> dict:
    import onnxlr

    cache = Path(args.cache) / spec.name
    cache.mkdir(parents=True, exist_ok=True)
    original = onnx.load(spec.path)
    inits = {t.name for t in original.graph.initializer}
    input_names = {i.name for i in original.graph.input if i.name not in inits}
    verify_data = load_subset(spec.eval_set, spec.verify_samples if not args.quick
                              else min(spec.verify_samples, 32))
    verify_data = {k: v for k, v in verify_data.items() if k in input_names}  # not the labels
    one = {k: v[:1] for k, v in verify_data.items()}
    bench_shapes = {k: list(v.shape) for k, v in one.items()}
    say(f"{spec.name}: baseline metric")
    base_metrics = spec.metrics(spec.path)
    import hashlib

    base = {"label": "original", "params": params(original), "macs": count_macs(original, one),
            "metrics": base_metrics, "path": str(spec.path),
            "sha256": hashlib.sha256(spec.path.read_bytes()).hexdigest()}
    say(f"{spec.name}: original {spec.primary} = {base_metrics[spec.primary]:.4f}")
    rows = []
    accepts_calib = "calib" in onnxlr.CompressConfig.__dataclass_fields__
    for i, setting in enumerate(settings, 1):
        row: dict = {"label": setting.label, "options": {k: v if isinstance(v, (str, int, float))
                                                          else str(v) for k, v in setting.options.items()},
                     "data_aware": setting.data_aware}
        rows.append(row)
        if setting.data_aware and not accepts_calib:
            row["error"] = "this onnxlr has no calib option"
            continue
        path = cache / (setting.label.replace(" ", "_").replace(",", "").replace(":", "-")
                        .replace("+", "") + ".onnx")
        say(f"{spec.name} [{i}/{len(settings)}] {setting.label}: compress")
        try:
            info, model = compress_setting(spec, setting, path)
        except Exception as exc:  # noqa: BLE001 -- a failed setting is a result, not the end
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            say(f"  failed: {row['error']}")
            continue
        row.update(info)
        row["path"] = str(path)
        row["params"] = params(model)
        row["macs"] = count_macs(model, one)
        del model
        say(f"  {info['layers_replaced']} replaced in {info['compress_seconds']:.1f} s; "
            f"MACs {base['macs'] / row['macs']:.2f}x fewer; verify + task metric")
        row["agreement"] = agreement(spec, spec.path, path, verify_data)
        row["metrics"] = spec.metrics(path)
        say(f"  {spec.primary} = {row['metrics'][spec.primary]:.4f} "
            f"(original {base_metrics[spec.primary]:.4f}), rel error {row['agreement']['rel_error']:.3g}")
    done = [r for r in rows if "error" not in r]
    bench_info = None
    if done:
        say(f"{spec.name}: timing the original and {len(done)} compressed models, interleaved "
            f"({args.runs} rounds)")
        try:
            times, result = timing([spec.path] + [Path(r["path"]) for r in done], bench_shapes,
                                   args.runs, args.warmup, spec.int_range)
        except Exception as exc:  # noqa: BLE001 -- keep the measured rows; say why timing failed
            bench_info = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"{spec.name}: timing failed: {exc}")
        else:
            base["timing"] = times[0]
            for r, t in zip(done, times[1:]):
                r["timing"] = t
            bench_info = {k: v for k, v in result.to_dict().items() if k != "models"}
            say(f"{spec.name}: original {times[0]['median_ms']:.2f} ms; best speedup "
                f"{max(t['speedup'] for t in times[1:]):.2f}x")
    return {"model": spec.name, "kind": spec.kind, "primary": spec.primary,
            "primary_label": spec.primary_label, "shown": list(spec.shown),
            "classifier": spec.classifier, "bench": bench_info, "baseline": base, "settings": rows}


def retime(res: dict, args) -> None:
    """Time the original and the cached compressed models of ``res`` again, in one interleaved run
    (no compression, no evaluation): for a quieter machine or more rounds."""
    rows = [r for r in res["settings"] if "error" not in r and Path(r.get("path", "")).exists()]
    if not rows:
        return
    original = Path(res["baseline"].get("path") or MODELS[res["model"]].path)
    b = res.get("bench") or {}
    shapes = b.get("input_shapes")
    say(f"{res['model']}: re-timing the original and {len(rows)} compressed models ({args.runs} rounds)")
    spec = MODELS[res["model"]]
    times, result = timing([original] + [Path(r["path"]) for r in rows], shapes, args.runs,
                           args.warmup, spec.int_range)
    res["baseline"]["timing"] = times[0]
    for r, t in zip(rows, times[1:]):
        r.setdefault("earlier_timings", []).append(r.get("timing"))
        r["timing"] = t
    res["bench"] = {k: v for k, v in result.to_dict().items() if k != "models"}
    res.setdefault("run", {})["retimed"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["run"]["retime_load_average"] = round(os.getloadavg()[0], 1)
    say(f"{res['model']}: original {times[0]['median_ms']:.2f} ms; best speedup "
        f"{max(t['speedup'] for t in times[1:]):.2f}x")


# ----------------------------------------------------------------------------------- rendering
def _fmt_metric(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.endswith(("accuracy", "top1", "top5", "agreement")):
        return f"{100 * value:.2f}%"
    return f"{value:.4f}"


def _delta(key: str, value: float, base: float) -> str:
    d = value - base
    if key.endswith(("accuracy", "top1", "top5", "agreement")):
        return f"{100 * d:+.2f} pt"
    return f"{d:+.4f}"


def render_markdown(results: dict) -> str:
    lines = ["# onnxlr evaluation suite", "",
             ("Generated by `python -m tools.eval_suite` (see `tools/eval_suite.py`); numbers as "
             "measured, losses included. Compression is data-free unless the setting says "
             "`+calib` (factors refined on the model's calibration set, disjoint from the "
             "evaluation data). Params = all initializers of the model; MACs = every "
             "Conv/Gemm/MatMul for one evaluation sample, counted from the shapes onnxruntime "
             "produces. Speedup = median over interleaved rounds of t(original) / t(compressed), "
             "onnxruntime CPU, batch 1, p10-p90 of the per-round ratios in brackets; all rows of "
             "one model are timed in the same run. Rel. err = ||y - y_orig|| / ||y_orig|| of the "
             "output on held-out samples (`onnxlr.verify`); top-1 agr. = fraction of samples whose "
             "argmax agrees with the original's. A row with 0 layers replaced runs a model identical "
             "to the original: its speedup shows the timing noise of that run."), "",
             ("Budget frontier (one table per model, green and purple lines in its plot): "
              "`python -m tools.eval_suite --budget` runs `tools/bench_budget.py` for every model "
              "(targets and uniform ranks in `BUDGET` of `tools/eval_suite.py`, single-threaded "
              "timing unless `ONNXLR_BENCH_THREADS` is set) into `docs/budget/<model>.json` and "
              "redraws this page; `--budget --models NAME` for one model, `--render` to redraw only. "
              "Its uniform rows are ranks refined on the calibration data (like `+calib`), measured "
              "in the same sweep as the budget rows."), ""]
    for name in MODELS:
        res = results.get("models", {}).get(name)
        if not res:
            continue
        base = res["baseline"]
        key = res["primary"]
        b = res.get("bench") or {}
        lines += [f"## {name}", "",
                  (f"Task metric: {res['primary_label']}. Original: "
                  f"{_fmt_metric(key, base['metrics'][key])}, {base['params'] / 1e6:.2f} M params, "
                  f"{base['macs'] / 1e6:.1f} M MACs, "
                  f"{base.get('timing', {}).get('median_ms', float('nan')):.2f} ms median "
                  f"({b.get('threads', '?')} threads, {b.get('runs', '?')} rounds, inputs "
                  f"{b.get('input_shapes', '?')})."), ""]
        run = res.get("run", {})
        if run:
            lines += [(f"Measured {run.get('date', '?')} ({run.get('machine', '')}, onnxruntime "
                      f"{run.get('onnxruntime', '?')}; {run.get('seconds', 0):.0f} s for this model"
                      f"{', --quick' if run.get('quick') else ''})"
                      + (f"; timings re-measured {run['retimed']} (load average "
                         f"{run.get('retime_load_average', '?')})" if run.get("retimed") else "")
                      + "."), ""]
        if res.get("note"):
            lines += [f"Note: {res['note']}.", ""]
        lines += [f"![{name}]({name}.png)", ""]
        extra = res.get("shown", [])
        rerun = any(r.get("earlier_timings") for r in res["settings"])
        head = (["setting", "replaced/skipped", "params", "MACs", "speedup (p10-p90)"]
                + (["1st run"] if rerun else []) + ["rel. err"]
                + (["top-1 agr."] if res.get("classifier") else [])
                + [key, "delta"] + extra + ["compress s"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        row = (["original", "-", f"{base['params'] / 1e6:.2f} M", f"{base['macs'] / 1e6:.1f} M",
                "1.00x"] + (["1.00x"] if rerun else []) + ["0"]
               + (["100%"] if res.get("classifier") else [])
               + [_fmt_metric(key, base["metrics"][key]), "-"]
               + [_fmt_metric(k, base["metrics"].get(k)) for k in extra] + ["-"])
        lines.append("| " + " | ".join(row) + " |")
        for r in res["settings"]:
            if "error" in r:
                err = r["error"] if len(r["error"]) <= 110 else r["error"][:107] + "..."
                cells = [r["label"], f"failed: {err}"] + ["-"] * (len(head) - 2)
                lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
                continue
            t = r.get("timing") or {}
            a = r["agreement"]
            m = r["metrics"]
            cells = ([r["label"], f"{r['layers_replaced']}/{r['layers_skipped']}",
                      f"{base['params'] / r['params']:.2f}x fewer",
                      f"{base['macs'] / r['macs']:.2f}x fewer",
                      f"{t['speedup']:.2f}x ({t['speedup_p10']:.2f}-{t['speedup_p90']:.2f})" if t else "-"]
                     + ([f"{r['earlier_timings'][0]['speedup']:.2f}x" if r.get("earlier_timings")
                         and r["earlier_timings"][0] else "-"] if rerun else [])
                     + [
                      f"{a['rel_error']:.3g}"]
                     + ([f"{100 * a['top1']:.1f}%" if a.get("top1") is not None else "-"]
                        if res.get("classifier") else [])
                     + [_fmt_metric(key, m[key]), _delta(key, m[key], base["metrics"][key])]
                     + [_fmt_metric(k, m.get(k)) for k in extra]
                     + [f"{r['compress_seconds']:.1f}"])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += best_within(res, 0.01) + [""]
        lines += budget_table(res)
        lines += int8_goal(res)
        skipped = Counter()
        for r in res["settings"]:
            for reason, n in (r.get("skipped") or {}).items():
                skipped[reason] += n
        if skipped:
            lines += ["Skip reasons over all settings (layer-times):", ""]
            lines += [f"- {n} x {reason}" for reason, n in skipped.most_common(8)]
            lines.append("")
    return "\n".join(lines) + "\n"


def budget_table(res: dict) -> list[str]:
    """Both frontiers of the model's budget sweep (``docs/budget/<model>.json``)."""
    key = res["primary"]
    bp = budget_points(res)
    if bp is None:
        return [(f"Budget frontier: no sweep with {key} in `{budget_file(res['model']).relative_to(ROOT)}` "
                 f"(`python -m tools.eval_suite --budget --models {res['model']}`)."), ""]
    meta = bp["meta"]
    base = meta["baseline_metric"]
    la = meta.get("retime_load_average") or meta.get("load_average")
    lines = [f"### {res['model']}: budget frontier", "",
             (f"From `{meta['file']}` (`tools/bench_budget.py`, measured {meta.get('date') or 'before dates were recorded'}"
              f", {meta.get('threads') or '?'} thread(s)"
              + (f", load average {la[0]:.1f}-{la[1]:.1f}" if la else "") + "): budgeted allocation "
              "(`--target-speedup`, data-aware damage) against uniform ranks refined on the same "
              "calibration data, every point measured end to end against the original"
              + (" (speedup re-timed in one interleaved run of all points, p10-p90 in brackets; "
                 "`sweep` is the solver's own check)" if meta["retimed"] else "")
              + ". Output error: relative L2 on calibration samples held out from the refinement (of the "
                "logits, for a Softmax output). Budget rows are a separate sweep from the grid above: compare "
                "speedups within this table."
              + (" int8 rows (`tools/bench_budget.py --int8`): onnxruntime static QDQ, per-channel, calibrated on "
                 "the same samples; the int8-aware budget plans on int8 timings and damages; speedups and errors "
                 "against the fp32 original." if bp["int8-original"] else "")),
             ""]
    if meta["same_model"] is False:
        lines += ["**The sweep was measured on a different model file than the rows above: rerun it.**", ""]
    extra = [k for k in res.get("shown", []) if any(k in r["metrics"] for r in bp["budget"])]
    head = ["setting", "layers replaced", "MACs", "predicted", "sweep", "speedup (p10-p90)",
            "output error (held-out calib)", key, "delta"] + extra
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in BUDGET_KINDS:
        for r in bp[kind]:
            sp = (f"{r['speedup']:.2f}x ({r['p10']:.2f}-{r['p90']:.2f})" if r["p10"] is not None
                  else f"{r['speedup']:.2f}x")
            cells = [r["label"], str(r["layers"]),
                     f"{r['macs_fewer']:.2f}x fewer" if r["macs_fewer"] else "-",
                     f"{r['predicted']:.2f}x" if r["predicted"] else "-", f"{r['sweep_speedup']:.2f}x", sp,
                     f"{r['error']:.3g}", _fmt_metric(key, r["metric"]),
                     _delta(key, r["metric"], base) if base is not None else "-"]
            cells += [_fmt_metric(k, r["metrics"].get(k)) for k in extra]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def int8_goal(res: dict, folder: Path = BUDGET_DIR) -> list[str]:
    """Issue #15's goal for the model's int8-aware budget (``BUDGET[model]["int8_goal"]``: the
    reference, the speedup over it, the most metric lost beyond the reference's), and whether the
    sweep reached it: the fastest int8-aware budget point within that loss, and by how much it
    falls short."""
    goal = BUDGET.get(res["model"], {}).get("int8_goal")
    bp = budget_points(res, folder)
    if goal is None or bp is None or not bp["int8-original"]:
        return []
    ref_name, wanted, loss = goal
    key = res["primary"]
    ref_speed, ref_metric = _goal_reference(bp, ref_name)
    floor = ref_metric - loss - 1e-9
    within = [r for r in bp["int8-budget"] if r["metric"] >= floor]
    vs_fp32 = ref_name == "fp32 original"
    ask = (f"**Issue #15's goal** for the int8-aware budget: at least {wanted:g}x the {ref_name}'s speed"
           + ("" if vs_fp32 else f" ({ref_speed * wanted:.2f}x the fp32 original in this run)")
           + (f" at no loss ({_fmt_metric(key, ref_metric)})." if loss == 0 else
              f" with at most {_fmt_delta(key, loss)} more loss than it ({_fmt_metric(key, ref_metric)})."))
    if not within:
        any_int8 = [r for kind in ("int8-uniform", "int8-budget") for r in bp[kind] if r["metric"] >= floor]
        best = max(any_int8, key=lambda r: r["speedup"]) if any_int8 else None
        tail = (f" The fastest int8 point of any kind within it: {best['label']}, {best['speedup']:.2f}x "
                f"({best['speedup'] / ref_speed:.2f}x the {ref_name})." if best else "")
        line = ask + " Not reached: no int8-aware budget point of this sweep is within that loss." + tail
        useful = budget_points(res, folder / "int8_range")  # a sweep of the useful range, where there is one
        if useful is not None and useful["int8-original"]:
            speed, metric = _goal_reference(useful, ref_name)
            near = [r for r in useful["int8-budget"] if r["metric"] >= metric - loss - 1e-9]
            if near:
                line += (f" In the useful-range sweep (`{useful['meta']['file']}`, {useful['meta']['date']}): "
                         + _goal_verdict(key, max(near, key=lambda r: r["speedup"]), speed, ref_name, wanted))
        return [line, ""]
    return [ask + " " + _goal_verdict(key, max(within, key=lambda r: r["speedup"]), ref_speed, ref_name, wanted), ""]


def _goal_reference(bp: dict, ref_name: str) -> tuple[float, float]:
    """(speedup against the fp32 original, metric) of the goal's reference in sweep ``bp``."""
    if ref_name == "int8 original":
        return bp["int8-original"][0]["speedup"], bp["int8-original"][0]["metric"]
    return 1.0, bp["meta"]["baseline_metric"]


def _goal_verdict(key: str, best: dict, ref_speed: float, ref_name: str, wanted: float) -> str:
    ratio = best["speedup"] / ref_speed
    verdict = ("Reached" if ratio >= wanted else
               f"Not reached, {100 * (1 - ratio / wanted):.0f}% short of the speed asked")
    return (f"{verdict}: {best['label']} re-timed {best['speedup']:.2f}x the fp32 original"
            + ("" if ref_name == "fp32 original" else f", {ratio:.2f}x the {ref_name}")
            + f", at {_fmt_metric(key, best['metric'])}.")


def _fmt_delta(key: str, value: float) -> str:
    return f"{100 * value:g} point(s)" if key.endswith(("accuracy", "top1", "top5", "agreement")) else f"{value:g}"


def best_within(res: dict, drop: float) -> list[str]:
    """One line each for data-free and data-aware: the fastest setting whose primary metric is
    at most ``drop`` (absolute, 0.01 = 1 point) below the original's."""
    key = res["primary"]
    base = res["baseline"]["metrics"][key]
    lines = []
    for aware in (False, True):
        rows = [r for r in res["settings"] if "error" not in r and r.get("timing")
                and r.get("layers_replaced") and bool(r.get("data_aware")) == aware]
        if not rows:
            continue
        kind = "data-aware" if aware else "data-free"
        ok = [r for r in rows if r["metrics"][key] >= base - drop - 1e-12]
        if not ok:
            lines.append(f"- Fastest {kind} setting (at least one layer replaced) within "
                         f"{100 * drop:g} pt of the original: none of the {len(rows)} measured.")
            continue
        best = max(ok, key=lambda r: r["timing"]["speedup"])
        t = best["timing"]
        lines.append(f"- Fastest {kind} setting (at least one layer replaced) within {100 * drop:g} pt of the original: "
                     f"**{best['label']}**, {t['speedup']:.2f}x ({t['speedup_p10']:.2f}-"
                     f"{t['speedup_p90']:.2f}) measured speedup, {key} "
                     f"{_fmt_metric(key, best['metrics'][key])} "
                     f"({_delta(key, best['metrics'][key], base)}).")
    return lines


def plot_model(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = res["primary"]
    base = res["baseline"]
    scale = 100.0 if key.endswith(("accuracy", "top1", "agreement")) else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=90)
    ax.axhline(base["metrics"][key] * scale, color="0.6", lw=0.8, ls="--")
    if scale == 100.0:
        ax.axhline(base["metrics"][key] * scale - 1, color="tab:red", lw=0.6, ls=":",
                   label="original - 1 pt")
    ax.axvline(1.0, color="0.6", lw=0.8, ls="--")
    ax.plot([1.0], [base["metrics"][key] * scale], marker="*", ms=16, color="k", ls="none",
            label="original")
    points = [(r["timing"]["speedup"], r["metrics"][key] * scale, r) for r in res["settings"]
              if "error" not in r and r.get("timing")]
    xs = [v for p in points for v in (p[2]["timing"]["speedup_p10"], p[2]["timing"]["speedup_p90"])]
    xs += [1.0]  # the axis spans the p10-p90 bars: label widths scale with it
    ys = [p[1] for p in points] + [base["metrics"][key] * scale]
    xspan, yspan = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []  # label anchors in axis-span units
    for x, y, r in sorted(points, key=lambda p: (p[1], p[0])):
        t = r["timing"]
        color = "tab:orange" if r.get("data_aware") else "tab:blue"
        ax.errorbar([x], [y], xerr=[[x - t["speedup_p10"]], [t["speedup_p90"] - x]], fmt="o",
                    color=color, ms=5, capsize=2, lw=0.6, alpha=0.9)
        # stack labels of nearby points instead of printing them over each other
        for dy in (4, -12, 14, -22, 24, -32, 34, -42, 44, -52, 54, -62, 64):
            if not any(abs(x / xspan - px) < 0.22 and abs((y / yspan) + dy / 300 - py) < 0.035
                       for px, py in placed):
                break
        placed.append((x / xspan, y / yspan + dy / 300))
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, dy), fontsize=7,
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if dy != 4 else None)
    bp = budget_points(res)
    if bp is not None:
        for kind, style, color, name in (("budget", "D-", "tab:green", "budget frontier (--target-speedup)"),
                                         ("uniform", "s--", "tab:purple", "uniform rank +calib (same sweep)"),
                                         ("int8-original", "P", "tab:red", "int8 original"),
                                         ("int8-uniform", "v--", "tab:brown", "uniform rank +calib, int8"),
                                         ("int8-budget", "^-", "tab:olive", "int8-aware budget, int8")):
            pts = bp[kind]
            if not pts:
                continue
            ax.plot([r["speedup"] for r in pts], [r["metric"] * scale for r in pts], style, color=color,
                    ms=5, lw=1.2, label=name)
            for r in pts:
                if r["p10"] is not None:
                    ax.errorbar([r["speedup"]], [r["metric"] * scale],
                                xerr=[[r["speedup"] - r["p10"]], [r["p90"] - r["speedup"]]], fmt="none",
                                color=color, capsize=2, lw=0.6, alpha=0.7)
                tag = (f"{r['setting']:g}x" if kind.endswith("budget") else f"r={r['setting']:g}"
                       if kind.endswith("uniform") else "int8")
                ax.annotate(tag, (r["speedup"], r["metric"] * scale), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=color)
    ax.plot([], [], "o", color="tab:blue", label="data-free")
    if any(r.get("data_aware") for r in res["settings"]):
        ax.plot([], [], "o", color="tab:orange", label="data-aware (+calib)")
    ax.set_xlabel("measured speedup vs original (onnxruntime CPU, batch 1; bars p10-p90)")
    ax.set_ylabel(res["primary_label"] + (" [%]" if scale == 100.0 else ""))
    ax.set_title(res["model"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: dict, out: Path, merge: bool = True) -> None:
    """Write JSON, Markdown and plots; with ``merge``, models measured by another run (in the
    results.json now on disk) are kept."""
    out.mkdir(parents=True, exist_ok=True)
    if merge and (out / "results.json").exists():
        on_disk = json.loads((out / "results.json").read_text())
        results["models"] = {**on_disk.get("models", {}), **results["models"]}
    tmp = out / f".results.{os.getpid()}.json"
    tmp.write_text(json.dumps(results, indent=1, default=_json) + "\n")
    tmp.replace(out / "results.json")  # atomic: a concurrent run never reads half a file
    (out / "README.md").write_text(render_markdown(results))
    for name, res in results["models"].items():
        plot_model(res, out / f"{name}.png")


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(o) else float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


# ----------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.eval_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="only these models")
    p.add_argument("--settings", nargs="+", metavar="LABEL", help="only these grid rows (by label)")
    p.add_argument("--quick", action="store_true", help="the quick rows, fewer samples and rounds")
    p.add_argument("--data-free", action="store_true", help="leave out the data-aware (+calib) rows")
    p.add_argument("--runs", type=int, help="timed interleaved rounds (default 100, quick 30)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "docs" / "eval"))
    p.add_argument("--cache", default=str(CACHE), help="where compressed models go")
    p.add_argument("--fresh", action="store_true", help="do not merge into an existing results.json")
    p.add_argument("--list", action="store_true", help="print the grid and the models, then exit")
    p.add_argument("--render", action="store_true",
                   help="only redraw README.md and the plots from results.json")
    p.add_argument("--budget", action="store_true",
                   help="run the budget sweeps (tools/bench_budget.py, settings in BUDGET) into "
                        "docs/budget/, then redraw README.md and the plots")
    p.add_argument("--retime", action="store_true",
                   help="only time the cached models of results.json again (all rows in one run)")
    args = p.parse_args(argv)
    args.runs = args.runs or (30 if args.quick else 100)
    if args.list:
        for s in GRID:
            print(f"{s.label:34s} {s.options} kinds={','.join(s.kinds)}"
                  f"{' +calib' if s.data_aware else ''}{' (quick)' if s.quick else ''}")
        for m in MODELS.values():
            print(f"{m.name:20s} {m.path} {'' if m.exists() else '(missing)'}")
        return 0
    if args.settings:
        unknown = set(args.settings) - {s.label for s in GRID}
        if unknown:
            p.error(f"unknown setting(s) {sorted(unknown)}; valid: {[s.label for s in GRID]}")
    out = Path(args.out)
    if args.fresh and (out / "results.json").exists():
        (out / "results.json").unlink()
    import platform

    import onnxruntime

    started = time.perf_counter()
    if args.budget:
        # the published sweeps are single-threaded: steadier ratios on a shared machine
        os.environ.setdefault("ONNXLR_BENCH_THREADS", "1")
        for name in args.models or list(BUDGET):
            if not MODELS[name].exists():
                say(f"{name}: {MODELS[name].path} or its data is missing; skipped")
                continue
            say(f"{name}: budget sweep ({BUDGET[name]})")
            run_budget(name)
        args.render = True
    if args.render:
        write_outputs(json.loads((out / "results.json").read_text()), out, merge=False)
        return 0
    if args.retime:
        results = json.loads((out / "results.json").read_text())
        for name in args.models or list(results["models"]):
            res = json.loads((out / "results.json").read_text())["models"][name]
            retime(res, args)
            write_outputs({"models": {name: res}}, out)  # merges: other models as on disk now
        return 0
    for name in args.models or list(MODELS):
        t_model = time.perf_counter()
        spec = MODELS[name]
        if not spec.exists():
            say(f"{name}: {spec.path} or its data is missing; skipped")
            continue
        settings = [s for s in settings_for(spec, args.quick, args.settings)
                    if not (args.data_free and s.data_aware)]
        say(f"{name}: {len(settings)} settings")
        res = run_model(spec, settings, args)
        results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() \
            else {"models": {}}
        if args.settings and name in results["models"]:  # merge rows into the earlier run
            old = results["models"][name]
            keep = [r for r in old["settings"] if r["label"] not in args.settings]
            res["settings"] = keep + res["settings"]
            res["settings"].sort(key=lambda r: [s.label for s in GRID].index(r["label"])
                                 if r["label"] in [s.label for s in GRID] else 99)
            res["note"] = "rows were timed in separate runs; compare speedups across runs loosely"
        res["run"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                 f"load average {os.getloadavg()[0]:.1f}",
                      "onnxruntime": onnxruntime.__version__,
                      "seconds": round(time.perf_counter() - t_model, 1), "quick": args.quick}
        # only this model: others stay as on disk (another run may be writing them)
        write_outputs({"models": {name: res}}, out)  # after every model: partial results survive
        say(f"{name}: done; wrote {out}")
    say(f"all done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
