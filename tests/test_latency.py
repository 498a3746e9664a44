"""Per-layer microbenchmarks: one-node models at the real input shape, and the on-disk cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import conv_model, gemm_model, run_ort

from onnxlr import methods
from onnxlr import model as g
from onnxlr.budget import latency
from onnxlr.model.targets import find_targets
from onnxlr.ranks import RankSpec


@pytest.fixture(autouse=True)
def fast_timing(monkeypatch):
    monkeypatch.setattr(latency, "LAYER_BUDGET_S", 0.02)
    monkeypatch.setattr(latency, "MIN_RUNS", 3)
    monkeypatch.setattr(latency, "WARMUP", 1)


def _target(model):
    return find_targets(model, g.infer_shapes(model))[0]


def test_one_node_model_runs_at_the_given_shape_and_chain_keeps_the_output():
    rng = np.random.default_rng(0)
    model = conv_model([1, 8, 10, 10], rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
                       bias=rng.standard_normal(16).astype(np.float32), pads=[1, 1, 1, 1])
    t = _target(model)
    ref = latency.one_node_model(t, (1, 8, 10, 10), g.infer_shapes(model), 17, model.ir_version)
    onnx.checker.check_model(ref)
    rep, _ = methods.get("tucker").factorize(t.layer, RankSpec("fraction", 0.5), 8)
    cand = latency.candidate_model(ref, rep)
    assert [n.op_type for n in cand.graph.node] == ["Conv"] * 3
    x = {"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)}
    assert run_ort(cand, x)[0].shape == run_ort(ref, x)[0].shape == (1, 16, 10, 10)


def test_structure_key_ignores_weight_values_but_not_shapes():
    rng = np.random.default_rng(0)
    a = gemm_model([1, 32], rng.standard_normal((32, 16)).astype(np.float32))
    b = gemm_model([1, 32], rng.standard_normal((32, 16)).astype(np.float32))
    c = gemm_model([1, 32], rng.standard_normal((32, 24)).astype(np.float32))
    key = lambda m: latency.structure_key(m, "cpu", 2)
    assert key(a) == key(b) != key(c)
    assert latency.structure_key(a, "cpu", 1) != key(a)


def test_time_layer_measures_every_candidate_and_caches(tmp_path):
    rng = np.random.default_rng(1)
    model = gemm_model([1, 64], rng.standard_normal((64, 64)).astype(np.float32), trans_b=0)
    t = _target(model)
    shapes = g.infer_shapes(model)
    reps = [methods.get("svd").factorize(t.layer, RankSpec("fraction", f), 8)[0] for f in (0.25, 0.5)]
    cache = latency.LatencyCache(tmp_path)
    t0, ms = latency.time_layer(t, (1, 64), shapes, reps, 17, model.ir_version, cache=cache)
    assert t0 > 0 and len(ms) == 2 and all(m > 0 for m in ms)
    assert cache.misses == 3 and cache.hits == 0
    cache.save()
    again = latency.LatencyCache(tmp_path)
    t1, ms1 = latency.time_layer(t, (1, 64), shapes, reps, 17, model.ir_version, cache=again)
    assert (t1, ms1) == (t0, ms) and again.hits == 3 and again.misses == 0
