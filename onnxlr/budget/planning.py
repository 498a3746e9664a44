"""The plan a budget allocates from: per layer, candidate factorizations with their measured
cost and damage, and the model's reference outputs and timings. Built once per model
(:func:`build_plan`) and reused by every goal of a sweep (:mod:`onnxlr.budget.allocate`).

1. **Candidates.** Every layer gets a small grid: rank fractions :data:`FRACTIONS` of each method
   that applies (Tucker-2 and SVD/channel decomposition for KxK convs under ``method=auto``, SVD
   for 1x1 convs, Gemm and MatMul; CP when asked for), rounded to ``round_to`` as ``compress``
   does. Duplicates (same ranks) and chains that do not reduce MACs are dropped.
2. **Cost** (:mod:`onnxlr.budget.latency`): each candidate is timed as a one-node model against the
   original layer at the layer's real input shape, interleaved, cached on disk. A candidate must be
   at least :data:`MIN_GAIN` faster than the layer it replaces, else it is dropped: no layer is
   ever replaced by a slower one, and a layer with no faster candidate stays as it is. A conv
   over more than :data:`onnxlr.budget.latency.MAX_TIMING_AREA` positions has its candidates
   timed on a smaller input (same channels and aspect ratio: a conv's cost is linear in the
   area), and the layer with its median-MACs candidate (the anchor) at the real shape; every
   candidate's time is its bounded-size time scaled by the anchor's real/bounded ratio. Measured
   on a VGG16-sized detector, the bounded-size ratios alone came out up to 1.6x optimistic on its
   full-resolution 64-channel convs (cached activations favour the chains); the anchor removes that.
3. **Damage** of a candidate, d:
   * with calibration data: the squared relative output error of the model with that one layer
     replaced (factors refined on the data by :mod:`onnxlr.calib.collect`, symmetric statistics) on
     :data:`DAMAGE_SAMPLES` calibration samples held out from the refinement: measured by one
     onnxruntime pass per candidate, or estimated from the candidate's layer-output error times
     the layer's sensitivity (one pass per layer), as the time allows (:mod:`onnxlr.budget.damage`).
     For an output made by a Softmax the error is that of its input, the logits
     (:data:`onnxlr.budget.outputs.ERROR_ON_LOGITS`);
   * without data: the squared relative weight error ``||W - W_r||^2 / ||W||^2`` (normalized per
     layer; every layer is taken as equally sensitive).
   Candidates with d > :data:`MAX_LAYER_DAMAGE` are dropped (a layer whose every candidate is too
   damaging stays). Squared errors of independent layers add, so sqrt(sum d) predicts the model's
   output error (data-aware damage), calibrated against a measurement for ``max_error``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxlr import data, methods
from onnxlr import model as g
from onnxlr.budget import latency, timing
from onnxlr.budget.outputs import (
    output_error,
    quantize_built,
    run_outputs,
    scored_outputs,
    softmax_logits,
)
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, Replacement, conv_macs, linear_macs
from onnxlr.methods.linalg import single_threaded_blas
from onnxlr.model.opset import default_opset
from onnxlr.model.targets import Target, layer_macs
from onnxlr.ranks import RankSpec
from onnxlr.report.compress import format_ranks
from onnxlr.report.progress import Progress

log = logging.getLogger("onnxlr")

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
MIN_GAIN = 0.05  # a candidate must be at least 5% faster than the layer (timing noise margin)
MAX_LAYER_DAMAGE = 0.25  # d > 0.25 (relative error > 0.5) is too damaging for one layer
DAMAGE_SAMPLES = 32  # as many as the checks: with 12 or 16 the allocations chased sample noise (see check_samples)
CHECK_SAMPLES = 32


@dataclass
class Candidate:
    method: str
    fraction: float
    ranks: dict
    replacement: Replacement
    macs: int | None
    weight_error: float
    ms: float | None = None
    damage: float | None = None
    dropped: str | None = None
    layer_error: float | None = None  # relative layer-output error on held-out moments, after refinement

    def label(self) -> str:
        return f"{self.method} {self.fraction:g} ({format_ranks(self.ranks)})"


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
    sensitivity: float | None = None  # d_model / e_layer^2 (sensitivity damage estimator)

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
    check_feeds: list  # feeds of the samples errors are measured on (held-out calibration samples, or random)
    timing_feed: dict  # one sample, for end-to-end timing
    reference_outputs: list
    alpha: float = 1.0
    error_scale: float = 1.0
    seconds: dict = field(default_factory=dict)
    check_samples: int = 0  # samples in check_feeds
    logits: dict = field(default_factory=dict)  # Softmax inputs errors are measured on (name -> dtype)
    threads: int = 1  # intra-op threads every timing uses (the threads the model will run with)
    damage: dict = field(default_factory=dict)  # the damage estimator's record (onnxlr.budget.damage)
    timings: dict = field(default_factory=dict)  # conditions of the timings (onnxlr.budget.timing)
    calib_samples: int | None = None
    # INT8 plans (--quantize): the QuantizeConfig, and the --calib data and sample limit compress
    # quantizes on; None: fp32, and model_ms is the fp32 original's time
    quantize: object = None
    quant_calib: object = None
    quant_samples: int | None = None
    reference_ms: float | None = None  # the fp32 original (the speedup's denominator); None: model_ms
    shipped_base: bytes | None = None  # the original quantized as the plan ships models (model_ms is its time)
    base_damage: float = 0.0  # squared output error of the original at the planned precision
    precision: str = latency.FP32  # latency.precision_tag of the plan

    @property
    def fp32_ms(self) -> float:
        return self.model_ms if self.reference_ms is None else self.reference_ms


def check_samples(model: onnx.ModelProto, calib, limit: int, calib_samples: int | None = None) -> list[dict]:
    """The samples errors are measured on.

    With calibration data: samples calibration never fits on, at most ``limit``: the held-out ones
    (every data.HOLDOUT_EVERY-th of the first ``calib_samples``), then the samples after the first
    ``calib_samples`` where the data has more. With ``--calib-samples 64`` of 200 the held-out
    samples alone are 12: on MiniLM-L6 the budget's points at 1.1-1.5x scored on them had 0.02-0.04
    more output error on 100 unseen samples than those scored on 32 (docs/budget/README.md).
    Otherwise ``limit`` seeded random samples."""
    specs = data.model_input_specs(model)
    if calib is not None:
        source = data.open_source(calib, specs, what="--calib")
        unfitted = (sample for i, sample in enumerate(source)
                    if data.is_held_out(i) or (calib_samples is not None and i >= calib_samples))
        samples = list(data.limited(unfitted, limit))
        if not samples:
            raise OnnxlrError(f"--calib {source.label}: fewer than {data.HOLDOUT_EVERY} samples; a budget scores "
                              f"on every {data.HOLDOUT_EVERY}th sample, held out from the refinement: give more samples")
    else:
        samples = list(data.random_source(specs, None, limit))
    return samples


def build_plan(work: onnx.ModelProto, targets: list[Target], config, *, fractions=None,
               extra_fractions=(), cache_dir=None) -> Plan:
    """Candidates, their measured latencies and damages for every selectable target of ``work``.

    ``work`` is the prepared model (constants folded) and ``targets`` its find_targets list with
    filters applied; neither is modified."""
    started = time.perf_counter()
    fractions = tuple(fractions or FRACTIONS)
    provider = getattr(config, "provider", "cpu") or "cpu"
    threads = latency.bench_threads(getattr(config, "threads", None))
    base = work.SerializeToString()
    data_aware = config.calib is not None
    samples = check_samples(work, config.calib, CHECK_SAMPLES, getattr(config, "calib_samples", None))
    specs = data.model_input_specs(work)
    check, feed, n_check = list(data.batches(samples, specs)), samples[0], len(samples)
    shapes = g.infer_shapes(work)
    opset = default_opset(work)
    todo = [(i, t) for i, t in enumerate(targets) if t.skip is None and t.layer is not None]
    quantize = getattr(config, "quantize", None)
    shipped_base = None
    if quantize is not None:
        shipped_base = quantize_built(work, quantize, config.calib, getattr(config, "calib_samples", None))

    # Real input shapes: one run of the model with every target's input exposed.
    main_nodes = {id(n) for n in work.graph.node}
    outputs = {o.name for o in work.graph.output}
    real_shape = {k: tuple(v.shape) for k, v in feed.items()}
    exposed = {t.node.input[0]: t.weight_dtype for _, t in todo
               if id(t.node) in main_nodes and t.node.input[0] not in feed and t.node.input[0] not in outputs}
    probe = run_outputs(base, [feed], exposed)
    real_shape.update(zip(exposed, (tuple(a.shape) for a in probe[len(outputs):])))

    # 1. candidates
    layers: list[LayerPlan] = []
    fr_all = tuple(sorted(set(fractions) | set(extra_fractions)))
    progress = Progress("budget: factorizing candidates", len(todo), unit="layers")
    with single_threaded_blas():
        for k, (i, t) in enumerate(todo):
            lp = LayerPlan(i, t.name, t.op_type, None, real_shape.get(t.node.input[0]))
            if id(t.node) not in main_nodes or lp.input_shape is None:
                lp.kept = ("inside a subgraph: not timed" if id(t.node) not in main_nodes else
                           "its input's shape is unknown: not timed")
                layers.append(lp)
                continue
            seen = set()
            for method in methods.budget_methods(t.layer, config.method):
                results = method.factorize_many(t.layer, [RankSpec("fraction", f) for f in fr_all], config.round_to)
                for f, result in zip(fr_all, results):
                    if isinstance(result, OnnxlrError):
                        log.info("%s: %s %g: %s", t.name, method.name, f, result)
                        continue
                    rep = result[0]
                    key = (method.name, tuple(sorted(rep.ranks.items())))
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
                    cand = Candidate(method.name, f, dict(rep.ranks), rep, after, err)
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
    progress = Progress("budget: timing layers", len(layers), unit="layers")
    by_index = dict(todo)
    layer_conditions: list = []
    bounded: dict = {}  # layer name -> the input shape its candidates were timed at
    for k, lp in enumerate(layers):
        if lp.kept is not None:
            continue
        cands = lp.candidates
        small = latency.timing_shape(by_index[lp.index], lp.input_shape)
        t0, ms = latency.time_layer(by_index[lp.index], small, shapes, [c.replacement for c in cands],
                                    opset, work.ir_version, provider, cache, threads, conds := [],
                                    quantize=quantize)
        if small != tuple(lp.input_shape) and t0 > 0 and cands:
            # the layer and one anchor candidate at the real shape: the anchor's ratio there corrects
            # every ratio measured at the bounded size (smaller activations stay in cache, which
            # favours the chains), and the layer's time puts them back in real milliseconds
            anchor = _anchor(cands)
            full, (anchor_ms,) = latency.time_layer(by_index[lp.index], lp.input_shape, shapes,
                                                    [cands[anchor].replacement], opset, work.ir_version, provider,
                                                    cache, threads, full_conds := [], quantize=quantize,
                                                    runs=latency.SLOW_MIN_RUNS)
            scale = anchor_ms / ms[anchor]
            t0, ms = full, [m * scale for m in ms]
            bounded[lp.name] = list(small)
            if full_conds:
                layer_conditions.append(full_conds)
        if conds:
            layer_conditions.append(conds)
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

    model_conditions: list = []
    originals = [onnx.load_from_string(base)] + ([] if shipped_base is None else [shipped_base])
    originals_ms = latency.time_models(originals, feed, provider, threads, budget_s=1.0,
                                       conditions=model_conditions, label="model")
    model_ms = originals_ms[-1]  # the original at the planned precision
    layer_sum = sum(lp.ms or 0 for lp in layers)
    alpha = float(np.clip(model_ms / layer_sum, 0.5, 3.0)) if layer_sum > 0 else 1.0
    plan = Plan(base, layers, provider, model_ms, total_macs, data_aware, check, feed, [],
                alpha=alpha, check_samples=n_check, logits=softmax_logits(work), threads=threads)
    plan.timings = {"layers": _layer_timing_summary(layer_conditions), "model": timing.summary(model_conditions),
                    "bounded_layers": bounded, "max_timing_area": latency.MAX_TIMING_AREA}
    if plan.logits:
        log.info("budget: output errors on the logits of the Softmax output(s) %s", ", ".join(plan.logits))
    plan.reference_outputs = scored_outputs(plan, base, check)
    if shipped_base is not None:
        plan.quantize, plan.quant_calib, plan.precision = quantize, config.calib, latency.precision_tag(quantize, opset)
        plan.quant_samples = getattr(config, "calib_samples", None)
        plan.reference_ms, plan.shipped_base = originals_ms[0], shipped_base.SerializeToString()
        plan.base_damage = output_error(plan.reference_outputs, scored_outputs(plan, shipped_base, check)) ** 2
        log.info("budget: planned at %s: original %.3f ms in fp32, %.3f ms quantized (output error %.4g)",
                 plan.precision, plan.reference_ms, model_ms, math.sqrt(plan.base_damage))
    log.info("budget: model %.3f ms, factorizable layers alone %.3f ms, alpha %.2f", model_ms, layer_sum, alpha)

    # 3. damage
    damage_t = time.perf_counter()
    if data_aware:
        from onnxlr.budget import damage

        plan.damage = damage.score(plan, work, todo, config, samples[:DAMAGE_SAMPLES], specs)
    else:
        for lp in layers:
            for c in lp.usable():
                c.damage = c.weight_error**2
        plan.damage = {"estimator": "weight-error", "reason": "no calibration data"}
    for lp in layers:
        for c in lp.usable():
            if c.damage > MAX_LAYER_DAMAGE:
                c.dropped = f"too damaging (d={c.damage:.3g})"
        if lp.kept is None and not lp.usable():
            lp.kept = "every faster candidate is too damaging"
    if plan.quantize is not None:
        _balance_candidates(plan)
    plan.seconds = {"candidates": plan_t - started, "latency": time_t - plan_t,
                    "model_timing": damage_t - time_t, "damage": time.perf_counter() - damage_t,
                    "total": time.perf_counter() - started}
    return plan


def _balance_candidates(plan: Plan) -> None:
    """Every candidate a model may use gets its factors balanced for int8 once (as the pipeline
    balances rule-made chains): the replacement built, measured and written."""
    from onnxlr.quant import balance_replacement

    for lp in plan.layers:
        for c in lp.candidates:
            if c.dropped != "does not reduce MACs":
                c.replacement = balance_replacement(c.replacement)


def _anchor(cands: list[Candidate]) -> int:
    """Index of the candidate of median MACs among those that reduce MACs (else the first)."""
    order = sorted((c.macs or 0, i) for i, c in enumerate(cands) if c.dropped != "does not reduce MACs")
    return order[len(order) // 2][1] if order else 0


def _layer_timing_summary(groups: list) -> dict:
    """The layer timings' conditions in a few figures (``groups``: per timed layer, the conditions
    of each attempt): timed layers, how many were contended and re-measured, how many stayed
    contended, the worst run-queue wait and load seen."""
    if not groups:
        return {"layers": 0, "note": "every layer time came from the cache"}
    flat = [c for g in groups for c in g]
    waits = [c.wait_s / c.wall_s for c in flat if c.wait_s is not None and c.wall_s > 0]
    return {"layers": len(groups), "remeasured": sum(len(g) > 1 for g in groups),
            "still_contended": sum(g[-1].contended for g in groups),
            "reasons": sorted({r.split(" ")[0] for g in groups for r in g[-1].reasons}),
            "threads": flat[0].threads, "cores": flat[0].cores,
            "max_wait": max(waits) if waits else None,
            "max_load": max(max(c.load_before, c.load_after) for c in flat),
            "wall_s": sum(c.wall_s for c in flat), "cpu_s": sum(c.cpu_s for c in flat)}


def _layer_macs_only(t: Target) -> int | None:
    if isinstance(t.layer, ConvLayer):
        return conv_macs(t.layer.weight.shape, t.layer.group, t.out_spatial)
    return linear_macs([t.layer.weight], t.rows)
