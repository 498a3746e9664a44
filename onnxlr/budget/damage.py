"""Damage of a candidate with calibration data: how far the model's output moves when that one
layer is replaced by it, d = ||y - y_c||^2 / ||y||^2 on held-out calibration samples.

Every candidate is first refined on the calibration samples that are not held out (symmetric
statistics, ``merge_held=False``), which gives, for free, its layer's relative output error on the
held-out moments, e_c (:func:`onnxlr.calib.collect.refine_replacement`'s "after"; the weight
error where no moments apply). Then one of these estimators::

    full         d_c = measured, one full-model pass over the damage samples per candidate
    sensitivity  d_c = s_l * e_c^2,  s_l = d_m / e_m^2 with m the layer's middle candidate
                 (median e among its usable ones) measured by one full pass: one pass per layer
    layer-error  d_c = e_c^2 (every layer equally sensitive): no pass at all
    weight-error d_c = (data-free weight error)^2, candidates not refined: only where --plan-time
                 would be passed by refining a layer's candidates at all

    shipped      (int8 plans, asked for) d_c = e_c^2 - e_0^2: e_c the output error of the int8
                 model with that one layer factorized, quantized as compress ships it
                 (:func:`onnxlr.budget.outputs.build_shipped`), e_0 the int8 original's. It can be
                 negative: a factorized layer can make the int8 model more accurate. One
                 quantization (a calibration run) and one pass per candidate.

``full`` costs (candidates) passes, ``sensitivity`` (layers) passes: on a VGG16-sized detector
213 candidates against 13 layers. ``auto`` (the default) times the reference pass and uses full
passes when their estimated cost fits in the damage phase's bound (``--plan-time``, else
:data:`FULL_PASS_BUDGET_S`), on fewer of the damage samples when only that fits (at least
:data:`MIN_FULL_SAMPLES`; ``full_samples`` in the record), else the sensitivity estimator; a
bound the work would pass while scoring switches the remaining layers to the cheaper estimator
(sensitivity on fewer samples, then layer-error; where refining the next layer would pass it,
weight-error with the data-free factors kept), and the plan says which estimator scored how many
layers. Without a bound the
sensitivity passes alone are held to :data:`FULL_PASS_BUDGET_S` by running them on fewer of the
damage samples (at least :data:`MIN_SENSITIVITY_SAMPLES`; ``sensitivity_samples`` in the record).

For an int8 plan (``plan.quantize``) every ``full`` pass runs the candidate's chain balanced and
with its weights fake-quantized as onnxruntime will quantize them (:func:`int8_weights`): the
damage includes the chain's weight rounding at no extra pass. Activation rounding and how a
factorized layer changes the rest of the int8 model's error are not simulated: measured with
``tools/bench_int8_damage.py``, this damage ranks the shipped one with Spearman 0.66 on PP-OCRv6
and -0.40 on EfficientNet-Lite0, where 11 of 18 and 7 of 20 single factorized layers make the int8
model more accurate than the int8 original. ``shipped`` measures that, at a quantization per
candidate; the solver's checks measure the real int8 model either way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from onnxlr import data
from onnxlr.budget.outputs import build_model, build_shipped, output_error, scored_outputs
from onnxlr.methods.linalg import single_threaded_blas
from onnxlr.model.splice import read_bias
from onnxlr.report.progress import Progress

log = logging.getLogger("onnxlr")

ESTIMATORS = ("auto", "full", "sensitivity", "shipped")
#: Without --plan-time, auto uses full passes when they are estimated to take at most this long.
FULL_PASS_BUDGET_S = 120.0
#: Fewest samples the sensitivity passes use when the bound (or, without --plan-time,
#: FULL_PASS_BUDGET_S for the passes alone) asks for a subsample.
MIN_SENSITIVITY_SAMPLES = 2
#: Fewest samples ``auto`` runs full passes on before it turns to the sensitivity estimator (the
#: budget's damage samples were 16 until the frontiers of 2026-11-27).
MIN_FULL_SAMPLES = 16


def score(plan, work, todo, config, samples: list, specs) -> dict:
    """Refine every candidate of ``plan`` and set its ``damage``; returns the estimator's record
    (for the report): which estimator, why, passes run, the time of one pass, seconds."""
    from onnxlr.calib.collect import Calibrator, refine_replacement

    started = time.perf_counter()
    wanted = getattr(config, "damage", "auto") or "auto"
    bound = getattr(config, "plan_time", None)
    feeds = list(data.batches(samples, specs))
    record = {"requested": wanted, "bound_s": bound, "samples": len(samples), "layers": {}}
    with single_threaded_blas():
        calibrator = Calibrator(work, [t for _, t in todo], config.calib, getattr(config, "calib_samples", None),
                                "symmetric", getattr(config, "calib_mask", "auto"), merge_held=False,
                                memory=getattr(config, "calib_memory", None))
        t0 = time.perf_counter()
        reference = scored_outputs(plan, plan.base, feeds)
        pass_s = time.perf_counter() - t0
        layers = [lp for lp in plan.layers
                  if not (lp.kept is not None and "not timed" in lp.kept)
                  and any(c.dropped != "does not reduce MACs" for c in lp.candidates)]
        n_cands = sum(len(lp.usable()) for lp in layers)
        n_layers = sum(1 for lp in layers if lp.usable())
        budget = bound if bound is not None else FULL_PASS_BUDGET_S
        elapsed = time.perf_counter() - started
        est_full, est_sens = pass_s * n_cands, pass_s * n_layers
        full_samples = len(samples)
        if wanted == "auto":
            estimator, full_samples = auto_estimator(budget - elapsed, est_full, len(samples))
            where = "--plan-time bound" if bound is not None else "default budget"
            why = (f"full passes estimated at {est_full:.0f} s ({n_cands} x {pass_s:.2f} s) "
                   f"{'within' if full_samples == len(samples) else 'over'} the {budget:g} s {where}"
                   + (f": full passes on {full_samples} of the {len(samples)} samples" if
                      estimator == "full" and full_samples < len(samples) else ""))
        else:
            estimator, why = wanted, "asked for"
        record.update(pass_s=pass_s, estimated_full_s=est_full, estimated_sensitivity_s=est_sens,
                      candidates=n_cands, reason=why)
        log.info("budget: damage by %s (%s)", estimator, why)
        by_index = dict(todo)
        progress = Progress(f"budget: damage ({estimator})", len(layers), unit="layers")
        passes = 0
        refine_s = collect_s = 0.0
        sub = {"feeds": feeds, "reference": reference, "n": len(samples)}
        if full_samples < len(samples):
            sub = _subsample(plan, samples[:full_samples], specs, scored_outputs)
            record["full_samples"] = full_samples
        if estimator == "shipped":
            from onnxlr.quant import balance_replacement

            original_damage = output_error(reference, scored_outputs(plan, plan.shipped_base, feeds)) ** 2
            record["int8_original_damage"] = original_damage
        if bound is None and estimator == "sensitivity" and est_sens > budget:
            # no --plan-time: the passes alone keep to the default budget, on fewer samples, so
            # their cost does not grow as layers x samples x forward time
            fit = max(MIN_SENSITIVITY_SAMPLES, int(len(samples) * budget / est_sens))
            if fit < len(samples):
                sub = _subsample(plan, samples[:fit], specs, scored_outputs)
                record["sensitivity_samples"] = fit
        for k, lp in enumerate(layers):
            t = by_index[lp.index]
            if bound is not None and estimator != "weight-error" and k > 0 and (
                    time.perf_counter() - started + refine_s / k > bound):
                # refining this layer's candidates alone would pass the bound: this layer and the
                # rest keep their data-free factors, scored by their weight error
                estimator = "weight-error"
                _note_switch(record, f"-> weight-error, not refined, at layer {k + 1} of {len(layers)}")
            if estimator == "weight-error":
                for c in lp.usable():
                    c.damage = c.weight_error**2
                record["layers"][lp.name] = estimator
                progress.update(k + 1, lp.name)
                continue
            c0 = time.perf_counter()
            # the calibration pass runs when a layer's stage is first due: a one-off, not part of
            # the per-layer refine rate the bound extrapolates
            calibrator.plan_for(t)
            collect_s += time.perf_counter() - c0
            r0 = time.perf_counter()
            _refine_layer(lp, t, calibrator, refine_replacement)
            calibrator.release(t)
            refine_s += time.perf_counter() - r0
            usable = lp.usable()
            if not usable:
                progress.update(k + 1, lp.name)
                continue
            # the bound: would this layer's estimator, then the rest, pass it?
            if bound is not None:
                now = time.perf_counter() - started
                left = len(layers) - k
                refine_left = refine_s / (k + 1) * (left - 1)
                per_pass = pass_s * sub["n"] / max(len(samples), 1)
                rest_cands = sum(len(x.usable()) for x in layers[k:])  # refined later: about the same
                if estimator == "full" and now + refine_left + per_pass * rest_cands > bound:
                    estimator = "sensitivity"
                    _note_switch(record, f"full -> sensitivity at layer {k + 1} of {len(layers)}")
                if estimator == "sensitivity" and now + refine_left + per_pass * left > bound:
                    fit = int(len(samples) * (bound - now - refine_left) / max(pass_s * left, 1e-9))
                    if fit >= MIN_SENSITIVITY_SAMPLES and fit < sub["n"]:
                        sub = _subsample(plan, samples[:fit], specs, scored_outputs)
                        record["sensitivity_samples"] = fit
                    elif fit < MIN_SENSITIVITY_SAMPLES:
                        estimator = "layer-error"
                        _note_switch(record, f"-> layer-error at layer {k + 1} of {len(layers)}")
            if estimator == "shipped":
                for c in usable:  # balanced as the pipeline balances the chains it quantizes
                    shipped = build_shipped(plan, {lp.index: replace(c, replacement=balance_replacement(c.replacement))})
                    c.damage = output_error(reference, scored_outputs(plan, shipped, feeds)) ** 2 - original_damage
                    passes += 1
            elif estimator == "full":
                for c in usable:
                    built = build_model(plan, {lp.index: int8_weights(c, getattr(plan, "quantize", None))})
                    c.damage = output_error(sub["reference"], scored_outputs(plan, built, sub["feeds"])) ** 2
                    passes += 1
            elif estimator == "sensitivity":
                proxy = _proxies(lp)
                mid = _middle(usable, proxy)
                d_mid = output_error(sub["reference"], scored_outputs(plan, build_model(plan, {lp.index: mid}),
                                                                      sub["feeds"])) ** 2
                passes += 1
                e_mid = proxy[id(mid)] ** 2
                lp.sensitivity = d_mid / e_mid if e_mid > 0 else 1.0
                for c in usable:
                    c.damage = lp.sensitivity * proxy[id(c)] ** 2
                mid.damage = d_mid
            else:
                proxy = _proxies(lp)
                for c in usable:
                    c.damage = proxy[id(c)] ** 2
            record["layers"][lp.name] = estimator
            progress.update(k + 1, lp.name)
        progress.close()
        plan.calib_samples = calibrator.total
    used = sorted(set(record["layers"].values()))
    record.update(estimator="+".join(used) if used else estimator, passes=passes, refine_s=refine_s,
                  calibration_pass_s=collect_s, seconds=time.perf_counter() - started)
    return record


def _note_switch(record: dict, what: str) -> None:
    """Add one estimator switch to the record's ``switched`` ("; "-separated, in order)."""
    record["switched"] = f"{record['switched']}; {what}" if "switched" in record else what


