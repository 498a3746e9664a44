"""The speed/accuracy frontier: budgeted allocation at several targets, against uniform ranks.

``sweep(model, targets=(1.2, 1.5, 2, 3), calib=..., evaluate=...)`` builds the budget plan once
(candidates, per-layer microbenchmarks, damages: :mod:`onnxlr.budget`) and reuses it for every
target: each point is one allocation, built and measured end to end against the original
(interleaved timing, median of per-round ratios) and checked for relative output error on the
calibration data (seeded random inputs without it). The uniform setting -- the same rank fraction
in every layer, ``method=auto``, refined on the same data when there is some -- is measured the
same way, one point per fraction, so both frontiers come from one set of measurements.

``evaluate``, Python API only, is a callback ``f(model: onnx.ModelProto) -> float`` (a task metric,
higher is better) called on the original and on every point's model.

With ``quantize`` (a QuantizeConfig, as compress --quantize) the plan is made for int8 and every
point's model is the int8 model compress would write (:func:`onnxlr.budget.outputs.build_shipped`),
measured against the fp32 original; the uniform points are quantized the same way, and one more
point, kind ``original``, is the int8 original (no layer factorized).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import onnx

from onnxlr import model as g
from onnxlr.budget import allocate as budget
from onnxlr.budget import outputs, planning
from onnxlr.config import CompressConfig, apply_filters
from onnxlr.errors import OnnxlrError
from onnxlr.model.targets import find_targets
from onnxlr.report.compress import CompressReport
from onnxlr.report.progress import Progress

log = logging.getLogger("onnxlr")

DEFAULT_TARGETS = (1.2, 1.5, 2.0, 3.0)
DEFAULT_UNIFORM = (0.25, 0.5, 0.75)


@dataclass
class SweepPoint:
    kind: str  # "budget", "uniform", or "original" (the int8 original of an int8 sweep)
    setting: float  # target speedup, or the uniform rank fraction
    layers_replaced: int
    macs_fraction: float
    measured_speedup: float
    error: float
    predicted_speedup: float | None = None
    predicted_error: float | None = None
    reached: bool | None = None
    metric: float | None = None
    seconds: float = 0.0
    choice: dict = field(default_factory=dict)
    search: dict | None = None  # the in-context search's record (onnxlr.budget.search), budget points


@dataclass
class SweepResult:
    model: str
    provider: str
    data_aware: bool
    points: list[SweepPoint]
    baseline_ms: float
    baseline_metric: float | None
    plan_seconds: dict
    seconds: float
    damage: dict = field(default_factory=dict)  # the damage estimator's record (onnxlr.budget.damage)
    threads: int | None = None
    timings: dict = field(default_factory=dict)  # conditions of the plan's timings
    precision: str = "fp32"  # what the points were planned and measured at (onnxlr.budget.latency.precision_tag)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def frontier(self, kind: str) -> list[SweepPoint]:
        return sorted((p for p in self.points if p.kind == kind), key=lambda p: p.measured_speedup)

    def to_table(self) -> str:
        from onnxlr.report.tables import format_rows as format_table

        rows = []
        for p in self.points:
            setting = {"budget": f"target {p.setting:g}x", "uniform": f"rank {p.setting:g}"}.get(p.kind, "-")
            pred = f"{p.predicted_speedup:.2f}x" if p.predicted_speedup else "-"
            rows.append([p.kind, setting, str(p.layers_replaced), f"{p.macs_fraction:.2f}", pred,
                         f"{p.measured_speedup:.2f}x", f"{p.error:.4f}",
                         "-" if p.metric is None else f"{p.metric:.4f}"])
        table = format_table(["kind", "setting", "layers", "MACs", "predicted", "measured", "error", "metric"], rows)
        base = "" if self.baseline_metric is None else f", original metric {self.baseline_metric:.4f}"
        return (f"{table}\n\n{self.provider}, {self.threads} threads; "
                f"{'data-aware (calibration data)' if self.data_aware else 'data-free'} damage by "
                f"{self.damage.get('estimator', '?')}; original {self.baseline_ms:.3f} ms{base}; sweep {self.seconds:.0f} s "
                f"(plan {self.plan_seconds.get('total', 0):.0f} s)")

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        try:
            import matplotlib
        except ImportError:
            raise OnnxlrError("--plot needs matplotlib: pip install matplotlib") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        has_metric = any(p.metric is not None for p in self.points)
        fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(11 if has_metric else 6, 4.2), squeeze=False)
        panels = [("error", "relative output error" + (" (calibration data)" if self.data_aware else " (random inputs)"))]
        if has_metric:
            panels.append(("metric", "task metric"))
        for ax, (key, label) in zip(axes[0], panels):
            for kind, style in (("budget", "o-"), ("uniform", "s--")):
                pts = self.frontier(kind)
                if not pts:
                    continue
                ax.plot([p.measured_speedup for p in pts], [getattr(p, key) for p in pts], style,
                        label="budgeted allocation" if kind == "budget" else "uniform rank")
                for p in pts:
                    tag = f"{p.setting:g}x" if kind == "budget" else f"r={p.setting:g}"
                    ax.annotate(tag, (p.measured_speedup, getattr(p, key)), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
            if key == "metric" and self.baseline_metric is not None:
                ax.axhline(self.baseline_metric, color="gray", lw=0.8, ls=":", label="original")
            ax.set_xlabel(f"measured speedup ({self.provider})")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title or os.path.basename(self.model))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise OnnxlrError(f"{what}: give comma-separated numbers, e.g. 1.2,1.5,2 (got {text!r})") from None
    if not values:
        raise OnnxlrError(f"{what}: give at least one number")
    return values


def sweep(
    model: onnx.ModelProto | str | os.PathLike,
    targets: Sequence[float] = DEFAULT_TARGETS,
    *,
    uniform: Sequence[float] = DEFAULT_UNIFORM,
    evaluate: Callable[[onnx.ModelProto], float] | None = None,
    config=None,
    **options,
) -> SweepResult:
    """Measure the budget frontier at ``targets`` (speedups) and the uniform one at ``uniform``
    (rank fractions). ``options`` are CompressConfig fields (calib, provider, method, round_to,
    include, exclude, cache_dir, ...)."""

    started = time.perf_counter()
    for x in targets:
        if not x > 1:
            raise OnnxlrError(f"--targets: every target speedup must be > 1, got {x:g}")
    for f in uniform:
        if not 0 < f <= 1:
            raise OnnxlrError(f"--uniform: every rank fraction must be in (0, 1], got {f:g}")
    config = replace(config, **options) if config is not None else CompressConfig(**options)
    label = str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
    work = g.load_model(model) if not isinstance(model, onnx.ModelProto) else onnx.ModelProto.FromString(model.SerializeToString())
    g.fold_constant_weights(work)
    found = find_targets(work, g.infer_shapes(work))
    apply_filters(found, config, CompressReport())
    plan = planning.build_plan(work, found, config, extra_fractions=tuple(uniform), cache_dir=config.cache_dir)
    del work, found
    baseline_metric = evaluate(onnx.load_from_string(plan.base)) if evaluate else None
    points: list[SweepPoint] = []

    def point(kind, setting, choice, alloc=None) -> SweepPoint:
        t0 = time.perf_counter()
        built = outputs.build_shipped(plan, choice)
        if alloc is not None and alloc.measured_speedup is not None:
            speedup, error = alloc.measured_speedup, alloc.measured_error
        else:
            speedup, error = budget.measure(plan, built)
        macs = plan.total_macs - sum(lp.macs - choice[lp.index].macs for lp in plan.layers
                                     if lp.index in choice and lp.macs and choice[lp.index].macs is not None)
        p = SweepPoint(kind, float(setting), len(choice), macs / max(plan.total_macs, 1), speedup, error,
                       choice={lp.name: choice[lp.index].label() for lp in plan.layers if lp.index in choice})
        if alloc is not None:
            p.predicted_speedup, p.predicted_error, p.reached = alloc.predicted_speedup, alloc.predicted_error, alloc.reached
            p.search = alloc.search
        if evaluate is not None:
            p.metric = float(evaluate(built))
        p.seconds = time.perf_counter() - t0
        log.info("sweep: %s %g: %.3fx, error %.4g%s", kind, setting, speedup, error,
                 "" if p.metric is None else f", metric {p.metric:.4f}")
        return p

    progress = Progress("sweep: budget targets", len(targets), unit="targets")
    for i, x in enumerate(sorted(targets)):
        t0 = time.perf_counter()
        alloc = budget.solve(plan, target_speedup=x, search_s=config.search_time)
        p = point("budget", x, alloc.choice, alloc)
        p.seconds += time.perf_counter() - t0
        points.append(p)
        progress.update(i + 1, f"{x:g}x")
    progress.close()
    for f in uniform:
        choice = {}
        for lp in plan.layers:
            cand = _uniform_candidate(lp, f)
            if cand is not None:
                choice[lp.index] = cand
        points.append(point("uniform", f, choice))
    if plan.quantize is not None:
        points.append(point("original", 0.0, {}))
    return SweepResult(label, plan.provider, plan.data_aware, points, plan.model_ms, baseline_metric,
                       plan.seconds, time.perf_counter() - started, plan.damage, plan.threads, plan.timings,
                       plan.precision)


def _uniform_candidate(lp: planning.LayerPlan, fraction: float):
    """The layer's ``method=auto`` candidate at ``fraction`` (as ``compress --rank F`` would make
    it: only dropped when it does not reduce MACs)."""
    auto = "tucker" if any(c.method == "tucker" for c in lp.candidates) else "svd"
    # candidates with equal ranks were merged into the smallest fraction: take the largest <= F
    same = [c for c in lp.candidates if c.method == auto and c.fraction <= fraction]
    if not same:
        return None
    c = max(same, key=lambda c: c.fraction)
    return None if c.dropped == "does not reduce MACs" else c
