"""Timings with their conditions: what else the machine was doing while a figure was measured.

Other jobs on the cores change speedups, not only times (docs: /reference/measuring): under
contention a multi-threaded session behaves like a single-threaded one and small factorized
layers look cheaper than they are on an idle machine. So every timed loop records

* ``threads`` (intra-op threads of the sessions) and ``cores`` (the cores this process may use);
* the load average (``os.getloadavg``) before and after;
* wall time, process CPU time (``resource.getrusage``) and the run-queue wait of this process's
  threads (``/proc/self/task/*/schedstat``, Linux: time a thread was ready to run but had no core);
* the spread of the figure: (p90 - p10) / median of its per-round values;

and calls it *contended* when (any of)

* the threads waited for a core more than :data:`MAX_WAIT` of the wall time (all threads together);
* the 1-minute load average was above ``cores +`` :data:`LOAD_MARGIN` (more runnable work than
  cores, ours included);
* without schedstat: the process got less than :data:`MIN_CPU_SHARE` of one core;
* the spread passed :data:`MAX_SPREAD`.

:func:`timed` runs a measurement, and once more when the first was contended; the second figure
is the one used, with both conditions kept (a persisting contention is the caller's warning).
"""

from __future__ import annotations

import glob
import os
import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from onnxlr import runtime

MAX_WAIT = 0.15
LOAD_MARGIN = 1.0
MIN_CPU_SHARE = 0.5
MAX_SPREAD = 0.5

#: Called with a label ("layer", "model", "check", "final") before every timed loop; tests use it
#: to start competing work.
HOOKS: list = []


@dataclass
class Conditions:
    label: str
    threads: int
    cores: int
    load_before: float
    load_after: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    wait_s: float | None = None  # run-queue wait of all our threads, None where not measurable
    spread: float | None = None
    contended: bool = False
    reasons: list = field(default_factory=list)

    def judge(self) -> Conditions:
        self.reasons = []
        if self.wait_s is not None and self.wall_s > 0 and self.wait_s / self.wall_s > MAX_WAIT:
            self.reasons.append(f"threads waited for a core {self.wait_s:.2f} s in {self.wall_s:.2f} s")
        load = max(self.load_before, self.load_after)
        if load > self.cores + LOAD_MARGIN:
            self.reasons.append(f"load average {load:.2f} on {self.cores} cores")
        if self.wait_s is None and self.wall_s > 0 and self.cpu_s / self.wall_s < MIN_CPU_SHARE:
            self.reasons.append(f"CPU {self.cpu_s / self.wall_s:.2f} s per wall second")
        if self.spread is not None and self.spread > MAX_SPREAD:
            self.reasons.append(f"spread (p90-p10)/median {self.spread:.0%}")
        self.contended = bool(self.reasons)
        return self

    def describe(self) -> str:
        wait = "" if self.wait_s is None else f", threads waited {self.wait_s:.2f} s for a core"
        spread = "" if self.spread is None else f", spread {self.spread:.0%}"
        return (f"{self.threads} threads on {self.cores} cores, load {self.load_before:.2f}->{self.load_after:.2f}, "
                f"CPU {self.cpu_s:.2f} s in {self.wall_s:.2f} s wall{wait}{spread}")

    def to_dict(self) -> dict:
        return asdict(self)


def _wait_ns() -> int | None:
    total, seen = 0, False
    for path in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, ValueError, IndexError):
            continue
    return total if seen else None


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


class Watch:
    """``with Watch(label, threads) as w: ...`` -> ``w.conditions`` (spread set by the caller)."""

    def __init__(self, label: str, threads: int):
        self.conditions = Conditions(label, int(threads), runtime.default_threads(), _load1())

    def __enter__(self) -> Watch:  # noqa: PYI034
        for hook in HOOKS:
            hook(self.conditions.label)
        self._wait, self._cpu, self._wall = _wait_ns(), _cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        c = self.conditions
        c.wall_s = time.perf_counter() - self._wall
        c.cpu_s = _cpu_s() - self._cpu
        wait = _wait_ns()
        c.wait_s = None if wait is None or self._wait is None else max(wait - self._wait, 0) / 1e9
        c.load_after = _load1()


def spread(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    med = float(np.median(values))
    if med <= 0:
        return 0.0
    p10, p90 = np.percentile(values, [10, 90])
    return float((p90 - p10) / med)


def interleaved(runners, warmup: int, runs: int, progress=None) -> np.ndarray:
    """:func:`onnxlr.runtime.interleaved` in chunks, calling ``progress(done)`` between them."""
    if progress is None:
        return runtime.interleaved(runners, warmup, runs)
    chunks = []
    step = max(1, min(runs, 10))
    done = 0
    while done < runs:
        n = min(step, runs - done)
        chunks.append(runtime.interleaved(runners, warmup if done == 0 else 0, n))
        done += n
        progress(done)
    return np.concatenate(chunks, axis=1)


def timed(measure, label: str, threads: int, retry: bool = True) -> tuple[object, list[Conditions]]:
    """``measure() -> (result, per-round values for the spread)`` run under a :class:`Watch`;
    run again once when contended (and ``retry``). Returns (the last result, the conditions of
    every attempt)."""
    attempts = []
    result = None
    for _ in range(2 if retry else 1):
        with Watch(label, threads) as w:
            result, values = measure()
        w.conditions.spread = spread(values) if values is not None and len(values) > 1 else None
        attempts.append(w.conditions.judge())
        if not w.conditions.contended:
            break
    return result, attempts


def summary(attempts: list[Conditions]) -> dict:
    """JSON for one timing: the conditions of the figure used, and whether it was re-measured."""
    last = attempts[-1]
    return {**last.to_dict(), "remeasured": len(attempts) > 1,
            "first": attempts[0].to_dict() if len(attempts) > 1 else None}
