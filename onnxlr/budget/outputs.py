"""Model outputs and errors the budget measures: the outputs errors are taken on (the logits of
Softmax outputs), the relative L2 error between two runs, and the prepared model with chosen layers
replaced (:func:`build_model`: the object the planner measures is the object the writer writes)."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxlr import model as g
from onnxlr import runtime
from onnxlr.model.opset import default_opset
from onnxlr.model.splice import splice
from onnxlr.model.targets import find_targets

#: A Softmax output saturates: errors in the logits of confident positions vanish from the
#: probabilities. Damages and output errors are measured on its input (the logits) instead.
ERROR_ON_LOGITS = True


def run_outputs(model: bytes | onnx.ModelProto, feeds: list, extra: dict | None = None) -> list[np.ndarray]:
    """Every graph output (then the ``extra`` tensors, name -> dtype) over all ``feeds``,
    concatenated."""
    if extra:  # expose_outputs works on a copy: a model passed in is not changed
        model = g.expose_outputs(onnx.load_from_string(model) if isinstance(model, bytes) else model, extra)
    session = runtime.make_session(model)
    names = [o.name for o in session.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for i, out in enumerate(session.run(names, feed)):
            parts[i].append(np.asarray(out))
    outs = []
    for p in parts:
        try:
            outs.append(np.concatenate(p) if p[0].ndim else p[0])
        except ValueError:
            outs.append(np.concatenate([x.ravel() for x in p]))
    return outs


def softmax_logits(model: onnx.ModelProto) -> dict:
    """{Softmax input name: dtype} for every graph output made by a Softmax (through Identity
    nodes), when :data:`ERROR_ON_LOGITS`; else {}."""
    if not ERROR_ON_LOGITS:
        return {}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Softmax":
            found[node.input[0]] = out.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    return found


def scored_outputs(plan, model: bytes | onnx.ModelProto, feeds: list) -> list[np.ndarray]:
    """The outputs errors are measured on: the graph outputs, or the logits of Softmax outputs
    (:func:`logits_or_outputs`), as many as the plan's model has."""
    if not plan.logits:
        return run_outputs(model, feeds)
    return logits_or_outputs(model, feeds, expected=len(plan.logits))


def logits_or_outputs(model: bytes | onnx.ModelProto, feeds: list, expected: int | None = None) -> list[np.ndarray]:
    """The logits of ``model``'s Softmax outputs (:func:`softmax_logits`), or its graph outputs
    where it has none; ``expected``: how many Softmax outputs it must have.

    The logits are found in ``model`` itself, in graph-output order: a tensor name of the plan's
    model need not survive in the models it scores (onnxruntime's quantization pre-processing
    removes the Identity between PP-OCRv6's logits and its Softmax, and the name with it)."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    logits = softmax_logits(proto)
    if expected is not None and len(logits) != expected:
        raise ValueError(f"the scored model has {len(logits)} Softmax output(s), the plan's {expected}")
    return run_outputs(proto, feeds, logits)[-len(logits):] if logits else run_outputs(proto, feeds)


def output_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Relative L2 error over all float outputs together."""
    return math.sqrt(float(np.sum(sample_errors2(reference, candidate, 1))))


def sample_errors2(reference: list[np.ndarray], candidate: list[np.ndarray], samples: int) -> np.ndarray:
    """``output_error(reference, candidate) ** 2`` split into ``samples`` parts (their sum), one per
    sample where the outputs' first axis is the samples (else contiguous chunks of equal size):
    what a paired comparison of two candidates on the same samples needs."""
    num, den = np.zeros(samples), 0.0
    for a, b in zip(reference, candidate):
        if not np.issubdtype(a.dtype, np.floating):
            continue
        a64 = a.astype(np.float64)
        diff2 = (a64 - b.astype(np.float64)) ** 2
        if diff2.ndim and diff2.shape[0] == samples:
            num += diff2.reshape(samples, -1).sum(axis=1)
        else:
            num += [float(np.sum(x)) for x in np.array_split(diff2.ravel(), samples)]
        den += float(np.sum(a64**2))
    if den > 0:
        return num / den
    return np.where(num == 0, 0.0, np.inf)


def build_model(plan, choice: dict) -> onnx.ModelProto:
    """The prepared model with the chosen layers replaced."""
    model = onnx.load_from_string(plan.base)
    targets = find_targets(model, {})
    names = g.NameScope(g.all_names(model))
    opset = default_opset(model)
    for index in sorted(choice):  # graph order, as the pipeline splices: the same names
        splice(targets[index], choice[index].replacement, names, opset, model.ir_version)
    return model


def quantize_built(model: onnx.ModelProto, quantize, calib, samples: int | None) -> onnx.ModelProto:
    """``model`` quantized exactly as compress quantizes its output (:func:`onnxlr.quant.quantize_on`
    on the same --calib data and sample limit: the same calibration feeds, the same layers kept in
    float)."""
    from onnxlr.quant import quantize_on

    quantized, _ = quantize_on(model, quantize, calib, samples)
    return quantized


def build_shipped(plan, choice: dict) -> onnx.ModelProto:
    """The model the pipeline writes for ``choice``: built (the plan's candidates come balanced
    for int8), then quantized as compress quantizes it when the plan is for int8."""
    model = build_model(plan, choice)
    if plan.quantize is None:
        return model
    return quantize_built(model, plan.quantize, plan.quant_calib, plan.quant_samples)
