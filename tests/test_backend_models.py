"""The Conv / Linear / mm test models shipped inside the onnx wheel, compressed at full rank.

``onnx/backend/test/data/pytorch-converted`` and ``pytorch-operator`` hold small models exported
by an old PyTorch: IR version 3, opset 6, every initializer also listed as a graph input, and one
or more ``test_data_set_N`` folders with stored inputs and the outputs PyTorch computed. Every such
model with a Conv, Gemm or MatMul node is discovered here (ConvTranspose is not a target) and
compressed with ``rank=1.0, force=True``: at full rank the factorized chain computes the same
function, so the compressed model must reproduce the stored outputs.

Three of them (test_Linear, test_operator_addmm, test_operator_mm) use Gemm at opset 6, for which
onnxruntime has no kernel: even the unmodified model fails to load ("Could not find an
implementation for Gemm(6)"). onnxlr keeps the model's opset by default, so the compressed model
fails in the same way; ``target_opset`` (``--target-opset``) runs onnx's version converter first,
and at opset 7 both the converted original and the compressed model reproduce the stored outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, version_converter

import onnxlr
from onnxlr.cli import main as cli_main

ort = pytest.importorskip("onnxruntime")

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("pytorch-converted", "pytorch-operator")
TARGET_OPS = {"Conv", "Gemm", "MatMul"}

# Relative error allowed against the stored outputs: max |got - want| / max |want| per output.
# Element-wise rtol alone is meaningless for outputs near zero, so the absolute part of the
# tolerance is scaled by the output's magnitude (float32 full-rank factors land near 1e-7).
MAX_REL_ERROR = 1e-4

# Models whose Gemm is opset 6: onnxruntime has no kernel for it, original included.
NEEDS_TARGET_OPSET = {"test_Linear", "test_operator_addmm", "test_operator_mm"}
# The smallest opset with an onnxruntime Gemm kernel (and the lowest ORT guarantees to support).
TARGET_OPSET = 7

# Layers expected to be kept, with a phrase their skip reason must contain. Every other
# Conv / Gemm / MatMul of every discovered model must be replaced.
EXPECTED_SKIPS = {
    "test_Conv2d_depthwise": ["depthwise"],
    "test_Conv2d_depthwise_padded": ["depthwise"],
    "test_Conv2d_depthwise_strided": ["depthwise"],
    "test_Conv2d_depthwise_with_multiplier": ["depthwise"],
    # mm / addmm multiply two run-time inputs: there is no constant weight to factorize.
    "test_operator_addmm": ["graph input", "graph input"],
    "test_operator_mm": ["graph input"],
}

# Names that must be discovered, so that a change in the wheel's layout fails loudly instead of
# silently testing nothing.
MUST_FIND = {
    "test_Conv1d",
    "test_Conv2d",
    "test_Conv3d",
    "test_Conv2d_depthwise",
    "test_Conv2d_groups",
    "test_Linear",
    "test_Linear_no_bias",
    "test_operator_conv",
    "test_operator_mm",
    "test_operator_addmm",
}


# --- discovery ------------------------------------------------------------------------------


def discover_backend_models() -> list[Path]:
    """Every backend test model directory whose graph has a Conv, Gemm or MatMul node."""
    found = []
    for suite in SUITES:
        for directory in sorted((DATA / suite).glob("test_*")):
            model_path = directory / "model.onnx"
            if not model_path.is_file():
                continue
            model = onnx.load(str(model_path))
            if any(node.op_type in TARGET_OPS for node in model.graph.node):
                found.append(directory)
    return found


MODEL_DIRS = discover_backend_models()


def load_data_sets(directory: Path) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """(inputs, outputs) of every stored test_data_set_N, in index order."""
    return [
        (_read_tensors(data_set, "input"), _read_tensors(data_set, "output"))
        for data_set in sorted(directory.glob("test_data_set_*"), key=_pb_index)
    ]


def _read_tensors(data_set: Path, kind: str) -> list[np.ndarray]:
    files = sorted(data_set.glob(f"{kind}_*.pb"), key=_pb_index)
    return [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]


def _pb_index(path: Path) -> int:
    return int(path.stem.rpartition("_")[2])


# --- running --------------------------------------------------------------------------------


def session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # opset-6 models draw a legacy-support warning on every load
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    sess = session(model)
    # Positional: the first len(inputs) graph inputs that are not initializers (IR 3 lists both).
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    assert len(names) == len(inputs), (names, len(inputs))
    return sess.run(None, dict(zip(names, inputs)))


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = (
        float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        if want.size
        else 0.0
    )
    return diff / scale if scale > 0 else diff


def assert_reproduces(model: onnx.ModelProto, directory: Path, label: str) -> float:
    """Run every stored data set; returns the largest relative error over all outputs."""
    worst = 0.0
    for inputs, outputs in load_data_sets(directory):
        got = run(model, inputs)
        assert len(got) == len(outputs)
        for i, (g, w) in enumerate(zip(got, outputs)):
            assert g.shape == w.shape, f"{label}: output {i} shape {g.shape} != stored {w.shape}"
            scale = float(np.max(np.abs(w))) if w.size else 1.0
            np.testing.assert_allclose(
                g,
                w,
                rtol=MAX_REL_ERROR,
                atol=MAX_REL_ERROR * scale,
                err_msg=f"{directory.name} ({label}): output {i} differs from the stored output",
            )
            worst = max(worst, rel_error(g, w))
    return worst


def ort_load_error(model: onnx.ModelProto) -> str | None:
    try:
        session(model)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's pybind errors
        return str(exc)
    return None


def check_ir3_consistency(model: onnx.ModelProto) -> None:
    """IR < 4: every initializer must also be declared as a graph input."""
    if model.ir_version < 4:
        inputs = {vi.name for vi in model.graph.input}
        missing = [t.name for t in model.graph.initializer if t.name not in inputs]
        assert not missing, (
            f"initializers not declared as inputs in an IR {model.ir_version} model: {missing}"
        )


def check_report(name: str, original: onnx.ModelProto, compressed: onnx.ModelProto, report) -> None:
    n_targets = sum(node.op_type in TARGET_OPS for node in original.graph.node)
    assert len(report.layers) == n_targets, [layer.name for layer in report.layers]
    expected = list(EXPECTED_SKIPS.get(name, []))
    skipped = [layer for layer in report.layers if layer.skipped]
    assert len(skipped) == len(expected), [(layer.name, layer.skipped) for layer in skipped]
    for layer, phrase in zip(skipped, expected):
        assert phrase in layer.skipped, (layer.name, layer.skipped)
    replaced = [layer for layer in report.layers if not layer.skipped]
    assert len(report.replaced) == len(replaced) == n_targets - len(expected)
    if replaced:
        # the replaced weights are gone, from the initializers and from the IR-3 input list
        still_read = {name for node in compressed.graph.node for name in node.input}
        names_left = {t.name for t in compressed.graph.initializer} | {
            vi.name for vi in compressed.graph.input
        }
        replaced_outputs = {layer.output for layer in replaced}
        for node in original.graph.node:
            if node.op_type in TARGET_OPS and node.output[0] in replaced_outputs:
                weight = node.input[1]
                assert weight in still_read or weight not in names_left, (
                    f"stale weight {weight!r} left behind"
                )
    else:
        assert len(compressed.graph.node) == len(original.graph.node)


# --- tests ----------------------------------------------------------------------------------


def test_discovery_finds_the_backend_models():
    names = {d.name for d in MODEL_DIRS}
    assert MUST_FIND <= names, sorted(MUST_FIND - names)
    assert not any("ConvTranspose" in n or "convtranspose" in n for n in names)
    assert NEEDS_TARGET_OPSET <= names
    assert set(EXPECTED_SKIPS) <= names


@pytest.mark.parametrize("directory", MODEL_DIRS, ids=[d.name for d in MODEL_DIRS])
def test_backend_model_compresses_at_full_rank(directory: Path):
    name = directory.name
    original = onnx.load(str(directory / "model.onnx"))
    compressed, report = onnxlr.compress(
        directory / "model.onnx", rank="1.0", force=True, round_to=1
    )

    onnx.checker.check_model(compressed, full_check=True)
    assert compressed.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in compressed.opset_import] == [
        (o.domain, o.version) for o in original.opset_import
    ]
    check_ir3_consistency(compressed)
    check_report(name, original, compressed, report)

    if name in NEEDS_TARGET_OPSET:
        # No Gemm(6) kernel in onnxruntime: the original fails to load, and the compressed model
        # (same opset) fails the same way rather than in some new way.
        original_error = ort_load_error(original)
        if original_error is None:  # a future onnxruntime with a Gemm(6) kernel
            assert_reproduces(original, directory, "original")
            assert_reproduces(compressed, directory, "compressed")
            return
        assert "Could not find an implementation for Gemm(6)" in original_error
        compressed_error = ort_load_error(compressed)
        assert (
            compressed_error is not None
            and "Could not find an implementation for Gemm(6)" in compressed_error
        )
        # The opset-6 chain itself (Gemm with broadcast=1 for the bias) is still right: raised
        # to opset 7 after compression, it reproduces the stored outputs.
        raised = version_converter.convert_version(compressed, TARGET_OPSET)
        assert_reproduces(
            raised, directory, f"compressed at opset 6, then converted to {TARGET_OPSET}"
        )
        return

    assert ort_load_error(original) is None
    assert_reproduces(original, directory, "original")
    assert_reproduces(compressed, directory, "compressed")


@pytest.mark.parametrize("name", sorted(NEEDS_TARGET_OPSET))
def test_opset6_gemm_models_run_with_target_opset(name: str):
    directory = next(d for d in MODEL_DIRS if d.name == name)
    original = onnx.load(str(directory / "model.onnx"))

    converted = version_converter.convert_version(original, TARGET_OPSET)
    onnx.checker.check_model(converted, full_check=True)
    assert_reproduces(converted, directory, f"original converted to opset {TARGET_OPSET}")

    compressed, report = onnxlr.compress(
        directory / "model.onnx", rank="1.0", force=True, round_to=1, target_opset=TARGET_OPSET
    )
    onnx.checker.check_model(compressed, full_check=True)
    assert compressed.ir_version == original.ir_version  # the converter keeps IR 3
    assert [o.version for o in compressed.opset_import if o.domain in ("", "ai.onnx")] == [
        TARGET_OPSET
    ]
    check_ir3_consistency(compressed)
    check_report(name, original, compressed, report)
    assert_reproduces(compressed, directory, f"compressed at opset {TARGET_OPSET}")


def test_linear_with_later_target_opset():
    """At opset >= 11 Gemm's C is optional: the chain must still reproduce the outputs."""
    directory = next(d for d in MODEL_DIRS if d.name == "test_Linear")
    compressed, report = onnxlr.compress(
        directory / "model.onnx", rank="1.0", force=True, round_to=1, target_opset=13
    )
    onnx.checker.check_model(compressed, full_check=True)
    assert len(report.replaced) == 1
    assert_reproduces(compressed, directory, "compressed at opset 13")


