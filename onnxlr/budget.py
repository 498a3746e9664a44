"""Budgeted allocation: per layer, keep it or pick (method, rank) so the model meets a target.

Goals (exactly one): ``target_speedup`` X (measured end-to-end latency ratio), ``target_macs`` F
(a fraction of the original MACs of the factorizable layers plus the rest), or ``max_error`` E
(relative L2 output error on calibration data; random inputs when none is given): the fastest
model within E.

1. **Candidates.** Every layer gets a small grid: rank fractions :data:`FRACTIONS` of each method
   that applies (Tucker-2 and SVD/channel decomposition for KxK convs under ``method=auto``, SVD
   for 1x1 convs, Gemm and MatMul; CP when asked for), rounded to ``round_to`` as ``compress``
   does. Duplicates (same ranks) and chains that do not reduce MACs are dropped.
2. **Cost** (:mod:`onnxlr.latency`): each candidate is timed as a one-node model against the
   original layer at the layer's real input shape, interleaved, cached on disk. A candidate must be
   at least :data:`MIN_GAIN` faster than the layer it replaces, else it is dropped: no layer is
   ever replaced by a slower one, and a layer with no faster candidate stays as it is.
3. **Damage** of a candidate, d:
   * with calibration data: the squared relative output error of the model with that one layer
     replaced (factors refined on the data by :mod:`onnxlr.calibrate`, symmetric statistics) on
     :data:`DAMAGE_SAMPLES` calibration samples held out from the refinement (see
     :func:`_load_data`): one onnxruntime pass per candidate. For an output made by a Softmax
     the error is that of its input, the logits (:data:`ERROR_ON_LOGITS`);
   * without data: the squared relative weight error ``||W - W_r||^2 / ||W||^2`` (normalized per
     layer; every layer is taken as equally sensitive).
   Candidates with d > :data:`MAX_LAYER_DAMAGE` are dropped (a layer whose every candidate is too
   damaging stays). Squared errors of independent layers add, so sqrt(sum d) predicts the model's
   output error (data-aware damage), calibrated against a measurement for ``max_error``.
4. **Allocation** (a multiple-choice knapsack, greedy): per layer the candidates on the lower
   convex hull of (saving, damage) are steps; repeatedly take the step with the smallest marginal
   damage per millisecond saved (per MAC for ``target_macs``) over all layers until the goal is
   predicted to hold.
5. **Prediction.** ``T_pred = T_model - alpha * sum(savings)``, T_model measured; ``alpha`` starts at
   ``T_model / sum(t_layer)`` (bounded to [0.5, 3]): measured here, one-node models ran up to 2x
   faster than the same layers inside the model (their data stays in cache), so savings scale with
   the layers' in-model share. Each final check recalibrates ``alpha`` to the value that would have
   predicted the measurement.
6. **Final check.** The model is built and timed against the original (interleaved, median of
   per-round ratios). If the measured speedup is below the target, or above it but off the
   prediction by more than :data:`PREDICTION_TOLERANCE` (more speed than asked costs accuracy),
   ``alpha`` is recalibrated and the allocation redone, at most :data:`MAX_ROUNDS` rounds; of the
   allocations measured at or above the target, the one with the least output error is returned.
   For ``max_error`` the error scale is recalibrated the same way.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxlr import graph as g
from onnxlr import latency, runtime
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, Replacement
from onnxlr.ranks import RankSpec
from onnxlr.targets import Target, find_targets

log = logging.getLogger("onnxlr")

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
MIN_GAIN = 0.05  # a candidate must be at least 5% faster than the layer (timing noise margin)
MAX_LAYER_DAMAGE = 0.25  # d > 0.25 (relative error > 0.5) is too damaging for one layer
DAMAGE_SAMPLES = 16
CHECK_SAMPLES = 32
MAX_ROUNDS = 4
PREDICTION_TOLERANCE = 0.15  # a final check within 15% of the prediction ends the rounds
MODEL_BUDGET_S = 5.0  # seconds of interleaved timing per end-to-end check
# A Softmax output saturates: errors in the logits of confident positions vanish from the
# probabilities. Damages and output errors are measured on its input (the logits) instead.
ERROR_ON_LOGITS = True


@dataclass
class Candidate:
    method: str
    fraction: float
    ranks: dict
    replacement: Replacement
    macs: int | None
    weight_error: float
    new_bias: np.ndarray | None = None
    ms: float | None = None
    damage: float | None = None
    dropped: str | None = None

    def label(self) -> str:
        return f"{self.method} {self.fraction:g} {self.ranks}"


@dataclass
class LayerPlan:
    index: int  # position in the model's target list
    name: str
    op_type: str
    macs: int | None
    input_shape: tuple | None = None
    ms: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    kept: str | None = None  # why no candidate is usable

    def usable(self) -> list[Candidate]:
        return [c for c in self.candidates if c.dropped is None]


@dataclass
class Plan:
    """Everything measured once and reused by every goal (a sweep's targets)."""

    base: bytes  # the prepared model (constant weights folded), serialized
    layers: list[LayerPlan]
    provider: str
    model_ms: float
    total_macs: int
    data_aware: bool
    check_data: dict  # samples for error checks (calibration data, or seeded random inputs)
    timing_feed: dict  # one batch-1 feed for end-to-end timing
    reference_outputs: list
    alpha: float = 1.0
    error_scale: float = 1.0
    seconds: dict = field(default_factory=dict)
    fit_samples: int | None = None  # calibration samples the candidates are refined on (the first ones)
    logits: dict = field(default_factory=dict)  # Softmax inputs errors are measured on (name -> dtype)


@dataclass
class Allocation:
    choice: dict  # layer index -> Candidate
    predicted_ms: float
    predicted_speedup: float
    predicted_error: float
    macs: int
    measured_speedup: float | None = None
    measured_error: float | None = None
    rounds: list = field(default_factory=list)
    reached: bool = True

    def summary(self) -> dict:
        return {
            "layers": {str(i): c.label() for i, c in self.choice.items()},
            "predicted_speedup": self.predicted_speedup,
            "measured_speedup": self.measured_speedup,
            "predicted_error": self.predicted_error,
            "measured_error": self.measured_error,
            "macs": self.macs,
            "rounds": self.rounds,
        }


class _Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.tty = label, total, sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, done: int, what: str = "") -> None:
        msg = f"{self.label} {done}/{self.total} {what} ({time.perf_counter() - self.t0:.0f} s)"
        if self.tty:
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)
        else:
            log.info(msg)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


