"""An earlier budget frontier against today's, at the same timing conditions.

The layer choices of an earlier ``docs/budget/<model>.json`` (from git) and of today's are both
rebuilt with today's code (``compress --config`` with one rule per chosen layer, symmetric
calibration on as many samples as today's frontier was planned on), scored with the model's task
metric, and re-timed in one interleaved run together with the original and today's budget points
as the budget wrote them (the models ``tools/bench_budget.py`` kept in ``.cache/budget/<model>``). Both rebuilds refine the
same way (``compress`` also fits on the samples the budget holds out), so the comparison of the
two rebuilds is one of the planners' choices alone, at the same timing conditions.

A metric difference of a point or less is within what the evaluation sets can tell apart (300
crops: one crop is 0.33 points), so each difference comes with its paired bootstrap interval: the
same resampled evaluation samples for both models (``tools.real_models.tasks.sample_parts``),
:data:`RESAMPLES` times, the 5th-95th percentiles of the difference. Both rebuilds' output errors
(of the logits, for a Softmax output) are measured too, on the planner's 32 check samples and on
the calibration samples from :data:`UNSEEN_FROM` on where the frontier was planned with fewer,
which neither the rebuilds' calibration nor the checks use: the error the planner minimizes,
against the task metric.

The evaluation sets are small (159 sentences for MiniLM), so for the models whose data is made
(PP-OCRv6's rendered lines, MiniLM's sentences) every model is also scored on ``--fresh`` more
samples made on demand and in neither set (``tools.real_models.tasks.fresh_parts``), with the
same paired intervals. On them a difference the evaluation set left open is settled: the two
targets where the frontier of 2026-11-28 04:23 UTC was lower by less than its interval were lower
there too, beyond theirs.

    git show eb19186:docs/budget/all-minilm-l6-v2.json > /tmp/old.json
    ONNXLR_BENCH_THREADS=1 python tools/compare_frontiers.py all-minilm-l6-v2 /tmp/old.json --out docs/budget/compare

Prints a table and writes ``<out>/<model>.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_budget import METRIC, REAL, real_callback, retime

from onnxlr import data
from onnxlr.budget.outputs import logits_or_outputs, output_error
from onnxlr.budget.planning import CHECK_SAMPLES, check_samples
from onnxlr.config import load_rules
from onnxlr.pipeline import compress_file
from tools.real_models.tasks import MODELS, fresh_parts, sample_parts

RESAMPLES = 2000
UNSEEN_FROM = 100  # of the 200 calibration samples of tools/real_models
FRESH_SEED = 777


def paired_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> list[float]:
    """5th-95th percentiles of metric(a) - metric(b) over samples resampled with replacement,
    the same samples for both; ``a``, ``b``: [numerators, denominators] per sample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[1], (RESAMPLES, a.shape[1]))
    diff = a[0][idx].sum(1) / a[1][idx].sum(1) - b[0][idx].sum(1) / b[1][idx].sum(1)
    return [float(x) for x in np.percentile(diff, [5, 95])]


def budget_points(result: dict) -> list[dict]:
    return [p for p in result["points"] if p["kind"] == "budget"]


def parse_choice(spec: str) -> tuple[str, str, dict]:
    """(method, fraction, ranks) of a point's choice label: ``svd 0.25 {'rank': 96}`` (earlier
    files), ``svd 0.25 (96)`` or ``tucker 0.625 (in 16, out 32)`` (today's)."""
    method, fraction, ranks = spec.split(" ", 2)
    if ranks.startswith("{"):
        return method, fraction, ast.literal_eval(ranks)
    inner = ranks.strip("()")
    if inner.isdigit():
        return method, fraction, {"rank": int(inner)}
    return method, fraction, {k: int(v) for k, v in (part.split() for part in inner.split(", "))}


