"""Budgeted allocation against the best uniform rank, at the same measured speedup.

For each model: ``onnxlr.budget.sweep.sweep`` with a task-metric callback (one plan: candidates,
microbenchmarks and damages measured once), then a comparison table: for every budget point, the
uniform frontier's metric linearly interpolated at the same measured speedup (and the best uniform
point that is at least as fast). Writes ``<out>/<model>.json``, ``<out>/<model>.png`` and prints
the tables as markdown.

    python tools/bench_budget.py digits --model models/digits_vgg.onnx --out bench/budget
    python tools/bench_budget.py efficientnet-lite0 --out bench/budget --targets 1.2,1.5,2

Every point's model is kept (``--keep``, default ``.cache/budget/<model>/``) and, after the sweep,
timed again together with the original in one interleaved ``onnxlr.proof.bench`` run (``--runs``
rounds, the threads of ``ONNXLR_BENCH_THREADS``), which gives each point a second measured
speedup with its p10-p90 spread (``bench`` in the JSON); the load average is recorded next to it.
For the real models every task metric of ``tools.real_models.tasks`` is kept per point
(``metrics``), so the evaluation suite can plot the budget frontier in its own primary metric.

``--int8`` adds a second sweep planned for the int8 model (``compress --quantize int8``: static
QDQ, per-channel, calibrated on the same ``--calib`` samples), whose points go into the same JSON
with kinds ``int8-budget`` (the int8-aware budget), ``int8-uniform`` (uniform ranks, then int8) and
``int8-original`` (the original quantized); with the fp32 ``budget`` points these are the four
curves, all re-timed in the one interleaved run, speedups against the fp32 original::

    python tools/bench_budget.py digits --int8 --targets 2,3 --uniform 0.25,0.5 --out bench/budget
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxlr.budget.sweep import parse_floats, sweep
from onnxlr.pipeline import CompressConfig

REAL = ROOT / ".cache" / "real-models"
log = logging.getLogger("bench_budget")
METRIC = {"efficientnet-lite0": ("eval_crops", "top1_agreement"), "ppocr-v6-rec": ("eval", "char_accuracy"),
          "all-minilm-l6-v2": ("eval", "mean_cosine")}


def digits_callback(test_npz: Path, records: list | None = None):
    """Test accuracy (the primary metric); with ``records``, also the test log-loss (mean negative
    log-likelihood of the true labels), which still moves where accuracy is saturated."""
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
        logits = np.concatenate([sess.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])
        accuracy = float((logits.argmax(-1) == y).mean())
        if records is not None:
            z = logits - logits.max(-1, keepdims=True)
            log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
            records.append({"test.accuracy": accuracy, "test.nll": float(-log_p[np.arange(len(y)), y].mean())})
        return accuracy

    return evaluate


def real_callback(name: str, records: list | None = None):
    """Primary metric of ``name`` (:data:`METRIC`); every metric of the evaluation goes to
    ``records`` as ``{"set.metric": value}``, one entry per call."""
    from tools.real_models.tasks import evaluate as task_eval

    eval_set, key = METRIC[name]

    def evaluate(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            onnx.save(model, path)
            result = task_eval(name, path, REAL / name)
        if records is not None:
            records.append({f"{s}.{k}": v for s, d in result.items() for k, v in d.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return float(result[eval_set][key])

    return evaluate


def keeping(evaluate, folder: Path, saved: list):
    """Wrap ``evaluate``: save every model it sees (the original first, then each sweep point in
    order) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("point_*.onnx"):
        old.unlink()

    def wrapped(model: onnx.ModelProto) -> float:
        path = folder / f"point_{len(saved):02d}.onnx"
        onnx.save(model, path)
        saved.append(path)
        return evaluate(model)

    return wrapped


