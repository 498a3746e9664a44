"""`onnxlr compress` from the command line: files, layer selection, the JSON report, skip reasons.

* The input file is byte-identical afterwards; the output appears only once it is complete (a
  failed write leaves neither a partial output nor temporary files).
* --include / --exclude select layers by name or op type; a pattern that matches nothing warns.
* --report FILE.json has the per-layer fields and totals.
* A replacement that would not reduce MACs is skipped with that reason unless --force; depthwise
  convs are always skipped with a reason.
* ``python -m onnxlr compress`` works in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import cnn_model, matmul_model, random_feeds, rel_error, run_ort

from onnxlr.cli import main
from onnxlr.model import io as onnxlr_graph

REPO = Path(__file__).resolve().parents[1]
LAYER_FIELDS = {
    "name", "op_type", "method", "ranks", "weight_shape", "params_before", "params_after",
    "macs_before", "macs_after", "weight_rel_error", "skipped",
}
TOTAL_FIELDS = {"params_before", "params_after", "macs_before", "macs_after"}


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(seed=0), str(path))
    return path


def run_cli(*args: str) -> int:
    return main(["compress", *map(str, args)])


def read_report(path: Path) -> dict:
    data = json.loads(path.read_text())
    for layer in data["layers"]:
        assert LAYER_FIELDS <= set(layer), LAYER_FIELDS - set(layer)
    assert TOTAL_FIELDS <= set(data["totals"]), data["totals"]
    return data


def by_name(report: dict) -> dict[str, dict]:
    return {layer["name"]: layer for layer in report["layers"]}


# --- files ------------------------------------------------------------------------------------


def test_input_unchanged_and_output_valid(cnn_path: Path, tmp_path: Path):
    before = cnn_path.read_bytes()
    stat = cnn_path.stat()
    out = tmp_path / "out.onnx"
    assert run_cli(cnn_path, "-o", out, "--rank", "0.5", "--round-to", "1") == 0
    assert cnn_path.read_bytes() == before
    assert cnn_path.stat().st_mtime_ns == stat.st_mtime_ns
    compressed = onnx.load(str(out))
    onnx.checker.check_model(compressed, full_check=True)
    assert len(compressed.graph.node) > len(onnx.load(str(cnn_path)).graph.node)
    original = onnx.load(str(cnn_path))
    feeds = random_feeds(original)
    (expected,) = run_ort(original, feeds)
    (actual,) = run_ort(compressed, feeds)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    # Only the output appeared next to the input: no temporary or stray files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "out.onnx"]


def test_output_appears_only_when_complete(cnn_path: Path, tmp_path: Path, monkeypatch):
    """When the model bytes are flushed to disk, the output name does not exist yet."""
    out = tmp_path / "out.onnx"
    seen = []
    real_fsync = os.fsync

    def spying_fsync(fd):
        seen.append(out.exists())
        return real_fsync(fd)

    monkeypatch.setattr(onnxlr_graph.os, "fsync", spying_fsync)
    assert run_cli(cnn_path, "-o", out) == 0
    assert seen and seen[0] is False
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_partial_output(cnn_path: Path, tmp_path: Path, monkeypatch, existing: bool):
    before = cnn_path.read_bytes()
    out = tmp_path / "out.onnx"
    if existing:
        out.write_bytes(b"previous output")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnxlr_graph.os, "fsync", failing_fsync)
    try:  # reported as a user error (exit 2) or raised: either way the run must fail
        status = run_cli(cnn_path, "-o", out)
    except OSError:
        status = None
    monkeypatch.undo()
    assert status != 0
    assert cnn_path.read_bytes() == before
    if existing:
        assert out.read_bytes() == b"previous output"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "out.onnx"]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_user_error_writes_nothing(cnn_path: Path, tmp_path: Path, capsys):
    out = tmp_path / "out.onnx"
    assert run_cli(cnn_path, "-o", out, "--rank", "0") == 2
    err = capsys.readouterr().err
    assert "rank" in err and "Traceback" not in err
    assert not out.exists()


def test_python_m_onnxlr_in_subprocess(cnn_path: Path, tmp_path: Path):
    before = cnn_path.read_bytes()
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "onnxlr", "compress", str(cnn_path), "-o", str(out), "--method", "svd",
         "--rank", "0.25", "--report", str(report)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert cnn_path.read_bytes() == before
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = read_report(report)
    assert {layer["method"] for layer in data["layers"] if layer["skipped"] is None} == {"svd", "channel"}  # svd on a KxK conv is the channel decomposition
    # A bad flag: one line on stderr, exit status 2, nothing written.
    bad = subprocess.run(
        [sys.executable, "-m", "onnxlr", "compress", str(cnn_path), "-o", str(tmp_path / "bad.onnx"),
         "--method", "qr"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "qr" in bad.stderr
    assert not (tmp_path / "bad.onnx").exists()


# --- the report -------------------------------------------------------------------------------


def test_report_fields_and_totals(cnn_path: Path, tmp_path: Path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    assert run_cli(cnn_path, "-o", out, "--rank", "0.5", "--round-to", "1", "--report", report_path) == 0
    data = read_report(report_path)
    layers = by_name(data)
    assert set(layers) == {"conv1", "conv2", "fc"}
    assert layers["conv1"]["weight_shape"] == [16, 3, 3, 3]
    assert layers["fc"]["weight_shape"] == [10, 16 * 8 * 8]
    for layer in data["layers"]:
        assert layer["skipped"] is None, layer
        assert layer["params_after"] < layer["params_before"]
        assert layer["macs_after"] < layer["macs_before"]
        assert 0 < layer["weight_rel_error"] < 1
        assert layer["ranks"] and all(isinstance(r, int) and r >= 1 for r in layer["ranks"].values())
    assert layers["conv2"]["method"] == "tucker" and layers["fc"]["method"] == "svd"
    assert layers["conv2"]["ranks"] == {"rank_in": 8, "rank_out": 8}
    assert layers["conv1"]["macs_before"] == 16 * 3 * 9 * 64
    totals = data["totals"]
    for key in TOTAL_FIELDS:
        assert totals[key] == sum(layer[key] for layer in data["layers"]), key
    # The written model holds exactly the reported parameter count of the factorized layers.
    model = onnx.load(str(out))
    biases = {"conv1_b", "fc_b"}
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in biases)
    assert weights == totals["params_after"]


# --- layer selection --------------------------------------------------------------------------


def test_include_selects_layers(cnn_path: Path, tmp_path: Path):
    report_path = tmp_path / "r.json"
    assert run_cli(cnn_path, "-o", tmp_path / "o.onnx", "--include", "^conv2$", "--report", report_path) == 0
    layers = by_name(read_report(report_path))
    assert layers["conv2"]["skipped"] is None
    for name in ("conv1", "fc"):
        assert "--include" in layers[name]["skipped"]
        assert layers[name]["params_after"] == layers[name]["params_before"]
    # The unselected layers are still there, untouched.
    nodes = {n.name for n in onnx.load(str(tmp_path / "o.onnx")).graph.node}
    assert {"conv1", "fc"} <= nodes and "conv2" not in nodes


def test_exclude_by_name_and_op_type(cnn_path: Path, tmp_path: Path):
    report_path = tmp_path / "r.json"
    assert run_cli(cnn_path, "-o", tmp_path / "o.onnx", "--exclude", "Gemm", "--exclude", "conv1",
                   "--report", report_path) == 0
    layers = by_name(read_report(report_path))
    assert layers["conv2"]["skipped"] is None
    assert "--exclude" in layers["conv1"]["skipped"] and "conv1" in layers["conv1"]["skipped"]
    assert "--exclude" in layers["fc"]["skipped"] and "Gemm" in layers["fc"]["skipped"]


@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_pattern_matching_nothing_warns(cnn_path: Path, tmp_path: Path, capsys, flag: str):
    report_path = tmp_path / "r.json"
    assert run_cli(cnn_path, "-o", tmp_path / "o.onnx", flag, "no_such_layer", "--report", report_path) == 0
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "no_such_layer" in shown and "warning" in shown.lower()
    data = read_report(report_path)
    assert any("no_such_layer" in w and flag in w for w in data["warnings"])
    if flag == "--include":  # nothing selected: nothing replaced
        assert all(layer["skipped"] for layer in data["layers"])


def test_valid_pattern_does_not_warn(cnn_path: Path, tmp_path: Path):
    report_path = tmp_path / "r.json"
    assert run_cli(cnn_path, "-o", tmp_path / "o.onnx", "--include", "conv", "--report", report_path) == 0
    assert read_report(report_path)["warnings"] == []


# --- skip reasons -----------------------------------------------------------------------------


def test_no_mac_reduction_is_skipped_unless_force(tmp_path: Path):
    model = matmul_model([2, 6], np.random.default_rng(0).standard_normal((6, 6)))
    path = tmp_path / "mm.onnx"
    onnx.save(model, str(path))
    report_path = tmp_path / "r.json"
    assert run_cli(path, "-o", tmp_path / "o.onnx", "--rank", "1.0", "--report", report_path) == 0
    (layer,) = read_report(report_path)["layers"]
    assert "would not reduce MACs" in layer["skipped"] and "--force" in layer["skipped"]
    assert layer["method"] is None and layer["params_after"] == layer["params_before"] == 36
    assert [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node] == ["MatMul"]

    forced_report = tmp_path / "forced.json"
    assert run_cli(path, "-o", tmp_path / "f.onnx", "--rank", "1.0", "--force", "--report", forced_report) == 0
    (layer,) = read_report(forced_report)["layers"]
    assert layer["skipped"] is None and layer["method"] == "svd"
    assert layer["params_after"] == 72 and layer["macs_after"] >= layer["macs_before"]
    forced = onnx.load(str(tmp_path / "f.onnx"))
    assert [n.op_type for n in forced.graph.node] == ["MatMul", "MatMul"]
    feeds = random_feeds(model)
    assert rel_error(run_ort(forced, feeds)[0], run_ort(model, feeds)[0]) <= 1e-5


@pytest.mark.parametrize("force", [False, True])
def test_depthwise_conv_skipped_with_reason(tmp_path: Path, force: bool):
    path = tmp_path / "dw.onnx"
    onnx.save(cnn_model(seed=1, depthwise=True), str(path))
    report_path = tmp_path / "r.json"
    args = [path, "-o", tmp_path / "o.onnx", "--report", report_path] + (["--force"] if force else [])
    assert run_cli(*args) == 0
    layers = by_name(read_report(report_path))
    assert "depthwise" in layers["dw"]["skipped"]
    assert layers["dw"]["method"] is None and layers["dw"]["params_after"] == layers["dw"]["params_before"]
    assert layers["conv2"]["skipped"] is None
    assert "dw" in {n.name for n in onnx.load(str(tmp_path / "o.onnx")).graph.node}
