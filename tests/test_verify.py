"""onnxlr verify: statistics, tolerances, per-layer errors, input feeding and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxlr import data, runtime
from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.proof.verify import DEFAULT_MAX_REL_ERROR, changed_tensors, verify

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
W2 = RNG.standard_normal((4, 8, 3, 3)).astype(np.float32)
G = RNG.standard_normal((4 * 8 * 8, 10)).astype(np.float32)


def cnn(batch="N", *, w1=W1, w2=W2, g=G, w1_name="w1", g_name="g", out_dims=(10,)):
    """x -> Conv(w1) -> c1 -> Relu -> Conv(w2) -> c2 -> Flatten -> Gemm(g) -> logits."""
    inits = [numpy_helper.from_array(w1, w1_name), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(g, g_name)]
    nodes = [
        helper.make_node("Conv", ["x", w1_name], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", g_name], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, *out_dims])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def perturbed_w2(delta=0.5):
    w2 = W2.copy()
    w2[0, 0, 1, 1] += delta
    return w2


def save(model, path) -> str:
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def ref(tmp_path):
    return save(cnn(), tmp_path / "ref.onnx")


@pytest.fixture
def perturbed(tmp_path):
    return save(cnn(w2=perturbed_w2()), tmp_path / "cand.onnx")


def no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# --- statistics and tolerances ---------------------------------------------------------------


def test_identical_models_pass_with_zero_error(ref, capsys):
    result = verify(ref, ref)
    assert result and result.passed and result.failures == []
    (out,) = result.outputs
    assert (out.name, out.max_abs_error, out.mean_abs_error, out.rel_error) == ("logits", 0, 0, 0)
    assert out.cosine == pytest.approx(1.0) and out.top1 == 1.0 and out.top5 == 1.0
    assert result.smallest_passing_tolerance == {"max_rel_error": 0.0, "min_top1": 1.0}
    assert main(["verify", ref, ref]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_perturbed_weight_fails_naming_the_output(ref, perturbed, capsys):
    result = verify(ref, perturbed)
    assert not result
    (out,) = result.outputs
    assert DEFAULT_MAX_REL_ERROR < out.rel_error < 0.2 and out.max_abs_error > 0
    assert 0.99 < out.cosine < 1.0
    assert main(["verify", ref, perturbed]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert "'logits'" in line and "relative L2 error" in line
    assert f"max_rel_error {DEFAULT_MAX_REL_ERROR:g}" in line


def test_statistics_match_numpy(ref, perturbed):
    x = np.random.default_rng(3).standard_normal((6, 3, 8, 8)).astype(np.float32)
    a = ort.InferenceSession(ref).run(None, {"x": x})[0].astype(np.float64)
    b = ort.InferenceSession(perturbed).run(None, {"x": x})[0].astype(np.float64)
    (out,) = verify(ref, perturbed, inputs={"x": x}).outputs
    assert out.max_abs_error == pytest.approx(np.abs(a - b).max())
    assert out.mean_abs_error == pytest.approx(np.abs(a - b).mean())
    assert out.rel_error == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a))
    cos = (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))
    assert out.cosine == pytest.approx(cos)
    assert out.top1 == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12), classes=st.integers(2, 9), cut=st.integers(1, 12),
    noise=st.floats(0, 2), seed=st.integers(0, 2**16),
)
def test_statistics_over_chunks_equal_those_of_the_whole(rows, classes, cut, noise, seed):
    from onnxlr.proof.verify import _Diff

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, classes)).astype(np.float32)
    b = (a + noise * rng.standard_normal(a.shape)).astype(np.float32)
    diff = _Diff("y")
    for start in range(0, rows, cut):
        diff.update(a[start : start + cut], b[start : start + cut])
    s = diff.stats()
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert s.max_abs_error == pytest.approx(np.abs(a64 - b64).max())
    assert s.rel_error == pytest.approx(np.linalg.norm(a64 - b64) / np.linalg.norm(a64))
    cos = (a64 * b64).sum() / (np.linalg.norm(a64) * np.linalg.norm(b64))
    assert s.cosine == pytest.approx(cos)
    assert s.top1 == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    if classes > 5:
        top5 = np.argsort(-b, axis=1)[:, :5]
        assert s.top5 == pytest.approx(np.mean((top5 == a.argmax(1)[:, None]).any(1)))
    else:
        assert s.top5 is None


def test_nan_in_the_candidate_fails():
    def with_log(abs_first: bool):
        model = cnn()
        src = "logits"
        if abs_first:
            model.graph.node.append(helper.make_node("Abs", ["logits"], ["abs"]))
            src = "abs"
        model.graph.node.append(helper.make_node("Log", [src], ["out"]))  # log(x < 0) = nan
        model.graph.output[0].name = "out"
        return model

    clean, nan = with_log(True), with_log(False)
    result = verify(clean, nan)
    assert not result and np.isnan(result.outputs[0].rel_error)
    assert result.failures == ["output 'out': relative L2 error nan exceeds max_rel_error 0.01"]
    as_json = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert as_json["outputs"][0]["rel_error"] == "nan"
    assert as_json["smallest_passing_tolerance"]["max_rel_error"] == "nan"
    assert not verify(clean, nan, max_rel_error=1e9)  # NaN passes no tolerance
    assert verify(nan, nan)  # NaN where both models give NaN agrees


def test_model_protos_are_accepted():
    assert verify(cnn(), cnn(), samples=2)
    assert not verify(cnn(), cnn(w2=perturbed_w2()), samples=2)


def test_smallest_passing_tolerance_is_the_boundary(ref, perturbed):
    worst = verify(ref, perturbed).smallest_passing_tolerance["max_rel_error"]
    assert verify(ref, perturbed, max_rel_error=worst)
    assert not verify(ref, perturbed, max_rel_error=worst * 0.999)
    assert verify(ref, perturbed, max_rel_error=None)  # the check turned off


def test_min_top1_fails_when_classes_disagree(ref, tmp_path, capsys):
    swapped = save(cnn(g=G[:, ::-1].copy()), tmp_path / "swapped.onnx")
    result = verify(ref, swapped, max_rel_error=None, min_top1=0.9)
    assert not result
    top1 = result.outputs[0].top1
    assert top1 < 0.9 and result.smallest_passing_tolerance["min_top1"] == top1
    assert any("top-1 agreement" in f and "'logits'" in f for f in result.failures)
    assert verify(ref, swapped, max_rel_error=None, min_top1=top1)
    assert main(["verify", ref, swapped, "--max-rel-error", "none", "--min-top1", "0.9"]) == 1
    assert "top-1" in capsys.readouterr().err


def test_real_output_shape_is_used_not_the_declared_one(tmp_path):
    liar = save(cnn(out_dims=(999, 7)), tmp_path / "liar.onnx")  # produces [N, 10]
    (out,) = verify(liar, liar, samples=3).outputs
    assert out.shape == [3, 10] and out.top1 == 1.0


def test_classification_shape_detection():
    from onnxlr.proof.verify import _class_count

    assert _class_count([4, 10]) == 10
    assert _class_count([1, 1000, 1, 1]) == 1000
    assert _class_count([4, 1]) is None
    assert _class_count([2, 8, 16]) is None
    assert _class_count([10]) is None


def test_missing_candidate_output_is_a_user_error(ref, tmp_path, capsys):
    other = cnn()
    other.graph.output[0].name = "other"
    other.graph.node[-1].output[0] = "other"
    other_path = save(other, tmp_path / "other.onnx")
    with pytest.raises(OnnxlrError, match="lacks output.*logits"):
        verify(ref, other_path)
    assert main(["verify", ref, other_path]) == 2
    no_traceback(capsys.readouterr().err)


def test_json_file_has_the_documented_fields(ref, perturbed, tmp_path):
    path = tmp_path / "out" / "v.json"
    path.parent.mkdir()
    assert main(["verify", ref, perturbed, "--per-layer", "--json", str(path)]) == 1
    data = json.loads(path.read_text())
    assert set(data) == {"passed", "reference", "candidate", "providers", "inputs", "tolerances",
                         "smallest_passing_tolerance", "outputs", "layers", "failures"}
    assert data["passed"] is False and data["providers"] == ["CPUExecutionProvider"]
    assert set(data["inputs"]) == {"source", "seed", "int_range", "samples", "feed_shapes"}
    assert data["tolerances"] == {"max_rel_error": DEFAULT_MAX_REL_ERROR, "min_top1": None}
    (out,) = data["outputs"]
    assert set(out) == {"name", "shape", "dtype", "max_abs_error", "mean_abs_error", "rel_error",
                        "cosine", "top1", "top5", "mismatch"}
    assert data["smallest_passing_tolerance"]["max_rel_error"] == out["rel_error"]
    assert set(data["layers"][0]) == {"tensor", "reference_op", "candidate_op", "rel_error",
                                      "max_abs_error", "cosine"}
    assert len(data["failures"]) == 1


# --- per layer -------------------------------------------------------------------------------


def test_per_layer_points_at_the_perturbed_layer(ref, tmp_path, capsys):
    # conv1 and the Gemm read renamed (but equal) weights: "replaced" with zero error of their
    # own; conv2 keeps its node but its weight is perturbed.
    cand = save(cnn(w1_name="w1_lr", g_name="g_lr", w2=perturbed_w2(0.05)), tmp_path / "c.onnx")
    result = verify(ref, cand, per_layer=True)
    assert [layer.tensor for layer in result.layers] == ["c1", "c2", "logits"]
    errors = [layer.rel_error for layer in result.layers]
    assert errors[0] == 0
    first = next(layer for layer in result.layers if layer.rel_error > 0)
    assert first.tensor == "c2" and first.reference_op == first.candidate_op == "Conv"
    assert result.layers[2].rel_error > 0
    assert main(["verify", ref, cand, "--per-layer"]) == (0 if result else 1)
    assert "per layer (graph order)" in capsys.readouterr().out


def test_per_layer_of_identical_models_is_empty(ref):
    assert verify(ref, ref, per_layer=True).layers == []


def test_changed_tensors_sees_op_and_weight_changes():
    ref = cnn()
    cand = cnn(w2=perturbed_w2())
    cand.graph.node[1].op_type = "Sigmoid"  # r1 computed by another op
    assert [t for t, _, _ in changed_tensors(ref, cand)] == ["r1", "c2"]
    assert changed_tensors(ref, cnn()) == []


# --- inputs ----------------------------------------------------------------------------------


@pytest.fixture
def count_runs(monkeypatch):
    feeds = []
    real = runtime.run_session

    def spy(session, feed, outputs, label):
        feeds.append({k: v.shape for k, v in feed.items()})
        return real(session, feed, outputs, label)

    monkeypatch.setattr(runtime, "run_session", spy)
    return feeds


def test_npz_on_fixed_batch_model_is_fed_one_sample_at_a_time(tmp_path, count_runs):
    ref1 = save(cnn(batch=1), tmp_path / "ref1.onnx")
    cand1 = save(cnn(batch=1, w2=perturbed_w2()), tmp_path / "cand1.onnx")
    x = np.random.default_rng(5).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    result = verify(ref1, cand1, inputs=tmp_path / "data.npz")
    assert count_runs == [{"x": (1, 3, 8, 8)}] * 10  # 5 samples x 2 models
    assert result.inputs["samples"] == 5 and result.outputs[0].shape == [1, 10]
    # the statistics come from the file's data
    a = np.concatenate([ort.InferenceSession(ref1).run(None, {"x": s[None]})[0] for s in x])
    b = np.concatenate([ort.InferenceSession(cand1).run(None, {"x": s[None]})[0] for s in x])
    assert result.outputs[0].max_abs_error == pytest.approx(np.abs(a - b).max(), rel=1e-6)


def test_npz_on_dynamic_batch_model_is_batched_in_chunks(ref, perturbed, tmp_path, count_runs):
    x = np.random.default_rng(5).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    whole = verify(ref, perturbed, inputs=tmp_path / "data.npz")
    assert count_runs == [{"x": (5, 3, 8, 8)}] * 2
    count_runs.clear()
    chunked = verify(ref, perturbed, inputs=tmp_path / "data.npz", chunk=2)
    assert [f["x"][0] for f in count_runs] == [2, 2, 2, 2, 1, 1]
    assert chunked.outputs[0].rel_error == pytest.approx(whole.outputs[0].rel_error, rel=1e-5)


def test_npz_missing_input_is_a_user_error(ref, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 3, 8, 8), np.float32))
    assert main(["verify", ref, ref, "--inputs", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "no array for input(s) x" in err and "image" in err


def test_npz_wrong_sample_shape_is_a_user_error(ref, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 9, 8), np.float32))
    with pytest.raises(OnnxlrError, match=r"shape \[2, 3, 9, 8\]"):
        verify(ref, ref, inputs=tmp_path / "bad.npz")


def token_model(vocab=50):
    """ids (int64 [N, T]) -> Gather(emb) ; mask (bool [N, T]) -> Where(mask, emb, 0) -> out."""
    emb = np.random.default_rng(1).standard_normal((vocab, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("Unsqueeze", ["mask", "axis"], ["m"]),
        helper.make_node("Where", ["m", "e", "zero"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "tok",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", "T"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(np.array([-1]), "axis"),
         numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_and_bool_inputs(tmp_path, capsys):
    path = save(token_model(vocab=50), tmp_path / "tok.onnx")
    specs = runtime.input_specs(ort.InferenceSession(path))
    samples = list(data.random_source(specs, {"ids": (2, 7), "mask": (2, 7)}, 3, seed=1, int_range=(10, 20)))
    assert len(samples) == 3
    data_ = {k: np.concatenate([s[k] for s in samples]) for k in ("ids", "mask")}
    assert data_["ids"].dtype == np.int64 and data_["ids"].shape == (6, 7)
    assert data_["ids"].min() >= 10 and data_["ids"].max() < 20
    assert data_["mask"].dtype == np.bool_ and 0 < data_["mask"].mean() < 1
    args = ["verify", path, path, "--shape", "ids:1,7", "--shape", "mask:1,7", "--int-range",
            "0:50"]
    assert main(args) == 0
    assert "[16,7,4]" in capsys.readouterr().out
    # ids beyond the vocabulary make Gather fail: a user error, not a traceback
    assert main(args[:-1] + ["0:5000"]) == 2
    no_traceback(capsys.readouterr().err)


def test_random_inputs_are_seeded(ref):
    specs = runtime.input_specs(ort.InferenceSession(ref))
    def draw(seed):
        return np.concatenate([s["x"] for s in data.random_source(specs, None, 2, seed=seed)])

    a = draw(7)
    assert np.array_equal(a, draw(7))
    assert not np.array_equal(a, draw(8))
    assert a.shape == (2, 3, 8, 8) and a.dtype == np.float32


@pytest.mark.parametrize("text", ["x", "x:", "x:1,a", ":1,2", "x:0,3"])
def test_bad_shape_flags(text):
    with pytest.raises(OnnxlrError, match="NAME:DIMS"):
        data.parse_shape(text)


def test_flag_parsers(ref, tmp_path):
    from onnxlr.proof.verify import parse_tolerance

    assert parse_tolerance("1e-3") == 1e-3 and parse_tolerance("none") is None
    for bad in ("abc", "-1", "nan"):
        with pytest.raises(OnnxlrError, match="bad tolerance"):
            parse_tolerance(bad)
    assert data.parse_int_range("0:30522") == (0, 30522)
    with pytest.raises(OnnxlrError, match="LO:HI"):
        data.parse_int_range("5")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(OnnxlrError, match="random inputs only"):
        verify(ref, ref, inputs=tmp_path / "d.npz", shapes={"x": (1, 3, 8, 8)})
    with pytest.raises(OnnxlrError, match="LO < HI"):
        verify(ref, ref, int_range=(5, 5))


def test_shape_flag_checks(ref):
    assert data.parse_shape("a:b:1,2") == ("a:b", (1, 2))
    specs = runtime.input_specs(ort.InferenceSession(ref))
    assert data.resolve_shapes(specs, {"x": (4, 3, 8, 8)}) == {"x": (4, 3, 8, 8)}
    with pytest.raises(OnnxlrError, match="unknown input"):
        data.resolve_shapes(specs, {"y": (1,)})
    with pytest.raises(OnnxlrError, match="fixed shape"):
        data.resolve_shapes(specs, {"x": (4, 3, 9, 8)})


# --- providers and user errors ---------------------------------------------------------------


def test_provider_mapping(monkeypatch):
    assert runtime.resolve_provider("cpu") == ["CPUExecutionProvider"]
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: every)
    assert runtime.resolve_provider("tensorrt") == every
    assert runtime.resolve_provider("cuda") == every[1:]
    with pytest.raises(OnnxlrError, match="choose one of: cpu, cuda, tensorrt"):
        runtime.resolve_provider("rocm")


def test_a_provider_that_does_not_start_is_an_error_not_a_fallback(ref, monkeypatch):
    """onnxruntime falls back to the next provider when, say, the CUDA libraries do not load;
    onnxlr refuses, so CPU timings are never reported as GPU ones."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        pytest.skip("this onnxruntime really has CUDA; the fallback is simulated on CPU builds")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    with pytest.raises(OnnxlrError, match="could not start CUDAExecutionProvider and fell back to "
                                          "CPUExecutionProvider.*onnxruntime-gpu"):
        runtime.make_session(ref, "cuda")
    with pytest.raises(OnnxlrError, match="TensorRT 10"):
        runtime.check_provider_started("TensorrtExecutionProvider", ["CUDAExecutionProvider"])
    runtime.check_provider_started("CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="has CUDA")
def test_unavailable_provider_lists_the_available_ones(ref, capsys):
    assert main(["verify", ref, ref, "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "CUDAExecutionProvider" in err and "available: " in err
    assert "cpu (CPUExecutionProvider)" in err


def test_unknown_provider_flag(ref, capsys):
    assert main(["verify", ref, ref, "--provider", "rocm"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "'cpu', 'cuda', 'tensorrt'" in err


def test_bad_files_are_user_errors(ref, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    cases = {
        str(tmp_path / "missing.onnx"): "no such file",
        str(tmp_path / "notes.txt"): "not an ONNX model",
        str(tmp_path): "not a file",
    }
    for path, message in cases.items():
        assert main(["verify", ref, path]) == 2
        err = capsys.readouterr().err
        no_traceback(err)
        assert message in err and path in err


def test_unsupported_opset_is_named(tmp_path, capsys):
    model = cnn()
    model.opset_import[0].version = 99
    path = save(model, tmp_path / "future.onnx")
    assert main(["verify", path, path]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "opset 99" in err and "re-export" in err


def test_subprocess_prints_one_line_without_traceback(ref, tmp_path):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "onnxlr", "verify", ref, str(tmp_path / "nope.onnx")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )
    assert proc.returncode == 2
    no_traceback(proc.stderr)
    assert proc.stderr.startswith("onnxlr: error:") and "nope.onnx" in proc.stderr