def rebuild(name: str, point: dict, path: Path, calib_samples: int) -> Path:
    """The point's layer choices, compressed with today's code to ``path``: a single rank as an
    absolute rank, several (Tucker-2's in and out) as the fraction the budget rounded them from,
    rounded the same way (``round_to`` 8, the default; absolute ranks are used as given) and
    checked against the label."""
    rules, expected = [], {}
    for layer, spec in point["choice"].items():
        method, fraction, ranks = parse_choice(spec)
        rank = str(ranks["rank"]) if set(ranks) == {"rank"} else fraction
        rules.append({"match": "^" + re.escape(layer) + "$", "method": method, "rank": rank})
        expected[layer] = ranks
    config = path.with_suffix(".json")
    config.write_text(json.dumps(rules))
    _, report = compress_file(REAL / name / "model.onnx", path, overwrite=True, calib=str(REAL / name / "calib.npz"),
                           calib_samples=calib_samples, calib_mode="symmetric", rules=load_rules(config),
                           include=tuple(r["match"] for r in rules))
    rebuilt = {layer.name: layer.ranks for layer in report.layers if layer.ranks}
    for layer, ranks in expected.items():
        if list(rebuilt.get(layer, {}).values()) != list(ranks.values()):
            raise SystemExit(f"{layer}: rebuilt with ranks {rebuilt.get(layer)}, the point has {ranks}")
    return path


