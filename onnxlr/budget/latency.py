"""Per-layer latency microbenchmarks, cached on disk.

The cost of a candidate replacement is what it takes on the execution provider, not its MAC count
(measured here: channel counts off a multiple of 8 leave onnxruntime's blocked conv kernels, and a
small Gemm beats its MAC ratio). For one layer, :func:`time_layer` builds one-node models::

    X[real input shape, batch 1] -> original layer -> Y           (the reference)
    X -> chain step 1 -> ... -> chain step k -> Y                (one model per candidate)

with the layer's real input shape (read from an onnxruntime run of the whole model, so dynamic
dims such as a sequence length take their real value), and times them *interleaved* with the
project's bench machinery (``runtime.interleaved``: sessions with spinning off, order flipped every
round). Each model's latency is its median over the rounds; a candidate's saving is
``t_original - t_candidate``.

Cache: a JSON file (``<cache_dir>/latency.json``, default ``~/.cache/onnxlr``; ``ONNXLR_CACHE_DIR``
overrides) maps a key to milliseconds. The key hashes the provider, the onnxruntime version, the
thread count, the precision (:func:`precision_tag`: fp32, or the INT8 mode) and the one-node
model's *structure* (input shape, op types, attributes, weight shapes; not the weight values, which
do not change the time), so a layer measured once is reused by every target of a sweep, every run,
and every model with the same layer; fp32 and int8 times never mix.

INT8 (``compress --quantize int8``: the budget plans for the model it ships): every one-node model
is quantized by :func:`onnxlr.quant.quantize` with the compress config's mode, per-channel setting
and types (:func:`quantized_layer_model`), calibrated on a few random feeds at the layer's input
shape (only the time of the result matters), and the quantized models are timed instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxlr import model as g
from onnxlr import runtime
from onnxlr.budget import timing
from onnxlr.layers import ConvLayer, Replacement
from onnxlr.model.opset import default_opset
from onnxlr.model.splice import splice
from onnxlr.model.targets import Target, find_targets
from onnxlr.quant.model import PER_CHANNEL_OPSET

log = logging.getLogger("onnxlr")

#: Seconds of timed rounds per layer (all its candidates together); bounds on the round count.
LAYER_BUDGET_S = 0.4
MIN_RUNS, MAX_RUNS = 15, 300
#: A timed loop that would take longer than this at MIN_RUNS (layers of a big model at full
#: resolution: 0.3 s per run) takes fewer rounds, at least SLOW_MIN_RUNS, and is not re-measured
#: when contended (that would double the plan's longest phase): its conditions go to the report.
SLOW_LOOP_S, SLOW_MIN_RUNS = 8.0, 5
WARMUP = 5
#: A plan times a conv's candidates on at most this many input positions (:func:`timing_shape`),
#: and the layer with one anchor candidate at the real shape (onnxlr.budget.allocate).
MAX_TIMING_AREA = 128 * 128
FP32 = "fp32"
#: Random feeds an int8 one-node model is calibrated on (its ranges only set scales, not speed).
QUANT_FEEDS = 3


def precision_tag(quantize, opset: int) -> str:
    """What sets the speed of a layer's quantized form: ``fp32`` without ``quantize`` (a
    QuantizeConfig), else its mode, per-channel or per-tensor (as onnxlr.quant decides it from the
    opset), types and quantized op types."""
    if quantize is None:
        return FP32
    per_channel = quantize.per_channel and (quantize.mode == "dynamic" or opset >= PER_CHANNEL_OPSET
                                            or quantize.upgrade_opset)
    return ":".join(["int8", quantize.mode, "per-channel" if per_channel else "per-tensor",
                     f"{quantize.activation_type}/{quantize.weight_type}", ",".join(quantize.op_types),
                     "reduce-range" if quantize.reduce_range else "full-range", f"opset{opset}"])


def quantized_layer_model(model: onnx.ModelProto, feeds: list[dict], quantize) -> onnx.ModelProto:
    """A one-node model quantized as onnxlr.quant quantizes the whole model (``quantize``: its
    QuantizeConfig; no max_error: a lone layer is never kept in float), calibrated on ``feeds``."""
    from onnxlr.quant import quantize as quantize_model

    quantized, _ = quantize_model(model, feeds, replace(quantize, max_error=None))
    return quantized


def bench_threads(threads: int | None = None) -> int:
    """Intra-op threads for every timing: ``threads`` (``--threads``: the plan is made for the
    threads the model will run with), else ``ONNXLR_BENCH_THREADS``, else all cores. On a shared,
    overloaded machine one thread gives far steadier ratios (no barrier waits on a descheduled
    worker thread)."""
    if threads:
        return int(threads)
    value = os.environ.get("ONNXLR_BENCH_THREADS")
    return int(value) if value else runtime.default_threads()


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONNXLR_CACHE_DIR") or Path.home() / ".cache" / "onnxlr")


class LatencyCache:
    """A JSON dict key -> ms, loaded once and written back atomically by :meth:`save`."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, enabled: bool = True):
        self.path = Path(cache_dir or default_cache_dir()) / "latency.json"
        self.enabled = enabled
        self.data: dict[str, float] = {}
        self.hits = self.misses = 0
        if enabled and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                log.warning("latency cache %s unreadable: starting a new one", self.path)

    def get(self, key: str) -> float | None:
        value = self.data.get(key) if self.enabled else None
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, ms: float) -> None:
        self.data[key] = float(ms)

    def save(self) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the latency cache %s: %s", self.path, exc)