def auto_estimator(seconds_left: float, full_s: float, samples: int) -> tuple[str, int]:
    """``--damage auto``: (estimator, samples for its full passes). Full passes on every damage
    sample when they fit in ``seconds_left``; else on as many as fit, down to
    :data:`MIN_FULL_SAMPLES`; else the sensitivity estimator (and ``samples``). Full passes rank
    candidates better than the sensitivity estimate (Spearman 0.96-0.99 against them, docs/budget),
    so fewer samples are given up first: PP-OCRv6's 188 candidates on 32 samples were estimated
    at 159 s, over the 120 s default, and on 22 samples they fit."""
    if full_s <= seconds_left:
        return "full", samples
    fit = int(samples * max(seconds_left, 0.0) / full_s) if full_s > 0 else samples
    if fit >= min(MIN_FULL_SAMPLES, samples):
        return "full", fit
    return "sensitivity", samples


def int8_weights(cand, quantize):
    """``cand`` with its chain balanced and its weights fake-quantized (symmetric int8, per channel
    as ``quantize`` asks) as in the int8 model; ``cand`` itself without ``quantize``."""
    if quantize is None:
        return cand
    from onnxlr.quant import balance_chain, fake_quantize_chain

    steps = cand.replacement.steps
    steps = fake_quantize_chain(balance_chain(steps) if len(steps) > 1 else steps, per_channel=quantize.per_channel)
    return replace(cand, replacement=replace(cand.replacement, steps=steps))


