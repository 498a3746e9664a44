"""Time models in onnxruntime, interleaved, and report each one's speedup over the first.

All models get the same seeded input data and identical sessions (ORT_ENABLE_ALL, ``threads``
intra-op threads, one inter-op thread, thread spinning off: with spinning on, the idle sessions of
an interleaved benchmark steal the cores of the running one). After ``warmup`` untimed rounds,
each of ``runs`` rounds times one ``run`` of every model in turn (A B, B A, A B, ...: the order
flips every round so that running first favours no model), so slow drifts of a shared machine hit
all models alike. Per model:

* latency median, p10 and p90 over the rounds (ms); throughput = samples per run / median latency;
* speedup vs the first model = median over rounds r of ``t_first[r] / t_model[r]``, with the p10
  and p90 of those per-round ratios as its spread (>1 means faster than the first model).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxlr import data, runtime
from onnxlr.errors import OnnxlrError
from onnxlr.report.tables import format_rows as format_table

log = logging.getLogger("onnxlr")

DEFAULT_WARMUP = 10
DEFAULT_RUNS = 100


@dataclass
class ModelTiming:
    """Latency of one model; the speedup fields are None for the first (baseline) model."""

    model: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    throughput: float  # samples per second at the median latency
    speedup: float | None = None
    speedup_p10: float | None = None
    speedup_p90: float | None = None


@dataclass
class BenchResult:
    """Timings of every model plus the session settings that produced them."""

    models: list[ModelTiming]
    providers: list[str]
    threads: int
    inter_op_threads: int
    spinning: bool
    graph_optimization: str
    warmup: int
    runs: int
    batch: int  # samples per run
    input_shapes: dict = field(default_factory=dict)
    io: str = "host"  # "host": numpy in and out of every run; "device": bound on the GPU once

    def to_dict(self) -> dict:
        return asdict(self)

    def to_table(self) -> str:
        rows = []
        for i, m in enumerate(self.models):
            if m.speedup is None:
                speed = "1.00x (baseline)"
            else:
                speed = f"{m.speedup:.2f}x ({m.speedup_p10:.2f}-{m.speedup_p90:.2f})"
            rows.append([m.model, f"{m.median_ms:.3f}", f"{m.p10_ms:.3f}", f"{m.p90_ms:.3f}",
                         f"{m.throughput:.1f}", speed])
        table = format_table(
            ["model", "median ms", "p10 ms", "p90 ms", "samples/s", "speedup (p10-p90)"], rows
        )
        shapes = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in self.input_shapes.items())
        return (
            f"{table}\n\n{'+'.join(self.providers)}, {self.threads} intra-op thread(s), "
            f"{self.inter_op_threads} inter-op, spinning {'on' if self.spinning else 'off'}, "
            f"{self.graph_optimization}; {self.warmup} warmup + {self.runs} timed runs per model, "
            f"interleaved; {self.batch} sample(s) per run; inputs {shapes}"
            + ("; inputs and outputs on the device (no host copies timed)" if self.io == "device" else "")
        )


def bench(
    models: Sequence[runtime.ModelLike] | runtime.ModelLike,
    *,
    provider: str = "cpu",
    provider_options: Mapping[str, str] | Sequence[str] | None = None,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    seed: int = 0,
    int_range: tuple[int, int] = (0, 100),
    host_io: bool = False,
    inputs=None,
) -> BenchResult:
    """Benchmark ``models`` (paths or ``ModelProto``\\ s) interleaved on identical inputs.

    ``threads`` defaults to the number of cores; ``batch`` sets dynamic batch dims (``shapes``
    overrides per input, other dynamic dims are 1). On a GPU provider the inputs sit on the device
    and the outputs stay there unless ``host_io`` (see :func:`runtime.timed_runner`). ``inputs``:
    real data instead of random (anything :func:`data.open_source` takes: an .npz, a folder, a
    ``file.py:function`` loader, a dict); its first feed of ``batch`` samples is timed. Raises
    ``OnnxlrError`` on bad models/options.
    """
    if isinstance(models, (str, bytes, onnx.ModelProto)) or not isinstance(models, Sequence):
        models = [models]
    if not models:
        raise OnnxlrError("bench needs at least one model")
    if runs < 1 or warmup < 0 or batch < 1:
        raise OnnxlrError(
            f"need runs >= 1, warmup >= 0 and batch >= 1 (got {runs}, {warmup}, {batch})"
        )
    if threads is not None and threads < 1:
        raise OnnxlrError(f"threads must be at least 1, got {threads}")
    threads = threads or runtime.default_threads()
    providers = runtime.resolve_provider(provider, provider_options)
    labels = [runtime.model_label(m) for m in models]
    sessions = [runtime.make_session(m, providers=providers, threads=threads) for m in models]

    specs = runtime.input_specs(sessions[0])
    for sess, label in zip(sessions[1:], labels[1:]):
        runtime.check_same_inputs(specs, runtime.input_specs(sess), label)
    if inputs is None:
        feed_shapes = data.resolve_shapes(specs, shapes, batch)
        feed = next(iter(data.random_source(specs, feed_shapes, 1, seed=seed, int_range=int_range)))
    else:
        source = data.open_source(inputs, specs, shapes=shapes, what="--inputs")
        size = data.fixed_batch(specs) or batch
        feed = next(data.batches(data.limited(source, size), specs, size), None)
        if feed is None:
            raise OnnxlrError(f"bench --inputs {source.label} holds no samples")
    per_run = data.sample_rows(feed, specs)

    for sess, label in zip(sessions, labels):  # first run: catches shape errors as user errors
        runtime.run_session(sess, feed, None, label)
    runners = [runtime.timed_runner(s, feed, host_io=host_io) for s in sessions]
    times = runtime.interleaved(runners, warmup, runs)

    timings = []
    for i, (label, t) in enumerate(zip(labels, times)):
        p10, med, p90 = np.percentile(t, [10, 50, 90]) * 1e3
        timing = ModelTiming(label, float(med), float(p10), float(p90), per_run / (med / 1e3))
        if i:
            r10, r50, r90 = np.percentile(times[0] / t, [10, 50, 90])
            timing.speedup, timing.speedup_p10, timing.speedup_p90 = (
                float(r50), float(r10), float(r90)
            )
        timings.append(timing)
    log.info("benchmarked %d model(s), %d runs each", len(models), runs)
    return BenchResult(
        models=timings,
        providers=list(sessions[0].get_providers()),
        threads=threads,
        inter_op_threads=1,
        spinning=False,
        graph_optimization="ORT_ENABLE_ALL",
        warmup=warmup,
        runs=runs,
        batch=per_run,
        input_shapes={k: list(v.shape) for k, v in feed.items()},
        io="host" if host_io or runtime.provider_names(providers)[0] == "CPUExecutionProvider" else "device",
    )
