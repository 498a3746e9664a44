"""`onnxlr compress --quantize int8` end to end: the CLI and the Python API.

* On a small CNN whose conv2 has exact Tucker rank (4, 4), ``--rank 4 --include conv2 --calib
  --quantize int8`` writes a QDQ model that passes onnx.checker (full check), loads in onnxruntime
  and stays within ``INT8_TOL`` of the original's outputs; the chain was balanced first, and the
  report (table and JSON) has a quantization section.
* Static quantization without --calib refuses in one line (exit 2, nothing written); dynamic
  quantization needs no calibration data.
* A model with If branches, one with external data and one with fp16 inputs work; one with fp16
  layers refuses in one line, with no output written.
* ``--verify`` prints each step's contribution: fp32 original -> factorized fp32 -> factorized int8,
  and the int8 original; ``onnxlr.proof.steps.compare_steps`` returns the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import cnn_model, exact_tucker_kernel, rel_error, run_ort, with_initializer
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr.cli import main
from onnxlr.quant import QuantizeConfig

#: int8 output error of the tiny CNN (standard-normal weights) against the fp32 original: the
#: quantizer's own error on it is about 0.05 (tests/test_quantize.py); the factorization is exact.
INT8_TOL = 0.1
SAMPLES = 25  # 20 calibrate, every 5th (5) checks


def low_rank_cnn(seed: int = 0) -> onnx.ModelProto:
    """cnn_model with conv2's weight of exact Tucker rank (4, 4): --rank 4 factorizes it exactly."""
    rng = np.random.default_rng(seed)
    weight = exact_tucker_kernel(16, 16, (3, 3), 4, 4, rng) / 4
    return with_initializer(cnn_model(seed=seed), "conv2_w", weight.astype(np.float32))


def samples(model: onnx.ModelProto, n: int = SAMPLES, seed: int = 1, dtype=np.float32) -> dict:
    """n samples of every input stacked on the batch axis (the --calib/--inputs .npz layout)."""
    rng = np.random.default_rng(seed)
    out = {}
    for inp in model.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        out[inp.name] = rng.standard_normal([n * dims[0], *dims[1:]]).astype(dtype)
    return out


@pytest.fixture
def cnn(tmp_path: Path) -> tuple[Path, Path]:
    model = low_rank_cnn()
    path, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(path))
    np.savez(calib, **samples(model))
    return path, calib


