"""Data-free against data-aware compression of one real model at the same ranks.

    python tools/compare_calib.py MODEL_NAME [--rank 0.5] [--method auto] [--modes free,symmetric,asymmetric]
        [--samples N] [--exclude REGEX]... [--data .cache/real-models] [--out DIR] [--no-metric]

MODEL_NAME is a folder of `tools/real_models` output (efficientnet-lite0, ppocr-v6-rec,
all-minilm-l6-v2). Calibration uses its calib.npz; errors and task metrics use its disjoint eval
sets. Ranks are chosen without data, so every mode has the same ranks. Prints one JSON line per
mode (seconds, layers replaced, held-out relative L2 error per eval set, task metric).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx

from onnxlr.pipeline import compress
from onnxlr.proof.verify import verify

REPO = Path(__file__).resolve().parent.parent
EVAL_SETS = {"efficientnet-lite0": ["eval_imagenet", "eval_crops"], "ppocr-v6-rec": ["eval"], "all-minilm-l6-v2": ["eval"]}


def task_metric(name: str, path: Path, data: Path) -> dict:
    """The task metric runs in the tools environment (it needs the real-model helpers)."""
    python = REPO / ".venv-tools" / "bin" / "python"
    out = subprocess.run([str(python if python.exists() else sys.executable), "-m", "tools.real_models.evaluate",
                          name, str(path), "--data", str(data), "--json"], cwd=REPO, capture_output=True, text=True)
    return {"error": out.stderr[-500:]} if out.returncode else json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(EVAL_SETS))
    parser.add_argument("--rank", default="0.5")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--modes", default="free,symmetric,asymmetric")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--data", type=Path, default=REPO / ".cache" / "real-models")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "compare-calib")
    parser.add_argument("--no-metric", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.data / args.model
    results = {}
    for mode in args.modes.split(","):
        options = {"rank": args.rank, "method": args.method, "exclude": tuple(args.exclude)}
        if mode != "free":
            options.update(calib=str(folder / "calib.npz"), calib_samples=args.samples, calib_mode=mode)
        start = time.time()
        model, report = compress(str(folder / "model.onnx"), **options)
        row = {"seconds": round(time.time() - start, 1), "replaced": len(report.replaced)}
        path = args.out / f"{args.model}_{args.rank}_{mode}.onnx"
        onnx.save(model, path)
        row["rel_error"] = {
            s: {o.name: o.rel_error for o in verify(folder / "model.onnx", str(path), inputs=folder / f"{s}.npz",
                                                     max_rel_error=None).outputs}
            for s in EVAL_SETS[args.model]
        }
        if not args.no_metric:
            row["metric"] = task_metric(args.model, path, args.data)
        results[mode] = row
        print(mode, json.dumps(row), flush=True)
    (args.out / f"{args.model}_{args.rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
