"""Compare a candidate model with its reference on the same inputs, output by output.

Both models run in onnxruntime on identical feeds (seeded random data, or an .npz of real
samples; see :mod:`onnxlr.runtime`). For each reference output ``a`` and the candidate's output
``b`` of the same name, over all samples:

* ``max_abs_error``  = max |a - b|,  ``mean_abs_error`` = mean |a - b|
* ``rel_error``      = ||a - b||_2 / ||a||_2   (relative L2 error; 0 when both are all-zero)
* ``cosine``         = <a, b> / (||a|| ||b||)  (1 when both are all-zero)
* for outputs that, as actually produced, are ``[N, C]`` with ``C > 1`` once the size-1 axes after
  the first are dropped (class scores): ``top1`` = fraction of rows whose argmax agrees, and
  ``top5`` (when ``C > 5``) = fraction of rows whose reference argmax is among the candidate's
  five highest scores.

The check passes when every output's ``rel_error <= max_rel_error`` (default
:data:`DEFAULT_MAX_REL_ERROR`; ``None`` turns it off) and, when ``min_top1`` is given, every
class-score output's ``top1 >= min_top1``. NaN never passes.

``per_layer=True`` also measures the intermediate tensors that both models produce under one name
but that the candidate computes differently (another op, other inputs, or other constant values):
the replaced layers, whose output names compression keeps. Both models are copied in memory with
those tensors added as graph outputs, so per-layer needs each model to fit in one protobuf (2 GB).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxlr import data, runtime
from onnxlr import model as graph
from onnxlr.errors import OnnxlrError
from onnxlr.report.tables import format_rows

log = logging.getLogger("onnxlr")

#: Relative L2 error allowed on every output by default: far above float32 reordering noise
#: (about 1e-6), tight enough that a visibly damaged model fails. Lossy compression usually
#: needs a looser bound or ``min_top1`` chosen from the application's accuracy budget.
DEFAULT_MAX_REL_ERROR = 1e-2
#: Random samples drawn when no data file is given.
DEFAULT_SAMPLES = 16
#: Samples per run when the batch dim is dynamic.
DEFAULT_CHUNK = 32


@dataclass
class OutputStats:
    """Differences of one output (or intermediate tensor) over all samples."""

    name: str
    shape: list[int]  # as produced for the first feed, not as declared
    dtype: str
    max_abs_error: float
    mean_abs_error: float
    rel_error: float
    cosine: float
    top1: float | None = None
    top5: float | None = None
    mismatch: str | None = None  # why the values could not be compared (shapes differ)


@dataclass
class LayerError:
    """Error of one replaced layer's output tensor (``--per-layer``)."""

    tensor: str
    reference_op: str
    candidate_op: str
    rel_error: float
    max_abs_error: float
    cosine: float


