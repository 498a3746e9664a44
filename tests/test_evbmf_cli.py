"""`--rank evbmf` through the command line recovers planted ranks, and uses its floor only on noise.

Issue 12: a 256x384 Gemm of planted rank 12 came out at rank 32 (the 1/8 floor overrode what EVBMF
found). Each model here holds three independent layers, one per input, whose weights are a planted
low-rank matrix plus i.i.d. noise:

    weight = U diag(s) V^T + E,   s geometric from 1 down to 0.1 (a decade, like trained layers),
    E ~ N(0, (level * rms(U diag(s) V^T))^2),  so ||E||_F ~ level * ||signal||_F,

scaled to the entry size of a trained layer (rms 1 / sqrt(fan_in)). The ranks are read from the
JSON report written by ``python -m onnxlr compress ... --report r.json`` in a subprocess.
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
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]

# (layer, op, weight shape as stored, planted rank): Gemm B is [K, N]; a transB Gemm stores [N, K].
LAYERS = (
    ("gemm_256x384", "Gemm", (256, 384), 12),
    ("matmul_512x128", "MatMul", (512, 128), 20),
    ("gemm_t_300x300", "GemmT", (300, 300), 7),
)
NOISE_LEVELS = (0.01, 0.02)
SEEDS = (0, 1, 2)
FLOOR_FRACTION = 1 / 8  # onnxlr.ranks.EVBMF_MIN_FRACTION, as the README states it


def planted(shape: tuple[int, int], rank: int, level: float, rng: np.random.Generator):
    rows, cols = shape
    u = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, rank)))[0]
    signal = (u * np.geomspace(1.0, 0.1, rank)) @ v.T
    signal *= (1.0 / np.sqrt(rows)) / np.sqrt(np.mean(signal**2))  # entries like a trained layer
    noise = level * np.sqrt(np.mean(signal**2)) * rng.standard_normal(shape)
    return (signal + noise).astype(np.float32)


def three_layer_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Three independent layers (one input and one output each), built with onnx.helper."""
    nodes, inputs, outputs, inits = [], [], [], []
    for name, op, shape, _ in LAYERS:
        w = weights[name]
        k, n = (shape[1], shape[0]) if op == "GemmT" else shape
        x, y = f"x_{name}", f"y_{name}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, k]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, n]))
        inits.append(numpy_helper.from_array(w, f"w_{name}"))
        if op == "MatMul":
            nodes.append(helper.make_node("MatMul", [x, f"w_{name}"], [y], name=name))
        else:
            nodes.append(helper.make_node("Gemm", [x, f"w_{name}"], [y], name=name,
                                          transB=int(op == "GemmT")))
    graph = helper.make_graph(nodes, "planted", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def compress_evbmf(model: onnx.ModelProto, tmp_path: Path) -> dict[str, dict]:
    """Run the CLI in a fresh process; the JSON report's layers by name."""
    src, out, report = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, str(src))
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "onnxlr", "compress", str(src), "-o", str(out), "--method", "svd",
         "--rank", "evbmf", "--round-to", "1", "--report", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    return {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}


@pytest.mark.parametrize("level", NOISE_LEVELS)
@pytest.mark.parametrize("seed", SEEDS)
def test_cli_evbmf_returns_the_planted_ranks(seed, level, tmp_path):
    rng = np.random.default_rng(seed)
    weights = {name: planted(shape, rank, level, rng) for name, _, shape, rank in LAYERS}
    layers = compress_evbmf(three_layer_model(weights), tmp_path)
    for name, _, shape, rank in LAYERS:
        layer = layers[name]
        assert layer["skipped"] is None, layer
        assert layer["ranks"] == layer["raw_ranks"] == {"rank": rank}, (name, layer)
        note = " ".join(layer["notes"])
        assert f"found rank {rank} of {min(shape)}" in note and f"using rank {rank}." in note
        assert "floor" not in note


def test_cli_evbmf_on_pure_noise_uses_the_floor_never_zero(tmp_path):
    rng = np.random.default_rng(3)
    weights = {
        name: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        for name, _, shape, _ in LAYERS
    }
    layers = compress_evbmf(three_layer_model(weights), tmp_path)
    for name, _, shape, _ in LAYERS:
        layer = layers[name]
        floor = int(np.ceil(min(shape) * FLOOR_FRACTION))
        assert layer["ranks"] == layer["raw_ranks"] == {"rank": floor}, (name, layer)
        note = " ".join(layer["notes"])
        assert "no signal" in note and f"no-signal floor, rank {floor}" in note, note
