"""Opsets: what the installed onnxruntime runs, and converting a model to another opset."""

from __future__ import annotations

import functools
import re

import onnx

from onnxlr.errors import OnnxlrError
from onnxlr.model.query import iter_graphs

_OPSET_PROBE = 10_000


@functools.cache
def runtime_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime accepts (probed once).

    onnxruntime rejects a model whose opset is newer than it knows, saying "... support for domain
    ai.onnx is till opset M"; a tiny Identity model at an absurd opset makes it say M. If the
    message ever changes, fall back to the onnx package's own newest opset.
    """
    import onnxruntime as ort

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", _OPSET_PROBE)])
    probe.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        found = re.search(r"till opset (\d+)", str(exc))
        if found:
            return int(found.group(1))
    return onnx.defs.onnx_opset_version()


def check_runtime_opset(model: onnx.ModelProto, target_opset: int | None = None) -> None:
    """Refuse what the installed onnxruntime could not load: the model's default-domain opset or,
    when the model is to be converted first, the target opset."""
    import onnxruntime as ort

    top = runtime_max_opset()
    if target_opset is not None:
        if target_opset > top:
            raise OnnxlrError(
                f"--target-opset {target_opset} is newer than onnxruntime {ort.__version__} "
                f"supports (up to {top}): use --target-opset {top} or upgrade onnxruntime"
            )
        return
    used = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), None)
    if used is not None and used > top:
        raise OnnxlrError(
            f"the model uses opset {used}; onnxruntime {ort.__version__} supports up to {top}: "
            f"use --target-opset {top} or upgrade onnxruntime"
        )


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def convert_opset(model: onnx.ModelProto, target_opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    current = default_opset(model)
    if current == target_opset:
        return model
    try:
        converted = version_converter.convert_version(model, target_opset)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrError(
            f"cannot convert the model from opset {current} to {target_opset}: {first}; try another --target-opset"
        ) from None
    raise_ir_version(converted)
    return converted


def raise_ir_version(model: onnx.ModelProto) -> None:
    """The version converter keeps the old IR version; stamp the one the new opset needs.

    Crossing IR 4 changes what an initializer listed in graph.input means (a constant before, an
    overridable default after), so those weights leave graph.input: they were constants.
    """
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version >= needed:
        return
    if model.ir_version < 4 <= needed:
        for graph in iter_graphs(model.graph):
            weights = {t.name for t in graph.initializer}
            kept = [vi for vi in graph.input if vi.name not in weights]
            del graph.input[:]
            graph.input.extend(kept)
    model.ir_version = needed