@dataclass
class VerifyResult:
    """Truthy iff every check passed. Render with :meth:`to_table` or :meth:`to_dict`."""

    reference: str
    candidate: str
    providers: list[str]
    inputs: dict
    tolerances: dict
    outputs: list[OutputStats] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.failures

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def smallest_passing_tolerance(self) -> dict:
        """The loosest values observed: the tolerances at which this comparison just passes."""
        rel = [o.rel_error for o in self.outputs]
        top1 = [o.top1 for o in self.outputs if o.top1 is not None]
        return {
            "max_rel_error": _worst(rel, max) if rel else 0.0,
            "min_top1": _worst(top1, min) if top1 else None,
        }

    def to_dict(self) -> dict:
        d = {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "providers": self.providers,
            "inputs": self.inputs,
            "tolerances": self.tolerances,
            "smallest_passing_tolerance": self.smallest_passing_tolerance,
            "outputs": [asdict(o) for o in self.outputs],
            "layers": [asdict(layer) for layer in self.layers],
            "failures": list(self.failures),
        }
        return _json_safe(d)

    def to_table(self) -> str:
        rows = [
            [o.name, _dims(o.shape), _g(o.max_abs_error), _g(o.mean_abs_error), _g(o.rel_error),
             _g(o.cosine, 6), _pct(o.top1), _pct(o.top5)]
            for o in self.outputs
        ]
        text = format_table(
            ["output", "shape", "max abs err", "mean abs err", "rel L2 err", "cosine", "top-1",
             "top-5"],
            rows,
        )
        if self.layers:
            rows = [
                [str(i), layer.tensor, _op(layer), _g(layer.rel_error), _g(layer.max_abs_error),
                 _g(layer.cosine, 6)]
                for i, layer in enumerate(self.layers, 1)
            ]
            text += "\n\nper layer (graph order):\n" + format_table(
                ["#", "tensor", "op (ref -> cand)", "rel L2 err", "max abs err", "cosine"], rows
            )
        tol = self.smallest_passing_tolerance
        loosest = f"max-rel-error {_g(tol['max_rel_error'])}"
        if tol["min_top1"] is not None:
            loosest += f", min-top1 {tol['min_top1']:.4g}"
        verdict = "PASSED" if self.passed else "FAILED"
        text += f"\n\n{verdict} ({self.inputs['samples']} samples, {self.inputs['source']}); "
        text += f"smallest passing tolerance: {loosest}"
        return text


def verify(
    reference: runtime.ModelLike,
    candidate: runtime.ModelLike,
    *,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    int_range: tuple[int, int] = (0, 100),
    provider: str = "cpu",
    provider_options: Mapping[str, str] | Sequence[str] | None = None,
    max_rel_error: float | None = DEFAULT_MAX_REL_ERROR,
    min_top1: float | None = None,
    per_layer: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output by name.

    ``reference``/``candidate``: paths or ``ModelProto``\\ s. ``inputs``: an .npz path or a dict
    ``name -> array`` with samples stacked on the first axis; without it, ``samples`` seeded random
    draws of each input's shape (``shapes`` overrides, other dynamic dims 1; integers in
    ``int_range`` = ``[lo, hi)``). ``provider_options`` go to the provider, e.g. ``{"use_tf32": "0"}``
    on CUDA. Raises ``OnnxlrError`` on bad models, options or data.
    """
    _check_tolerances(max_rel_error, min_top1)
    providers = runtime.resolve_provider(provider, provider_options)
    ref_label, cand_label = runtime.model_label(reference), runtime.model_label(candidate)
    ref_sess = runtime.make_session(reference, providers=providers)
    cand_sess = runtime.make_session(candidate, providers=providers)
    specs = runtime.input_specs(ref_sess)
    runtime.check_same_inputs(specs, runtime.input_specs(cand_sess), cand_label)

    source = data.open_source(inputs, specs, shapes=shapes, samples=samples, seed=seed, int_range=int_range)
    feeds = list(data.batches(source, specs, chunk))
    if not feeds:
        raise OnnxlrError(f"{source.label} holds no samples")
    count = sum(data.sample_rows(f, specs) for f in feeds)
    log.info("feeding %d sample(s) in %d run(s) per model", count, len(feeds))
    info = {"source": source.label, "samples": count, "feed_shapes": {k: list(v.shape) for k, v in feeds[0].items()}}
    if inputs is None:
        info.update(seed=seed, int_range=list(int_range))

    names = [o.name for o in ref_sess.get_outputs()]
    cand_names = {o.name for o in cand_sess.get_outputs()}
    missing = [n for n in names if n not in cand_names]
    if missing:
        raise OnnxlrError(
            f"{cand_label} lacks output(s) {', '.join(missing)} of {ref_label}; a candidate must "
            f"keep every output name of its reference"
        )
    outputs = _compare(ref_sess, cand_sess, names, feeds, ref_label, cand_label)

    result = VerifyResult(
        reference=ref_label,
        candidate=cand_label,
        providers=list(cand_sess.get_providers()),
        inputs=info,
        tolerances={"max_rel_error": max_rel_error, "min_top1": min_top1},
        outputs=outputs,
    )
    result.failures = _failures(outputs, max_rel_error, min_top1)
    if per_layer:
        del ref_sess, cand_sess  # one pair of sessions alive at a time
        result.layers = _per_layer(reference, candidate, providers, feeds)
    return result


def parse_tolerance(text: str) -> float | None:
    """A tolerance flag: a number >= 0, or ``none``/``off`` to turn the check off."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise OnnxlrError(f"bad tolerance {text!r}; give a number >= 0, or 'none' to turn it off")
    return value