def retime(original: Path, paths: list[Path], calib: Path, runs: int, int_range: tuple[int, int]) -> dict:
    """One interleaved ``onnxlr.proof.bench`` run of the original and ``paths`` at the calibration
    data's batch-1 shapes: per model median speedup with p10-p90, and the load average."""
    from onnxlr.budget import latency
    from onnxlr.proof.bench import bench

    inputs = {i.name for i in onnx.load(str(original), load_external_data=False).graph.input}
    with np.load(calib) as data:  # arrays that are no model input (labels) are left out
        shapes = {k: [1, *data[k].shape[1:]] for k in data.files if k in inputs}
    load_before = os.getloadavg()[0]
    result = bench([str(original)] + [str(p) for p in paths], shapes=shapes, runs=runs, warmup=10, batch=1,
                   threads=latency.bench_threads(), int_range=int_range).to_dict()
    rows = result["models"]
    return {"threads": latency.bench_threads(), "runs": runs, "input_shapes": shapes,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "original_ms": rows[0]["median_ms"],
            "points": [{k: r[k] for k in ("median_ms", "speedup", "speedup_p10", "speedup_p90")} for r in rows[1:]]}


def add_macs(data: dict, folder: Path, calib: Path) -> None:
    """Whole-model MACs (every Conv/Gemm/MatMul, from the shapes onnxruntime produces for one
    calibration sample, as ``tools.eval_suite`` counts them) of the kept models: ``macs`` of the
    original (``baseline_macs``) and of every point. The sweep's ``macs_fraction`` only covers
    layers whose shapes are static."""
    from tools.real_models.common import count_macs

    paths = sorted(folder.glob("point_*.onnx"))
    if len(paths) != len(data["points"]) + 1:
        log.info("MACs: %d kept models for %d points in %s: not counted", len(paths), len(data["points"]), folder)
        return
    with np.load(calib) as npz:
        feed = {k: npz[k][:1] for k in npz.files}
    macs = []
    for path in paths:
        model = onnx.load(path)
        names = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
        macs.append(count_macs(model, {k: v for k, v in feed.items() if k in names}))
    data["baseline_macs"] = macs[0]
    for p, m in zip(data["points"], macs[1:]):
        p["macs"] = m


def compare(result: dict, timing: str = "sweep", prefix: str = "") -> list[dict]:
    """Per budget point: uniform metric interpolated at the same measured speedup, and the best
    uniform point at least as fast. ``timing``: "sweep" (the solver's own end-to-end check) or
    "bench" (the re-timing of all points in one interleaved run). ``prefix`` "int8-": the int8
    sweep's points."""

    def speed(p):
        return p["bench"]["speedup"] if timing == "bench" else p["measured_speedup"]

    uni = sorted((p for p in result["points"] if p["kind"] == prefix + "uniform"), key=speed)
    rows = []
    for p in sorted((p for p in result["points"] if p["kind"] == prefix + "budget"), key=lambda p: p["setting"]):
        s = speed(p)
        xs = [speed(u) for u in uni]
        interp = None
        if uni and xs[0] <= s <= xs[-1] and p["metric"] is not None:
            interp = float(np.interp(s, xs, [u["metric"] for u in uni]))
        faster = [u for u in uni if speed(u) >= s and u["metric"] is not None]
        best = max(faster, key=lambda u: u["metric"]) if faster else None
        rows.append({"timing": timing, "kind": p["kind"], "target": p["setting"], "predicted": p["predicted_speedup"], "measured": s,
                     "within_15pct": abs(s - p["predicted_speedup"]) <= 0.15 * p["predicted_speedup"],
                     "at_or_above_target": s >= p["setting"], "error": p["error"], "metric": p["metric"],
                     "uniform_interp_metric": interp,
                     "best_uniform_at_least_as_fast": None if best is None else
                     {"rank": best["setting"], "speedup": speed(best), "metric": best["metric"]}})
    return rows


