"""onnxlr bench: interleaved timing, speedup statistics, session settings and user errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import runtime
from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.proof.bench import bench


def conv(cout: int, cin: int = 32, hw: int | str = 32, batch="N") -> onnx.ModelProto:
    """One 3x3 conv, cin -> cout channels: the MACs (and time) scale with cout."""
    w = np.random.default_rng(0).standard_normal((cout, cin, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def heavy(tmp_path):
    onnx.save(conv(64), str(tmp_path / "heavy.onnx"))
    return str(tmp_path / "heavy.onnx")


@pytest.fixture
def light(tmp_path):
    onnx.save(conv(8), str(tmp_path / "light.onnx"))
    return str(tmp_path / "light.onnx")


def test_model_against_itself_is_about_one(heavy):
    result = bench([heavy, heavy], runs=200, warmup=10)
    base, same = result.models
    assert base.speedup is None
    assert 0.9 <= same.speedup <= 1.1
    assert same.speedup_p10 <= same.speedup <= same.speedup_p90


def test_lighter_model_is_faster(heavy, light):
    result = bench([heavy, light], runs=60, warmup=5)
    fast = result.models[1]
    assert fast.speedup > 1.3  # 8x fewer MACs
    assert fast.speedup_p10 <= fast.speedup <= fast.speedup_p90
    assert result.models[0].median_ms > fast.median_ms
    slow = bench([light, heavy], runs=60, warmup=5).models[1]
    assert slow.speedup < 1 / 1.3


def test_latency_statistics_are_ordered(heavy):
    (m,) = bench(heavy, runs=30, warmup=2).models
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.throughput == pytest.approx(1e3 / m.median_ms)


def test_runs_are_interleaved_and_the_order_flips():
    calls = []

    times = runtime.interleaved(
        [lambda: calls.append("A"), lambda: calls.append("B")], warmup=1, runs=3
    )
    assert calls == ["B", "A", "A", "B", "B", "A", "A", "B"]  # warmup round, then 3 timed
    assert times.shape == (2, 3)


def test_session_settings_are_reported_and_applied(heavy):
    result = bench([heavy], threads=1, runs=3, warmup=0)
    assert (result.threads, result.inter_op_threads, result.spinning) == (1, 1, False)
    assert result.graph_optimization == "ORT_ENABLE_ALL"
    assert result.providers == ["CPUExecutionProvider"]
    assert bench([heavy], runs=3, warmup=0).threads == runtime.default_threads()
    opts = runtime.session_options(3)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_batch_sets_the_dynamic_batch_dim(heavy):
    result = bench([heavy], batch=4, runs=5, warmup=1)
    assert result.batch == 4 and result.input_shapes == {"x": [4, 32, 32, 32]}
    (m,) = result.models
    assert m.throughput == pytest.approx(4e3 / m.median_ms)
    spatial = conv(8, hw="H")  # dynamic height and width
    shaped = bench([spatial], shapes={"x": (2, 32, 16, 8)}, runs=3, warmup=0)
    assert shaped.batch == 2 and shaped.input_shapes == {"x": [2, 32, 16, 8]}
    assert bench([spatial], runs=1, warmup=0).input_shapes == {"x": [1, 32, 1, 1]}


def test_fixed_batch_and_mismatched_inputs_are_user_errors(tmp_path, heavy):
    fixed = str(tmp_path / "fixed.onnx")
    onnx.save(conv(8, batch=1), fixed)
    with pytest.raises(OnnxlrError, match="fixed batch of 1"):
        bench([fixed], batch=4)
    other = conv(8)
    other.graph.input[0].name = "image"
    other.graph.node[0].input[0] = "image"
    with pytest.raises(OnnxlrError, match="same input names"):
        bench([heavy, other])
    small = str(tmp_path / "small.onnx")
    onnx.save(conv(8, cin=16), small)  # 16 channels where the first model takes 32
    with pytest.raises(OnnxlrError, match="failed to run"):
        bench([heavy, small])


def test_cli_table_and_json(heavy, light, tmp_path, capsys):
    path = tmp_path / "b.json"
    argv = ["bench", heavy, light, "--runs", "20", "--warmup", "2", "--threads", "1"]
    assert main(argv + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "speedup (p10-p90)" in out and "1.00x (baseline)" in out and "spinning off" in out
    data = json.loads(path.read_text())
    assert set(data) == {"models", "providers", "threads", "inter_op_threads", "spinning",
                         "graph_optimization", "warmup", "runs", "batch", "input_shapes", "io"}
    assert set(data["models"][0]) == {"model", "median_ms", "p10_ms", "p90_ms", "throughput",
                                      "speedup", "speedup_p10", "speedup_p90"}
    assert data["models"][0]["speedup"] is None and data["models"][1]["speedup"] > 0
    assert (data["threads"], data["spinning"], data["runs"]) == (1, False, 20)
    assert data["io"] == "host"  # the CPU provider has nothing to bind on a device


def test_device_bound_runner_returns_what_run_returns(heavy):
    """The IOBinding path used on GPU providers, exercised on the CPU device (same API)."""
    session = runtime.make_session(heavy, threads=1)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 32, 32, 32)).astype(np.float32)}
    (expected,) = runtime.timed_runner(session, feed)()
    bound = runtime._bound_runner(session, feed, "cpu")
    for _ in range(2):  # rebinding nothing between calls: the same binding runs again
        (value,) = bound()
        np.testing.assert_array_equal(value.numpy(), expected)


def test_int_range_and_seed_reach_the_inputs(tmp_path):
    """Token-type inputs need --int-range 0:2; a bad range is a user error."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    model = helper.make_model(
        helper.make_graph([helper.make_node("Gather", ["t", "ids"], ["y"])], "g", [ids], [out],
                          [numpy_helper.from_array(np.arange(2, dtype=np.int64), "t")]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    path = str(tmp_path / "gather.onnx")
    onnx.save(model, path)
    assert main(["bench", path, "--int-range", "0:2", "--runs", "3", "--seed", "4"]) == 0
    with pytest.raises(OnnxlrError, match="failed to run"):  # ids >= 2 index out of the table
        bench([path], runs=3, int_range=(0, 100), seed=4)


@pytest.mark.parametrize(
    "extra, message",
    [(["--provider", "tensorrt"], "available: "), (["--runs", "0"], "runs >= 1"),
     (["--batch", "0"], "batch >= 1"), (["--threads", "0"], "threads must be")],
)
def test_cli_user_errors(heavy, capsys, extra, message):
    if "tensorrt" in extra and "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is available here")
    assert main(["bench", heavy, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err


def test_cli_missing_model(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "gone.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