# --- comparison -----------------------------------------------------------------------------


class _Diff:
    """Accumulates the statistics of one tensor pair over feeds without keeping the tensors."""

    def __init__(self, name: str, batch_first: bool = True):
        self.name = name
        # False when axis 0 of the output is not its batch (a recurrent state [2, batch, H]):
        # no top-k there, whatever its shape.
        self.batch_first = batch_first
        self.shape: list[int] | None = None
        self.dtype = ""
        self.count = 0
        self.sum_abs = self.max_abs = 0.0
        self.ss_ref = self.ss_cand = self.ss_diff = self.dot = 0.0
        self.rows = self.top1_hits = self.top5_hits = 0
        self.classes: int | None = None
        self.mismatch: str | None = None

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref, cand = np.asarray(ref), np.asarray(cand)
        if self.shape is None:
            self.shape, self.dtype = list(ref.shape), str(ref.dtype)
            self.classes = _class_count(ref.shape) if self.batch_first else None
        elif self.classes and _class_count(ref.shape) != self.classes:
            self.classes, self.rows = None, 0  # not [N, C] in every feed: not class scores
        if ref.shape != cand.shape:
            self.mismatch = self.mismatch or (
                f"candidate shape {_dims(cand.shape)} differs from reference {_dims(ref.shape)}"
            )
            return
        if ref.dtype == object or cand.dtype == object:  # strings: exact match only
            if not np.array_equal(ref, cand):
                self.mismatch = self.mismatch or "string values differ"
            return
        a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
        # NaN/inf where both models give the same non-finite value agree; elsewhere they poison
        # the statistics (NaN fails every tolerance).
        agree = ~np.isfinite(a) & ((a == b) | (np.isnan(a) & np.isnan(b)))
        if agree.any():
            a, b = np.where(agree, 0.0, a), np.where(agree, 0.0, b)
        d = np.abs(a - b)
        if d.size:
            m = float(d.max())
            self.max_abs = math.nan if math.isnan(m + self.max_abs) else max(self.max_abs, m)
        self.count += d.size
        self.sum_abs += float(d.sum())
        self.ss_diff += float(d @ d)
        self.ss_ref += float(a @ a)
        self.ss_cand += float(b @ b)
        self.dot += float(a @ b)
        if self.classes:
            n = ref.shape[0]
            r2, c2 = a.reshape(n, self.classes), b.reshape(n, self.classes)
            truth = r2.argmax(axis=1)
            self.rows += n
            self.top1_hits += int((c2.argmax(axis=1) == truth).sum())
            if self.classes > 5:
                top5 = np.argpartition(-c2, 5, axis=1)[:, :5]
                self.top5_hits += int((top5 == truth[:, None]).any(axis=1).sum())

    def stats(self) -> OutputStats:
        if self.mismatch:
            nan = math.nan
            return OutputStats(self.name, self.shape or [], self.dtype, nan, nan, math.inf, nan,
                               mismatch=self.mismatch)
        rel = _ratio(math.sqrt(self.ss_diff), math.sqrt(self.ss_ref))
        norms = math.sqrt(self.ss_ref) * math.sqrt(self.ss_cand)
        if norms == 0:
            cosine = 1.0 if self.ss_ref == self.ss_cand == 0 else 0.0
        else:
            cosine = self.dot / norms
        top1 = self.top1_hits / self.rows if self.rows else None
        top5 = self.top5_hits / self.rows if self.rows and (self.classes or 0) > 5 else None
        return OutputStats(
            name=self.name,
            shape=self.shape or [],
            dtype=self.dtype,
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / self.count if self.count else 0.0,
            rel_error=rel,
            cosine=cosine,
            top1=top1,
            top5=top5,
        )


