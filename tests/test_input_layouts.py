"""Models whose inputs are not stacked along one batch axis (issue 12, must show 4).

verify, bench, ``compress --calib`` and ``compress --target-speedup`` through the CLI on:

* a streaming-audio-like model: ``input [batch, time]``, a recurrent ``state [2, batch, H]``
  (the batch on axis 1) in and out, a scalar int64 sample rate, a Conv1d and MatMuls, and a Conv
  and MatMuls inside an If on the sample rate; fed random feeds, a folder of per-feed .npz files
  (exact shapes, both branches taken) and a stacked .npz;
* the same model with every dim fixed (batch 1);
* a model whose inputs have different fixed leading sizes (x [4, 16], y [7, 16]).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.cli import main
from onnxlr.proof.verify import verify

H = 64  # recurrent state width
T = 160  # samples per chunk in the data files
FILES = 12  # per-feed files in the folder: 2 of them (the 5th, 10th) held out


pytestmark = pytest.mark.usefixtures("fast_timing")


# --- models ---------------------------------------------------------------------------------


def _tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def streaming_model(batch: str | int = "batch", time: str | int = "time", seed: int = 0) -> onnx.ModelProto:
    """input [batch, time], state [2, batch, H], sr [] -> output [batch, 4], stateN [2, batch, H].

        input -> Unsqueeze -> Conv1d(16x1x5) -> Relu -> c1 -> Conv1d(32x16x3) -> mean over time -> f
        f * (sr / 16000) @ W_x + state[0] @ W_h -> tanh -> h0'
        If sr > 8000: then Conv1d(c1, 32x16x3) -> mean -> @ W_t   else: state[1] @ W_e
        (If + h0' @ W_r) -> tanh -> h1';  stateN = [h0', h1'];  output = h1' @ W_o
    """
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    then_branch = helper.make_graph([
        helper.make_node("Conv", ["c1", "W_c3"], ["t1"], name="then_conv", pads=[1, 1], kernel_shape=[3]),
        helper.make_node("ReduceMean", ["t1"], ["t2"], axes=[2], keepdims=0),
        helper.make_node("MatMul", ["t2", "W_t"], ["t_out"], name="then_matmul"),
    ], "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [batch, H])],
        initializer=[_tensor("W_c3", w(32, 16, 3)), _tensor("W_t", w(32, H))])
    else_branch = helper.make_graph([
        helper.make_node("MatMul", ["h1", "W_e"], ["e_out"], name="else_matmul"),
    ], "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [batch, H])],
        initializer=[_tensor("W_e", w(H, H))])
    nodes = [
        helper.make_node("Unsqueeze", ["input", "ax1"], ["x3"]),
        helper.make_node("Conv", ["x3", "W_c1"], ["c1_pre"], name="conv1", pads=[2, 2], kernel_shape=[5]),
        helper.make_node("Relu", ["c1_pre"], ["c1"]),
        helper.make_node("Conv", ["c1", "W_c2"], ["c2"], name="conv2", pads=[1, 1], kernel_shape=[3]),
        helper.make_node("ReduceMean", ["c2"], ["f"], axes=[2], keepdims=0),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["srf", "inv_sr"], ["scale"]),
        helper.make_node("Mul", ["f", "scale"], ["f2"]),
        helper.make_node("Gather", ["state", "i0"], ["h0"], axis=0),
        helper.make_node("Gather", ["state", "i1"], ["h1"], axis=0),
        helper.make_node("MatMul", ["f2", "W_x"], ["zx"], name="in_proj"),
        helper.make_node("MatMul", ["h0", "W_h"], ["zh"], name="rec_proj"),
        helper.make_node("Add", ["zx", "zh"], ["z"]),
        helper.make_node("Tanh", ["z"], ["nh0"]),
        helper.make_node("Greater", ["sr", "sr_cut"], ["cond"]),
        helper.make_node("If", ["cond"], ["g"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("MatMul", ["nh0", "W_r"], ["r"], name="res_proj"),
        helper.make_node("Add", ["g", "r"], ["g2"]),
        helper.make_node("Tanh", ["g2"], ["nh1"]),
        helper.make_node("Unsqueeze", ["nh0", "ax0"], ["s0"]),
        helper.make_node("Unsqueeze", ["nh1", "ax0"], ["s1"]),
        helper.make_node("Concat", ["s0", "s1"], ["stateN"], axis=0),
        helper.make_node("MatMul", ["nh1", "W_o"], ["output"], name="out_proj"),
    ]
    inits = [
        _tensor("W_c1", w(16, 1, 5)), _tensor("W_c2", w(32, 16, 3)), _tensor("W_x", w(32, H)),
        _tensor("W_h", w(H, H)), _tensor("W_r", w(H, H)), _tensor("W_o", w(H, 4)),
        _tensor("ax0", np.array([0], np.int64)), _tensor("ax1", np.array([1], np.int64)),
        _tensor("i0", np.array(0, np.int64)), _tensor("i1", np.array(1, np.int64)),
        _tensor("inv_sr", np.array(1 / 16000, np.float32)), _tensor("sr_cut", np.array(8000, np.int64)),
    ]
    graph = helper.make_graph(nodes, "streaming", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, time]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, H]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ], [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 4]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, batch, H]),
    ], initializer=inits)
    return _finish(graph)


def two_input_model(seed: int = 0) -> onnx.ModelProto:
    """x [4, 16], y [7, 16] (fixed, no shared batch) -> out [4, 64] = relu(x @ A) @ B + mean_rows(y @ C)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["xa"], name="x_proj"),
        helper.make_node("Relu", ["xa"], ["xr"]),
        helper.make_node("MatMul", ["xr", "B"], ["xb"], name="x_out"),
        helper.make_node("MatMul", ["y", "C"], ["yc"], name="y_proj"),
        helper.make_node("ReduceMean", ["yc"], ["ym"], axes=[0], keepdims=1),
        helper.make_node("Add", ["xb", "ym"], ["out"]),
    ]
    inits = [_tensor(n, (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32))
             for n, s in (("A", (16, 64)), ("B", (64, 64)), ("C", (16, 64)))]
    graph = helper.make_graph(nodes, "two_inputs", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 16]),
    ], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 64])], initializer=inits)
    return _finish(graph)


