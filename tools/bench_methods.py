"""Speed per MAC saved of the KxK-conv methods on onnxruntime CPU (issue 12, must-show 6).

    python tools/bench_methods.py [--models NAME,...] [--fractions 0.25,0.5] [--round-to 8]
                                  [--max-layers 8] [--repeats 3] [--threads 1] [--out DIR]

For every KxK, non-depthwise Conv of the bundled ``models/digits_vgg.onnx`` and of the real models
in ``.cache/real-models/`` (MiniLM has no conv: it is listed and skipped), at most ``--max-layers``
per model (the heaviest by real MACs), each method of :data:`METHODS` factorizes the layer at each
rank fraction (``parse_rank``, ``round_to``); then ``onnxlr.budget.latency.time_layer`` times the
one-node model of the original layer and every candidate chain *interleaved*, at the layer's real
input shape (batch 1, read from one onnxruntime run of the whole model with the layer inputs and
outputs exposed), with no latency cache. The timing is repeated ``--repeats`` times and each
model's ms is the median of the repeats.

Per candidate:
    MACs saved       before - after, real shapes, one sample
    ms saved         t_layer - t_chain
    ms per GMAC      ms saved / (MACs saved / 1e9): the speed each saved MAC buys; compare it with
                     the layer's own ms per GMAC (``ms_per_gmac``), what a chain with free MACs saves
    speedup/MAC      (t_layer / t_chain) / (MACs before / MACs after): 1.0 means the chain got
                     exactly the speedup its MACs promise, < 1 less

Aggregated per model, method and fraction (and over all models per method and fraction) as the
median over the layers with the p10-p90 spread. A chain that does not reduce MACs (e.g. Tucker-2
on a conv with 1 input channel) is left out of the aggregates and counted (``no_mac_saving``). Prints JSON, then the tables; ``--out DIR`` writes
``DIR/bench_methods.json``; ``--markdown`` also prints the pooled summary as markdown. The load average (``os.getloadavg``) before and after is recorded: the
machine is shared, so read the figures together with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxlr import data, methods
from onnxlr import model as g
from onnxlr.budget import latency
from onnxlr.budget.outputs import run_outputs
from onnxlr.errors import OnnxlrError
from onnxlr.layers import chain_conv_macs, conv_macs
from onnxlr.methods.linalg import single_threaded_blas
from onnxlr.model.io import write_text_atomic
from onnxlr.model.opset import default_opset
from onnxlr.model.targets import find_targets
from onnxlr.ranks import parse_rank
from onnxlr.report.tables import format_rows, human

REAL = ROOT / ".cache" / "real-models"
MODELS = {
    "digits_vgg": ROOT / "models" / "digits_vgg.onnx",
    "efficientnet-lite0": REAL / "efficientnet-lite0" / "model.onnx",
    "ppocr-v6-rec": REAL / "ppocr-v6-rec" / "model.onnx",
    "all-minilm-l6-v2": REAL / "all-minilm-l6-v2" / "model.onnx",
}
#: Batch 1; dynamic dims other than the batch at their deployed values (PP-OCR pads lines to 320).
SHAPES = {"ppocr-v6-rec": {"x": (1, 3, 48, 320)}}
METHODS = ("tucker", "channel", "spatial-svd", "cp")
log = logging.getLogger("bench_methods")


def pct(values: list[float]) -> dict | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not v.size:
        return None
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "n": int(v.size)}


def real_shapes(work, targets) -> dict[str, tuple[int, ...]]:
    """Shapes of every target's input and output tensor in one batch-1 run of the model."""
    specs = data.model_input_specs(work)
    feed = next(iter(data.random_source(specs, SHAPES.get(work.graph.name, None), 1)))
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    outputs = [o.name for o in work.graph.output]
    exposed = {}
    for t in targets:
        for name in (t.node.input[0], t.node.output[0]):
            if name not in feed and name not in outputs:
                exposed[name] = t.weight_dtype
    got = run_outputs(work.SerializeToString(), [feed], exposed)
    shapes.update(zip(exposed, (tuple(a.shape) for a in got[len(outputs):])))
    for name, a in zip(outputs, got):
        shapes[name] = tuple(a.shape)
    return shapes