def _class_count(shape: Sequence[int]) -> int | None:
    """C when ``shape`` is [N, C] (C > 1) after dropping the size-1 axes past the first."""
    rest = [d for d in shape[1:] if d != 1]
    return rest[0] if len(shape) >= 2 and len(rest) == 1 and rest[0] > 1 else None


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _batch_first(declared: Sequence | None, rows: int | None) -> bool:
    """Whether axis 0 of an output declared ``declared`` (onnxruntime's shape: ints, names or
    None) may be its batch axis: not when axis 0 is fixed and a later axis is dynamic (a state
    [2, batch, H]), or axis 0 is fixed at another size than the ``rows`` samples per feed."""
    if not declared or not isinstance(declared[0], int):
        return True
    if any(not isinstance(d, int) for d in declared[1:]):
        return False
    return rows is None or declared[0] == rows


def _compare(ref_sess, cand_sess, names, feeds, ref_label, cand_label) -> list[OutputStats]:
    """Run both sessions on every feed and compare the tensors ``names``."""
    declared = {o.name: o.shape for o in ref_sess.get_outputs()}
    specs = runtime.input_specs(ref_sess)
    batched = feeds and any(axis is not None for axis in data.batch_axes(specs).values())
    rows = data.sample_rows(feeds[0], specs) if batched else None  # None: the inputs have no batch axis
    diffs = [_Diff(n, _batch_first(declared.get(n), rows)) for n in names]
    for feed in feeds:
        ref_out = runtime.run_session(ref_sess, feed, names, ref_label)
        cand_out = runtime.run_session(cand_sess, feed, names, cand_label)
        for diff, a, b in zip(diffs, ref_out, cand_out):
            diff.update(a, b)
    return [d.stats() for d in diffs]


def _failures(outputs, max_rel_error, min_top1) -> list[str]:
    failures = []
    if min_top1 is not None and not any(o.top1 is not None for o in outputs):
        raise OnnxlrError(
            "--min-top1 needs an output of class scores shaped [N, C]; this model has none "
            f"({', '.join(f'{o.name} {_dims(o.shape)}' for o in outputs)})"
        )
    for o in outputs:
        if o.mismatch:
            failures.append(f"output {o.name!r}: {o.mismatch}")
            continue
        if max_rel_error is not None and not o.rel_error <= max_rel_error:
            failures.append(
                f"output {o.name!r}: relative L2 error {_g(o.rel_error)} exceeds "
                f"max_rel_error {max_rel_error:g}"
            )
        if min_top1 is not None and o.top1 is not None and not o.top1 >= min_top1:
            failures.append(
                f"output {o.name!r}: top-1 agreement {o.top1:.4g} is below min_top1 {min_top1:g}"
            )
    return failures


def _check_tolerances(max_rel_error, min_top1) -> None:
    if max_rel_error is not None and not max_rel_error >= 0:
        raise OnnxlrError(f"max_rel_error must be >= 0, got {max_rel_error}")
    if min_top1 is not None and not 0 <= min_top1 <= 1:
        raise OnnxlrError(f"min_top1 is a fraction in [0, 1], got {min_top1}")


# --- per layer ------------------------------------------------------------------------------


