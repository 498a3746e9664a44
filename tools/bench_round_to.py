"""Which ``--round-to`` multiple suits onnxruntime CPU: measure it on representative layers.

    python tools/bench_round_to.py [--quick] [--runs N] [--warmup N] [--threads N] [--layers TEXT]
                                   [--out FILE.json]

For each layer below and each raw rank (about C/4, C/3, C/2 and a few odd values), compresses a
one-layer model through the public API, ``onnxlr.compress(model, method=..., rank=<fraction>,
round_to=N)`` for N in (1, 2, 4, 8, 16, 32), so the raw rank is the fraction's and the rounded one
is onnxlr's own. Every distinct rounded rank of a layer is built once; then, per raw rank, the
original and that rank's distinct rounded variants are timed together with ``onnxlr.bench.bench``
(interleaved rounds, thread spinning off, the same seeded input), so every speedup compared is a
ratio measured in the same short run. One intra-op thread by default (``--threads``): on this
shared 2-core machine a 2-thread session keeps waiting on a descheduled thread.

Layers (batch 1, random weights: speed only):
    3x3 conv 64@112x112, 128@56x56, 256@28x28, 512@14x14  (Tucker-2: R3 = R4 = the rank)
    1x1 conv 256->256 @56x56                            (SVD: two 1x1 convs)
    Gemm [1,4096] x [4096,4096]                          (SVD)
    MatMul [1,128,768] x [768,3072]                       (SVD)

Per layer, raw rank and N it reports the rounded rank, the MAC reduction (before/after), the
measured speedup over the original (median of per-round ratios, with p10-p90), and the speedup per
MAC (measured speedup / MAC reduction: 1.0 means the layer got exactly the speedup its MACs
promise). Rounding up only ever keeps more rank, so accuracy at N > 1 is never worse than at N = 1;
the summary ranks each N by the geometric mean, over all (layer, raw rank) cases, of its speedup
relative to N = 1 on the same case, and recommends the N with the best one. Each row also says
whether onnxruntime ran every conv of the chain in its blocked NCHWc layout ("b") or left one
plain ("p"), read from the graph ORT optimizes: a deterministic check beside noisy timings.

Decompositions are cached per weight inside this tool (the spectrum of a weight does not depend
on the rank), so a 4096x4096 Gemm is eigendecomposed once, not once per rank.

Prints JSON (also written to --out), then tables. ``--quick``: three layers, N in (1, 8, 16), fewer
runs: about a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr.methods import svd as svd_module
from onnxlr.methods import tucker as tucker_module
from onnxlr.proof.bench import bench
from onnxlr.ranks import round_up

MULTIPLES = (1, 2, 4, 8, 16, 32)
QUICK_MULTIPLES = (1, 8, 16)


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # "conv" | "gemm" | "matmul"
    method: str  # "tucker" | "svd"
    full: int  # the dimension the rank fraction is taken of (and the rounding cap)
    channels_in: int = 0
    channels_out: int = 0
    kernel: int = 3
    size: int = 0  # spatial size (convs)
    shape_x: tuple[int, ...] = ()
    shape_w: tuple[int, ...] = ()


def raw_ranks(full: int, method: str) -> list[int]:
    if method == "tucker":  # 3x3 Tucker-2 still reduces MACs at C/2
        picks = [full // 4, round(full / 3), full // 2, full // 4 + 3, round(full * 0.4) | 1]
    elif full >= 1024:  # a square Gemm: SVD pays off only below full/2
        picks = [1024 * full // 4096, round(full / 3), (1000 * full // 4096) | 1]
    else:
        picks = [full // 8, full // 4, round(full / 3), full // 4 + 5, round(full * 0.3) | 1]
    return sorted(set(picks))


def layers(quick: bool) -> list[Layer]:
    convs = [(64, 112), (128, 56), (256, 28), (512, 14)]
    out = [Layer(f"conv3x3 {c}@{s}", "conv", "tucker", c, c, c, 3, s) for c, s in convs]
    out.append(Layer("conv1x1 256@56", "conv", "svd", 256, 256, 256, 1, 56))
    out.append(Layer("Gemm 1x4096x4096", "gemm", "svd", 4096, shape_x=(1, 4096), shape_w=(4096, 4096)))
    out.append(Layer("MatMul 128x768x3072", "matmul", "svd", 768, shape_x=(1, 128, 768), shape_w=(768, 3072)))
    if quick:
        out = [out[0], out[2], out[6]]
    return out


def build(layer: Layer, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    if layer.kind == "conv":
        k = layer.kernel
        shape_w = (layer.channels_out, layer.channels_in, k, k)
        w = (rng.standard_normal(shape_w) * math.sqrt(2 / (layer.channels_in * k * k))).astype(np.float32)
        b = np.zeros(layer.channels_out, np.float32)
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="layer", kernel_shape=[k, k],
                                pads=[k // 2] * 4)
        x_shape = [1, layer.channels_in, layer.size, layer.size]
        y_shape = [1, layer.channels_out, layer.size, layer.size]
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    else:
        w = (rng.standard_normal(layer.shape_w) / math.sqrt(layer.shape_w[0])).astype(np.float32)
        op = "Gemm" if layer.kind == "gemm" else "MatMul"
        node = helper.make_node(op, ["x", "W"], ["y"], name="layer")
        x_shape = list(layer.shape_x)
        y_shape = x_shape[:-1] + [layer.shape_w[1]]
        inits = [numpy_helper.from_array(w, "W")]
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cache_spectra() -> None:
    """Memoize left_singular (the eigendecomposition) by the matrix's bytes: rank-independent."""
    original = svd_module.left_singular
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def cached(matrix: np.ndarray):
        array = np.ascontiguousarray(matrix)
        key = (array.shape, array.dtype.str, hashlib.blake2b(array.view(np.uint8), digest_size=16).digest())
        if key not in cache:
            cache[key] = original(matrix)
        values, basis = cache[key]
        return values.copy(), basis.copy()

    svd_module.left_singular = cached
    tucker_module.left_singular = cached


