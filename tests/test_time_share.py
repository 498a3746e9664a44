"""tools/time_share.py, the profile that bounds what factorization can buy (README: the int8
shares that cap issue #15's goal), on the bundled model and its int8 QDQ version."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest

from onnxlr.quant import QuantizeConfig, quantize_on

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_vgg.onnx"
DATA = ROOT / "models" / "digits_vgg_calib.npz"


@pytest.fixture(scope="module")
def time_share():
    spec = importlib.util.spec_from_file_location("time_share", ROOT / "tools" / "time_share.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_int8_model_is_grouped_by_its_float_model_targets(tmp_path, time_share):
    quantized, _ = quantize_on(onnx.load(str(MODEL)), QuantizeConfig(), str(DATA), 16)
    int8 = tmp_path / "int8.onnx"
    onnx.save(quantized, int8)
    fp32 = time_share.profile(MODEL, 3, 1, DATA)
    grouped = time_share.profile(int8, 3, 1, DATA, targets_from=MODEL)
    alone = time_share.profile(int8, 3, 1, DATA)
    for result in (fp32, grouped, alone):
        assert sum(result["share"].values()) == pytest.approx(1.0)
        assert result["bound_speedup"] >= 1.0
    assert fp32["share"]["factorizable"] > 0.5  # a VGG: its convs and classifier are the time
    assert grouped["share"]["factorizable"] > 0.3  # QLinearConv kernels traced back to the float convs
    assert alone["share"]["factorizable"] == 0.0  # its weights come from DequantizeLinear: no targets


def test_the_command_line_prints_the_table_and_writes_json(tmp_path, time_share, capsys):
    out = tmp_path / "shares.json"
    assert time_share.main([f"{MODEL}={DATA}", "--runs", "2", "--json", str(out)]) == 0
    assert "factorizable" in capsys.readouterr().out and out.stat().st_size > 0