def _finish(graph) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxlr-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def streaming_feed(rng, sr: int) -> dict[str, np.ndarray]:
    return {"input": rng.standard_normal((1, T)).astype(np.float32),
            "state": rng.standard_normal((2, 1, H)).astype(np.float32), "sr": np.array(sr, np.int64)}


def write_folder(folder, make_feed) -> None:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(FILES):
        np.savez(folder / f"feed{i:02d}.npz", **make_feed(rng, i))


@pytest.fixture
def streaming(tmp_path):
    """(model path, folder of per-feed files at exact shapes: both If branches taken)."""
    path = tmp_path / "stream.onnx"
    onnx.save(streaming_model(), path)
    write_folder(tmp_path / "feeds", lambda rng, i: streaming_feed(rng, 16000 if i % 2 else 8000))
    return path, tmp_path / "feeds"


# --- helpers --------------------------------------------------------------------------------


def run_cli(args, capsys) -> str:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    return out.out + out.err


def assert_valid_model(path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_exact(original, compressed, tmp_path, capsys, inputs=None) -> None:
    """verify through the CLI passes at 1e-4, and every output's relative error is that small."""
    js = tmp_path / "verify.json"
    args = ["verify", original, compressed, "--max-rel-error", "1e-4", "--json", js]
    out = run_cli(args + (["--inputs", inputs] if inputs is not None else []), capsys)
    assert "PASSED" in out
    result = json.loads(js.read_text())
    assert result["passed"] and all(o["rel_error"] <= 1e-4 for o in result["outputs"])


def layer_rows(report_path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(report_path.read_text())["layers"]}


# --- the streaming model --------------------------------------------------------------------


def test_streaming_model_compressed_at_full_rank_verifies_on_random_folder_and_stacked_inputs(streaming, tmp_path,
                                                                                              capsys):
    path, folder = streaming
    out = tmp_path / "full.onnx"
    run_cli(["compress", path, "-o", out, "--rank", "1.0", "--force", "--report", tmp_path / "r.json"], capsys)
    assert_valid_model(out)
    rows = layer_rows(tmp_path / "r.json")
    assert all(rows[n]["method"] for n in ("then_conv", "then_matmul", "else_matmul", "conv1", "conv2"))
    assert_exact(path, out, tmp_path, capsys)  # random feeds: sr in 0:100, the else branch
    assert_exact(path, out, tmp_path, capsys, inputs=folder)  # per-feed files, both branches
    stacked = tmp_path / "stacked.npz"  # 6 samples along the batch axes (axis 1 of state), sr once
    rng = np.random.default_rng(3)
    np.savez(stacked, input=rng.standard_normal((6, T)).astype(np.float32),
             state=rng.standard_normal((2, 6, H)).astype(np.float32), sr=np.array(16000, np.int64))
    assert_exact(path, out, tmp_path, capsys, inputs=stacked)
    # the public API, random feeds at a --shape that is not 1 along time
    result = verify(str(path), str(out), shapes={"input": (1, 400)}, max_rel_error=1e-4)
    assert result.passed and result.inputs["samples"] == 16
    # a recurrent state [2, batch, H] is not class scores [N, C]
    assert {o.name: o.top1 for o in result.outputs}["stateN"] is None


def test_streaming_model_verify_counts_per_feed_files(streaming, tmp_path, capsys):
    path, folder = streaming
    out = run_cli(["verify", path, path, "--inputs", folder], capsys)
    assert f"PASSED ({FILES} samples" in out and "stateN" in out


def test_streaming_model_bench_batches_the_state_on_its_own_axis(streaming, tmp_path, capsys):
    path, _ = streaming
    js = tmp_path / "bench.json"
    out = run_cli(["bench", path, path, "--runs", "3", "--warmup", "1", "--batch", "3", "--shape", f"input:3,{T}",
                   "--json", js], capsys)
    assert "state[2,3,64]" in out and f"input[3,{T}]" in out and "sr[]" in out
    assert js.exists()


@pytest.mark.parametrize("calib", ["folder", "stacked"])
def test_streaming_model_calibrates_on_every_feed_and_says_why_the_if_branch_is_data_free(streaming, tmp_path, capsys,
                                                                                           calib):
    path, folder = streaming
    if calib == "stacked":
        data, n = tmp_path / "stacked.npz", 10
        rng = np.random.default_rng(2)
        np.savez(data, input=rng.standard_normal((n, T)).astype(np.float32),
                 state=rng.standard_normal((2, n, H)).astype(np.float32), sr=np.array(16000, np.int64))
    else:
        data, n = folder, FILES
    out, report = tmp_path / "cal.onnx", tmp_path / "cal.json"
    # rank 0.5: the 64x64 MatMuls would not reduce MACs and are kept before their calibration
    # stage runs (a stage then holds finished layers: it must skip them)
    text = run_cli(["compress", path, "-o", out, "--rank", "0.5", "--calib", data, "--report", report], capsys)
    assert_valid_model(out)
    notes = json.loads(report.read_text())["notes"]
    assert any(f"calibrated (asymmetric) on {n} samples" in note for note in notes), notes
    rows = layer_rows(report)
    for name in ("then_conv", "then_matmul"):  # inside the If: replaced, data-free, and why
        assert rows[name]["method"], rows[name]
        assert any("inside a subgraph" in note and "data-free" in note for note in rows[name]["notes"]), rows[name]
    assert any(note.startswith("calib: ") and "subgraph" not in note for note in rows["conv2"]["notes"])
    assert rows["rec_proj"]["skipped"] and "would not reduce MACs" in rows["rec_proj"]["skipped"]
    assert f"on {n} samples" in text
    run_cli(["verify", path, out, "--inputs", data, "--max-rel-error", "none"], capsys)


@pytest.mark.parametrize("with_calib", [False, True])
def test_streaming_model_budget_runs_and_writes_a_valid_model(streaming, tmp_path, capsys, with_calib):
    path, folder = streaming
    out, report = tmp_path / "bud.onnx", tmp_path / "bud.json"
    args = ["compress", path, "-o", out, "--target-speedup", "1.05", "--cache-dir", tmp_path / "cache",
            "--report", report]
    text = run_cli(args + (["--calib", folder] if with_calib else []), capsys)
    assert_valid_model(out)
    js = json.loads(report.read_text())
    (note,) = [n for n in js["notes"] if n.startswith("budget (target speedup 1.05x")]
    assert ("data-aware" in note) == with_calib
    if with_calib:
        assert js["budget"]["calib_samples"] == FILES and js["budget"]["check_samples"] == 2  # the 5th, 10th
    rows = layer_rows(report)
    for name in ("then_conv", "then_matmul", "else_matmul"):
        assert rows[name]["skipped"] == "budget: kept (inside a subgraph: not timed)"
    for row in rows.values():  # every layer says what happened to it
        assert row["method"] or row["skipped"].startswith("budget: kept (")
    assert "budget (target speedup 1.05x" in text
    # the written model runs on the per-feed files; what it chose is what the report says
    run_cli(["verify", path, out, "--inputs", folder, "--max-rel-error", "none"], capsys)
    assert len(js["budget"]["layers"]) == sum(1 for row in rows.values() if row["method"])


# --- batch fixed to 1 -----------------------------------------------------------------------


def test_fixed_batch_one_model_verify_bench_calib_budget(tmp_path, capsys):
    path = tmp_path / "fixed.onnx"
    onnx.save(streaming_model(batch=1, time=T), path)
    folder = tmp_path / "feeds"
    write_folder(folder, lambda rng, i: streaming_feed(rng, 16000 if i % 3 else 8000))
    full = tmp_path / "full.onnx"
    run_cli(["compress", path, "-o", full, "--rank", "1.0", "--force"], capsys)
    assert_valid_model(full)
    assert_exact(path, full, tmp_path, capsys)
    assert_exact(path, full, tmp_path, capsys, inputs=folder)
    out = run_cli(["bench", path, full, "--runs", "3", "--warmup", "1"], capsys)
    assert f"input[1,{T}]" in out and "state[2,1,64]" in out

    cal, report = tmp_path / "cal.onnx", tmp_path / "cal.json"
    run_cli(["compress", path, "-o", cal, "--rank", "0.5", "--calib", folder, "--report", report], capsys)
    assert_valid_model(cal)
    assert any(f"on {FILES} samples" in n for n in json.loads(report.read_text())["notes"])

    bud, report = tmp_path / "bud.onnx", tmp_path / "bud.json"
    run_cli(["compress", path, "-o", bud, "--target-speedup", "1.05", "--calib", folder, "--cache-dir",
             tmp_path / "cache", "--report", report], capsys)
    assert_valid_model(bud)
    js = json.loads(report.read_text())
    assert js["budget"]["calib_samples"] == FILES and any(n.startswith("budget (") for n in js["notes"])


# --- inputs with different leading sizes ----------------------------------------------------


def test_inputs_with_different_leading_sizes_verify_bench_calib_budget(tmp_path, capsys):
    path = tmp_path / "two.onnx"
    onnx.save(two_input_model(), path)
    folder = tmp_path / "feeds"
    write_folder(folder, lambda rng, i: {"x": rng.standard_normal((4, 16)).astype(np.float32),
                                         "y": rng.standard_normal((7, 16)).astype(np.float32)})
    full = tmp_path / "full.onnx"
    run_cli(["compress", path, "-o", full, "--rank", "1.0", "--force"], capsys)
    assert_valid_model(full)
    assert_exact(path, full, tmp_path, capsys)
    assert_exact(path, full, tmp_path, capsys, inputs=folder)
    out = run_cli(["verify", path, full, "--inputs", folder], capsys)
    assert f"PASSED ({FILES} samples" in out
    out = run_cli(["bench", path, full, "--runs", "3", "--warmup", "1"], capsys)
    assert "x[4,16]" in out and "y[7,16]" in out

    cal, report = tmp_path / "cal.onnx", tmp_path / "cal.json"
    run_cli(["compress", path, "-o", cal, "--rank", "0.25", "--calib", folder, "--report", report], capsys)
    assert_valid_model(cal)
    js = json.loads(report.read_text())
    assert any(f"on {FILES} samples" in n for n in js["notes"])
    assert any(note.startswith("calib: ") for row in js["layers"] for note in row["notes"])

    bud, report = tmp_path / "bud.onnx", tmp_path / "bud.json"
    run_cli(["compress", path, "-o", bud, "--target-speedup", "1.05", "--calib", folder, "--cache-dir",
             tmp_path / "cache", "--report", report], capsys)
    assert_valid_model(bud)
    js = json.loads(report.read_text())
    assert js["budget"]["calib_samples"] == FILES and js["budget"]["check_samples"] == 2
    run_cli(["verify", path, bud, "--inputs", folder, "--max-rel-error", "none"], capsys)