def conv_layouts(model: onnx.ModelProto) -> dict[str, int] | None:
    """How many convs onnxruntime runs in its blocked NCHWc layout vs the plain one (None: no conv).

    Read from the graph ORT itself optimizes (ORT_ENABLE_ALL): deterministic, unlike timings.
    """
    import os
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the "hardware specific optimizations" warning
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    ops = [(n.domain, n.op_type) for n in optimized.graph.node]
    nchwc = ops.count(("com.microsoft.nchwc", "Conv"))
    plain = sum(1 for domain, op in ops if op in ("Conv", "FusedConv") and domain != "com.microsoft.nchwc")
    return {"nchwc": nchwc, "plain": plain} if nchwc + plain else None


def fraction_for(raw: int, full: int) -> float:
    """A fraction F with ceil(F * full) == raw exactly (no float edge)."""
    return (raw - 0.5) / full


def run_layer(layer: Layer, multiples, runs: int, warmup: int, threads: int | None = None) -> dict:
    original = build(layer)
    variants: dict[tuple, tuple[onnx.ModelProto, dict]] = {}  # rounded ranks -> (model, layer report)
    cases = []
    t0 = time.perf_counter()
    for raw in raw_ranks(layer.full, layer.method):
        fraction = fraction_for(raw, layer.full)
        for n in multiples:
            expected = round_up(raw, n, layer.full)
            key = (expected,)
            if key not in variants:
                model, report = onnxlr.compress(original, method=layer.method, rank=fraction, round_to=n,
                                                force=True)  # time it even if MACs do not drop
                lr = report.layers[0]
                if lr.skipped:
                    raise SystemExit(f"{layer.name} rank {raw} N={n}: skipped: {lr.skipped}")
                assert set(lr.raw_ranks.values()) == {raw}, (lr.raw_ranks, raw)
                assert set(lr.ranks.values()) == {expected}, (lr.ranks, expected)
                model.graph.name = f"R{expected}"
                variants[key] = (model, {"ranks": lr.ranks, "raw_ranks": lr.raw_ranks,
                                         "macs_before": lr.macs_before, "macs_after": lr.macs_after,
                                         "weight_rel_error": lr.weight_rel_error,
                                         "conv_layout": conv_layouts(model)})
            cases.append((raw, n, key))
    build_s = time.perf_counter() - t0
    # One interleaved bench per raw rank: the original, the raw-rank model and its rounded
    # variants. Small groups keep the models compared in a round close together in time.
    timing: dict[tuple[int, tuple], object] = {}
    original_ms = []
    t0 = time.perf_counter()
    for raw in dict.fromkeys(c[0] for c in cases):
        keys = list(dict.fromkeys(key for r, _, key in cases if r == raw))
        result = bench([original] + [variants[k][0] for k in keys], runs=runs, warmup=warmup,
                       threads=threads)
        original_ms.append(result.models[0].median_ms)
        for i, key in enumerate(keys):
            timing[(raw, key)] = (result.models[i + 1], result.models[0].p10_ms)
    bench_s = time.perf_counter() - t0
    rows = []
    for raw, n, key in cases:
        info, (t, original_p10) = variants[key][1], timing[(raw, key)]
        reduction = info["macs_before"] / info["macs_after"] if info["macs_before"] and info["macs_after"] else None
        rows.append({
            "raw_rank": raw, "round_to": n, "rank": key[0], "ranks": info["ranks"],
            "raw_ranks": info["raw_ranks"], "macs_before": info["macs_before"],
            "macs_after": info["macs_after"], "mac_reduction": reduction,
            "speedup": t.speedup, "speedup_p10": t.speedup_p10, "speedup_p90": t.speedup_p90,
            "speedup_per_mac": t.speedup / reduction if reduction else None,
            "median_ms": t.median_ms, "p10_ms": t.p10_ms,
            # Fast-path estimate: p10 latency of the original over the model's. Under heavy load a
            # run longer than a scheduler slice is preempted more often, which biases the medians.
            "speedup_fast": original_p10 / t.p10_ms,
            "weight_rel_error": info["weight_rel_error"], "conv_layout": info["conv_layout"],
        })
    return {"layer": layer.name, "method": layer.method, "full": layer.full,
            "original_ms": float(np.median(original_ms)), "models_built": len(variants),
            "build_s": round(build_s, 1), "bench_s": round(bench_s, 1), "rows": rows}


