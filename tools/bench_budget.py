"""Budgeted allocation against the best uniform rank, at the same measured speedup.

For each model: ``onnxlr.sweep.sweep`` with a task-metric callback (one plan: candidates,
microbenchmarks and damages measured once), then a comparison table: for every budget point, the
uniform frontier's metric linearly interpolated at the same measured speedup (and the best uniform
point that is at least as fast). Writes ``<out>/<model>.json``, ``<out>/<model>.png`` and prints
the tables as markdown.

    python tools/bench_budget.py digits --model models/digits_vgg.onnx --out bench/budget
    python tools/bench_budget.py efficientnet-lite0 --out bench/budget --targets 1.2,1.5,2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxlr.compress import CompressConfig
from onnxlr.sweep import parse_floats, sweep

REAL = ROOT / ".cache" / "real-models"
METRIC = {"efficientnet-lite0": ("eval_crops", "top1_agreement"), "ppocr-v6-rec": ("eval", "char_accuracy"),
          "all-minilm-l6-v2": ("eval", "mean_cosine")}


def digits_callback(test_npz: Path):
    import onnxruntime as ort

    data = np.load(test_npz)
    x, y = data["input"].astype(np.float32), data["labels"]

    def evaluate(model: onnx.ModelProto) -> float:
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        fixed = isinstance(sess.get_inputs()[0].shape[0], int)
        step = 1 if fixed else 64
        pred = np.concatenate([sess.run(None, {name: x[i:i + step]})[0].argmax(-1) for i in range(0, len(x), step)])
        return float((pred == y).mean())

    return evaluate


def real_callback(name: str):
    from tools.real_models.tasks import evaluate as task_eval

    eval_set, key = METRIC[name]

    def evaluate(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            onnx.save(model, path)
            return float(task_eval(name, path, REAL / name)[eval_set][key])

    return evaluate


def compare(result: dict) -> list[dict]:
    """Per budget point: uniform metric interpolated at the same measured speedup."""
    uni = sorted((p for p in result["points"] if p["kind"] == "uniform"), key=lambda p: p["measured_speedup"])
    rows = []
    for p in sorted((p for p in result["points"] if p["kind"] == "budget"), key=lambda p: p["setting"]):
        s = p["measured_speedup"]
        xs = [u["measured_speedup"] for u in uni]
        interp = None
        if uni and xs[0] <= s <= xs[-1] and p["metric"] is not None:
            interp = float(np.interp(s, xs, [u["metric"] for u in uni]))
        faster = [u for u in uni if u["measured_speedup"] >= s and u["metric"] is not None]
        best = max(faster, key=lambda u: u["metric"]) if faster else None
        rows.append({"target": p["setting"], "predicted": p["predicted_speedup"], "measured": s,
                     "within_15pct": abs(s - p["predicted_speedup"]) <= 0.15 * p["predicted_speedup"],
                     "at_or_above_target": s >= p["setting"], "error": p["error"], "metric": p["metric"],
                     "uniform_interp_metric": interp,
                     "best_uniform_at_least_as_fast": None if best is None else
                     {"rank": best["setting"], "speedup": best["measured_speedup"], "metric": best["metric"]}})
    return rows


def markdown(name: str, result: dict, rows: list[dict]) -> str:
    base = result["baseline_metric"]
    out = [f"### {name}", "", (f"original metric {base:.4f}; {result['provider']}; "
           f"{'data-aware' if result['data_aware'] else 'data-free'} damage; sweep {result['seconds']:.0f} s"), "",
           "| kind | setting | layers | MACs | predicted | measured | output error | metric |",
           "|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        setting = f"{p['setting']:g}x" if p["kind"] == "budget" else f"rank {p['setting']:g}"
        pred = f"{p['predicted_speedup']:.2f}x" if p["predicted_speedup"] else "-"
        out.append(f"| {p['kind']} | {setting} | {p['layers_replaced']} | {p['macs_fraction']:.2f} | {pred} | "
                   f"{p['measured_speedup']:.2f}x | {p['error']:.4f} | {p['metric']:.4f} |")
    out += ["", "| target | predicted | measured | within 15% | >= target | budget metric | uniform at same speedup |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        u = "-" if r["uniform_interp_metric"] is None else f"{r['uniform_interp_metric']:.4f}"
        out.append(f"| {r['target']:g}x | {r['predicted']:.2f}x | {r['measured']:.2f}x | {r['within_15pct']} | "
                   f"{r['at_or_above_target']} | {r['metric']:.4f} | {u} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="digits, efficientnet-lite0, ppocr-v6-rec or all-minilm-l6-v2")
    p.add_argument("--model", type=Path, help="the .onnx (default: the bundled / cached one)")
    p.add_argument("--calib", type=Path, help="calibration .npz (default: the model's own)")
    p.add_argument("--data-free", action="store_true", help="no calibration data: weight-error damage")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--targets", default="1.2,1.5,2,3")
    p.add_argument("--uniform", default="0.25,0.375,0.5,0.625,0.75")
    p.add_argument("--out", type=Path, default=Path("bench/budget"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--fractions", default=None, help="budget candidate grid (default: onnxlr.budget.FRACTIONS)")
    args = p.parse_args(argv)
    if args.fractions:
        from onnxlr import budget

        budget.FRACTIONS = parse_floats(args.fractions, "--fractions")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.name == "digits":
        model = args.model or ROOT / "models" / "digits_vgg.onnx"
        calib = args.calib or model.with_name("digits_vgg_calib.npz")
        evaluate = digits_callback(model.with_name("digits_vgg_test.npz"))
    else:
        model = args.model or REAL / args.name / "model.onnx"
        calib = args.calib or REAL / args.name / "calib.npz"
        evaluate = real_callback(args.name)
    config = CompressConfig(calib=None if args.data_free else str(calib),
                            calib_samples=None if args.data_free else args.calib_samples,
                            cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    result = sweep(str(model), parse_floats(args.targets, "--targets"), uniform=parse_floats(args.uniform, "--uniform"),
                   evaluate=evaluate, config=config)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.name + ("-datafree" if args.data_free else "")
    data = result.to_dict()
    rows = compare(data)
    data["comparison"] = rows
    (args.out / f"{tag}.json").write_text(json.dumps(data, indent=2))
    result.plot(args.out / f"{tag}.png", title=f"{args.name}: budgeted allocation vs uniform rank")
    md = markdown(tag, data, rows)
    (args.out / f"{tag}.md").write_text(md + "\n")
    print(md)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {args.out}/{tag}.json, .png, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
