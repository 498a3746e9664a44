"""Budgets that plan on the shipped precision: ``--target-speedup X --quantize int8``.

* Layers and candidate chains are timed quantized, under cache keys of their own (fp32 and int8
  times never mix; per-channel and per-tensor neither).
* Every check of the solver and the final re-time measure the int8 model; the final re-time also
  runs the int8 original, and report.budget gives the speedup against it.
* Full-pass damages run the candidate's chain with int8-rounded weights.
* The written file is the int8 model the budget measured: verify of it on the held-out samples
  gives the report's error.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import check_budget_wrote_what_it_measured, cnn_model, steady_budget

from onnxlr import model as g
from onnxlr.budget import allocate as budget
from onnxlr.budget import damage, latency, outputs, planning
from onnxlr.budget.sweep import sweep
from onnxlr.cli import main
from onnxlr.layers import LinearStep
from onnxlr.model.targets import find_targets
from onnxlr.pipeline import CompressConfig, compress
from onnxlr.quant import QuantizeConfig

pytestmark = pytest.mark.usefixtures("fast_timing")


def _quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def _calib(tmp_path, n=40, seed=0, channels=3, spatial=8):
    x = np.random.default_rng(seed).standard_normal((n, channels, spatial, spatial)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return x


def test_int8_layer_timings_are_of_quantized_models_under_their_own_cache_keys(tmp_path, monkeypatch):
    work = cnn_model(channels=(3, 16, 16), spatial=8)
    targets = find_targets(work, g.infer_shapes(work))
    conv2 = next(t for t in targets if t.name == "conv2")
    from onnxlr.methods import get
    from onnxlr.ranks import RankSpec

    chains = [get("tucker").factorize(conv2.layer, RankSpec("fraction", f), 1)[0] for f in (0.25, 0.5)]
    timed: list = []
    real = latency.time_models

    def capture(models, *args, **kwargs):
        timed.append(list(models))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(latency, "time_models", capture)
    cache = latency.LatencyCache(tmp_path)
    for quantize in (None, QuantizeConfig(), QuantizeConfig(per_channel=False)):
        latency.time_layer(conv2, (1, 16, 8, 8), {}, chains, 17, 8, cache=cache, threads=1, quantize=quantize)
    assert len(cache.data) == 3 * 3  # reference + 2 chains, at three precisions: nothing shared
    fp32, per_channel, per_tensor = timed
    assert not any(_quantized(m) for m in fp32)
    assert all(_quantized(m) for m in per_channel + per_tensor)
    axes = [{a.i for n in m.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"}
            for m in per_channel + per_tensor]
    assert all(axes[:3]) and not any(axes[3:])  # per-channel DequantizeLinear carries an axis
    # the same int8 timing again comes from the cache: no model is timed
    latency.time_layer(conv2, (1, 16, 8, 8), {}, chains, 17, 8, cache=cache, threads=1, quantize=QuantizeConfig())
    assert len(timed) == 3
    assert latency.precision_tag(None, 17) == "fp32"
    assert latency.precision_tag(QuantizeConfig(mode="dynamic"), 17) != latency.precision_tag(QuantizeConfig(), 17)


def test_an_int8_plan_measures_int8_models_and_reports_both_speedups(tmp_path, monkeypatch):
    model = cnn_model(channels=(4, 32, 32), spatial=8)
    _calib(tmp_path, n=20, channels=4)
    measured, damaged = [], []
    real_measure, real_build = budget.measure_timed, damage.build_model

    def capture_measure(plan, candidate, *args, **kwargs):
        measured.append((candidate, kwargs.get("int8_original", False)))
        return real_measure(plan, candidate, *args, **kwargs)

    def capture_build(plan, choice):
        damaged.extend(c.replacement for c in choice.values())
        return real_build(plan, choice)

    monkeypatch.setattr(planning, "MIN_GAIN", -100.0)  # every candidate is scored, fast or not
    monkeypatch.setattr(budget, "measure_timed", capture_measure)
    monkeypatch.setattr(damage, "build_model", capture_build)
    out, report = compress(model, target_speedup=1.5, calib=str(tmp_path / "calib.npz"), damage="full",
                           quantize=QuantizeConfig(), cache_dir=tmp_path)
    info = report.budget
    assert info["precision"].startswith("int8:static:per-channel")
    # every check and the final re-time measured a quantized model; the last ran the int8 original too
    assert measured and all(_quantized(m) for m, _ in measured)
    assert [with_int8 for _, with_int8 in measured][-1] is True
    assert info["speedup_vs_int8_original"] > 0 and info["int8_original_ms"] > 0
    assert len(info["speedup_vs_int8_original_p10_p90"]) == 2
    assert info["timing"]["int8_original_ms"] == info["int8_original_ms"]
    assert info["reference_ms"] != info["model_ms"]  # fp32 original and int8 original were timed apart
    assert info["int8_original_error"] > 0
    assert any("planned and measured as int8" in n for n in report.model_notes)
    # full-pass damages ran chains whose weights sit on a symmetric int8 grid per output channel
    assert damaged
    for rep in damaged:
        step = rep.steps[0]
        w = np.asarray(step.weight, dtype=np.float64)
        w = w.T if isinstance(step, LinearStep) else w  # one row per output channel
        w = w.reshape(len(w), -1)
        scale = np.abs(w).max(axis=1, keepdims=True) / 127
        levels = w / np.where(scale > 0, scale, 1)
        assert np.allclose(levels, np.round(levels), atol=1e-3)
    assert _quantized(out)


def test_an_int8_budget_writes_the_int8_model_it_measured(tmp_path, monkeypatch):
    """verify of the written int8 file on the held-out samples gives the error the budget's report
    states, and the chosen layers are the replaced ones, with the budget's ranks."""
    steady_budget(monkeypatch)
    model = cnn_model(channels=(3, 32, 32), spatial=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = _calib(tmp_path)
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(out), "--target-speedup", "3",
                 "--calib", str(tmp_path / "calib.npz"), "--quantize", "int8", "--report", str(report_path),
                 "--cache-dir", str(tmp_path)]) == 0
    report = json.loads(report_path.read_text())
    chosen = report["budget"]["chosen"]
    assert _quantized(onnx.load(str(out)))
    rows = check_budget_wrote_what_it_measured(tmp_path, x, out, report)
    for choice in chosen:
        assert any("factors balanced for int8" in note for note in rows[choice["output"]]["notes"])
    replaced = {row["output"] for row in report["layers"] if row["skipped"] is None}
    assert replaced == {c["output"] for c in chosen}