def summarize(results: list[dict], multiples) -> dict:
    """Geomean over (layer, raw rank) cases of speedup(N) / speedup(N=1), and of speedup(N)."""
    rel: dict[int, list[float]] = {n: [] for n in multiples}
    rel_fast: dict[int, list[float]] = {n: [] for n in multiples}
    abs_: dict[int, list[float]] = {n: [] for n in multiples}
    per_layer: dict[str, dict[int, float]] = {}
    for res in results:
        by_raw: dict[int, dict[int, dict]] = {}
        for row in res["rows"]:
            by_raw.setdefault(row["raw_rank"], {})[row["round_to"]] = row
        layer_rel: dict[int, list[float]] = {n: [] for n in multiples}
        for row_by_n in by_raw.values():
            base = row_by_n[1]["speedup"]
            for n in multiples:
                ratio = row_by_n[n]["speedup"] / base
                rel[n].append(ratio)
                rel_fast[n].append(row_by_n[n]["speedup_fast"] / row_by_n[1]["speedup_fast"])
                layer_rel[n].append(ratio)
                abs_[n].append(row_by_n[n]["speedup"])
        per_layer[res["layer"]] = {n: _geomean(v) for n, v in layer_rel.items()}
    geo_rel = {n: _geomean(v) for n, v in rel.items()}
    chosen = max(multiples, key=lambda n: geo_rel[n])
    return {"geomean_speedup_vs_round_to_1": geo_rel,
            "geomean_speedup_vs_original": {n: _geomean(v) for n, v in abs_.items()},
            "geomean_fast_speedup_vs_round_to_1": {n: _geomean(v) for n, v in rel_fast.items()},
            "worst_case_vs_round_to_1": {n: min(v) for n, v in rel.items()},
            "per_layer_geomean_vs_round_to_1": per_layer,
            "recommended_round_to": chosen}


