"""Decisions: what happens to each target layer, the plain data between planning and splicing.

A decision names its target by position (the order of ``model.targets.find_targets``) and output
tensor, never by a pattern on its name: node names need not be unique, and may be empty. Rules
(``--method``/``--rank``/``--config``) make decisions without replacements; a budget makes them
with the finished replacements it refined and measured, and the pipeline splices exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxlr import methods
from onnxlr.config import CompressConfig, rule_for
from onnxlr.layers import Replacement
from onnxlr.model.targets import Target
from onnxlr.ranks import RankSpec


@dataclass
class Decision:
    index: int  # the target's position in find_targets order
    output: str  # the target's output tensor (unique in the model)
    method: str  # a registry name (onnxlr.methods)
    ranks: RankSpec | dict  # a spec to derive them from the layer, or the exact ranks
    replacement: Replacement | None = None  # finished: spliced as it is, not factorized or refined again
    notes: list[str] = field(default_factory=list)


def rule_decisions(targets: list[Target], config: CompressConfig) -> list[Decision]:
    """One decision per selected target, from --method/--rank and the first matching rule."""
    decisions = []
    for i, target in enumerate(targets):
        if target.skip is not None:
            continue
        requested, spec = rule_for(target, config)
        method, note = methods.resolve(target.layer, requested)
        decisions.append(Decision(i, target.node.output[0], method.name, spec, notes=[note] if note else []))
    return decisions
