"""`onnxlr inspect`: every Conv, Gemm and MatMul, its cost, and what rank selection would pick.

For each layer: weight shape, parameters, MACs per sample and share of the model's MACs, whether it
can be factorized (or why not), and the ranks that ``evbmf`` and ``energy:0.9`` choose with the MAC
reduction each gives under ``--method auto``. Where shape inference cannot size a layer's output
(dynamic spatial dims or sequence length), MACs are given per output position and marked so; they
are then left out of the shares.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxlr import data, methods
from onnxlr import model as g
from onnxlr.layers import ConvLayer
from onnxlr.methods.linalg import single_threaded_blas
from onnxlr.model.targets import NOMINAL_SPATIAL, fill_runtime_shapes, find_targets, layer_macs
from onnxlr.ranks import parse_rank
from onnxlr.report.tables import format_table, human

INSPECT_SPECS = ("evbmf", "energy:0.9")


@dataclass
class Suggestion:
    spec: str
    method: str
    ranks: dict[str, int]
    macs_after: int | None
    mac_reduction: float | None  # before / after
    notes: list[str] = field(default_factory=list)


@dataclass
class LayerInfo:
    name: str
    op_type: str
    weight_shape: list[int]
    params: int
    macs: int | None  # per sample, or per output position when macs_per_position
    macs_per_position: bool
    mac_share: float | None
    factorizable: bool
    reason: str | None
    suggestions: list[Suggestion] = field(default_factory=list)


@dataclass
class InspectResult:
    model: str
    layers: list[LayerInfo]

    @property
    def totals(self) -> dict:
        known = [layer.macs for layer in self.layers if layer.macs is not None and not layer.macs_per_position]
        return {
            "layers": len(self.layers),
            "factorizable": sum(layer.factorizable for layer in self.layers),
            "params": sum(layer.params for layer in self.layers),
            "macs_known": sum(known),
            "layers_with_unknown_size": sum(layer.macs_per_position for layer in self.layers),
        }

    def to_dict(self) -> dict:
        return {"model": self.model, "layers": [asdict(layer) for layer in self.layers], "totals": self.totals}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        header = ["layer", "op", "weight", "params", "MACs", "share", "factorizable"]
        header += [f"{spec} ranks -> MACs" for spec in INSPECT_SPECS]
        rows = [tuple(header)]
        for layer in self.layers:
            macs = human(layer.macs) + ("/pos" if layer.macs_per_position else "")
            share = "-" if layer.mac_share is None else f"{100 * layer.mac_share:.1f}%"
            cells = [
                layer.name,
                layer.op_type,
                "x".join(map(str, layer.weight_shape)),
                human(layer.params),
                macs,
                share,
                "yes" if layer.factorizable else f"no: {layer.reason}",
            ]
            for s in layer.suggestions:
                reduction = "?" if s.mac_reduction is None else f"{s.mac_reduction:.2f}x"
                cells.append(f"{s.method} {','.join(map(str, s.ranks.values()))} -> {reduction}")
            cells += ["-"] * (len(header) - len(cells))
            rows.append(tuple(cells))
        t = self.totals
        known, unsized = t["macs_known"], t["layers_with_unknown_size"]
        total = "?" if unsized and not known else human(known) + ("+?" if unsized else "")
        rows.append(("TOTAL", "", "", human(t["params"]), total, "100%" if known else "-",
                     f"{t['factorizable']} of {t['layers']}") + ("",) * len(INSPECT_SPECS))
        lines = format_table(rows)
        if t["layers_with_unknown_size"]:
            lines.append(f"note: {t['layers_with_unknown_size']} layer(s) have dynamic sizes: their MACs are per "
                         "output position (/pos) and not in the total; --shape NAME:DIMS or --inputs DATA sizes them")
        return "\n".join(lines)


def inspect(model: onnx.ModelProto | str | os.PathLike, round_to: int = 8, *, shapes: dict | None = None,
            inputs=None) -> InspectResult:
    """``shapes`` (name -> dims) or ``inputs`` (anything onnxlr.data.open_source takes; its first
    sample is used) size the layers whose dims the model leaves dynamic."""
    name = str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
    if not isinstance(model, onnx.ModelProto):
        model = g.load_model(model)
    targets = find_targets(model, g.infer_shapes(model))
    feed = None
    if shapes or inputs is not None:
        specs = data.model_input_specs(model)
        feed = next(iter(data.open_source(inputs, specs, shapes=shapes if inputs is None else None, samples=1)), None)
    fill_runtime_shapes(model, targets, feed)
    infos = []
    with single_threaded_blas():
        for target in targets:
            infos.append(_layer_info(target, round_to))
    total = sum(i.macs for i in infos if i.macs is not None and not i.macs_per_position)
    for info in infos:
        if info.macs is not None and not info.macs_per_position and total:
            info.mac_share = info.macs / total
    infos.sort(key=lambda i: (i.macs_per_position, -(i.macs or 0)))
    return InspectResult(model=name, layers=infos)


def _layer_info(target, round_to: int) -> LayerInfo:
    params = int(np.prod(target.weight_shape)) if target.weight_shape else 0
    info = LayerInfo(
        name=target.name,
        op_type=target.op_type,
        weight_shape=list(target.weight_shape),
        params=params,
        macs=None,
        macs_per_position=False,
        mac_share=None,
        factorizable=target.skip is None,
        reason=target.skip,
    )
    if target.layer is None or target.skip is not None:
        return info
    method = methods.auto(target.layer)
    for spec in INSPECT_SPECS:
        replacement, rank_log = method.factorize(target.layer, parse_rank(spec), round_to)
        before, after = layer_macs(target, replacement)
        if before is None:
            before, after = layer_macs(target, replacement, nominal=True)
            info.macs_per_position = True
            before, after = _per_position(target, before), _per_position(target, after)
        info.macs = before
        info.suggestions.append(
            Suggestion(spec, method.name, replacement.ranks, after, before / after if after else None, rank_log.notes)
        )
    return info


def _per_position(target, macs: int) -> int:
    """Nominal MACs divided back to one output position (or one row of a linear layer)."""
    layer = target.layer
    if isinstance(layer, ConvLayer):
        return macs // (NOMINAL_SPATIAL ** layer.spatial_rank)
    return macs