def markdown(name: str, result: dict, rows: list[dict]) -> str:
    base = result["baseline_metric"]
    b = result.get("bench")
    la = result.get("load_average")
    out = [f"### {name}", "", (f"original metric {base:.4f}; {result['provider']}; "
           f"{'data-aware' if result['data_aware'] else 'data-free'} damage; sweep {result['seconds']:.0f} s"
           + (f"; {result.get('threads')} thread(s)" if result.get("threads") else "")
           + (f"; load average {la[0]:.1f} -> {la[1]:.1f}" if la else "")
           + (f"; re-timed in one interleaved run of {b['runs']} rounds (load average "
              f"{b['load_average'][0]:.1f} -> {b['load_average'][1]:.1f}), original {b['original_ms']:.2f} ms"
              if b else "")), "",
           "| kind | setting | layers | MACs | predicted | measured (sweep) | re-timed (p10-p90) | output error | metric |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        setting = (f"{p['setting']:g}x" if p["kind"].endswith("budget") else
                   f"rank {p['setting']:g}" if p["kind"].endswith("uniform") else "-")
        pred = f"{p['predicted_speedup']:.2f}x" if p["predicted_speedup"] else "-"
        pb = p.get("bench")
        rt = f"{pb['speedup']:.2f}x ({pb['speedup_p10']:.2f}-{pb['speedup_p90']:.2f})" if pb else "-"
        macs = (f"{result['baseline_macs'] / p['macs']:.2f}x fewer" if p.get("macs") and result.get("baseline_macs")
                else f"{p['macs_fraction']:.2f}")
        out.append(f"| {p['kind']} | {setting} | {p['layers_replaced']} | {macs} | {pred} | "
                   f"{p['measured_speedup']:.2f}x | {rt} | {p['error']:.4f} | {p['metric']:.4f} |")
    tables = [("sweep", rows)] + ([("re-timed", compare(result, "bench"))] if b else [])
    if any(p["kind"] == "int8-budget" for p in result["points"]):
        tables += [("int8 sweep", compare(result, "sweep", "int8-"))]
        tables += [("int8 re-timed", compare(result, "bench", "int8-"))] if b else []
    for what, rs in tables:
        out += ["", f"Speedups {what}:", "",
                ("| target | predicted | measured | error | within 15% | >= target | budget metric "
                 "| uniform at same speedup | best uniform at least as fast |"),
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            u = "-" if r["uniform_interp_metric"] is None else f"{r['uniform_interp_metric']:.4f}"
            bu = r["best_uniform_at_least_as_fast"]
            bu = "-" if bu is None else f"rank {bu['rank']:g}: {bu['speedup']:.2f}x, {bu['metric']:.4f}"
            err = (r["measured"] - r["predicted"]) / r["predicted"]
            out.append(f"| {r['target']:g}x | {r['predicted']:.2f}x | {r['measured']:.2f}x | {100 * err:+.1f}% | "
                       f"{r['within_15pct']} | {r['at_or_above_target']} | {r['metric']:.4f} | {u} | {bu} |")
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
    p.add_argument("--fractions", default=None, help="budget candidate grid (default: onnxlr.planning.FRACTIONS)")
    p.add_argument("--keep", type=Path, default=None, help="where the points' models go (default .cache/budget/<tag>)")
    p.add_argument("--runs", type=int, default=100, help="interleaved rounds of the re-timing (0: none)")
    p.add_argument("--int-range", default=None,
                   help="LO:HI, integer inputs of the re-timing (default 0:2 for all-minilm-l6-v2, else 0:100)")
    p.add_argument("--damage", default="auto", help="the damage estimator (compress --damage); shipped applies "
                                                     "to the int8 sweep, the fp32 sweep uses auto then")
    p.add_argument("--render", action="store_true", help="only rewrite <out>/<name>.md from <out>/<name>.json")
    p.add_argument("--int8", action="store_true",
                   help="also sweep planned for int8 (--quantize int8): int8-budget, int8-uniform and int8-original "
                        "points in the same JSON and re-timing")
    p.add_argument("--int8-targets", default=None,
                   help="targets of the int8 sweep, against the fp32 original (default: --targets); the int8 "
                        "original alone is already a speedup, so the targets worth planning lie above it")
    args = p.parse_args(argv)
    if args.render:
        tag = args.name + ("-datafree" if args.data_free else "")
        data = json.loads((args.out / f"{tag}.json").read_text())
        if "baseline_macs" not in data:
            model = args.model or (ROOT / "models" / "digits_vgg.onnx" if args.name == "digits" else REAL / args.name / "model.onnx")
            calib = args.calib or (model.with_name("digits_vgg_calib.npz") if args.name == "digits"
                                   else REAL / args.name / "calib.npz")
            add_macs(data, args.keep or ROOT / ".cache" / "budget" / tag, calib)
        data["comparison"] = compare(data)
        (args.out / f"{tag}.json").write_text(json.dumps(data, indent=2))
        md = markdown(tag, data, data["comparison"])
        (args.out / f"{tag}.md").write_text(md + "\n")
        print(md)
        return 0
    if args.fractions:
        from onnxlr.budget import planning

        planning.FRACTIONS = parse_floats(args.fractions, "--fractions")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    records: list = []
    if args.name == "digits":
        model = args.model or ROOT / "models" / "digits_vgg.onnx"
        calib = args.calib or model.with_name("digits_vgg_calib.npz")
        evaluate = digits_callback(model.with_name("digits_vgg_test.npz"), records)
    else:
        model = args.model or REAL / args.name / "model.onnx"
        calib = args.calib or REAL / args.name / "calib.npz"
        evaluate = real_callback(args.name, records)
    tag = args.name + ("-datafree" if args.data_free else "")
    saved: list = []
    evaluate = keeping(evaluate, args.keep or ROOT / ".cache" / "budget" / tag, saved)
    int_range = tuple(int(x) for x in (args.int_range or ("0:2" if args.name == "all-minilm-l6-v2" else "0:100"))
                      .split(":"))
    load_start = os.getloadavg()[0]
    config = CompressConfig(calib=None if args.data_free else str(calib),
                            calib_samples=None if args.data_free else args.calib_samples,
                            cache_dir=args.cache_dir, damage="auto" if args.damage == "shipped" else args.damage)
    t0 = time.perf_counter()
    result = sweep(str(model), parse_floats(args.targets, "--targets"), uniform=parse_floats(args.uniform, "--uniform"),
                   evaluate=evaluate, config=config)
    int8_result = None
    if args.int8:
        from dataclasses import replace

        from onnxlr.quant import QuantizeConfig

        n_fp32 = len(saved)
        int8_result = sweep(str(model), parse_floats(args.int8_targets or args.targets, "--int8-targets"),
                            uniform=parse_floats(args.uniform, "--uniform"), evaluate=evaluate,
                            config=replace(config, quantize=QuantizeConfig(), damage=args.damage))
        # the int8 sweep evaluated the fp32 original again: one copy of its model and metrics
        saved.pop(n_fp32).unlink()
        if len(records) > n_fp32:
            records.pop(n_fp32)
        for i, path in enumerate(saved):  # point_NN in order again, for add_macs
            if path.name != f"point_{i:02d}.onnx":
                saved[i] = path.rename(path.with_name(f"point_{i:02d}.onnx"))
    args.out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    if int8_result is not None:
        extra = int8_result.to_dict()
        for p in extra["points"]:
            p["kind"] = "int8-" + p["kind"]
        data["points"] += extra["points"]
        data["int8"] = {k: extra[k] for k in ("precision", "baseline_ms", "plan_seconds", "seconds", "damage",
                                              "timings")}
    data["calib_samples"] = None if args.data_free else args.calib_samples
    data["threads"] = __import__("onnxlr.budget.latency", fromlist=["x"]).bench_threads()
    data["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    data["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data["model_sha256"] = hashlib.sha256(Path(model).read_bytes()).hexdigest()
    if records:
        data["baseline_metrics"] = records[0]
        for p, r in zip(data["points"], records[1:]):
            p["metrics"] = r
    if args.runs and len(saved) > 1:
        log.info("re-timing the original and %d points (%d rounds)", len(saved) - 1, args.runs)
        data["bench"] = retime(saved[0], saved[1:], Path(calib), args.runs, int_range)
        for p, b in zip(data["points"], data["bench"]["points"]):
            p["bench"] = b
    add_macs(data, args.keep or ROOT / ".cache" / "budget" / tag, Path(calib))
    rows = compare(data)
    data["comparison"] = rows
    if int8_result is not None:
        data["comparison_int8"] = compare(data, prefix="int8-")
    (args.out / f"{tag}.json").write_text(json.dumps(data, indent=2))
    result.plot(args.out / f"{tag}_frontier.png", title=f"{args.name}: budgeted allocation vs uniform rank")
    if int8_result is not None:
        int8_result.plot(args.out / f"{tag}_int8_frontier.png",
                         title=f"{args.name}: int8-aware budget vs uniform rank + int8")
    md = markdown(tag, data, rows)
    (args.out / f"{tag}.md").write_text(md + "\n")
    print(md)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {args.out}/{tag}.json, _frontier.png, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