def compress(*args) -> int:
    return main(["compress", *map(str, args)])


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def check_written(path: Path) -> ort.InferenceSession:
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def refused(capsys, code: int, out: Path, *words: str) -> str:
    """Exit 2, one line on stderr with ``words``, no traceback, nothing written."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("onnxlr: error:")]
    assert "Traceback" not in err
    for word in words:
        assert word in line, line
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))
    return line


def test_quantize_int8_writes_a_checked_qdq_model_close_to_the_original(cnn, tmp_path, capsys):
    path, calib = cnn
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    code = compress(path, "-o", out, "--rank", 4, "--include", "conv2", "--calib", calib,
                    "--quantize", "int8", "--report", report)
    printed = capsys.readouterr().out
    assert code == 0
    session = check_written(out)
    types = ops(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(types)
    assert types.count("Conv") == 4 and types.count("Gemm") == 1  # conv1, the 3-conv chain, fc
    model = low_rank_cnn()
    for seed in range(3):
        x = samples(model, 1, seed=100 + seed)
        (want,) = run_ort(model, x)
        (got,) = session.run(None, x)
        assert rel_error(got, want) < INT8_TOL

    data = json.loads(report.read_text())
    quant = data["quantization"]
    assert quant["mode"] == "static" and quant["per_channel"] is True
    assert quant["calibrate_method"] == "minmax" and quant["calib_feeds"] == 20
    assert len(quant["quantized"]) == 5 and quant["kept_float"] == []
    assert quant["error"] < INT8_TOL and "5 check feeds" in quant["error_feeds"]
    (conv2,) = [layer for layer in data["layers"] if layer["name"] == "conv2"]
    assert any("factors balanced for int8" in note for note in conv2["notes"])
    assert "quantization: int8 static (minmax calibration on 20 feeds), per-channel weights" in printed
    assert "quantized 5 layer(s), kept 0 in float" in printed


def test_quant_options_map_onto_the_quantizer(cnn, tmp_path, capsys):
    """--quant-per-tensor, --quant-calibrate and --quant-max-error reach the quantizer; a bound of
    0 keeps layers in float, each with its measured sensitivity."""
    path, calib = cnn
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    code = compress(path, "-o", out, "--rank", 4, "--include", "conv2", "--calib", calib, "--quantize", "int8",
                    "--quant-per-tensor", "--quant-calibrate", "percentile", "--quant-max-error", 0,
                    "--report", report)
    printed = capsys.readouterr().out
    assert code == 0
    check_written(out)
    quant = json.loads(report.read_text())["quantization"]
    assert quant["per_channel"] is False and "per-tensor as configured" in quant["per_channel_note"]
    assert quant["calibrate_method"] == "percentile" and quant["max_error"] == 0
    assert quant["kept_float"] and all("sensitivity" in k["reason"] for k in quant["kept_float"])
    assert "  float: " in printed


def test_static_without_calib_refuses_in_one_line(cnn, tmp_path, capsys):
    path, _ = cnn
    out = tmp_path / "q.onnx"
    code = compress(path, "-o", out, "--rank", 4, "--quantize", "int8")
    refused(capsys, code, out, "calibration data", "--calib", "--quant-mode dynamic")
    code = compress(path, "-o", out, "--rank", 4, "--quantize", "int8", "--quant-mode", "dynamic",
                    "--quant-max-error", 0.1)
    refused(capsys, code, out, "--quant-max-error", "--calib")


def test_dynamic_without_calib_works(cnn, tmp_path, capsys):
    path, _ = cnn
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    code = compress(path, "-o", out, "--rank", 4, "--include", "conv2", "--quantize", "int8",
                    "--quant-mode", "dynamic", "--report", report)
    assert code == 0, capsys.readouterr().err
    check_written(out)
    quant = json.loads(report.read_text())["quantization"]
    assert quant["mode"] == "dynamic" and quant["quantized"]


def if_model() -> onnx.ModelProto:
    """conv0 (8 -> 8, 3x3) -> If(sum > 0) then conv_then else Relu: a branch layer."""
    rng = np.random.default_rng(6)
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, 6, 6])
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["h", "w_then"], ["yt"], name="conv_then", pads=[1, 1, 1, 1])], "then", [],
        [out("yt")])
    else_g = helper.make_graph([helper.make_node("Relu", ["h"], ["ye"], name="relu_else")], "else", [], [out("ye")])
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
            helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0, name="sum"),
            helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
            helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branch"),
        ],
        "if_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [out("y")],
        [
            numpy_helper.from_array(exact_tucker_kernel(8, 8, (3, 3), 2, 2, rng).astype(np.float32), "w0"),
            numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w_then"),
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_if_branches_work_and_the_branch_layer_is_listed_in_float(tmp_path, capsys):
    model = if_model()
    path, calib, out, report = (tmp_path / n for n in ("if.onnx", "calib.npz", "q.onnx", "report.json"))
    onnx.save(model, str(path))
    np.savez(calib, **samples(model))
    code = compress(path, "-o", out, "--rank", 2, "--include", "conv0", "--calib", calib,
                    "--quantize", "int8", "--report", report)
    assert code == 0, capsys.readouterr().err
    session = check_written(out)
    quant = json.loads(report.read_text())["quantization"]
    assert [k["name"] for k in quant["kept_float"]] == ["conv_then"]
    assert "subgraph" in quant["kept_float"][0]["reason"]
    x = samples(model, 1, seed=7)
    assert rel_error(session.run(None, x)[0], run_ort(model, x)[0]) < INT8_TOL


def test_external_data_works_and_the_output_keeps_external_data(cnn, tmp_path, capsys):
    path, calib = cnn
    ext = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(path)), str(ext), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    out = tmp_path / "q.onnx"
    code = compress(ext, "-o", out, "--rank", 4, "--include", "conv2", "--calib", calib, "--quantize", "int8")
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "q.onnx.data").is_file()
    session = check_written(out)
    x = samples(low_rank_cnn(), 1, seed=3)
    assert rel_error(session.run(None, x)[0], run_ort(low_rank_cnn(), x)[0]) < INT8_TOL


def fp16_input_cnn() -> onnx.ModelProto:
    """The low-rank CNN behind an fp16 input (Cast to float32 first)."""
    model = low_rank_cnn()
    model.graph.node[0].input[0] = "x32"
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="cast"))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fp16_inputs_work(tmp_path, capsys):
    model = fp16_input_cnn()
    path, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(model, str(path))
    np.savez(calib, **samples(model, dtype=np.float16))
    code = compress(path, "-o", out, "--rank", 4, "--include", "conv2", "--calib", calib, "--quantize", "int8")
    assert code == 0, capsys.readouterr().err
    session = check_written(out)
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = samples(model, 1, seed=5, dtype=np.float16)
    assert rel_error(session.run(None, x)[0], run_ort(model, x)[0]) < INT8_TOL


def test_fp16_layers_refuse_in_one_line(tmp_path, capsys):
    model = low_rank_cnn()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    path, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(model, str(path))
    np.savez(calib, **samples(model, dtype=np.float16))
    code = compress(path, "-o", out, "--rank", 4, "--calib", calib, "--quantize", "int8")
    refused(capsys, code, out, "float16", "float32 export")


STEPS = ("fp32 original", "factorized fp32", "factorized int8", "int8 original (reference)")


def test_verify_summary_shows_each_step(cnn, tmp_path, capsys):
    path, calib = cnn
    out = tmp_path / "q.onnx"
    code = compress(path, "-o", out, "--rank", 4, "--include", "conv2", "--calib", calib, "--quantize", "int8",
                    "--verify", "--inputs", calib, "--max-rel-error", INT8_TOL, "--bench-runs", 3)
    printed = capsys.readouterr().out
    assert code == 0
    summary = printed[printed.index("each step's contribution:"):]
    rows = {line.split("  ")[0]: line for line in summary.splitlines()}
    for step in STEPS:
        assert step in rows, summary
    assert "1.00x" in rows["fp32 original"]


def test_compare_steps_api(cnn, tmp_path):
    """The Python API: compress to a quantized ModelProto, then each step's rows."""
    from onnxlr.proof.steps import compare_steps

    path, calib = cnn
    arrays = dict(np.load(calib))
    out, float_path = tmp_path / "q.onnx", tmp_path / "f.onnx"
    _, report = onnxlr.compress_file(path, out, rank=4, include=("conv2",), calib=arrays,
                                     quantize=QuantizeConfig(), float_path=float_path)
    assert report.quantization.per_channel and report.to_dict()["quantization"]["error"] < INT8_TOL
    assert "QuantizeLinear" not in ops(float_path) and "QuantizeLinear" in ops(out)
    steps = compare_steps(path, float_path, out, quantize=QuantizeConfig(), calib=arrays, inputs=arrays,
                          runs=3, max_rel_error=INT8_TOL)
    assert steps and [r.step for r in steps.rows] == list(STEPS)
    factorized, shipped, int8 = (steps.row(s) for s in STEPS[1:])
    assert factorized.rel_error < 1e-4  # exact Tucker rank
    assert 0 < shipped.rel_error < INT8_TOL and 0 < int8.rel_error < INT8_TOL
    assert steps.int8_original["quantized"] == ["conv1", "conv2", "fc"]
    json.dumps(steps.to_dict())
    model, api_report = onnxlr.compress(low_rank_cnn(), rank=4, include=("conv2",), calib=arrays,
                                        quantize=QuantizeConfig(mode="dynamic"))
    assert api_report.quantization.mode == "dynamic"
    onnx.checker.check_model(model, full_check=True)