def _geomean(values: list[float]) -> float:
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


def print_tables(results: list[dict], summary: dict, multiples) -> None:
    for res in results:
        print(f"\n## {res['layer']} ({res['method']}; original {res['original_ms']:.2f} ms; "
              f"{res['models_built']} compressed models; each raw rank timed in its own interleaved group)")
        head = ["raw"] + [f"N={n}: rank  MACs/  speedup sp/MAC p10-sp" for n in multiples]
        print(" | ".join(head))
        by_raw: dict[int, list[dict]] = {}
        for row in res["rows"]:
            by_raw.setdefault(row["raw_rank"], []).append(row)
        for raw, rows in by_raw.items():
            cells = [f"{raw:>4}"]
            for row in sorted(rows, key=lambda r: r["round_to"]):
                layout = row["conv_layout"]
                mark = "" if layout is None else ("b" if layout["plain"] == 0 else "p")
                cells.append(f"{row['rank']:>5}{mark:1} {row['mac_reduction']:5.2f}x {row['speedup']:5.2f}x "
                             f"{row['speedup_per_mac']:5.2f} {row['speedup_fast']:5.2f}x")
            print(" | ".join(cells))
    print("\n## Summary: geomean over (layer, raw rank) of speedup at N / speedup at N=1")
    print("layer" + "".join(f" | N={n:<4}" for n in multiples))
    for name, by_n in summary["per_layer_geomean_vs_round_to_1"].items():
        print(name + "".join(f" | {by_n[n]:5.2f}" for n in multiples))
    print("ALL" + "".join(f" | {summary['geomean_speedup_vs_round_to_1'][n]:5.2f}" for n in multiples))
    print("ALL (p10)" + "".join(f" | {summary['geomean_fast_speedup_vs_round_to_1'][n]:5.2f}" for n in multiples))
    print("worst" + "".join(f" | {summary['worst_case_vs_round_to_1'][n]:5.2f}" for n in multiples))
    print("vs original" + "".join(f" | {summary['geomean_speedup_vs_original'][n]:5.2f}" for n in multiples))
    print("\nrank suffix: b = every conv in ORT's blocked NCHWc layout, p = some conv left plain")
    print(f"\nrecommended --round-to: {summary['recommended_round_to']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 layers, N in (1, 8, 16), fewer runs")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds per raw rank (default 40, quick 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: on this loaded 2-core machine a 2-thread "
                        "run waits on its descheduled thread and the ratios scatter; 0 = all cores)")
    parser.add_argument("--layers", default=None, help="substring filter on layer names")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    multiples = QUICK_MULTIPLES if args.quick else MULTIPLES
    runs = args.runs or (15 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    cache_spectra()
    import onnxruntime

    results = []
    started = time.perf_counter()
    for layer in layers(args.quick):
        if args.layers and args.layers not in layer.name:
            continue
        print(f"... {layer.name}", file=sys.stderr, flush=True)
        results.append(run_layer(layer, multiples, runs, warmup, args.threads or None))
    summary = summarize(results, multiples)
    payload = {"onnxruntime": onnxruntime.__version__, "runs": runs, "warmup": warmup,
               "threads": args.threads or "all cores",
               "multiples": list(multiples), "seconds": round(time.perf_counter() - started, 1),
               "layers": results, "summary": summary}
    text = json.dumps(payload, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print_tables(results, summary, multiples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