def structure_key(model: onnx.ModelProto, provider: str, threads: int, precision: str = FP32) -> str:
    """Hash of everything that sets a one-node model's speed at ``precision``, and nothing else."""
    import onnxruntime as ort

    g = model.graph
    parts = [provider, ort.__version__, str(threads)]
    if precision != FP32:  # fp32 keys stay those of caches written before int8 plans existed
        parts.append(f"precision:{precision}")
    for vi in g.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        parts.append(f"in:{vi.type.tensor_type.elem_type}:{dims}")
    for t in g.initializer:
        parts.append(f"w:{t.name}:{t.data_type}:{list(t.dims)}")
    for n in g.node:
        attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute)
        parts.append(f"n:{n.op_type}:{list(n.input)}:{list(n.output)}:{attrs}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def one_node_model(target: Target, input_shape: Sequence[int], shapes: dict, opset: int,
                   ir_version: int) -> onnx.ModelProto:
    """The original layer alone at ``input_shape``; other inputs become random initializers of
    their inferred shapes (values do not change the time)."""
    node = onnx.NodeProto()
    node.CopyFrom(target.node)
    rng = np.random.default_rng(0)
    dtype = target.weight_dtype
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits = []
    for i, name in enumerate(node.input[1:], start=1):
        if not name:
            continue
        shape = shapes.get(name)
        if i == 1:
            shape = list(target.weight_shape)
        if shape is None or any(d is None for d in shape):
            out = target.weight_shape[0] if target.op_type == "Conv" else target.weight_shape[-1]
            shape = [out]
        inits.append(_random_tensor(name, shape, np_dtype, rng))
    x = helper.make_tensor_value_info(node.input[0], dtype, list(input_shape))
    rank = 2 if target.op_type == "Gemm" else len(input_shape)
    y = helper.make_tensor_value_info(node.output[0], dtype, [None] * rank)
    graph = helper.make_graph([node], "layer", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _random_tensor(name, shape, np_dtype, rng) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np_dtype), name)


def candidate_model(reference: onnx.ModelProto, replacement: Replacement) -> onnx.ModelProto:
    """``reference`` (a one-node model) with its layer replaced by the chain."""
    model = onnx.ModelProto()
    model.CopyFrom(reference)
    target = find_targets(model, g.infer_shapes(model))[0]
    splice(target, replacement, g.NameScope(g.all_names(model)), default_opset(model), model.ir_version)
    return model