# --- the CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, extra",
    [
        ("test_Conv2d", []),
        ("test_Conv3d_groups", []),
        ("test_Conv2d_depthwise", []),
        ("test_Linear", ["--target-opset", str(TARGET_OPSET)]),
    ],
)
def test_cli_compress(tmp_path: Path, capsys, name: str, extra: list[str]):
    directory = next(d for d in MODEL_DIRS if d.name == name)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    rc = cli_main(
        [
            "compress",
            str(directory / "model.onnx"),
            "-o",
            str(out),
            "--rank",
            "1.0",
            "--force",
            "--report",
            str(report_path),
            *extra,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    compressed = onnx.load(str(out))
    onnx.checker.check_model(compressed, full_check=True)
    assert compressed.ir_version == 3
    check_ir3_consistency(compressed)
    layers = json.loads(report_path.read_text())["layers"]
    if name in EXPECTED_SKIPS:
        assert all(layer["skipped"] and "depthwise" in layer["skipped"] for layer in layers)
    else:
        assert all(layer["skipped"] is None for layer in layers)
    assert_reproduces(compressed, directory, "compressed by the CLI")


def test_cli_verify_of_an_opset6_gemm_model_says_why_it_cannot_run(tmp_path: Path, capsys):
    """What a user sees when onnxruntime cannot load a model because of its opset."""
    directory = next(d for d in MODEL_DIRS if d.name == "test_Linear")
    out = tmp_path / "linear.onnx"
    assert (
        cli_main(
            ["compress", str(directory / "model.onnx"), "-o", str(out), "--rank", "1.0", "--force"]
        )
        == 0
    )
    capsys.readouterr()
    rc = cli_main(["verify", str(directory / "model.onnx"), str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("onnxlr: error:") and "Gemm(6)" in err, err


# --- the Transpose-fed weight of test_Linear_no_bias, on small inline models -------------------


def _transpose_matmul_model(consumers: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(
        rng.standard_normal((6, 5)).astype(np.float32), "W"
    )  # [out, in]
    nodes = [helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0], name="T")]
    outputs = []
    for i in range(consumers):
        nodes.append(helper.make_node("MatMul", ["x", "WT"], [f"y{i}"], name=f"mm{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [3, 6]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        outputs,
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_transpose_fed_weight_is_read_through_and_removed():
    model = _transpose_matmul_model(consumers=1)
    compressed, report = onnxlr.compress(model, rank="1.0", force=True, round_to=1)
    assert len(report.replaced) == 1 and report.layers[0].weight_shape == [5, 6]
    assert [n.op_type for n in compressed.graph.node] == ["MatMul", "MatMul"]
    assert "W" not in {t.name for t in compressed.graph.initializer}
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(run(compressed, [x])[0], run(model, [x])[0], rtol=1e-5, atol=1e-5)


def test_transpose_fed_weight_shared_by_two_layers_is_kept():
    model = _transpose_matmul_model(consumers=2)
    compressed, report = onnxlr.compress(model, rank="1.0", force=True, round_to=1)
    assert not report.replaced
    assert all("Transpose" in layer.skipped for layer in report.layers)
    assert [n.op_type for n in compressed.graph.node] == ["Transpose", "MatMul", "MatMul"]
