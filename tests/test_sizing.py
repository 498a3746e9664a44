"""Layers whose sizes the model leaves dynamic are sized from the calibration data or --shape, in
compress's report and in inspect (a detector's [batch, 3, height, width] input)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlr.cli import main


def _detector(tmp_path) -> str:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "det",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 16, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32, "height", "width"])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "det.onnx")
    return str(tmp_path / "det.onnx")


def _macs(tmp_path, *flags) -> int | None:
    rep = tmp_path / "r.json"
    assert main(["compress", _detector(tmp_path), "-o", str(tmp_path / "o.onnx"), "--report", str(rep), *flags]) == 0
    return json.loads(rep.read_text())["totals"]["macs_before"]


def test_dynamic_layers_are_sized_from_the_data_or_shape(tmp_path):
    conv_macs = 32 * 16 * 9 * 24 * 40  # per sample at 24x40
    assert _macs(tmp_path) is None  # nothing says how big: unknown, not a made-up size
    assert _macs(tmp_path, "--shape", "image:1,16,24,40") == conv_macs
    x = np.random.default_rng(1).standard_normal((10, 16, 24, 40)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", image=x)
    assert _macs(tmp_path, "--calib", str(tmp_path / "calib.npz")) == conv_macs


def test_inspect_sizes_dynamic_layers_from_shape(tmp_path, capsys):
    assert main(["inspect", _detector(tmp_path), "--json", str(tmp_path / "i.json")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["totals"]["macs_known"] == 0
    capsys.readouterr()
    assert main(["inspect", _detector(tmp_path), "--shape", "image:1,16,24,40", "--json", str(tmp_path / "i.json")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["totals"]["macs_known"] == 32 * 16 * 9 * 24 * 40
    assert "TOTAL" in capsys.readouterr().out


def test_inspect_total_is_unknown_not_zero_without_sizes(tmp_path, capsys):
    assert main(["inspect", _detector(tmp_path)]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("TOTAL"))
    assert " ? " in total and "100%" not in total