def time_models(models: Sequence[onnx.ModelProto], feed: dict, provider: str = "cpu",
                threads: int | None = None, budget_s: float = LAYER_BUDGET_S,
                runs: int | None = None, conditions: list | None = None, label: str = "layer") -> list[float]:
    """Median ms of each model, timed interleaved on ``feed``. The timed loop runs under
    :func:`onnxlr.budget.timing.timed` (once more when contended); ``conditions``, when given, gets
    the :class:`~onnxlr.budget.timing.Conditions` of every attempt."""
    providers = runtime.resolve_provider(provider)
    threads = bench_threads(threads)
    sessions = [runtime.make_session(m, providers=providers, threads=threads) for m in models]
    for s in sessions:
        s.run(None, feed)
    if runs is None:
        t0 = time.perf_counter()
        for s in sessions:
            s.run(None, feed)
        one_round = max(time.perf_counter() - t0, 1e-6)
        runs = int(np.clip(budget_s / one_round, MIN_RUNS, MAX_RUNS))
        if one_round * runs > SLOW_LOOP_S:
            # slow: the two runs per session above were the warm-up
            runs, warmup = max(SLOW_MIN_RUNS, int(SLOW_LOOP_S / one_round)), 0
        else:
            warmup = WARMUP
    else:
        one_round, warmup = 0.0, WARMUP
    runners = [runtime.timed_runner(s, feed) for s in sessions]

    def run():
        t = runtime.interleaved(runners, warmup, runs)
        return t, (t[0] / t[-1] if len(t) > 1 else t[0])

    times, attempts = timing.timed(run, label, threads, retry=one_round * runs <= SLOW_LOOP_S)
    if conditions is not None:
        conditions.extend(attempts)
    return [float(np.median(t) * 1e3) for t in times]


def time_layer(target: Target, input_shape: Sequence[int], shapes: dict, candidates: Sequence[Replacement],
               opset: int, ir_version: int, provider: str = "cpu", cache: LatencyCache | None = None,
               threads: int | None = None, conditions: list | None = None,
               quantize=None, runs: int | None = None) -> tuple[float, list[float]]:
    """(ms of the original layer, ms of each candidate chain) at ``input_shape``, quantized first
    with ``quantize`` (a QuantizeConfig; None: fp32); ``conditions`` and ``runs`` (None: as the
    budget allows) as for :func:`time_models` (nothing is added when every time came from the cache)."""
    threads = bench_threads(threads)
    reference = one_node_model(target, input_shape, shapes, opset, ir_version)
    models = [reference] + [candidate_model(reference, r) for r in candidates]
    precision = precision_tag(quantize, opset)
    keys = [structure_key(m, provider, threads, precision) for m in models]
    cache = cache or LatencyCache(enabled=False)
    cached = [cache.get(k) for k in keys]
    if all(c is not None for c in cached):
        return cached[0], cached[1:]
    # The reference is always re-timed with the missing candidates: savings are differences of
    # times from one interleaved run.
    todo = [0] + [i for i in range(1, len(models)) if cached[i] is None]
    np_dtype = helper.tensor_dtype_to_np_dtype(target.weight_dtype)
    rng = np.random.default_rng(0)
    feeds = [{reference.graph.input[0].name: rng.standard_normal(input_shape).astype(np_dtype)}
             for _ in range(QUANT_FEEDS if quantize is not None else 1)]
    timed = [models[i] for i in todo]
    if quantize is not None:
        timed = [quantized_layer_model(m, feeds, quantize) for m in timed]
    ms = time_models(timed, feeds[0], provider, threads, runs=runs, conditions=conditions)
    for i, t in zip(todo, ms):
        cached[i] = t
        cache.put(keys[i], t)
    return cached[0], cached[1:]


def timing_shape(target: Target, input_shape: Sequence[int], max_area: int | None = None) -> tuple:
    """The input shape a layer's candidates are timed at. A conv's cost is linear in its spatial
    area and what a plan needs is each candidate's time against its layer's, so a conv over more
    than ``max_area`` positions (:data:`MAX_TIMING_AREA`) is timed on a smaller input of the same
    channels and aspect ratio, whole strides per axis. Other layers: ``input_shape``."""
    max_area = MAX_TIMING_AREA if max_area is None else max_area
    spatial = [int(d) for d in input_shape[2:]]
    area = math.prod(spatial)
    if not isinstance(target.layer, ConvLayer) or not spatial or area <= max_area:
        return tuple(input_shape)
    layer, shrink = target.layer, (max_area / area) ** (1 / len(spatial))
    small = []
    for i, size in enumerate(spatial):
        stride, extent = layer.strides[i], layer.dilations[i] * (layer.kernel[i] - 1) + 1
        n = max(math.ceil(size * shrink), extent, stride)
        small.append(min(math.ceil(n / stride) * stride, size))
    return (*input_shape[:2], *small)
