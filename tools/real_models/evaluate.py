"""Score an ONNX model (e.g. a compressed one) on a real model's evaluation sets.

    python -m tools.real_models.evaluate NAME MODEL.onnx [--data .cache/real-models] [--json]

NAME is one of the fetched models (efficientnet-lite0, ppocr-v6-rec, all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.real_models.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(tasks.MODELS))
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--data", type=Path, default=Path(".cache/real-models"),
                        help="output root of fetch, or the model's folder in it")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = parser.parse_args(argv)
    results = tasks.evaluate(args.name, args.onnx, args.data, args.batch_size)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for eval_set, metrics in results.items():
            print(eval_set + ": " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
