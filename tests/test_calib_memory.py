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


def _two_branch_model(rng) -> onnx.ModelProto:
    """x [n, 5000] -> Gemm (5000 -> 16): wider than the reduced-basis threshold;
    img [n, 256, 6, 6] -> Conv 3x3 (256 -> 32): its patch is 2304 wide."""
    w = (rng.standard_normal((5000, 16)) * 0.02).astype(np.float32)
    k = (rng.standard_normal((32, 256, 3, 3)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc"),
         helper.make_node("Conv", ["img", "K"], ["z"], name="conv", pads=[1, 1, 1, 1])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5000]),
                helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 256, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 32, 6, 6])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(k, "K")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_layers_over_the_memory_bound_use_a_reduced_basis_or_stay_data_free(tmp_path):
    rng = np.random.default_rng(0)
    onnx.save(_two_branch_model(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((30, 5000)).astype(np.float32),
             img=rng.standard_normal((30, 256, 6, 6)).astype(np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(out), "--rank", "0.25", "--calib",
                 str(tmp_path / "calib.npz"), "--calib-memory", "100M", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    notes = {row["name"]: " ".join(row["notes"]) for row in report["layers"]}
    assert "reduced basis of 1024 of 5000 inputs" in notes["fc"]  # Gemm: whitened SVD in the basis
    assert "over the 100 MB bound (--calib-memory); data-free factors kept" in notes["conv"]  # tucker: full stats
    assert any("statistics bound 100 MB" in n and "1 wide layer(s) in a reduced basis" in n for n in report["notes"])
    onnx.checker.check_model(str(out), full_check=True)


def test_out_of_memory_is_one_line_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4000, 64)) * 0.02).astype(np.float32)  # 4000 wide: full statistics, 122 MiB each
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "wide.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((50, 4000)).astype(np.float32))
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
        p2, q2, nb2 = fit.reduced_whitened_svd(w, b, reduced, rank, True)
        exact, approx = fit.relative_error(w, b, q @ p, nb, full), fit.relative_error(w, b, q2 @ p2, nb2, full)
        assert approx <= exact * (1 + (1e-9 if k == n else 1e-3))
        estimate = np.sqrt(np.divide(*reduced.output_error(w, b, q2 @ p2, nb2)))
        assert estimate == pytest.approx(approx, rel=1e-3)


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