def bench_model(name: str, path: Path, fractions, round_to: int, max_layers: int, repeats: int,
                threads: int) -> dict:
    result: dict = {"model": name, "path": str(path.relative_to(ROOT)), "layers": [], "skipped": None}
    if not path.exists():
        result["skipped"] = f"{path} not found (fetch it with python -m tools.real_models.fetch)"
        return result
    work = g.load_model(path)
    work.graph.name = name  # SHAPES is keyed by our model name
    g.fold_constant_weights(work)
    shapes = g.infer_shapes(work)
    found = find_targets(work, shapes)
    # protobuf hands out one wrapper per live message: compare ids while the targets hold theirs
    main_nodes = {id(n) for n in work.graph.node}
    targets = [t for t in found
               if t.skip is None and t.layer is not None and id(t.node) in main_nodes
               and methods.base.is_kxk_conv(t.layer) and not t.layer.is_depthwise]
    n_conv = sum(1 for n in work.graph.node if n.op_type == "Conv")
    result["convs"] = n_conv
    result["kxk_convs"] = len(targets)
    if not targets:
        result["skipped"] = f"no KxK non-depthwise conv ({n_conv} Conv nodes in the main graph)"
        return result
    real = real_shapes(work, targets)
    sized = []
    for t in targets:
        x, y = real[t.node.input[0]], real[t.node.output[0]]
        sized.append((conv_macs(t.layer.weight.shape, t.layer.group, y[2:]), t, x, y))
    sized.sort(key=lambda s: -s[0])
    result["layers_timed"] = min(len(sized), max_layers)
    opset = default_opset(work)
    for macs, t, x, y in sized[:max_layers]:
        layer = t.layer
        row = {"name": t.name, "weight": list(layer.weight.shape), "group": layer.group,
               "strides": list(layer.strides), "input": list(x), "output": list(y), "macs": int(macs),
               "candidates": [], "not_applicable": {}}
        cands = []
        for method in METHODS:
            reason = methods.get(method).check(layer)
            if reason is not None:
                row["not_applicable"][method] = reason
                continue
            for f in fractions:
                t0 = time.perf_counter()
                try:
                    with single_threaded_blas():
                        rep, _ = methods.get(method).factorize(layer, parse_rank(str(f)), round_to)
                except OnnxlrError as exc:
                    row["not_applicable"][f"{method}@{f}"] = str(exc)
                    continue
                after = chain_conv_macs(rep.steps, x[2:], y[2:])
                cands.append(rep)
                row["candidates"].append({"method": method, "fraction": f, "ranks": dict(rep.ranks),
                                          "macs_after": int(after), "factorize_s": time.perf_counter() - t0})
        runs = [latency.time_layer(t, x, shapes, cands, opset, work.ir_version, "cpu", None, threads)
                for _ in range(repeats)]
        ms0 = float(np.median([r[0] for r in runs]))
        row["ms"] = ms0
        row["ms_per_gmac"] = ms0 / (macs / 1e9)  # the layer's own cost: what an ideal chain saves per GMAC
        row["ms_repeats"] = [r[0] for r in runs]
        for j, c in enumerate(row["candidates"]):
            ms = float(np.median([r[1][j] for r in runs]))
            saved_macs = macs - c["macs_after"]
            c["ms"] = ms
            c["macs_saved"] = int(saved_macs)
            c["ms_saved"] = ms0 - ms
            c["mac_ratio"] = macs / c["macs_after"] if c["macs_after"] else None
            c["speedup"] = ms0 / ms
            c["ms_per_gmac_saved"] = (ms0 - ms) / (saved_macs / 1e9) if saved_macs > 0 else None
            c["speedup_per_mac_ratio"] = c["speedup"] / c["mac_ratio"] if c["mac_ratio"] else None
        result["layers"].append(row)
        log.info("%s %s %s: %.3f ms, %d candidates", name, t.name, x, ms0, len(cands))
    return result


def aggregate(layers: list[dict], method: str, fraction: float) -> dict | None:
    every = [c | {"layer_macs": lr["macs"], "layer_ms": lr["ms"]} for lr in layers for c in lr["candidates"]
             if c["method"] == method and c["fraction"] == fraction]
    # A chain with as many MACs as the layer or more is no candidate (a budget drops it too)
    cands = [c for c in every if c["macs_saved"] > 0]
    if not cands:
        return None
    return {
        "method": method, "fraction": fraction, "layers": len(cands),
        "macs_saved_share": pct([c["macs_saved"] / c["layer_macs"] for c in cands]),
        "macs_saved": pct([c["macs_saved"] for c in cands]),
        "ms_saved": pct([c["ms_saved"] for c in cands]),
        "ms_saved_share": pct([c["ms_saved"] / c["layer_ms"] for c in cands]),
        "ms_per_gmac_saved": pct([c["ms_per_gmac_saved"] for c in cands]),
        "speedup": pct([c["speedup"] for c in cands]),
        "mac_ratio": pct([c["mac_ratio"] for c in cands]),
        "speedup_per_mac_ratio": pct([c["speedup_per_mac_ratio"] for c in cands]),
        "slower": sum(c["ms_saved"] < 0 for c in cands),
        "no_mac_saving": len(every) - len(cands),
    }


def cell(s: dict | None, fmt: str, scale: float = 1.0) -> str:
    if s is None:
        return "-"
    f = lambda v: format(v * scale, fmt)
    return f"{f(s['median'])} ({f(s['p10'])}..{f(s['p90'])})"


