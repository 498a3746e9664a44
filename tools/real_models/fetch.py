"""Build the real-model test bed: trained ONNX models plus calibration and evaluation sets.

    python -m tools.real_models.fetch --out .cache/real-models [--only NAME ...]

For each model: export or extract ``model.onnx``, write ``calib.npz`` and the evaluation sets
with their ground truth, measure the original model's task metrics with onnxruntime CPU, and
write everything (plus ONNX stats) to ``info.json``. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import common, tasks

log = logging.getLogger("onnxlr.real_models")


def describe_sets(folder: Path) -> dict:
    sets = {}
    for f in sorted(folder.glob("*.npz")):
        arrays = common.load_npz(f)
        sets[f.stem] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}
    return sets


def fetch_one(name: str, root: Path) -> dict:
    mod = tasks.model_module(name)
    t0 = time.perf_counter()
    folder = mod.build(root)
    onnx_path = folder / "model.onnx"
    stats = common.onnx_stats(onnx_path)
    baseline = tasks.evaluate(name, onnx_path, folder)
    info = {
        "model": name,
        "onnx": str(onnx_path.relative_to(root)),
        **stats,
        "sets": describe_sets(folder),
        "baseline": baseline,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    common.write_json(folder / "info.json", info)
    for eval_set, metrics in baseline.items():
        print(common.format_stats(f"{name} / {eval_set}", stats, metrics), flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.real_models.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".cache/real-models"),
                        help="output root (default: .cache/real-models)")
    parser.add_argument("--only", action="append", choices=list(tasks.MODELS), metavar="NAME",
                        help=f"build only this model (repeatable); one of {', '.join(tasks.MODELS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or list(tasks.MODELS):
        try:
            fetch_one(name, root)
        except Exception:  # keep going: one model's failure must not hide the others
            log.exception("%s failed", name)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
