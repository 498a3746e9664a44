"""A plan that scales with the input size: convs over big inputs have their candidates timed at a
bounded spatial size, and their times are put back on the layer's own time at its real shape."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from builders import cnn_model, conv_model, gemm_model

from onnxlr import model as g
from onnxlr.budget import latency, planning
from onnxlr.model.opset import default_opset
from onnxlr.model.targets import find_targets
from onnxlr.pipeline import CompressConfig

pytestmark = pytest.mark.usefixtures("fast_timing")


def _target(model):
    return find_targets(model, g.infer_shapes(model))[0]


def test_a_big_conv_is_timed_at_a_bounded_size_of_the_same_channels_aspect_and_whole_strides():
    w = np.zeros((8, 4, 3, 3), np.float32)
    target = _target(conv_model((1, 4, 400, 240), w, strides=(2, 2), pads=(1, 1, 1, 1)))
    shape = latency.timing_shape(target, (1, 4, 400, 240), max_area=1500)
    assert shape[:2] == (1, 4)
    h, w_ = shape[2:]
    assert h % 2 == 0 and w_ % 2 == 0
    assert 1500 <= h * w_ <= 1500 * 1.2
    assert math.isclose(h / w_, 400 / 240, rel_tol=0.1)
    assert latency.timing_shape(target, (1, 4, 30, 40), max_area=1500) == (1, 4, 30, 40)  # small: as it is
    gemm = _target(gemm_model((1, 4096), np.zeros((4096, 8), np.float32)))
    assert latency.timing_shape(gemm, (1, 4096), max_area=16) == (1, 4096)


def test_plan_times_candidates_at_the_bounded_size_and_the_layer_at_its_real_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "MAX_TIMING_AREA", 16)  # the 8x8 convs are timed at 4x4
    monkeypatch.setattr(planning, "MIN_GAIN", -100.0)  # keep every candidate
    model = cnn_model(channels=(4, 32, 32), spatial=8, classes=10)
    work = onnx.ModelProto.FromString(model.SerializeToString())
    targets = find_targets(work, g.infer_shapes(work))
    plan = planning.build_plan(work, targets, CompressConfig(), cache_dir=tmp_path)
    bounded = plan.timings["bounded_layers"]
    convs = [lp for lp in plan.layers if lp.op_type == "Conv" and lp.ms is not None]
    assert convs and {lp.name for lp in convs} <= set(bounded)
    assert all(shape[2:] == [4, 4] for shape in bounded.values())
    cache = latency.LatencyCache(tmp_path)
    shapes = g.infer_shapes(work)

    def cached_ms(one_node, replacement=None):
        model = one_node if replacement is None else latency.candidate_model(one_node, replacement)
        return cache.data.get(latency.structure_key(model, "cpu", plan.threads))

    for lp in convs:
        t = targets[lp.index]
        real = latency.one_node_model(t, lp.input_shape, shapes, default_opset(work), work.ir_version)
        small = latency.one_node_model(t, bounded[lp.name], shapes, default_opset(work), work.ir_version)
        assert lp.ms == pytest.approx(cached_ms(real))  # the layer's own time: at its real shape
        anchors = [c for c in lp.candidates if cached_ms(real, c.replacement) is not None]
        assert len(anchors) == 1  # one candidate timed at the real shape too, as it is
        anchor = anchors[0]
        assert anchor.ms == pytest.approx(cached_ms(real, anchor.replacement))
        for c in lp.candidates:  # the others: their ratio to the anchor at the bounded size
            ratio = cached_ms(small, c.replacement) / cached_ms(small, anchor.replacement)
            assert c.ms == pytest.approx(ratio * anchor.ms)
    assert not any(lp.name in bounded for lp in plan.layers if lp.op_type == "Gemm")