def table(summary: list[dict]) -> str:
    headers = ("model", "method", "frac", "layers", "MACs saved %", "ms saved", "ms/GMAC saved",
               "speedup", "MAC ratio", "speedup/MAC ratio", "slower", "no saving")
    rows = []
    for s in summary:
        rows.append((s["model"], s["method"], f"{s['fraction']:g}", str(s["layers"]),
                     cell(s["macs_saved_share"], ".0f", 100), cell(s["ms_saved"], ".3f"),
                     cell(s["ms_per_gmac_saved"], ".2f"), cell(s["speedup"], ".2f"), cell(s["mac_ratio"], ".2f"),
                     cell(s["speedup_per_mac_ratio"], ".2f"), str(s["slower"]), str(s["no_mac_saving"])))
    return format_rows(headers, rows)


def layer_table(results: list[dict]) -> str:
    headers = ("model", "layer", "input", "weight", "MACs", "ms", "ms/GMAC", *METHODS)
    rows = []
    for r in results:
        for lr in r["layers"]:
            per = []
            for m in METHODS:
                cs = [c for c in lr["candidates"] if c["method"] == m]
                per.append(" ".join(f"{c['speedup']:.2f}x/{c['mac_ratio']:.1f}" for c in cs) or "-")
            rows.append((r["model"], lr["name"][:28], "x".join(map(str, lr["input"][1:])),
                         "x".join(map(str, lr["weight"])), human(lr["macs"]), f"{lr['ms']:.3f}",
                         f"{lr['ms_per_gmac']:.1f}", *per))
    return format_rows(headers, rows)


def markdown(summary: list[dict], model: str = "all") -> str:
    """The summary rows of one model (``all``: every layer pooled) as a markdown table: medians,
    p10..p90 for the two per-MAC figures."""
    header = ("| method | rank fraction | layers | MACs saved | ms saved per GMAC saved | speedup | MAC reduction "
              "| speedup / MAC reduction |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if s["model"] != model:
            continue
        lines.append(f"| {s['method']} | {s['fraction']:g} | {s['layers']} | {100 * s['macs_saved_share']['median']:.0f} % "
                     f"| {cell(s['ms_per_gmac_saved'], '.1f')} | {s['speedup']['median']:.2f}x "
                     f"| {s['mac_ratio']['median']:.2f}x | {cell(s['speedup_per_mac_ratio'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--fractions", default="0.25,0.5")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--max-layers", type=int, default=8, help="heaviest KxK convs timed per model")
    p.add_argument("--repeats", type=int, default=3, help="interleaved time_layer runs per layer (median)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads (1: steadiest on a shared 2-core machine)")
    p.add_argument("--out", type=Path, help="write DIR/bench_methods.json")
    p.add_argument("--markdown", action="store_true", help="also print the pooled summary as markdown")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    fractions = [float(f) for f in args.fractions.split(",")]

    import onnxruntime as ort

    started = time.perf_counter()
    load_before = os.getloadavg()
    results = [bench_model(n, MODELS[n], fractions, args.round_to, args.max_layers, args.repeats, args.threads)
               for n in names]
    load_after = os.getloadavg()
    summary = []
    for r in results:
        for m in METHODS:
            for f in fractions:
                s = aggregate(r["layers"], m, f)
                if s:
                    summary.append({"model": r["model"]} | s)
    all_layers = [lr for r in results for lr in r["layers"]]
    for m in METHODS:
        for f in fractions:
            s = aggregate(all_layers, m, f)
            if s:
                summary.append({"model": "all"} | s)
    out = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python tools/bench_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "onnxruntime": ort.__version__, "provider": "cpu", "threads": args.threads, "batch": 1,
        "fractions": fractions, "round_to": args.round_to, "max_layers": args.max_layers,
        "repeats": args.repeats, "layer_budget_s": latency.LAYER_BUDGET_S,
        "loadavg_before": list(load_before), "loadavg_after": list(load_after), "cpus": os.cpu_count(),
        "seconds": time.perf_counter() - started,
        "models": results, "summary": summary,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "bench_methods.json", text + "\n")
    print()
    for r in results:
        if r["skipped"]:
            print(f"{r['model']}: skipped: {r['skipped']}")
        else:
            print(f"{r['model']}: {r['kxk_convs']} KxK non-depthwise convs of {r['convs']} Conv nodes; "
                  f"timed the {r['layers_timed']} heaviest")
    print()
    print(layer_table(results))
    print("\n(per layer and method: measured speedup x / MAC ratio, one entry per fraction)\n")
    print(table(summary))
    if args.markdown:
        print()
        print(markdown(summary))
    print(f"\nmedian (p10..p90) over layers; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
