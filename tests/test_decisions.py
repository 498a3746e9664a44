"""One source of truth: the budget writes the model it measured, layers are addressed by position
and output tensor (not by a possibly repeated or empty node name), calibration reads every file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import check_budget_wrote_what_it_measured, cnn_model, steady_budget
from onnx import TensorProto, helper, numpy_helper

from onnxlr.cli import main


@pytest.fixture(autouse=True)
def planned_layers(fast_timing, monkeypatch):
    steady_budget(monkeypatch)


def _calib(tmp_path, n=40, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return x


def test_the_budget_writes_the_model_it_measured(tmp_path):
    """verify of the written file on the samples the budget held out gives the error its report
    states, and each layer's method and ranks in the file are the budget's choice."""
    model = cnn_model(channels=(3, 32, 32), spatial=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = _calib(tmp_path)
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(out), "--target-speedup", "1.5",
                 "--calib", str(tmp_path / "calib.npz"), "--report", str(report_path),
                 "--cache-dir", str(tmp_path)]) == 0
    report = json.loads(report_path.read_text())
    chosen = report["budget"]["chosen"]
    rows = check_budget_wrote_what_it_measured(tmp_path, x, out, report)
    written = onnx.load(str(out))
    weights = {t.name: tuple(t.dims) for t in written.graph.initializer}
    for choice in chosen:  # the chain's first factor has the chosen rank as its output width
        first = weights[f"{choice['name']}_lr0_weight"]
        width = first[0] if rows[choice["output"]]["op_type"] == "Conv" else first[1]
        assert width == choice["ranks"].get("rank", choice["ranks"].get("rank_in"))
    replaced = {row["output"] for row in report["layers"] if row["skipped"] is None}
    assert replaced == {c["output"] for c in chosen}


def _named_model(names=("conv", "conv", "")) -> onnx.ModelProto:
    """Three convs (outputs c1, c2, c3): by default two named "conv" and one with no name."""
    rng = np.random.default_rng(1)
    inits, nodes, current = [], [], "x"
    for i, name in enumerate(names):
        w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.2
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"c{i + 1}"], name=name, pads=[1, 1, 1, 1]))
        current = f"c{i + 1}"
    graph = helper.make_graph(nodes, "named", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _rows(report_path) -> list[dict]:
    return json.loads(report_path.read_text())["layers"]


def test_duplicate_and_empty_node_names_address_the_right_layers(tmp_path):
    onnx.save(_named_model(), tmp_path / "m.onnx")
    model, out, rep = str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), tmp_path / "r.json"
    # the unnamed conv is labelled by op and position; the repeated name by its output tensor
    assert main(["compress", model, "-o", out, "--include", "^c2$", "--report", str(rep)]) == 0
    assert [r["skipped"] is None for r in _rows(rep)] == [False, True, False]
    assert main(["compress", model, "-o", out, "--exclude", "^Conv_3$", "--report", str(rep)]) == 0
    assert [r["skipped"] is None for r in _rows(rep)] == [True, True, False]
    config = tmp_path / "rules.json"
    config.write_text(json.dumps([{"match": "^c1$", "method": "cp", "rank": 4}, {"match": "^Conv_3$", "rank": 8}]))
    assert main(["compress", model, "-o", out, "--config", str(config), "--rank", "0.5", "--report", str(rep)]) == 0
    rows = _rows(rep)
    assert [r["method"] for r in rows] == ["cp", "tucker", "tucker"]
    assert rows[0]["ranks"] == {"rank": 4} and rows[1]["ranks"] == {"rank_in": 8, "rank_out": 8}
    assert rows[2]["ranks"] == {"rank_in": 8, "rank_out": 8} and rows[2]["name"] == "Conv_3"
    # a budget replaces exactly the layers it chose, never others with the same (here: empty)
    # name; onnxruntime refuses to load repeated non-empty node names, so budgets never see them
    onnx.save(_named_model(("", "", "")), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((20, 16, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    assert main(["compress", model, "-o", out, "--target-speedup", "1.2", "--exclude", "^c2$", "--calib",
                 str(tmp_path / "calib.npz"), "--report", str(rep), "--cache-dir", str(tmp_path)]) == 0
    report = json.loads(rep.read_text())
    replaced = [r["output"] for r in report["layers"] if r["skipped"] is None]
    assert "c2" not in replaced and replaced == [c["output"] for c in report["budget"]["chosen"]]
    assert ort.InferenceSession(out).run(None, {"x": x[:1]})[0].shape == (1, 16, 8, 8)


def test_a_calibration_folder_of_several_files_is_read_whole(tmp_path):
    model = cnn_model(channels=(3, 16, 16), spatial=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((37, 3, 8, 8)).astype(np.float32)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, part in enumerate(np.array_split(x, 3)):
        np.savez(folder / f"part{i}.npz", x=part)
    out, rep = str(tmp_path / "o.onnx"), tmp_path / "r.json"
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", out, "--calib", str(folder), "--report", str(rep)]) == 0
    assert any("on 37 samples" in n for n in json.loads(rep.read_text())["notes"])
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", out, "--calib", str(folder), "--report", str(rep),
                 "--target-speedup", "1.2", "--cache-dir", str(tmp_path)]) == 0
    budget_report = json.loads(rep.read_text())["budget"]
    assert budget_report["calib_samples"] == 37 and budget_report["check_samples"] == 7
