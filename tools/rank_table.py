"""The ranks each automatic rule picks on the evaluation models, with the MACs and error they give.

    python tools/rank_table.py [--results docs/eval/results.json]

For every model of the evaluation suite and each of `evbmf`, `energy:0.9` and `0.33` (method
auto), compresses without data and summarizes the chosen ranks as fractions of each layer's full
rank (median, min-max over replaced layers); MAC reduction, held-out output error and task metric
come from the evaluation suite's results (`python -m tools.eval_suite`). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import onnxlr

REPO = Path(__file__).resolve().parent.parent
SPECS = ("evbmf", "energy:0.9", "0.33")


def kept_fractions(report) -> list[float]:
    fractions = []
    for layer in report.replaced:
        shape = layer.weight_shape
        if layer.op_type == "Conv" and "rank_in" in layer.ranks:
            fractions += [layer.ranks["rank_out"] / shape[0], layer.ranks["rank_in"] / shape[1]]
        elif layer.op_type == "Conv":
            fractions.append(layer.ranks["rank"] / min(shape[0], int(np.prod(shape[1:]))))
        else:
            fractions.append(layer.ranks["rank"] / min(shape))
    return fractions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "eval" / "results.json")
    args = parser.parse_args()
    models = json.loads(args.results.read_text())["models"]
    print("| model | rank rule | layers replaced | kept rank / full: median (min-max) | MACs | output rel. error | task metric (original) |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in models.items():
        rows = {row["label"]: row for row in entry["settings"]}
        baseline = entry["baseline"]
        primary = entry["primary"]
        for spec in SPECS:
            _, report = onnxlr.compress(baseline["path"], method="auto", rank=spec)
            fractions = kept_fractions(report)
            row = rows.get(f"auto {spec}", {})
            macs = f"{baseline['macs'] / row['macs']:.2f}x fewer" if row.get("macs") else "-"
            error = f"{row['agreement']['rel_error']:.3g}" if row.get("agreement") else "-"
            metric = row.get("metrics", {}).get(primary)
            metric_text = "-" if metric is None else f"{100 * metric:.1f}% ({100 * baseline['metrics'][primary]:.1f}%)"
            ranks = (f"{np.median(fractions):.2f} ({min(fractions):.2f}-{max(fractions):.2f})" if fractions else "-")
            print(f"| {name} | {spec} | {len(report.replaced)} | {ranks} | {macs} | {error} | {metric_text} |")


if __name__ == "__main__":
    main()
