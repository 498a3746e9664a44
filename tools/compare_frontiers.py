"""An earlier budget frontier against today's, at the same timing conditions.

The layer choices of an earlier ``docs/budget/<model>.json`` (from git) are rebuilt with today's
code (``compress --config`` with one rule per chosen layer, symmetric calibration on the same 64
samples: the budget's own refinement), scored with the model's task metric, and re-timed in one
interleaved run together with the original and today's budget points (the models
``tools/bench_budget.py`` kept in ``.cache/budget/<model>``). So a change of the planner is told
apart from a change of the refinement and from the load the earlier run was timed under.

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

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_budget import METRIC, REAL, real_callback, retime

from onnxlr.config import load_rules
from onnxlr.pipeline import compress_file


def budget_points(result: dict) -> list[dict]:
    return [p for p in result["points"] if p["kind"] == "budget"]


def rebuild(name: str, point: dict, folder: Path) -> Path:
    """The point's layer choices, compressed with today's code; returns the model's path."""
    rules = []
    for layer, spec in point["choice"].items():
        method, _fraction, ranks = spec.split(" ", 2)
        ranks = ast.literal_eval(ranks)
        if set(ranks) != {"rank"}:
            raise SystemExit(f"{layer}: {spec}: only single-rank choices are rebuilt")
        rules.append({"match": "^" + re.escape(layer) + "$", "method": method, "rank": str(ranks["rank"])})
    config = folder / f"t_{point['setting']:g}.json"
    config.write_text(json.dumps(rules))
    path = folder / f"t_{point['setting']:g}.onnx"
    compress_file(REAL / name / "model.onnx", path, overwrite=True, calib=str(REAL / name / "calib.npz"),
                  calib_samples=64, calib_mode="symmetric", rules=load_rules(config), round_to=1,
                  include=tuple(r["match"] for r in rules))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(METRIC))
    p.add_argument("earlier", type=Path, help="an earlier docs/budget/<model>.json")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "budget" / "compare")
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
    rebuilt = [rebuild(args.name, q, folder) for q in earlier]
    metrics = [evaluate(onnx.load(str(path))) for path in rebuilt]
    timing = retime(kept / "point_00.onnx", [kept / f"point_{i + 1:02d}.onnx" for i in range(len(now))] + rebuilt,
                    REAL / args.name / "calib.npz", args.runs, (0, 2) if args.name == "all-minilm-l6-v2" else (0, 100))
    speeds = timing.pop("points")
    rows = []
    for i, (q_now, q_then) in enumerate(zip(now, earlier)):
        rows.append({"target": q_now["setting"],
                     "today": {"bench": speeds[i], "metric": q_now["metric"], "output_error": q_now["error"]},
                     "earlier_choice": {"bench": speeds[len(now) + i], "metric": metrics[i],
                                        "metric_then": q_then["metric"], "output_error_then": q_then["error"]}})
    result = {"model": args.name, "earlier": str(args.earlier), "today_date": today.get("date"), "timing": timing,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(f"{args.name}: one interleaved run of {args.runs} rounds, load {timing['load_average']}, "
          f"original {timing['original_ms']:.2f} ms")
    print("| target | today: re-timed (p10-p90), metric | earlier choice, today's code: re-timed (p10-p90), metric (then) |")
    print("|---|---|---|")
    for r in rows:
        a, b = r["today"], r["earlier_choice"]
        ta, tb = a["bench"], b["bench"]
        print(f"| {r['target']:g}x | {ta['speedup']:.3f}x ({ta['speedup_p10']:.2f}-{ta['speedup_p90']:.2f}), "
              f"{a['metric']:.4f} | {tb['speedup']:.3f}x ({tb['speedup_p10']:.2f}-{tb['speedup_p90']:.2f}), "
              f"{b['metric']:.4f} ({b['metric_then']:.4f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