def _refine_layer(lp, t, calibrator, refine_replacement) -> None:
    """Refine every candidate a model may use (uniform sweeps too); record each one's layer error."""
    stats = calibrator.plan_for(t)
    bias, fit_bias = read_bias(t)
    for c in lp.candidates:
        if c.dropped == "does not reduce MACs":
            continue
        if stats is not None:
            errors: dict = {}
            c.replacement, _ = refine_replacement(t.layer, bias, fit_bias, c.replacement, stats.fit, stats.held,
                                                  merge_held=False, errors=errors)
            c.layer_error = errors.get("after")


def _proxies(lp) -> dict:
    """id(candidate) -> its error proxy: the layer-output error where every usable candidate has
    one, else the weight error (one kind per layer, so their ratios mean something)."""
    usable = lp.usable()
    if all(c.layer_error is not None for c in usable):
        return {id(c): float(c.layer_error) for c in usable}
    return {id(c): float(c.weight_error) for c in usable}


def _middle(usable: list, proxy: dict):
    """The candidate of median error among those with a nonzero one (else the first)."""
    ranked = sorted((c for c in usable if proxy[id(c)] > 0 and math.isfinite(proxy[id(c)])), key=lambda c: proxy[id(c)])
    return ranked[len(ranked) // 2] if ranked else usable[0]


def _subsample(plan, samples, specs, scored_outputs) -> dict:
    feeds = list(data.batches(samples, specs))
    return {"feeds": feeds, "reference": scored_outputs(plan, plan.base, feeds), "n": len(samples)}
