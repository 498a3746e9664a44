"""Calibration within a memory bound: a schedule that fits --calib-memory, wide layers in a reduced
basis, layers left data-free with the reason, out of memory as one line, one pass per layer."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.calib import fit
from onnxlr.cli import main
import itertools


def _three_branch_model(rng) -> onnx.ModelProto:
    """x [n, 5000] -> Gemm (5000 -> 16): wider than the reduced-basis threshold, one row per sample;
    img [n, 256, 6, 6] -> Conv 3x3 (256 -> 32): its patch is 2304 wide;
    seq [n, 64, 600] -> MatMul (600 -> 16): 64 rows per sample."""
    w = (rng.standard_normal((5000, 16)) * 0.02).astype(np.float32)
    k = (rng.standard_normal((32, 256, 3, 3)) * 0.02).astype(np.float32)
    m = (rng.standard_normal((600, 16)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc"),
         helper.make_node("Conv", ["img", "K"], ["z"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("MatMul", ["seq", "M"], ["s"], name="mm")],
        "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5000]),
                  helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 256, 6, 6]),
                  helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["n", 64, 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 32, 6, 6]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 64, 16])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(k, "K"), numpy_helper.from_array(m, "M")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_layers_over_the_memory_bound_use_a_bounded_method_or_stay_data_free(tmp_path, monkeypatch):
    from onnxlr.calib import collect

    monkeypatch.setattr(collect, "WIDE_INPUT", 512)  # the MatMul's 600 inputs count as wide
    monkeypatch.setattr(collect, "REDUCED_BASIS", 128)
    rng = np.random.default_rng(0)
    onnx.save(_three_branch_model(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((30, 5000)).astype(np.float32),
             img=rng.standard_normal((30, 256, 6, 6)).astype(np.float32),
             seq=rng.standard_normal((30, 64, 600)).astype(np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(out), "--rank", "0.25", "--calib",
                 str(tmp_path / "calib.npz"), "--calib-memory", "100M", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    notes = {row["name"]: " ".join(row["notes"]) for row in report["layers"]}
    # 30 rows for 5000 inputs: the rows themselves are the exact statistics (4.8 MB, not 4 x 200 MB)
    assert "statistics: its 30 calibration rows themselves" in notes["fc"]
    # Tucker-2 keeps U_in: its statistics are those of U_in^T-projected patches, 64 x 9 of 2304 wide
    assert "projected on the chain's 576 of 2304 inputs" in notes["conv"]
    # 1920 rows for 600 inputs, wider than the (patched) threshold: W's leading directions
    assert "reduced basis of 128 of 600 inputs" in notes["mm"]
    for name in ("fc", "conv", "mm"):
        assert "calib: held-out output error" in notes[name] or "calib: data-free factors kept (held-out" in notes[name]
    assert any("statistics bound 100 MB" in n and "1 wide layer(s) in a reduced basis" in n for n in report["notes"])
    onnx.checker.check_model(str(out), full_check=True)

    # Under 1 MB none fits: every layer keeps its data-free factors, and the report says why
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(out), "--rank", "0.25", "--calib",
                 str(tmp_path / "calib.npz"), "--calib-memory", "1M", "--report", str(rep), "--overwrite"]) == 0
    notes = {row["name"]: " ".join(row["notes"]) for row in json.loads(rep.read_text())["layers"]}
    for name in ("fc", "conv", "mm"):
        assert "over the 1 MB bound (--calib-memory); data-free factors kept" in notes[name], notes[name]
    onnx.checker.check_model(str(out), full_check=True)


def test_out_of_memory_is_one_line_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4000, 64)) * 0.02).astype(np.float32)  # 4000 wide: full statistics, 122 MiB each
    # (64 rows per sample, 2048 in all: too many to keep the rows themselves)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64, 4000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64, 64])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "wide.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 64, 4000)).astype(np.float32))
    out = tmp_path / "out.onnx"

    def limit():  # 1.4 GB of address space: the statistics a 64 GB bound allows do not fit
        resource.setrlimit(resource.RLIMIT_AS, (1_400_000_000, 1_400_000_000))

    done = subprocess.run([sys.executable, "-m", "onnxlr", "compress", str(tmp_path / "wide.onnx"), "-o", str(out),
                           "--calib", str(tmp_path / "calib.npz"), "--calib-memory", "64G", "--rank", "8"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "out of memory: Unable to allocate" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "wide.onnx"]


def test_one_pass_per_layer(tmp_path):
    from builders import cnn_model

    onnx.save(cnn_model(channels=(3, 16, 16), spatial=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((20, 3, 8, 8)).astype(np.float32))
    rep = tmp_path / "r.json"
    for stages, passes in (("all", 3), ("1", 1)):
        assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib",
                     str(tmp_path / "calib.npz"), "--calib-stages", stages, "--report", str(rep), "--force"]) == 0
        assert any(f"in {passes} pass(es)" in n for n in json.loads(rep.read_text())["notes"])
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib",
                 str(tmp_path / "calib.npz"), "--calib-stages", "0"]) == 2


@pytest.mark.parametrize("k", [300, 80])
def test_reduced_basis_whitening_matches_full_moments(k):
    """With the whole basis the reduced fit is the full one; with W's row space plus a random
    complement it stays within 0.1% on data with a decaying spectrum."""
    rng = np.random.default_rng(0)
    n, t = 300, 40
    w, b = rng.standard_normal((t, n)), rng.standard_normal(t)
    x = rng.standard_normal((4000, n)) @ np.diag(np.linspace(3, 0.1, n)) + 1.0
    full = fit.Moments(n)
    full.add(x)
    reduced = fit.ReducedMoments(fit.reduced_basis(w, k))
    reduced.add(x)
    for rank in (5, 20):
        p, q, nb = fit.whitened_svd(w, b, full, rank, True)
        low, nb2 = fit.reduced_whitened_svd(w, b, reduced, rank, True)
        p2, q2 = low.p, low.q
        exact, approx = fit.relative_error(w, b, q @ p, nb, full), fit.relative_error(w, b, q2 @ p2, nb2, full)
        assert approx <= exact * (1 + (1e-9 if k == n else 1e-3))
        estimate = np.sqrt(np.divide(*reduced.output_error(w, b, q2 @ p2, nb2)))
        assert estimate == pytest.approx(approx, rel=1e-3)


@pytest.mark.parametrize("t", [40, 500])  # a wide W (T < n) and a tall one
@pytest.mark.parametrize("fit_bias", [True, False])
def test_wide_fits_work_on_float32_blocks_and_their_errors_on_the_factors(t, fit_bias, monkeypatch):
    """A wide layer's fit reads its float32 W in column blocks (no float64 copy of W) and its errors
    come from the factors (no T x n product): both equal the dense float64 computation."""
    monkeypatch.setattr(fit, "_BLOCK", 64)  # several blocks on this small W
    rng = np.random.default_rng(1)
    n = 300
    weight = rng.standard_normal((n, t)).astype(np.float32)  # a linear layer's [n, T]
    w32, w64 = weight.T, weight.T.astype(np.float64)
    b = rng.standard_normal(t)
    x = rng.standard_normal((3000, n)) @ np.diag(np.linspace(3, 0.1, n)) + 0.5
    moments = [fit.ReducedMoments(fit.reduced_basis(w, 120), shared={}) for w in (w32, w64)]
    for m in moments:
        m.add(x)
    np.testing.assert_allclose(moments[0].basis @ moments[0].basis.T, moments[1].basis @ moments[1].basis.T, atol=1e-8)
    for shrink in (0.0, 0.3):
        (low, nb), (low2, nb2) = (fit.reduced_whitened_svd(w, b, m, 30, fit_bias, shrink=shrink)
                                  for w, m in zip((w32, w64), moments))
        np.testing.assert_allclose(low.dense(), low2.dense(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(nb, nb2, rtol=1e-6, atol=1e-9)
        dense = moments[1].output_error(w64, b, low2.dense(), nb2)
        for factored in (low, fit.LowRank(low.q, low.p)):  # its projection form, and plain factors
            np.testing.assert_allclose(moments[0].output_error(w32, b, factored, nb), dense, rtol=1e-7)


def test_a_stacked_npz_is_read_in_chunks_not_whole(tmp_path, monkeypatch):
    """Calibration memory does not grow with the number of samples: a stacked file is streamed."""
    from onnxlr import data
    from onnxlr.data import feeds
    from onnxlr.runtime import InputSpec

    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    np.savez(tmp_path / "big.npz", x=x, scale=np.float32(2.0))
    specs = [InputSpec("x", "tensor(float)", (None, 4), ("batch", None)), InputSpec("scale", "tensor(float)", ())]
    reads = []
    real = feeds._Member.read
    monkeypatch.setattr(feeds._Member, "read", lambda self, rows: reads.append(rows) or real(self, rows))
    samples = list(data.open_source(tmp_path / "big.npz", specs))
    assert len(samples) == 300 and max(reads) <= 64 and sum(reads) == 300
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in samples]), x)
    assert all(float(s["scale"]) == 2.0 for s in samples)


def _mlp(rng, widths=(48, 64, 64, 32)) -> onnx.ModelProto:
    """x [n, 48] -> (MatMul + Add + Relu) x 3: every weight over 1 kB, so it can live on disk."""
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(np.float32), f"B{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", widths[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", widths[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_a_model_with_external_data_calibrates_from_disk_as_one_in_memory(tmp_path, monkeypatch):
    """Calibration runs a model saved with external data without reading it into memory (its
    sessions open files in a temporary folder beside it, removed afterwards), and refines exactly
    as for the same model in memory; an in-memory model forced through files does too."""
    import onnxlr.model
    from onnxlr.calib import collect
    from onnxlr.pipeline import compress_file

    rng = np.random.default_rng(0)
    model = _mlp(rng)
    onnx.save(model, tmp_path / "mem.onnx")
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(model, str(ext / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    x = (rng.standard_normal((40, 48)) * np.linspace(0.1, 3, 48)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    options = {"rank": "0.25", "calib": str(tmp_path / "calib.npz"), "calib_stages": "all"}

    _, in_memory = compress_file(tmp_path / "mem.onnx", tmp_path / "o_mem.onnx", **options)
    refined = [r.name for r in in_memory.layers if any(n.startswith("calib: ") and "->" in n for n in r.notes)]
    assert refined  # the data-aware factors won somewhere, so the comparison below means something

    def no_materialize(model):
        raise AssertionError("calibration read the external data into memory")

    monkeypatch.setattr(onnxlr.model, "materialize_external", no_materialize)
    opened, refers_to = [], set()

    def make_session(source, *args, **kwargs):  # the input stays valid while calibration runs
        onnx.checker.check_model(str(ext / "m.onnx"), full_check=True)  # refuses hard-linked data
        opened.append(str(source) if isinstance(source, str) else "bytes")
        if isinstance(source, str):
            refers_to.update(e.value for t in onnx.load(source, load_external_data=False).graph.initializer
                             for e in t.external_data if e.key == "location")
        return real_make_session(source, *args, **kwargs)

    real_make_session = collect.make_session
    monkeypatch.setattr(collect, "make_session", make_session)
    _, on_disk = compress_file(ext / "m.onnx", ext / "o.onnx", **options)
    assert any(name.startswith(str(ext / ".onnxlr-calib-")) for name in opened)  # files beside the data
    # the factors spliced so far are read from a weights file beside the data, not from memory
    assert any(name.startswith(".onnxlr-weights-") for name in refers_to)
    assert refers_to <= {"m.onnx.data"} | {name for name in refers_to if name.startswith(".onnxlr-weights-")}
    monkeypatch.setattr(collect, "make_session", real_make_session)
    assert [r.notes for r in on_disk.layers] == [r.notes for r in in_memory.layers]
    expected, got = _weights(tmp_path / "o_mem.onnx"), _weights(ext / "o.onnx")  # loads o.onnx.data
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in ext.iterdir()) == ["m.onnx", "m.onnx.data", "o.onnx", "o.onnx.data"]

    monkeypatch.setattr(collect, "SESSION_BYTES", 0)  # every pass's model through files, in TMPDIR
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    _, via_files = compress_file(tmp_path / "mem.onnx", tmp_path / "o_files.onnx", **options)
    assert [r.notes for r in via_files.layers] == [r.notes for r in in_memory.layers]
    for name, value in _weights(tmp_path / "o_files.onnx").items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_two_models_of_a_pass_run_one_after_the_other_with_the_same_result(tmp_path, monkeypatch):
    """A pass keeps the original model's rows and then runs the compressed model (one session alive
    at a time) when those rows are small: the factors are exactly those of running both together."""
    from builders import cnn_model

    from onnxlr.calib import collect

    onnx.save(cnn_model(channels=(3, 16, 16), spatial=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((20, 3, 8, 8)).astype(np.float32))
    weights = []
    for kept in (0, collect.KEPT_ROWS_BYTES):
        monkeypatch.setattr(collect, "KEPT_ROWS_BYTES", kept)
        out = tmp_path / f"o{kept}.onnx"
        assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                     "--force", "--rank", "0.5"]) == 0
        weights.append({t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer})
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][name], err_msg=name)