def _per_layer(reference, candidate, providers, feeds) -> list[LayerError]:
    ref, cand = _load_proto(reference), _load_proto(candidate)
    tensors = changed_tensors(ref, cand)
    if not tensors:
        log.info("per-layer: the candidate computes no shared tensor differently")
        return []
    names = [t for t, _, _ in tensors]
    ref_x, ref_kept = _with_outputs(ref, names)
    cand_x, cand_kept = _with_outputs(cand, names)
    keep = [t for t in tensors if t[0] in ref_kept and t[0] in cand_kept]
    names = [t for t, _, _ in keep]
    stats = _compare(
        runtime.make_session(ref_x, providers=providers),
        runtime.make_session(cand_x, providers=providers),
        names, feeds, runtime.model_label(reference), runtime.model_label(candidate),
    )
    return [
        LayerError(name, rop, cop, s.rel_error, s.max_abs_error, s.cosine)
        for (name, rop, cop), s in zip(keep, stats)
    ]


def changed_tensors(ref: onnx.ModelProto, cand: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """``(tensor, reference op, candidate op)`` for each main-graph tensor both models compute by
    name where the candidate's producing node differs (op, attributes, input names, or the values
    of its constant inputs), in the reference's (topological) node order."""
    ref_inits = {t.name: t for t in ref.graph.initializer}
    cand_inits = {t.name: t for t in cand.graph.initializer}
    cand_producer = {o: n for n in cand.graph.node for o in n.output if o}
    found = []
    for node in ref.graph.node:
        for out in node.output:
            other = cand_producer.get(out)
            if out and other is not None and not _same_node(node, other, ref_inits, cand_inits):
                found.append((out, _op_name(node), _op_name(other)))
    return found


def _op_name(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _same_node(a, b, a_inits, b_inits) -> bool:
    if (a.op_type, a.domain, list(a.input), list(a.output)) != (
        b.op_type, b.domain, list(b.input), list(b.output)
    ):
        return False
    if _attributes(a) != _attributes(b):
        return False
    for name in a.input:
        ta, tb = a_inits.get(name), b_inits.get(name)
        if (ta is None) != (tb is None):
            return False
        if ta is not None and not _same_tensor(ta, tb):
            return False
    return True


def _attributes(node) -> list[bytes]:
    return sorted(x.SerializeToString(deterministic=True) for x in node.attribute)


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    from onnx import numpy_helper

    x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)


def _load_proto(model: runtime.ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return graph.load_model(model, check=False)


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> tuple[onnx.ModelProto, set]:
    """A copy of ``model`` with ``names`` added as graph outputs (typed, unshaped); returns the
    copy and the names it can output (those whose element type is known)."""
    if model.ByteSize() >= 2**31:
        raise OnnxlrError(
            f"{runtime.model_label(model)} is over 2 GB; --per-layer needs the model to fit in "
            f"one protobuf: run verify without --per-layer"
        )
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output, *g.input)}
    if any(not types.get(n) for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            for v in inferred.graph.value_info:
                types.setdefault(v.name, v.type.tensor_type.elem_type)
                if not types[v.name]:
                    types[v.name] = v.type.tensor_type.elem_type
        except Exception as exc:  # noqa: BLE001 -- a fallback: types stay unknown, and are logged
            log.warning("per-layer: shape inference failed (%s); untyped tensors are skipped", exc)
    kept = {n for n in names if n in {o.name for o in g.output} or types.get(n)}
    for name in sorted(set(names) - kept):
        log.warning("per-layer: skipping %s, its element type is unknown", name)
    return graph.expose_outputs(model, {n: types.get(n, 0) for n in names if n in kept}), kept


# --- rendering ------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return format_rows(headers, rows)


def write_json(path: str | os.PathLike, content: dict) -> None:
    """Write ``content`` as indented JSON, atomically; an unwritable path is an ``OnnxlrError``."""
    graph.write_text_atomic(path, json.dumps(content, indent=2, allow_nan=False) + "\n")


def _json_safe(value):
    """Non-finite floats become the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _worst(values, pick):
    return math.nan if any(math.isnan(v) for v in values) else pick(values)


def _g(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _dims(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _op(layer: LayerError) -> str:
    if layer.reference_op == layer.candidate_op:
        return layer.reference_op
    return f"{layer.reference_op} -> {layer.candidate_op}"
