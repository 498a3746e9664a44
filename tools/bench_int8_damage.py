"""How well the int8 plan's damage predicts the damage of the int8 model that ships.

An int8 budget (``--quantize int8``) scores each candidate by one full pass with the candidate's
chain balanced and its weights rounded as onnxruntime rounds them, activations in float
(:func:`onnxlr.budget.damage.int8_weights`). This tool builds that plan for a real model, then for
every K-th candidate quantizes the model with only that layer factorized exactly as compress ships
it (:func:`onnxlr.budget.outputs.build_shipped`) and measures its squared output error on the
plan's check samples, minus the int8 original's (``plan.base_damage``). Prints one line per
candidate and the Spearman correlation; writes ``<out>/int8_damage_<model>.json``.

    ONNXLR_BENCH_THREADS=1 python tools/bench_int8_damage.py efficientnet-lite0 --every 5 --out docs/budget/int8_range
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxlr import model as g
from onnxlr.budget import outputs, planning
from onnxlr.budget.outputs import output_error, scored_outputs
from onnxlr.config import CompressConfig
from onnxlr.pipeline import prepare_targets
from onnxlr.quant import QuantizeConfig
from onnxlr.report.compress import CompressReport

REAL = ROOT / ".cache" / "real-models"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="a model of tools/real_models (efficientnet-lite0, ppocr-v6-rec, ...)")
    p.add_argument("--every", type=int, default=5, help="check every K-th usable candidate")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    args = p.parse_args(argv)
    folder = REAL / args.name
    config = CompressConfig(calib=str(folder / "calib.npz"), calib_samples=args.calib_samples,
                            quantize=QuantizeConfig())
    work = g.load_model(folder / "model.onnx")
    g.fold_constant_weights(work)
    found = prepare_targets(work, config, CompressReport())  # as compress plans it
    started = time.perf_counter()
    plan = planning.build_plan(work, found, config)
    plan_s = time.perf_counter() - started
    print(f"{args.name}: plan {plan_s:.0f} s, damage by {plan.damage.get('estimator')}, "
          f"int8 original's output error {math.sqrt(plan.base_damage):.4f}")
    picked = [(lp, c) for lp in plan.layers for c in lp.usable()][:: args.every]
    rows = []
    for lp, c in picked:
        shipped = outputs.build_shipped(plan, {lp.index: c})
        error = output_error(plan.reference_outputs, scored_outputs(plan, shipped, plan.check_feeds))
        rows.append({"layer": lp.name, "candidate": c.label(), "simulated": c.damage,
                     "shipped": error**2, "shipped_minus_original": error**2 - plan.base_damage})
        print(f"{lp.name[-30:]:30s} {c.label():24s} simulated {c.damage:.4g}  shipped int8 {error**2:.4g} "
              f"(int8 original {plan.base_damage:.4g})", flush=True)
    rho = float(spearmanr([r["simulated"] for r in rows], [r["shipped_minus_original"] for r in rows]).correlation)
    lower = sum(r["shipped_minus_original"] < 0 for r in rows)
    print(f"{len(rows)} candidates: Spearman {rho:.2f}; {lower} of them make the int8 model's error lower "
          f"than the int8 original's")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"int8_damage_{args.name}.json").write_text(json.dumps(
        {"model": args.name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "plan_s": plan_s,
         "base_damage": plan.base_damage, "estimator": plan.damage.get("estimator"), "spearman": rho,
         "lower_than_original": lower, "candidates": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