def test_an_int8_sweep_evaluates_int8_models(tmp_path):
    model = cnn_model(channels=(4, 32, 32), spatial=8)
    _calib(tmp_path, n=20, channels=4)
    seen: list = []

    def evaluate(m: onnx.ModelProto) -> float:
        seen.append(_quantized(m))
        return 1.0

    result = sweep(model, (1.5,), uniform=(0.5,), evaluate=evaluate,
                   config=CompressConfig(calib=str(tmp_path / "calib.npz"), quantize=QuantizeConfig(),
                                         cache_dir=tmp_path))
    assert result.precision.startswith("int8:")
    # the fp32 original, then the budget and uniform points and the int8 original, in int8
    assert seen == [False, True, True, True]
    assert [p.kind for p in result.points] == ["budget", "uniform", "original"]
    assert result.points[-1].layers_replaced == 0


def test_an_int8_budget_scores_the_logits_of_a_softmax_output_after_quantization_renames_them(tmp_path, monkeypatch):
    """PP-OCRv6: its Softmax reads an Identity's output. onnxruntime's quantization pre-processing
    (without sympy, as a plain install has it) removes the Identity, so the int8 model has no tensor
    of that name: the budget failed to load it ("Graph output ... does not exist"). The logits are
    found in each scored model by following its own Softmax output."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "W2"], ["logits"], name="fc2"),
         helper.make_node("Identity", ["logits"], ["z"], name="ident"),
         helper.make_node("Softmax", ["z"], ["y"], axis=-1)],
        "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [onnx.numpy_helper.from_array(w1, "W1"), onnx.numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((40, 64)).astype(np.float32))
    quantized = outputs.quantize_built(model, QuantizeConfig(), str(tmp_path / "calib.npz"), None)
    monkeypatch.setattr(planning, "MIN_GAIN", -100.0)
    monkeypatch.setattr(planning, "MAX_LAYER_DAMAGE", 10.0)
    work = onnx.ModelProto.FromString(model.SerializeToString())
    config = CompressConfig(cache_dir=tmp_path, calib=str(tmp_path / "calib.npz"), quantize=QuantizeConfig())
    plan = planning.build_plan(work, find_targets(work, g.infer_shapes(work)), config)
    assert plan.logits == {"z": onnx.TensorProto.FLOAT}
    (int8_logits,) = outputs.scored_outputs(plan, quantized, plan.check_feeds)
    assert int8_logits.shape == plan.reference_outputs[0].shape
    assert 0 < plan.base_damage < 0.1  # the int8 original's logits, not its probabilities
    assert plan.base_damage == pytest.approx(outputs.output_error(plan.reference_outputs, [int8_logits]) ** 2)


def test_shipped_damage_is_the_int8_models_error_less_the_int8_originals(tmp_path, monkeypatch):
    """--damage shipped: each candidate's damage is the squared output error of the int8 model with
    that one layer factorized (balanced, quantized as compress ships it) less the int8 original's,
    which can be negative; the allocation and the written model follow from it as from any damage."""
    from onnxlr.quant import balance_replacement

    model = cnn_model(channels=(4, 32, 32), spatial=8)
    _calib(tmp_path, n=20, channels=4)
    monkeypatch.setattr(planning, "MIN_GAIN", -100.0)
    work = onnx.ModelProto.FromString(model.SerializeToString())
    config = CompressConfig(cache_dir=tmp_path, calib=str(tmp_path / "calib.npz"), quantize=QuantizeConfig(),
                            damage="shipped")
    plan = planning.build_plan(work, find_targets(work, g.infer_shapes(work)), config)
    assert plan.damage["estimator"] == "shipped"
    assert plan.damage["int8_original_damage"] == pytest.approx(plan.base_damage)  # damage and check samples agree
    lp = next(lp for lp in plan.layers if lp.usable())
    cand = lp.usable()[0]
    chosen = {lp.index: planning.Candidate(cand.method, cand.fraction, cand.ranks, balance_replacement(cand.replacement),
                                         cand.macs, cand.weight_error)}
    shipped = outputs.build_shipped(plan, chosen)
    assert _quantized(shipped)
    error = outputs.output_error(plan.reference_outputs, outputs.scored_outputs(plan, shipped, plan.check_feeds))
    assert cand.damage == pytest.approx(error**2 - plan.base_damage, rel=1e-6, abs=1e-9)
    out, report = compress(model, target_speedup=1.2, calib=str(tmp_path / "calib.npz"), damage="shipped",
                           quantize=QuantizeConfig(), cache_dir=tmp_path)
    assert _quantized(out) and report.budget["damage"]["estimator"] == "shipped"
    onnx.checker.check_model(out, full_check=True)


def test_shipped_damage_without_int8_is_one_clear_line(tmp_path, capsys):
    onnx.save(cnn_model(channels=(4, 16, 16), spatial=8), tmp_path / "m.onnx")
    _calib(tmp_path, n=20, channels=4)
    out = tmp_path / "out.onnx"
    rc = main(["compress", str(tmp_path / "m.onnx"), "-o", str(out), "--target-speedup", "1.2",
               "--calib", str(tmp_path / "calib.npz"), "--damage", "shipped"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "--damage shipped" in err[0] and "--quantize int8" in err[0]