# --- building the plan ----------------------------------------------------------------------


def _methods(target: Target, requested: str) -> tuple[str, ...]:
    layer = target.layer
    if isinstance(layer, ConvLayer) and not layer.is_pointwise:
        return ("tucker", "svd") if requested == "auto" else (requested,)
    return ("svd",)


def _load_data(model_bytes: bytes, calib, samples: int, fit_samples: int | None = None) -> tuple[dict, dict, int | None]:
    """(check data: up to ``samples`` samples, timing feed: one sample, refinement samples).

    With calibration data the check samples are **held out** from the samples the candidates are
    refined on (``fit_samples``, the first ones, as :class:`onnxlr.calibrate.Calibrator` reads
    them): the samples after them, or, when ``fit_samples`` is None (all) or leaves too few, the
    last ``samples`` with the refinement limited to the ones before. Damages measured on the
    refinement samples are optimistic for exactly the candidates that fit them best (low ranks),
    so the allocation would favour them. Only a file with fewer than 2 x ``samples`` samples is
    scored in-sample (logged). Returns the refinement limit to use (None: all samples)."""
    session = runtime.make_session(model_bytes, threads=1)
    specs = runtime.input_specs(session)
    if calib is not None:
        from onnxlr.calibrate import data_files

        data = runtime.load_npz(data_files(calib)[0], specs)
        n = min((v.shape[0] for v in data.values() if v.ndim), default=0)
        fit = n if fit_samples is None else min(int(fit_samples), n)
        if n - fit >= min(samples, n // 2) and n - fit > 0:
            start = fit  # the samples after the refinement's
        elif n >= 2 * samples:
            start = fit = n - samples  # the last ones; refine on the rest
        else:
            start = 0
            log.info("budget: only %d calibration samples: damage is measured on samples also used to refine", n)
        if start:
            log.info("budget: candidates refined on calibration samples 0-%d, damage and checks on %d-%d (held out)",
                     fit - 1, start, min(start + samples, n) - 1)
        data = {k: (v[start:start + samples] if v.ndim else v) for k, v in data.items()}
        fit_samples = fit if start else fit_samples
    else:
        shapes = runtime.resolve_shapes(specs, None, 1)
        data = runtime.random_inputs(specs, shapes, samples, seed=0)
    feed = {k: (v[:1] if v.ndim else v) for k, v in data.items()}
    return data, feed, fit_samples


def run_outputs(model: bytes | onnx.ModelProto, data: dict, extra: dict | None = None) -> list[np.ndarray]:
    """Every graph output (then the ``extra`` tensors, name -> dtype) over all samples of
    ``data``, concatenated."""
    if extra:
        m = onnx.load_from_string(model if isinstance(model, bytes) else model.SerializeToString())
        for name, dtype in extra.items():
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
        model = m
    session = runtime.make_session(model)
    specs = runtime.input_specs(session)
    rows, exact = runtime.feed_rows([specs], 16)
    names = [o.name for o in session.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in runtime.iter_feeds(data, rows, exact):
        for i, out in enumerate(session.run(names, feed)):
            parts[i].append(np.asarray(out))
    outs = []
    for p in parts:
        try:
            outs.append(np.concatenate(p) if p[0].ndim else p[0])
        except ValueError:
            outs.append(np.concatenate([x.ravel() for x in p]))
    return outs


def softmax_logits(model: onnx.ModelProto) -> dict:
    """{Softmax input name: dtype} for every graph output made by a Softmax (through Identity
    nodes), when :data:`ERROR_ON_LOGITS`; else {}."""
    if not ERROR_ON_LOGITS:
        return {}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Softmax":
            found[node.input[0]] = out.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    return found


def scored_outputs(plan: Plan, model: bytes | onnx.ModelProto, data: dict) -> list[np.ndarray]:
    """The outputs errors are measured on: the graph outputs, or the logits of Softmax outputs."""
    if not plan.logits:
        return run_outputs(model, data)
    return run_outputs(model, data, plan.logits)[-len(plan.logits):]


def output_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Relative L2 error over all float outputs together."""
    num = den = 0.0
    for a, b in zip(reference, candidate):
        if not np.issubdtype(a.dtype, np.floating):
            continue
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        num += float(np.sum((a64 - b64) ** 2))
        den += float(np.sum(a64**2))
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def build_plan(work: onnx.ModelProto, targets: list[Target], config, *, fractions=None,
               extra_fractions=(), cache_dir=None) -> Plan:
    """Candidates, their measured latencies and damages for every selectable target of ``work``.

    ``work`` is the prepared model (constants folded) and ``targets`` its find_targets list with
    filters applied; neither is modified."""
    from onnxlr.compress import decompose, layer_macs, single_threaded_blas
    from onnxlr.splice import default_opset

    started = time.perf_counter()
    fractions = tuple(fractions or FRACTIONS)
    provider = getattr(config, "provider", "cpu") or "cpu"
    base = work.SerializeToString()
    data_aware = config.calib is not None
    samples = DAMAGE_SAMPLES if data_aware else CHECK_SAMPLES
    check_data, feed, fit_samples = _load_data(base, config.calib, max(samples, CHECK_SAMPLES),
                                               getattr(config, "calib_samples", None))
    damage_data = {k: (v[:DAMAGE_SAMPLES] if v.ndim else v) for k, v in check_data.items()}
    shapes = g.infer_shapes(work)
    opset = default_opset(work)
    todo = [(i, t) for i, t in enumerate(targets) if t.skip is None and t.layer is not None]

    # Real input shapes: one run of the model with every target's input exposed.
    main_nodes = {id(n) for n in work.graph.node}
    outputs = {o.name for o in work.graph.output}
    real_shape = {k: tuple(v.shape) for k, v in feed.items()}
    exposed = {t.node.input[0]: t.weight_dtype for _, t in todo
               if id(t.node) in main_nodes and t.node.input[0] not in feed and t.node.input[0] not in outputs}
    probe = run_outputs(base, feed, exposed)
    real_shape.update(zip(exposed, (tuple(a.shape) for a in probe[len(outputs):])))

    # 1. candidates
    layers: list[LayerPlan] = []
    fr_all = tuple(sorted(set(fractions) | set(extra_fractions)))
    progress = _Progress("budget: factorizing candidates", len(todo))
    with single_threaded_blas():
        for k, (i, t) in enumerate(todo):
            lp = LayerPlan(i, t.name, t.op_type, None, real_shape.get(t.node.input[0]))
            if id(t.node) not in main_nodes or lp.input_shape is None:
                lp.kept = "inside a subgraph (not timed): kept"
                layers.append(lp)
                continue
            seen = set()
            for method in _methods(t, config.method):
                for f in fr_all:
                    try:
                        rep, _ = decompose(t, method, RankSpec("fraction", f), config.round_to)
                    except OnnxlrError as exc:
                        log.info("%s: %s %g: %s", t.name, method, f, exc)
                        continue
                    key = (method, tuple(sorted(rep.ranks.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    before, after = layer_macs(t, rep)
                    nb, na = layer_macs(t, rep, nominal=True)
                    lp.macs = before
                    w = t.layer.weight
                    err = getattr(rep, "weight_rel_error", None)
                    if err is None:
                        err = float(np.linalg.norm(rep.reconstruction - w) / max(np.linalg.norm(w), 1e-30))
                    cand = Candidate(method, f, dict(rep.ranks), rep, after, err)
                    if na >= nb:
                        cand.dropped = "does not reduce MACs"
                    elif f not in fractions:
                        cand.dropped = "uniform-only fraction"
                    lp.candidates.append(cand)
            if lp.macs is None:
                lp.macs = _layer_macs_only(t)
            layers.append(lp)
            progress.update(k + 1, t.name)
    progress.close()
    total_macs = sum(lp.macs or 0 for lp in layers)
    plan_t = time.perf_counter()

    # 2. cost: microbenchmarks
    cache = latency.LatencyCache(cache_dir)
    progress = _Progress("budget: timing layers", len(layers))
    by_index = dict(todo)
    for k, lp in enumerate(layers):
        if lp.kept is not None:
            continue
        cands = lp.candidates
        t0, ms = latency.time_layer(by_index[lp.index], lp.input_shape, shapes, [c.replacement for c in cands],
                                    opset, work.ir_version, provider, cache)
        lp.ms = t0
        for c, m in zip(cands, ms):
            c.ms = m
            if c.dropped is None and m > t0 * (1 - MIN_GAIN):
                c.dropped = f"not faster: {m:.4f} ms vs {t0:.4f} ms for the layer"
        if not lp.usable():
            lp.kept = "no candidate is faster than the layer" if lp.candidates else "no candidate reduces MACs"
        progress.update(k + 1, lp.name)
    cache.save()
    progress.close()
    log.info("budget: latency cache %s: %d hits, %d measured", cache.path, cache.hits, cache.misses)
    time_t = time.perf_counter()

    model_ms = latency.time_models([onnx.load_from_string(base)], feed, provider, budget_s=1.0)[0]
    layer_sum = sum(lp.ms or 0 for lp in layers)
    alpha = float(np.clip(model_ms / layer_sum, 0.5, 3.0)) if layer_sum > 0 else 1.0
    plan = Plan(base, layers, provider, model_ms, total_macs, data_aware, check_data, feed, [],
                alpha=alpha, fit_samples=fit_samples, logits=softmax_logits(work))
    if plan.logits:
        log.info("budget: output errors on the logits of the Softmax output(s) %s", ", ".join(plan.logits))
    plan.reference_outputs = scored_outputs(plan, base, check_data)
    log.info("budget: model %.3f ms, factorizable layers alone %.3f ms, alpha %.2f", model_ms, layer_sum, alpha)

    # 3. damage
    if data_aware:
        _data_damage(plan, work, targets, todo, config, damage_data)
    else:
        for lp in layers:
            for c in lp.usable():
                c.damage = c.weight_error**2
    for lp in layers:
        for c in lp.usable():
            if c.damage > MAX_LAYER_DAMAGE:
                c.dropped = f"too damaging (d={c.damage:.3g})"
        if lp.kept is None and not lp.usable():
            lp.kept = "every faster candidate is too damaging"
    plan.seconds = {"candidates": plan_t - started, "latency": time_t - plan_t,
                    "damage": time.perf_counter() - time_t, "total": time.perf_counter() - started}
    return plan


def _layer_macs_only(t: Target) -> int | None:
    from onnxlr.layers import conv_macs, linear_macs

    if isinstance(t.layer, ConvLayer):
        return conv_macs(t.layer.weight.shape, t.layer.group, t.out_spatial)
    return linear_macs([t.layer.weight], t.rows)


def _data_damage(plan: Plan, work, targets, todo, config, damage_data) -> None:
    """Refine every usable candidate on the calibration data, then d = rel. output error^2 of the
    model with that one layer replaced."""
    from onnxlr.calibrate import Calibrator, read_bias, refine_replacement

    with _blas1():
        calibrator = Calibrator(work, [t for _, t in todo], config.calib, plan.fit_samples, "symmetric",
                                getattr(config, "calib_mask", "auto"))
        by_index = dict(todo)
        reference = scored_outputs(plan, plan.base, damage_data)
        n = sum(len(lp.usable()) for lp in plan.layers)
        progress = _Progress("budget: damage on calibration data", n)
        done = 0
        for lp in plan.layers:
            # refine every candidate a model may use (uniform sweeps too), score the usable ones
            refinable = [c for c in lp.candidates if c.dropped != "does not reduce MACs"]
            if lp.kept is not None and "subgraph" in lp.kept or not refinable:
                continue
            t = by_index[lp.index]
            stats = calibrator.plan_for(t)
            bias, fit_bias = read_bias(t)
            for c in refinable:
                if stats is not None:
                    new, new_bias, _note = refine_replacement(t.layer, bias, fit_bias, c.replacement, stats.fit, stats.held)
                    if new is not c.replacement:
                        c.replacement = new
                        c.new_bias = new_bias if fit_bias else None
                if c.dropped is not None:
                    continue
                model = build_model(plan, {lp.index: c})
                c.damage = output_error(reference, scored_outputs(plan, model, damage_data)) ** 2
                done += 1
                progress.update(done, lp.name)
            calibrator.release(t)
        progress.close()


def _blas1():
    from onnxlr.compress import single_threaded_blas

    return single_threaded_blas()


# --- building and measuring -----------------------------------------------------------------


def build_model(plan: Plan, choice: dict) -> onnx.ModelProto:
    """The prepared model with the chosen layers replaced."""
    from onnxlr.splice import default_opset, splice

    model = onnx.load_from_string(plan.base)
    targets = find_targets(model, {})
    names = g.NameScope(g.all_names(model))
    opset = default_opset(model)
    for index, cand in choice.items():
        t = targets[index]
        new_nodes = splice(t, cand.replacement, names, opset, model.ir_version)
        if cand.new_bias is not None:
            from onnxlr.calibrate import write_bias

            write_bias(t, new_nodes, cand.new_bias, names)
    return model


def measure(plan: Plan, model: onnx.ModelProto, budget_s: float = MODEL_BUDGET_S) -> tuple[float, float]:
    """(measured speedup: median of per-round ratios, relative output error on the check data)."""
    from onnxlr.bench import _interleaved

    base = onnx.load_from_string(plan.base)
    providers = runtime.resolve_provider(plan.provider)
    sessions = [runtime.make_session(m, providers=providers, threads=latency.bench_threads()) for m in (base, model)]
    for s in sessions:
        s.run(None, plan.timing_feed)
    t0 = time.perf_counter()
    for s in sessions:
        s.run(None, plan.timing_feed)
    runs = int(np.clip(budget_s / max(time.perf_counter() - t0, 1e-6), 20, 400))
    times = _interleaved([runtime.timed_runner(s, plan.timing_feed) for s in sessions], 5, runs)
    del sessions
    speedup = float(np.median(times[0] / times[1]))
    error = output_error(plan.reference_outputs, scored_outputs(plan, model, plan.check_data))
    return speedup, error


# --- allocation -----------------------------------------------------------------------------


def _steps(lp: LayerPlan, by_macs: bool) -> list[tuple[float, float, Candidate]]:
    """The lower convex hull of (saving, damage) from (0, 0): [(saving, damage, cand), ...]."""
    pts = []
    for c in lp.usable():
        s = (lp.macs - c.macs) if by_macs else (lp.ms - c.ms)
        if by_macs and (lp.macs is None or c.macs is None):
            continue
        if s > 0:
            pts.append((float(s), float(c.damage), c))
    pts.sort(key=lambda p: (p[0], p[1]))
    hull: list = []
    for p in pts:
        if hull and p[1] <= hull[-1][1] and p[0] >= hull[-1][0]:
            # dominates the previous point(s): more saving for less damage
            while hull and p[1] <= hull[-1][1]:
                hull.pop()
        while len(hull) >= 1:
            s0, d0 = (hull[-2][0], hull[-2][1]) if len(hull) >= 2 else (0.0, 0.0)
            s1, d1 = hull[-1][0], hull[-1][1]
            # keep the slopes increasing: drop hull[-1] if it lies above the chord to p
            if (d1 - d0) * (p[0] - s0) >= (p[1] - d0) * (s1 - s0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(plan: Plan, *, target_speedup: float | None = None, target_macs: float | None = None,
             max_error: float | None = None) -> Allocation:
    """Greedy on marginal damage per unit saved (ms, or MACs for ``target_macs``)."""
    by_macs = target_macs is not None
    hulls = {lp.index: _steps(lp, by_macs) for lp in plan.layers}
    pos = {i: 0 for i in hulls}
    heap = []

    def push(i):
        h, k = hulls[i], pos[i]
        if k < len(h):
            s0, d0 = (h[k - 1][0], h[k - 1][1]) if k else (0.0, 0.0)
            heapq.heappush(heap, ((h[k][1] - d0) / (h[k][0] - s0), i))

    for i in hulls:
        push(i)
    lp_by = {lp.index: lp for lp in plan.layers}
    choice: dict = {}
    damage = 0.0

    def state():
        saved_ms = sum(lp_by[i].ms - c.ms for i, c in choice.items())
        ms = plan.model_ms - plan.alpha * saved_ms
        macs = plan.total_macs - sum(lp_by[i].macs - c.macs for i, c in choice.items()
                                     if lp_by[i].macs is not None and c.macs is not None)
        return ms, macs

    def done():
        ms, macs = state()
        if target_speedup is not None:
            return plan.model_ms / ms >= target_speedup
        if by_macs:
            return macs <= target_macs * plan.total_macs
        return False

    while heap and not done():
        _, i = heapq.heappop(heap)
        step = hulls[i][pos[i]]
        prev_d = hulls[i][pos[i] - 1][1] if pos[i] else 0.0
        new_damage = damage - prev_d + step[1]
        if max_error is not None and math.sqrt(new_damage) * plan.error_scale > max_error:
            continue  # this layer goes no further
        damage = new_damage
        choice[i] = step[2]
        pos[i] += 1
        push(i)
    ms, macs = state()
    return Allocation(choice, ms, plan.model_ms / ms, math.sqrt(damage) * plan.error_scale, macs,
                      reached=done() or max_error is not None)


def solve(plan: Plan, *, target_speedup=None, target_macs=None, max_error=None, rounds: int = MAX_ROUNDS,
          check: bool = True) -> Allocation:
    """Allocate, build, measure; recalibrate (alpha, error scale) and redo while the measured
    result misses the goal, at most ``rounds`` times. Returns the first allocation that meets a
    speedup goal, the fastest that meets ``max_error``, else the closest miss."""
    goals = [x is not None for x in (target_speedup, target_macs, max_error)]
    if sum(goals) != 1:
        raise OnnxlrError("give exactly one of --target-speedup, --target-macs, --max-error")
    history: list = []
    best = fallback = None
    for r in range(rounds):
        alloc = allocate(plan, target_speedup=target_speedup, target_macs=target_macs, max_error=max_error)
        if not check:
            return alloc
        speedup, error = measure(plan, build_model(plan, alloc.choice))
        alloc.measured_speedup, alloc.measured_error = speedup, error
        history.append({"round": r + 1, "alpha": plan.alpha, "error_scale": plan.error_scale,
                        "layers": len(alloc.choice), "predicted_speedup": alloc.predicted_speedup,
                        "measured_speedup": speedup, "predicted_error": alloc.predicted_error,
                        "measured_error": error})
        log.info("budget round %d: %d layers, predicted %.3fx measured %.3fx, error %.4g (predicted %.4g)",
                 r + 1, len(alloc.choice), alloc.predicted_speedup, speedup, error, alloc.predicted_error)
        if target_macs is not None:  # MACs are exact: nothing to recalibrate
            best = alloc
            break
        if target_speedup is not None:
            close = abs(speedup - alloc.predicted_speedup) <= PREDICTION_TOLERANCE * alloc.predicted_speedup
            if speedup >= target_speedup:
                # meets the target: keep the least damaging such allocation
                if best is None or (alloc.measured_error or 0) < (best.measured_error or 0):
                    best = alloc
                if close:
                    break
            elif fallback is None or speedup > fallback.measured_speedup:
                fallback = alloc
            pred_saving, meas_saving = 1 - 1 / alloc.predicted_speedup, 1 - 1 / speedup
            if pred_saving <= 0 or (speedup < target_speedup and not alloc.reached):
                break  # nothing to recalibrate on, or every useful step is taken already
            # the alpha that would have predicted this measurement exactly (bounded per round)
            plan.alpha *= float(np.clip(meas_saving / pred_saving, 0.5, 3.0))
            continue
        # max_error
        if error <= max_error:
            if best is None or speedup > best.measured_speedup:
                best = alloc
            if error >= 0.8 * max_error or alloc.predicted_error <= 0:
                break
            plan.error_scale *= float(np.clip(error / alloc.predicted_error, 0.3, 1.0))  # room left
        else:
            if fallback is None or error < fallback.measured_error:
                fallback = alloc
            plan.error_scale *= float(np.clip(error / max(alloc.predicted_error, 1e-12), 1.05, 20))
    best = best or fallback or alloc
    best.reached = best.reached and (
        (target_speedup is None or best.measured_speedup >= target_speedup)
        and (max_error is None or best.measured_error <= max_error))
    best.rounds = history
    return best


# --- the compress hook ----------------------------------------------------------------------


def apply_budget(work: onnx.ModelProto, targets: list[Target], config, report):
    """Choose per layer; mark kept layers' skip reasons; return a config whose rules pin the
    chosen method and rank fraction of every chosen layer (compress then factorizes as usual)."""
    from dataclasses import replace

    from onnxlr.compress import Rule

    plan = build_plan(work, targets, config, cache_dir=getattr(config, "cache_dir", None))
    alloc = solve(plan, target_speedup=config.target_speedup, target_macs=config.target_macs,
                  max_error=config.max_error)
    rules = []
    for lp in plan.layers:
        t = targets[lp.index]
        cand = alloc.choice.get(lp.index)
        if cand is None:
            t.skip = f"budget: kept ({lp.kept or 'not needed for the target'})"
            continue
        rules.append(Rule(match=f"^{re.escape(t.name)}$", method=cand.method, rank=RankSpec("fraction", cand.fraction)))
    goal = (f"target speedup {config.target_speedup:g}x" if config.target_speedup is not None else
            f"target MACs {config.target_macs:g}" if config.target_macs is not None else
            f"max error {config.max_error:g}")
    report.model_notes.append(
        f"budget ({goal}, {'data-aware' if plan.data_aware else 'data-free'} damage, {plan.provider}): "
        f"{len(alloc.choice)} of {len(plan.layers)} layers factorized; predicted speedup "
        f"{alloc.predicted_speedup:.2f}x, measured {alloc.measured_speedup:.2f}x; output error "
        f"{alloc.measured_error:.4g} on {'calibration' if plan.data_aware else 'random'} inputs; "
        f"plan {plan.seconds.get('total', 0):.0f} s")
    if not alloc.reached:
        report.warnings.append(f"budget: the {goal} was not reached (measured {alloc.measured_speedup:.2f}x)")
    report.budget = {"goal": goal, **alloc.summary(), "plan_seconds": plan.seconds,
                     "model_ms": plan.model_ms, "alpha": plan.alpha}
    return replace(config, rules=tuple(rules) + tuple(config.rules), target_speedup=None, target_macs=None,
                   max_error=None)