def output_errors(name: str, paths: list[Path], calib_samples: int) -> list[dict]:
    """Each model's output error against the original on the planner's check samples (with
    ``calib_samples``, as tools/bench_budget.py plans) and on the unseen samples, if any are left."""
    original = onnx.load(str(REAL / name / "model.onnx"))
    calib = str(REAL / name / "calib.npz")
    specs = data.model_input_specs(original)
    unseen = [x for i, x in enumerate(data.open_source(calib, specs, what="--calib"))
              if i >= max(UNSEEN_FROM, calib_samples)]
    sets = {"check": list(data.batches(check_samples(original, calib, CHECK_SAMPLES, calib_samples), specs))}
    if unseen:
        sets["unseen"] = list(data.batches(unseen, specs))

    reference = {k: logits_or_outputs(original, feeds) for k, feeds in sets.items()}
    found = []
    for path in paths:
        model = onnx.load(str(path))
        found.append({k: output_error(reference[k], logits_or_outputs(model, feeds)) for k, feeds in sets.items()})
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(METRIC))
    p.add_argument("earlier", type=Path, help="an earlier docs/budget/<model>.json")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "budget" / "compare")
    p.add_argument("--fresh", type=int, default=1000,
                   help="also score on this many fresh samples, for the models that make them (0: none)")
    args = p.parse_args(argv)
    earlier = budget_points(json.loads(args.earlier.read_text()))
    today = json.loads((ROOT / "docs" / "budget" / f"{args.name}.json").read_text())
    now = budget_points(today)
    if [q["setting"] for q in now] != [q["setting"] for q in earlier]:
        raise SystemExit("the two frontiers have different targets")
    kept = ROOT / ".cache" / "budget" / args.name  # point_00 the original, then the points in order
    folder = ROOT / ".cache" / "compare_frontiers" / args.name
    folder.mkdir(parents=True, exist_ok=True)
    evaluate = real_callback(args.name)
    samples = today.get("calib_samples") or 64  # files that do not record it were all planned on 64
    rebuilt_then = [rebuild(args.name, q, folder / f"earlier_{q['setting']:g}.onnx", samples) for q in earlier]
    rebuilt_now = [rebuild(args.name, q, folder / f"today_{q['setting']:g}.onnx", samples) for q in now]
    metrics_then = [evaluate(onnx.load(str(path))) for path in rebuilt_then]
    metrics_now = [evaluate(onnx.load(str(path))) for path in rebuilt_now]
    written = [kept / f"point_{i + 1:02d}.onnx" for i in range(len(now))]
    eval_set, key = METRIC[args.name]
    errors_then = output_errors(args.name, rebuilt_then, samples)
    errors_now = output_errors(args.name, rebuilt_now, samples)

    def parts(path: Path) -> np.ndarray:
        return sample_parts(args.name, path, REAL / args.name, eval_set)[key]
    fresh = args.fresh if hasattr(MODELS[args.name], "fresh") else 0
    k = len(now)
    if fresh:  # written, today's rebuilt, earlier rebuilt, in that order
        on_fresh = fresh_parts(args.name, written + rebuilt_now + rebuilt_then, REAL / args.name, fresh, FRESH_SEED)
    timing = retime(kept / "point_00.onnx", written + rebuilt_now + rebuilt_then, REAL / args.name / "calib.npz",
                    args.runs, (0, 2) if args.name == "all-minilm-l6-v2" else (0, 100))
    speeds = timing.pop("points")
    rows = []
    for i, (q_now, q_then) in enumerate(zip(now, earlier)):
        then = parts(rebuilt_then[i])
        # today's metric less the earlier choice's: each estimate with its paired 5-95% interval
        diff = {"written": paired_interval(parts(written[i]), then),
                "rebuilt": paired_interval(parts(rebuilt_now[i]), then),
                "written_estimate": q_now["metric"] - metrics_then[i],
                "documented": q_now["metric"] - q_then["metric"],
                "rebuilt_estimate": metrics_now[i] - metrics_then[i]}
        if fresh:
            written_f, now_f, then_f = (on_fresh[j * k + i][key] for j in range(3))
            diff["fresh"] = {"samples": fresh, "seed": FRESH_SEED, "written": _ratio(written_f),
                             "today_rebuilt": _ratio(now_f), "earlier_rebuilt": _ratio(then_f),
                             "written_difference": paired_interval(written_f, then_f),
                             "rebuilt_difference": paired_interval(now_f, then_f)}
        rows.append({"target": q_now["setting"], "difference": diff,
                     "output_error": {"today_rebuilt": errors_now[i], "earlier_rebuilt": errors_then[i]},
                     "today": {"bench": speeds[i], "metric": q_now["metric"], "output_error": q_now["error"]},
                     "today_rebuilt": {"bench": speeds[k + i], "metric": metrics_now[i]},
                     "earlier_rebuilt": {"bench": speeds[2 * k + i], "metric": metrics_then[i],
                                         "metric_then": q_then["metric"], "output_error_then": q_then["error"]}})
    result = {"model": args.name, "earlier": str(args.earlier), "today_date": today.get("date"), "timing": timing,
              "calib_samples": samples, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(f"{args.name}: one interleaved run of {args.runs} rounds, load {timing['load_average']}, "
          f"original {timing['original_ms']:.2f} ms; both choices rebuilt on {samples} calibration samples")
    print("| target | today, as written: re-timed (p10-p90), metric | today's choice rebuilt | earlier choice "
          "rebuilt (metric in the earlier run) | today - earlier, as written (5-95%) | rebuilt (5-95%) | "
          "as documented |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, c, b, d = r["today"], r["today_rebuilt"], r["earlier_rebuilt"], r["difference"]
        print(f"| {r['target']:g}x | {_cell(a)} | {_cell(c)} | {_cell(b)} ({b['metric_then']:.4f}) | "
              f"{_diff(d['written_estimate'], d['written'])} | {_diff(d['rebuilt_estimate'], d['rebuilt'])} | "
              f"{d['documented']:+.4f} |")
    if fresh:
        print(f"\non {fresh} fresh samples (seed {FRESH_SEED}): today as written, today rebuilt, earlier rebuilt | "
              "today - earlier, as written (5-95%) | rebuilt (5-95%)")
        for r in rows:
            f = r["difference"]["fresh"]
            print(f"{r['target']:g}x: {f['written']:.4f}, {f['today_rebuilt']:.4f}, {f['earlier_rebuilt']:.4f} | "
                  f"{_diff(f['written'] - f['earlier_rebuilt'], f['written_difference'])} | "
                  f"{_diff(f['today_rebuilt'] - f['earlier_rebuilt'], f['rebuilt_difference'])}")
    print(f"\noutput error of the rebuilt choices, today / earlier: on the {CHECK_SAMPLES} check samples | on the "
          f"calibration samples from {UNSEEN_FROM} on")
    for r in rows:
        e = r["output_error"]
        unseen = (f"{e['today_rebuilt']['unseen']:.4f} / {e['earlier_rebuilt']['unseen']:.4f}"
                  if "unseen" in e["today_rebuilt"] else "none left (the rebuilds fit on every sample)")
        print(f"{r['target']:g}x: {e['today_rebuilt']['check']:.4f} / {e['earlier_rebuilt']['check']:.4f} | {unseen}")
    return 0


def _ratio(parts: np.ndarray) -> float:
    return float(parts[0].sum() / parts[1].sum())


def _diff(estimate: float, interval: list[float]) -> str:
    return f"{estimate:+.4f} ({interval[0]:+.4f} to {interval[1]:+.4f})"


def _cell(entry: dict) -> str:
    t = entry["bench"]
    return f"{t['speedup']:.3f}x ({t['speedup_p10']:.2f}-{t['speedup_p90']:.2f}), {entry['metric']:.4f}"


if __name__ == "__main__":
    raise SystemExit(main())
