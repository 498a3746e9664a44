"""Which layers to keep in float: measured sensitivity, then the fewest exclusions meeting a bound.

**Output error** of a model y~ against the float model y on check feeds f = 1..F, worst output::

    err = max_o  sqrt( sum_f ||y~_o,f - y_o,f||^2 / sum_f ||y_o,f||^2 )

**Sensitivity** of layer l: the output error with *only* l quantized (its weights, its input
activation, its bias). Measured one layer at a time, it does not saturate: when two layers each
ruin the output, leaving either one in float changes little in a fully quantized model, so a
leave-one-out measure would call both harmless; quantized alone, each shows its damage.

**Exclusion.** Sort the layers by sensitivity, worst first, and keep the k worst in float for the
smallest k whose fully measured error err(k) <= max_error, found by bisection on k (err(0) is the
all-quantized model, err(N) = 0 is the float one). Every err(k) is measured, not predicted, so the
bound holds for the model returned even where errors do not add up. Cost: N sensitivity trials
plus about log2(N) + 1 exclusion trials, each a quantization (calibration is cached) and a run of
the check feeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


def output_error(
    reference: Sequence[Sequence[np.ndarray]], actual: Sequence[Sequence[np.ndarray]]
) -> float:
    """Relative L2 error over all feeds, worst output (see the module docstring). ``reference``
    and ``actual`` hold one list of outputs per feed."""
    if not reference:
        return 0.0
    worst = 0.0
    for o in range(len(reference[0])):
        diff = sum(
            float(np.sum((np.asarray(a[o], np.float64) - np.asarray(r[o], np.float64)) ** 2))
            for r, a in zip(reference, actual)
        )
        norm = sum(float(np.sum(np.asarray(r[o], np.float64) ** 2)) for r in reference)
        worst = max(worst, float(np.sqrt(diff / norm)) if norm > 0 else float(np.sqrt(diff)))
    return worst


@dataclass
class Exclusion:
    """The outcome of the search: which layers stay in float, and what was measured."""

    excluded: list[str]
    error: float  # measured with exactly ``excluded`` in float
    sensitivity: dict[str, float] = field(default_factory=dict)
    trials: int = 0


def exclude_until(
    names: Sequence[str],
    max_error: float,
    all_error: float,
    error_only: Callable[[str], float],
    error_without: Callable[[list[str]], float],
) -> Exclusion:
    """Keep the most sensitive of ``names`` in float until the output error is <= ``max_error``.

    ``all_error`` is the measured error with every layer quantized; ``error_only(name)`` measures
    the error with only ``name`` quantized, ``error_without(names)`` with ``names`` in float.
    """
    if all_error <= max_error or not names:
        return Exclusion(excluded=[], error=all_error)
    sensitivity = {name: error_only(name) for name in names}
    order = sorted(names, key=lambda n: -sensitivity[n])
    measured = {0: all_error}
    lo, hi = 0, len(order)  # err(lo) > max_error; err(hi) assumed <= max_error until measured
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measured[mid] = error_without(order[:mid])
        if measured[mid] <= max_error:
            hi = mid
        else:
            lo = mid
    if hi not in measured:
        measured[hi] = error_without(order[:hi])
    return Exclusion(
        excluded=order[:hi],
        error=measured[hi],
        sensitivity=sensitivity,
        trials=len(names) + len(measured) - 1,
    )
