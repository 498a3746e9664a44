"""Damage estimators of the budget against full-pass damage: rank correlation and plan time.

For one model and its calibration data:

1. ``build_plan(damage="full")``: every usable candidate refined and scored by one full-model pass
   on the held-out samples (today's damage, the reference), with each candidate's layer-output
   error e_c on the held-out moments kept;
2. from the same candidates, the cheap estimates: ``sensitivity`` (s_l * e_c^2, s_l from the
   layer's middle candidate, exactly as onnxlr.budget.damage computes it), ``layer-error`` (e_c^2)
   and ``weight-error`` (the data-free damage);
3. ``build_plan(damage="sensitivity")`` for its own plan time (the latency cache is warm by then,
   so compare the damage phases);
4. Spearman's rank correlation of each estimate with the full-pass damage, over all candidates
   and the mean within layers; optionally (``--targets``) the frontier each plan gives.

    python tools/bench_estimators.py digits
    python tools/bench_estimators.py ppocr-v6-rec --calib-samples 64 --targets 1.5,2

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxlr import model as g
from onnxlr.budget import allocate as budget
from onnxlr.budget import damage, planning
from onnxlr.config import CompressConfig, apply_filters
from onnxlr.model.targets import find_targets
from onnxlr.report.compress import CompressReport

REAL = ROOT / ".cache" / "real-models"


def paths(name: str, model: Path | None, calib: Path | None) -> tuple[Path, Path]:
    if name == "digits":
        return model or ROOT / "models" / "digits_vgg.onnx", calib or ROOT / "models" / "digits_vgg_calib.npz"
    return model or REAL / name / "model.onnx", calib or REAL / name / "calib.npz"


def make_plan(model_path: Path, config: CompressConfig):
    work = g.load_model(str(model_path))
    g.fold_constant_weights(work)
    found = find_targets(work, g.infer_shapes(work))
    apply_filters(found, config, CompressReport())
    t0 = time.perf_counter()
    plan = planning.build_plan(work, found, config, cache_dir=config.cache_dir)
    return plan, time.perf_counter() - t0


def cheap_estimates(plan) -> list[dict]:
    """Per usable candidate: full-pass damage and the cheap estimators' values."""
    rows = []
    for lp in plan.layers:
        usable = [c for c in lp.usable() if c.damage is not None]
        if not usable:
            continue
        proxy = damage._proxies(lp)
        mid = damage._middle(usable, proxy)
        e_mid = proxy[id(mid)] ** 2
        s = mid.damage / e_mid if e_mid > 0 else 1.0
        for c in usable:
            rows.append({"layer": lp.name, "candidate": c.label(), "full": c.damage,
                         "sensitivity": s * proxy[id(c)] ** 2, "layer-error": proxy[id(c)] ** 2,
                         "weight-error": c.weight_error**2, "middle": c is mid})
    return rows


def correlations(rows: list[dict]) -> dict:
    out = {}
    full = np.array([r["full"] for r in rows])
    for key in ("sensitivity", "layer-error", "weight-error"):
        est = np.array([r[key] for r in rows])
        pooled = float(spearmanr(full, est).statistic) if len(rows) > 2 else None
        per_layer = []
        for layer in sorted({r["layer"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["layer"] == layer]
            if len(idx) > 2 and np.ptp(full[idx]) > 0 and np.ptp(est[idx]) > 0:
                per_layer.append(float(spearmanr(full[idx], est[idx]).statistic))
        # without each layer's middle candidate (exact in the sensitivity estimate by construction)
        keep = [i for i, r in enumerate(rows) if not r["middle"]]
        no_mid = float(spearmanr(full[keep], est[keep]).statistic) if len(keep) > 2 else None
        out[key] = {"spearman": pooled, "spearman_without_middles": no_mid,
                    "mean_within_layer": float(np.mean(per_layer)) if per_layer else None}
    return out


def frontier(plan, targets) -> list[dict]:
    points = []
    for x in targets:
        alloc = budget.solve(plan, target_speedup=x)
        points.append({"target": x, "layers": len(alloc.choice), "measured_speedup": alloc.measured_speedup,
                       "output_error": alloc.measured_error, "reached": alloc.reached})
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="digits, efficientnet-lite0, ppocr-v6-rec or all-minilm-l6-v2")
    p.add_argument("--model", type=Path)
    p.add_argument("--calib", type=Path)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--targets", default="", help="target speedups for a frontier per estimator (default: none)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("docs/budget/estimators"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    model_path, calib = paths(args.name, args.model, args.calib)
    load = os.getloadavg()
    result = {"model": args.name, "calib_samples": args.calib_samples, "load_before": load, "plans": {}}
    plans = {}
    for estimator in ("full", "sensitivity"):
        config = CompressConfig(calib=str(calib), calib_samples=args.calib_samples, damage=estimator,
                                cache_dir=args.cache_dir)
        plan, seconds = make_plan(model_path, config)
        plans[estimator] = plan
        result["plans"][estimator] = {"seconds": seconds, "phases": plan.seconds, "damage": {
            k: v for k, v in plan.damage.items() if k != "layers"}}
    rows = cheap_estimates(plans["full"])
    result["candidates"] = len(rows)
    result["correlation"] = correlations(rows)
    # the sensitivity plan's own damages against the full ones (its subsample, its middles)
    own = {(lp.name, c.label()): c.damage for lp in plans["sensitivity"].layers for c in lp.usable()}
    pairs = [(r["full"], own[(r["layer"], r["candidate"])]) for r in rows if (r["layer"], r["candidate"]) in own]
    result["correlation"]["sensitivity_plan"] = {
        "spearman": float(spearmanr(*zip(*pairs)).statistic) if len(pairs) > 2 else None}
    targets = [float(x) for x in args.targets.split(",") if x.strip()]
    if targets:
        result["frontier"] = {k: frontier(plans[k], targets) for k in plans}
    result["load_after"] = os.getloadavg()
    result["rows"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    print()
    print(table(result))
    print(f"wrote {path}")
    return 0


def table(result: dict) -> str:
    full, sens = result["plans"]["full"], result["plans"]["sensitivity"]
    lines = [(f"{result['model']}: {result['candidates']} candidates, load {result['load_before'][0]:.2f} -> "
              f"{result['load_after'][0]:.2f}"),
             "| estimator | Spearman vs full (all) | without middles | mean within layer | passes | damage phase s | plan s |",
             "|---|---|---|---|---|---|---|",
             (f"| full | 1 | 1 | 1 | {full['damage'].get('passes')} | {full['phases']['damage']:.1f} | "
              f"{full['seconds']:.1f} |")]
    for key in ("sensitivity", "layer-error", "weight-error"):
        c = result["correlation"][key]
        extra = (f"{sens['damage'].get('passes')} | {sens['phases']['damage']:.1f} | {sens['seconds']:.1f}"
                 if key == "sensitivity" else "0 | - | -")
        lines.append(f"| {key} | {_f(c['spearman'])} | {_f(c['spearman_without_middles'])} | "
                     f"{_f(c['mean_within_layer'])} | {extra} |")
    lines.append(f"sensitivity plan's own damages vs full: Spearman "
                 f"{_f(result['correlation']['sensitivity_plan']['spearman'])}")
    for k, pts in result.get("frontier", {}).items():
        lines.append(f"frontier ({k}): " + "; ".join(
            f"{p['target']:g}x -> {p['measured_speedup']:.2f}x, err {p['output_error']:.4g}" for p in pts))
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