def test_the_quantizers_temporary_files_stay_out_of_the_working_directory(cnn, tmp_path, capsys, monkeypatch):
    """onnxruntime's quant_pre_process writes temporary files into the working directory when its
    symbolic shape inference is incomplete (sym_shape_infer_temp.onnx and <uuid>.data of each
    tensor; seen quantizing PP-OCR and MiniLM): none may land in the user's folder."""
    from onnxruntime.quantization import shape_inference

    real = shape_inference.quant_pre_process

    def leaky(*args, **kwargs):
        Path("sym_shape_infer_temp.onnx").write_bytes(b"temp")  # where the real one dumps its temp model
        return real(*args, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", leaky)
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    path, _ = cnn
    out = tmp_path / "q.onnx"
    code = compress(path, "-o", out, "--rank", 4, "--include", "conv2", "--quantize", "int8", "--quant-mode", "dynamic")
    assert code == 0, capsys.readouterr().err
    assert list(user.iterdir()) == []
    check_written(out)


def test_a_failing_symbolic_shape_inference_still_leaves_the_graph_optimization(cnn, tmp_path, capsys, monkeypatch):
    """With sympy installed, quant_pre_process's symbolic shape inference fails on PP-OCRv6
    ("Incomplete symbolic shape inference"); pre-processing runs again without it (skipping it all
    cost that model 1.1 points of character accuracy), and the report says what happened."""
    from onnxruntime.quantization import shape_inference

    from onnxlr.quant import backend

    real = shape_inference.quant_pre_process
    calls = []

    def symbolic_fails(*args, skip_symbolic_shape=False, **kwargs):
        calls.append(skip_symbolic_shape)
        if not skip_symbolic_shape:
            raise RuntimeError("Incomplete symbolic shape inference")
        return real(*args, skip_symbolic_shape=True, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", symbolic_fails)
    monkeypatch.setattr(backend, "has_sympy", lambda: True)
    path, _ = cnn
    out = tmp_path / "q.onnx"
    code = compress(path, "-o", out, "--rank", 4, "--include", "conv2", "--quantize", "int8", "--quant-mode", "dynamic")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert calls == [False, True]
    assert "graph optimization; symbolic shape inference failed (Incomplete symbolic shape inference)" in printed.out
    assert "quantized without it" not in printed.out
    check_written(out)
