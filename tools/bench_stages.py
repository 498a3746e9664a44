"""Asymmetric calibration: output error, task metric and calibration time against the number of
passes (``--calib-stages``), from a few stages up to one per layer (sequential fitting).

With S stages a layer does not see the compression of the layers before it in its own stage;
with one pass per layer every layer is fitted to the inputs the model compressed so far gives it.
Each point compresses the model at the same ranks with ``onnxlr.compress(calib=..., calib_stages=S)``
and scores it like the evaluation suite (held-out evaluation data, disjoint from calibration):
relative output error (onnxlr.verify) and the model's task metric.

    python tools/bench_stages.py --models digits_vgg efficientnet-lite0 --stages 1 2 4 8 all \
        --out docs/calib

Prints a table and writes ``<out>/stages.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.eval_suite import MODELS, NO_FC, agreement

# The setting each model is measured at: the README's data-aware rows.
SETTINGS = {
    "digits_vgg": {"method": "tucker", "rank": "0.375", **NO_FC},
    "efficientnet-lite0": {"method": "auto", "rank": "0.5"},
    "ppocr-v6-rec": {"method": "auto", "rank": "0.5"},
    "all-minilm-l6-v2": {"method": "auto", "rank": "0.5"},
}


def run_point(name: str, stages, folder: Path) -> dict:
    import onnx

    import onnxlr

    spec = MODELS[name]
    out = folder / f"{name}-{stages}.onnx"
    started = time.perf_counter()
    model, report = onnxlr.compress(str(spec.path), calib=str(spec.calib), calib_stages=stages, **SETTINGS[name])
    seconds = time.perf_counter() - started
    onnx.save(model, out)
    import numpy as np

    data = {k: v[: spec.verify_samples] for k, v in np.load(spec.eval_set).items()}
    agree = agreement(spec, spec.path, out, data)
    metrics = spec.metrics(out)
    note = next((n for n in report.model_notes if n.startswith("calibrated")), "")
    return {"model": name, "stages": stages, "passes": note.split(" in ")[1].split(" pass")[0] if " in " in note else None,
            "rel_error": agree.get("rel_error"), "top1_agreement": agree.get("top1"),
            "metric": metrics.get(spec.primary), "metric_name": spec.primary, "compress_seconds": seconds,
            "note": note}


def compare_positions(args) -> int:
    """One row per (model, positions, stages): how many conv positions per sample calibration needs."""
    from onnxlr.calib import collect

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for positions in args.positions:
                collect.CONV_POSITIONS = positions
                for stages in args.stages:
                    value = None if stages == "default" else stages if stages == "all" else int(stages)
                    row = run_point(name, value, Path(tmp)) | {"positions": positions}
                    rows.append(row)
                    print(f"{name} positions={positions} stages={stages}: rel err {row['rel_error']:.4g}, "
                          f"{row['metric_name']} {row['metric']:.4f}, {row['compress_seconds']:.0f} s", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "positions.json").write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_vgg", "efficientnet-lite0"])
    parser.add_argument("--stages", nargs="+", default=["1", "2", "4", "8", "all", "default"],
                        help="pass counts; 'all': one per layer; 'default': what compress chooses")
    parser.add_argument("--out", type=Path, default=None, help="write stages.json here")
    parser.add_argument("--positions", nargs="+", type=int, default=None,
                        help="conv output positions sampled per sample (onnxlr.calib.collect.CONV_POSITIONS) to "
                             "compare, each at the --stages given")
    args = parser.parse_args(argv)
    if args.positions:
        return compare_positions(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if not MODELS[name].exists():
                print(f"{name}: not fetched (python -m tools.real_models.fetch): skipped")
                continue
            for stages in args.stages:
                value = None if stages == "default" else stages if stages == "all" else int(stages)
                row = run_point(name, value, Path(tmp))
                rows.append(row)
                print(f"{name} stages={stages}: passes {row['passes']}, rel err {row['rel_error']:.4g}, "
                      f"{row['metric_name']} {row['metric']:.4f}, {row['compress_seconds']:.0f} s", flush=True)
    result = {"load_average": os.getloadavg(), "rows": rows}
    print("\n| model | stages | passes | output rel. error | task metric | compress s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stages']} | {r['passes']} | {r['rel_error']:.4g} | {r['metric']:.4f} | "
              f"{r['compress_seconds']:.0f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stages.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
