"""Where a model's onnxruntime CPU time goes, and how much of it low-rank factorization can touch.

    python tools/time_share.py MODEL.onnx[=DATA.npz] ... [--runs 50] [--threads 1] [--json FILE]
    python tools/time_share.py INT8.onnx=DATA.npz --targets-from MODEL.onnx    # a quantized model

Profiles each model with onnxruntime's profiler (ORT_ENABLE_ALL, as onnxlr bench runs it), fed one
sample of DATA.npz (keyed by input name, samples stacked on the first axis) or, without it, random
inputs with dynamic dims of 1, and sums the kernel time of every node into one of four groups
(onnxruntime's fused and layout-transformed kernels are traced back to the original node by name):

* ``factorizable``: a Conv/Gemm/MatMul that ``onnxlr`` can factorize (a target with no skip reason);
* ``depthwise``: depthwise convs (already rank 1 across channels);
* ``other target``: Conv/Gemm/MatMul skipped for another reason (activation x activation MatMuls
  of attention, weights fed at run time, ...);
* ``rest``: every other op (activations, pooling, normalization, reshapes, ...).

``factorizable`` bounds what factorization can buy: with a share f, even replacing those layers by
nothing gives at most 1 / (1 - f). Prints a table and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxlr import data, runtime
from onnxlr import model as g
from onnxlr.model.targets import find_targets
from onnxlr.report.tables import format_rows as format_table

GROUPS = ("factorizable", "depthwise", "other target", "rest")


# Ops onnxruntime fuses into the conv before them (its NCHWc kernels take the name of the fused
# chain's last output tensor).
FUSED_AFTER = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Add", "Sum"}


def node_groups(model: onnx.ModelProto) -> dict[str, str]:
    """kernel name -> group, for the Conv/Gemm/MatMul nodes of the main graph: the node's name
    and, for fused kernels, the output tensors of the activations fused into it."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    groups = {}
    for target in find_targets(model, g.infer_shapes(model)):
        if target.skip is None:
            group = "factorizable"
        elif target.skip.startswith("depthwise"):
            group = "depthwise"
        else:
            group = "other target"
        groups[target.node.name] = group
        tensor = target.node.output[0]
        for _ in range(3):
            groups[tensor] = group
            after = consumers.get(tensor, [])
            if len(after) != 1 or after[0].op_type not in FUSED_AFTER:
                break
            tensor = after[0].output[0]
    return groups


def group_of(kernel: str, groups: dict[str, str]) -> str:
    """The group of a profiled kernel: its node's (``_nchwc`` kernels are named after their output
    tensor), or that of the longest original name it starts with (onnxruntime names rewritten
    nodes after the node they came from)."""
    kernel = kernel.removesuffix("_nchwc")
    if kernel in groups:
        return groups[kernel]
    best = max((n for n in groups if n and kernel.startswith(n)), key=len, default=None)
    return groups[best] if best is not None else "rest"


def profile(path: Path, runs: int, threads: int, data_path: Path | None = None,
            targets_from: Path | None = None) -> dict:
    model = onnx.load(str(path))
    groups = node_groups(onnx.load(str(targets_from)) if targets_from is not None else model)
    opts = runtime.session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        specs = data.model_input_specs(model)
        source = (data.open_source(str(data_path), specs, what="data") if data_path is not None
                  else data.random_source(specs, None, 1))
        feed = next(iter(data.batches(data.limited(source, 1), specs)))
        for _ in range(5):  # warm-up runs are profiled too; they are dropped below
            session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run: dict[str, list[float]] = defaultdict(list)
    runs_seen = 0
    current: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs_seen += 1
            if runs_seen > 5:
                for group in GROUPS:
                    per_run[group].append(current[group])
            current = defaultdict(float)
        elif event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            current[group_of(node, groups)] += event["dur"] / 1e3  # us -> ms
    medians = {group: float(np.median(per_run[group])) if per_run[group] else 0.0 for group in GROUPS}
    total = sum(medians.values())
    shares = {group: medians[group] / total if total else 0.0 for group in GROUPS}
    return {
        "model": str(path),
        "runs": runs,
        "threads": threads,
        "median_ms": medians,
        "share": shares,
        "bound_speedup": 1.0 / max(1.0 - shares["factorizable"], 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="MODEL[=DATA]")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: steadier shares)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--targets-from", type=Path, metavar="ORIGINAL",
                   help="group the nodes by ORIGINAL's targets (an int8 QDQ model keeps its float model's node "
                        "names, but its weights come from DequantizeLinear, so it has no targets of its own)")
    args = p.parse_args(argv)
    results = []
    for item in args.models:
        model, _, data = item.partition("=")
        results.append(profile(Path(model), args.runs, args.threads, Path(data) if data else None,
                               args.targets_from))
    rows = [[Path(r["model"]).parent.name or r["model"]]
            + [f"{r['median_ms'][k]:.2f} ms ({100 * r['share'][k]:.0f}%)" for k in GROUPS]
            + [f"{r['bound_speedup']:.2f}x"] for r in results]
    print(format_table(["model", *GROUPS, "bound if factorizable took 0"], rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
