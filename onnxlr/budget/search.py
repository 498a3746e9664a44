"""Search after the greedy allocation: swaps measured on the model they change.

The greedy allocation (:func:`onnxlr.budget.allocate.allocate`) adds damages measured one layer at
a time, as if the layers' errors were independent. They are not: in a transformer or a CNN, two
factorized layers of one block can add more error than their damages say, or less. Starting from
the greedy allocation, this search measures each move in its context, on the plan's damage
samples:

* back: one chosen layer one step back along its hull (less compression), b_i = the error^2 saved;
* forward: one layer one step further, c_j = the error^2 added.

A swap (i back, j forward) that keeps at least the saving asked for (ms, or MACs: the allocation's
own by default; with less, one step back alone is a move too) is estimated at c_j - b_i; the :data:`TOP_SWAPS` best estimates are built and measured, and the best one that
lowers the model's error is taken. Then the moves of the two layers it changed are measured again
(the others are kept: one step elsewhere changes them little), and so on until no measured swap
helps, :data:`MAX_SWAPS` were taken, or the time (:data:`SEARCH_BUDGET_S`, ``--search-time``) is
spent. When not every move fits in the time, the least efficient chosen steps and the most
efficient next steps (by their single-layer damage per saving) are measured first.

Measured on MiniLM-L6 (36 MatMul layers, 32 damage samples, the allocation's predicted saving
kept): the output error on 100 calibration samples no plan saw went from 0.332 to 0.318 at 1.2x,
from 0.415 to 0.399 at 1.3x and from 0.510 to 0.491 at 1.5x, in 79, 77 and 91 model passes (43, 38
and 42 s). Measuring every move again when no swap helps found one more swap at 1.3x in 96 s, whose
error was lower on the damage samples and higher on the unseen ones (0.402): the damage samples
are 32, and the later swaps chase their noise. Hence few swaps, a short default time, and a swap
is taken only when its drop is larger than the samples' noise: :data:`MIN_DROP_SE` standard errors
of the paired per-sample difference (:func:`lower`). On the same plans, judged on the 100 unseen
samples, that stopped MiniLM's 1.2x and 1.3x searches one swap before the swap that raised the
unseen error (0.3166 -> 0.3184, 0.3969 -> 0.3991), kept 1.5x's five swaps (0.510 -> 0.491), and
took none of EfficientNet-Lite0's two at 1.1x (unseen 0.303 -> 0.308 with them) nor of its four
at 1.2x (0.416 -> 0.401 with them; top-1 agreement on 300 crops 67.7% -> 67.0%).

Every score is the output error of the model the plan ships at its damage's precision: float, or
for an int8 plan the chains' weights fake-quantized as the ``full`` damage does
(:func:`onnxlr.budget.damage.int8_weights`), or the quantized model itself under ``--damage
shipped``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from onnxlr.budget.damage import int8_weights
from onnxlr.budget.outputs import build_model, build_shipped, sample_errors2, scored_outputs
from onnxlr.report.progress import Progress

#: Seconds the search may take per goal (``--search-time``; 0 turns it off).
SEARCH_BUDGET_S = 60.0
#: Swaps built and measured per step, best estimates first.
TOP_SWAPS = 3
#: Swaps taken at most.
MAX_SWAPS = 8
#: Fewest moves worth measuring: with less time than that the search does not start.
MIN_MOVES = 4
#: A swap is taken only when it lowers the error by at least this many standard errors of the
#: paired per-sample difference: smaller drops are the damage samples' noise.
MIN_DROP_SE = 1.0


@dataclass
class SearchResult:
    positions: dict  # layer index -> steps taken along its hull (0: kept)
    error_before: float  # relative output error on the damage samples
    error_after: float
    path: list = field(default_factory=list)  # positions after each swap taken, in order (the last: positions)
    evaluations: int = 0
    swaps: list = field(default_factory=list)  # one line per swap taken
    stopped: str = ""
    seconds: float = 0.0

    def record(self) -> dict:
        return {"error_before": self.error_before, "error_after": self.error_after,
                "evaluations": self.evaluations, "swaps": self.swaps, "stopped": self.stopped,
                "seconds": self.seconds}


def scorer(plan):
    """choice -> squared relative output error on the plan's check samples, per sample (their sum
    is the error^2), at the precision its damages were measured at."""
    shipped = plan.quantize is not None and "shipped" in str(plan.damage.get("estimator", ""))

    def err2(choice: dict) -> np.ndarray:
        if shipped:
            model = build_shipped(plan, choice)
        else:
            model = build_model(plan, {i: int8_weights(c, plan.quantize) for i, c in choice.items()})
        return sample_errors2(plan.reference_outputs, scored_outputs(plan, model, plan.check_feeds),
                              plan.check_samples)

    return err2


def lower(new, current) -> bool:
    """Whether per-sample squared errors ``new`` are lower than ``current`` by at least
    :data:`MIN_DROP_SE` standard errors of their paired difference (plain floats: lower at all)."""
    diff = np.atleast_1d(np.asarray(new, dtype=np.float64) - np.asarray(current, dtype=np.float64))
    if diff.sum() >= 0:
        return False
    if diff.size < 2:
        return True
    return -diff.sum() >= MIN_DROP_SE * math.sqrt(diff.size) * float(np.std(diff, ddof=1))


def improve(hulls: dict, positions: dict, err2, names: dict, budget_s: float = SEARCH_BUDGET_S,
            need: float | None = None) -> SearchResult:
    """Swap steps between layers while the measured error drops, keeping a saving of at least
    ``need`` (default: the saving of ``positions``; with less, steps may also go back alone).

    ``hulls``: layer index -> [(saving, damage, candidate), ...] (cumulative, along the layer's
    lower convex hull, as the greedy takes them); ``positions``: layer index -> steps taken;
    ``err2``: choice -> squared output error, or its per-sample parts (then a swap must lower it
    by :data:`MIN_DROP_SE` standard errors, see :func:`lower`); ``names``: layer index -> name
    (for the record)."""
    started = time.perf_counter()
    pos = dict(positions)

    def saving(p):
        return sum(hulls[i][k - 1][0] for i, k in p.items() if k > 0)

    def choice(p):
        return {i: hulls[i][k - 1][2] for i, k in p.items() if k > 0}

    def step(i, k):  # (saving, damage) of step k (1-based) of layer i, from step k - 1
        s0, d0 = (hulls[i][k - 2][0], hulls[i][k - 2][1]) if k > 1 else (0.0, 0.0)
        return hulls[i][k - 1][0] - s0, hulls[i][k - 1][1] - d0

    need = saving(pos) if need is None else need
    t0 = time.perf_counter()
    errors = err2(choice(pos))
    error = float(np.sum(errors))
    eval_s = max(time.perf_counter() - t0, 1e-6)
    result = SearchResult(pos, math.sqrt(max(error, 0.0)), math.sqrt(max(error, 0.0)), evaluations=1)

    def left():
        return budget_s - (time.perf_counter() - started)

    def moves_of(i):
        out = []
        if pos[i] > 0:
            out.append((i, -1))
        if pos[i] < len(hulls[i]):
            out.append((i, +1))
        return out

    def promise(move):  # single-layer damage per saving: high first for back, low first for forward
        i, d = move
        s, dmg = step(i, pos[i] if d < 0 else pos[i] + 1)
        ratio = dmg / s if s > 0 else math.inf
        return -ratio if d < 0 else ratio

    measured: dict = {}  # (i, direction) -> (error^2 change, saving change)
    todo = sorted((m for i in pos for m in moves_of(i)), key=promise)
    tried: set = set()  # allocations built and measured (none of them beat the error of its time)
    progress = Progress("budget: search", None, unit="passes")
    while True:
        fit = max(int((left() - TOP_SWAPS * eval_s) / eval_s), 0)
        if not measured and fit < min(MIN_MOVES, len(todo)):
            result.stopped = (f"not started: a model pass takes {eval_s:.2f} s, the {budget_s:g} s search "
                              f"fits {fit} of {len(todo)} moves")
            break
        for i, d in todo[:fit]:
            p = dict(pos)
            p[i] += d
            e = float(np.sum(err2(choice(p))))
            result.evaluations += 1
            s, _ = step(i, pos[i] if d < 0 else pos[i] + 1)
            measured[(i, d)] = (e - error, d * s)
            progress.update(result.evaluations, f"error {math.sqrt(max(error, 0.0)):.4f}")
        swaps = []
        for (i, di), (de_i, ds_i) in measured.items():
            if di > 0:
                continue
            if saving(pos) + ds_i >= need:
                swaps.append((de_i, ((i, -1),)))
            for (j, dj), (de_j, ds_j) in measured.items():
                if dj > 0 and j != i and saving(pos) + ds_i + ds_j >= need:
                    swaps.append((de_i + de_j, ((i, -1), (j, +1))))
        swaps = sorted((s for s in swaps if s[0] < 0), key=lambda s: s[0])
        best, built, within_noise = None, 0, 0
        for est, moves in swaps:
            if built == TOP_SWAPS or left() < eval_s:
                break
            p = dict(pos)
            for i, d in moves:
                p[i] += d
            key = tuple(sorted(p.items()))
            if key in tried:
                continue
            tried.add(key)
            e = err2(choice(p))
            result.evaluations += 1
            built += 1
            if lower(e, errors):
                if best is None or np.sum(e) < np.sum(best[0]):
                    best = (e, p, moves)
            elif np.sum(e) < error:
                within_noise += 1
        if best is None:
            result.stopped = "time" if left() < eval_s else "no measured swap lowers the error" + (
                f" beyond the samples' noise ({within_noise} lowered it less than {MIN_DROP_SE:g} standard "
                "error(s) of the paired difference)" if within_noise else "")
            break
        errors, new = best[0], best[2]
        error = float(np.sum(errors))
        result.swaps.append("; ".join(f"{names[i]}: {_label(hulls, i, pos[i])} -> {_label(hulls, i, pos[i] + d)}"
                                      for i, d in new))
        for i, d in new:
            pos[i] += d
        result.path.append(dict(pos))
        changed = {i for i, _ in new}
        measured = {m: v for m, v in measured.items() if m[0] not in changed}
        todo = sorted((m for i in changed for m in moves_of(i)), key=promise)
        if len(result.swaps) >= MAX_SWAPS:
            result.stopped = f"{MAX_SWAPS} swaps"
            break
        if left() < eval_s * (len(todo) + 1):
            result.stopped = "time"
            break
    progress.close()
    result.positions = pos
    result.error_after = math.sqrt(max(error, 0.0))
    result.seconds = time.perf_counter() - started
    return result


def _label(hulls: dict, i: int, k: int) -> str:
    return "kept" if k == 0 else hulls[i][k - 1][2].label()
