"""What compress did, per layer and in total: a table for people and JSON for tools."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from onnxlr.report.tables import format_table, human, ratio


@dataclass
class LayerReport:
    name: str
    op_type: str
    method: str | None
    ranks: dict[str, int] | None
    weight_shape: list[int]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    weight_rel_error: float | None
    skipped: str | None
    raw_ranks: dict[str, int] | None = None
    output: str | None = None  # the tensor the layer (or its chain) writes
    graph: str = "main"
    notes: list[str] = field(default_factory=list)


@dataclass
class CompressReport:
    layers: list[LayerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model_notes: list[str] = field(default_factory=list)
    budget: dict | None = None  # the allocation a --target-speedup/--target-macs/--max-error chose
    quantization: object = None  # onnxlr.quant.QuantReport of --quantize (to_dict(), lines())

    @property
    def replaced(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def totals(self) -> dict[str, int | None]:
        def total(key: str) -> int | None:
            values = [getattr(layer, key) for layer in self.layers]
            return None if any(v is None for v in values) else sum(values)

        return {
            "params_before": total("params_before"),
            "params_after": total("params_after"),
            "macs_before": total("macs_before"),
            "macs_after": total("macs_after"),
            "layers_replaced": len(self.replaced),
            "layers_skipped": len(self.layers) - len(self.replaced),
        }

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "totals": self.totals,
            "warnings": self.warnings,
            "notes": self.model_notes,
            "budget": self.budget,
            "quantization": None if self.quantization is None else self.quantization.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        rows = [("layer", "op", "method", "ranks", "params", "MACs", "w.err", "note")]
        for layer in self.layers:
            ranks = format_ranks(layer.ranks, short=True) if layer.ranks else "-"
            rows.append(
                (
                    layer.name,
                    layer.op_type,
                    layer.method or "-",
                    ranks,
                    f"{human(layer.params_before)}->{human(layer.params_after)}",
                    f"{human(layer.macs_before)}->{human(layer.macs_after)}",
                    "-" if layer.weight_rel_error is None else f"{layer.weight_rel_error:.3g}",
                    layer.skipped or "; ".join(layer.notes),
                )
            )
        t = self.totals
        rows.append(
            (
                "TOTAL",
                "",
                f"{t['layers_replaced']} replaced",
                f"{t['layers_skipped']} kept",
                f"{human(t['params_before'])}->{human(t['params_after'])} ({ratio(t['params_before'], t['params_after'])})",
                f"{human(t['macs_before'])}->{human(t['macs_after'])} ({ratio(t['macs_before'], t['macs_after'])})",
                "",
                "",
            )
        )
        lines = format_table(rows)
        if not self.replaced:
            lines.append("No layer was replaced: " + ("the model has no Conv, Gemm or MatMul layer"
                                                       if not self.layers else "see the reasons above"))
        lines.extend(f"warning: {w}" for w in self.warnings)
        lines.extend(f"note: {n}" for n in self.model_notes)
        if self.quantization is not None:
            lines.extend("quantization: " + line if i == 0 else "  " + line
                         for i, line in enumerate(self.quantization.lines()))
        return "\n".join(lines)


def compress_summary(report: CompressReport, verification, timing, steps=None) -> str:
    """One table after `compress --verify`: size, cost, agreement and measured speed; with
    ``steps`` (an ``onnxlr.proof.steps.StepsResult``, after --quantize) each step's contribution
    follows: fp32 original -> factorized fp32 -> factorized int8, and the int8 original."""
    t = report.totals
    base, compressed = timing.models[0], timing.models[1]
    rows = [("", "original", "compressed", "ratio")]
    rows.append(("params (Conv/Gemm/MatMul weights)", human(t["params_before"]), human(t["params_after"]),
                 ratio(t["params_before"], t["params_after"])))
    rows.append(("MACs (Conv/Gemm/MatMul)", human(t["macs_before"]), human(t["macs_after"]),
                 ratio(t["macs_before"], t["macs_after"])))
    rows.append((f"latency median ms ({timing.providers[0]}, {timing.threads} threads)",
                 f"{base.median_ms:.3g}", f"{compressed.median_ms:.3g}",
                 f"{compressed.speedup:.2f}x (p10-p90 {compressed.speedup_p10:.2f}-{compressed.speedup_p90:.2f})"))
    for out in verification.outputs:
        stats = f"rel err {out.rel_error:.3g}, cosine {out.cosine:.5f}"
        if out.top1 is not None:
            stats += f", top-1 agree {100 * out.top1:.1f}%"
        rows.append((f"output {out.name}", "", stats, ""))
    lines = format_table(rows)
    verdict = "PASSED" if verification else "FAILED"
    lines.append(f"verification {verdict} on {verification.inputs.get('samples')} samples "
                 f"({verification.inputs.get('source')}); speedup is the median of {timing.runs} interleaved pairs")
    if steps is not None:
        lines += ["", "each step's contribution:", steps.to_table()]
    return "\n".join(lines)


def format_ranks(ranks: dict, short: bool = False) -> str:
    """``{'rank_in': 24, 'rank_out': 48}`` -> ``in 24, out 48`` (``24,48`` when ``short``)."""
    if short:
        return ",".join(str(v) for v in ranks.values())
    return ", ".join(str(v) if k == "rank" else f"{k.removeprefix('rank_')} {v}" for k, v in ranks.items())
