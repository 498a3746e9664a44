"""Calibration: run the model on data with onnxruntime and refine each layer's factors on it.

``compress(..., calib=DATA)`` builds a :class:`Calibrator` over any source onnxlr.data takes
(.npz files, folders, loaders, image folders). Each pass exposes the inputs of its layers as the
outputs of the model's prefix that computes them, and accumulates, per layer, the moments of its
input vectors (:class:`onnxlr.calib.fit.Moments`): channel vectors for Gemm/MatMul rows, im2col
patches for convs, at ``CONV_POSITIONS`` seeded random output positions per sample (up to
``ROWS_PER_SAMPLE`` rows of a linear layer's input). Memory is
the statistics (sized before any pass, scheduled within ``--calib-memory``; wide inputs in a reduced
basis, :class:`~onnxlr.calib.fit.ReducedMoments`; methods that keep their first factors, in those
factors' input space, :class:`~onnxlr.calib.fit.ProjectedMoments`) plus one chunk of activations,
whatever the number of samples.

Modes:

* ``symmetric``: one pass over the original model; every layer is fitted to its own inputs.
* ``asymmetric`` (default): each layer is fitted with the inputs it sees in the model compressed
  so far, against the original model's outputs, so errors do not pile up with depth. Layers are
  processed in graph (topological) order in passes; a pass runs the original and the partially
  compressed model side by side. A layer does not see the compression of layers in its own pass,
  so the default is one pass per layer when that is expected to be affordable
  (:meth:`Calibrator._default_stages`). Layers inside If/Loop bodies keep their data-free factors.

Every ``data.HOLDOUT_EVERY``-th sample goes to held-out moments: the data-aware factors replace the
data-free ones only when their layer-output error on those held-out samples is lower, and are then
refitted on all samples (budgets keep the held-out samples out, to score on them). Layers that
cannot take a new bias (MatMul without a following Add, Gemm without constant C) keep theirs; the
others get a refitted bias, written by the splice.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxlr import data, methods
from onnxlr.calib import fit
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, LinearLayer, Replacement
from onnxlr.methods.base import group_blocks, layer_matrices
from onnxlr.model.edit import detach_weights, prune_to_outputs
from onnxlr.model.io import (
    BIG_INITIALIZER,
    all_initializers,
    append_aligned,
    external_info,
    has_lazy_tensors,
    read_range,
    refer_external,
    tensor_bytes,
    track_temp,
    untrack_temp,
    writable_data_folder,
)
from onnxlr.model.splice import read_bias
from onnxlr.model.targets import Target
from onnxlr.report.progress import Progress
from onnxlr.runtime import make_session, run_session, trim_heap

log = logging.getLogger("onnxlr")

MODES = ("asymmetric", "symmetric")
#: Conv output positions sampled per sample: measured on EfficientNet-Lite0 (auto 0.5 +calib, one
#: pass per layer), 64 positions gave 73.3% crop agreement (output error 0.328), 256 gave 76.0%
#: (0.323), for 16% more calibration time (tools/bench_stages.py --positions 64 256).
CONV_POSITIONS = 256
ROWS_PER_SAMPLE = 64  # rows of a linear layer's input (tokens of a sentence) sampled per sample
ASYMMETRIC_STAGES = 4  # the fewest passes the default chooses in asymmetric mode
#: Calibration time the default number of passes aims at (see Calibrator._default_stages).
CALIB_SECONDS = 300.0
#: Default bound on the statistics held at once: this fraction of the memory available when
#: calibration starts (the rest is the model, onnxruntime's two sessions and one chunk of activations).
MEMORY_FRACTION = 0.5
#: Inputs wider than this keep their statistics in a reduced basis (fit.ReducedMoments) of
#: REDUCED_BASIS directions: n x n float64 matrices past it cost 128 MB each and grow as n^2.
WIDE_INPUT = 4096
REDUCED_BASIS = 1024
CHUNK = 8  # samples per onnxruntime run when the batch is dynamic, at most
#: ... and fewer when the layers' inputs of one run would pass this many bytes (VGG-16's 224 x 224
#: activations are 13 MB per sample: its early passes run 2 samples at a time, not 8).
CHUNK_BYTES = 32 * 2**20
#: A pass keeps the original model's rows up to this size and runs the two models one after the
#: other; past it both sessions stay open and run chunk by chunk.
KEPT_ROWS_BYTES = 256 * 2**20
#: A pass's model (prefix) up to this size, all in memory, goes to onnxruntime as bytes; a bigger
#: one, or one with weights on disk (external data), is written to the calibration's temporary
#: folder with its weights as external data, and onnxruntime reads it from there.
SESSION_BYTES = 256 * 2**20
SEED = 0


# --- im2col patches at sampled positions ------------------------------------------------------


def conv_pads(layer: ConvLayer, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Explicit (begin..., end...) pads, resolving auto_pad."""
    d = layer.spatial_rank
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for a in range(d):
            out = -(-in_spatial[a] // layer.strides[a])
            total = max((out - 1) * layer.strides[a] + (layer.kernel[a] - 1) * layer.dilations[a] + 1 - in_spatial[a], 0)
            low = total // 2 if layer.auto_pad == "SAME_UPPER" else total - total // 2
            begin.append(low)
            end.append(total - low)
        return tuple(begin + end)
    if layer.auto_pad == "VALID":
        return (0,) * (2 * d)
    return tuple(layer.pads)


def sample_patches(layer: ConvLayer, x: np.ndarray, sample_idx: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
    """im2col patches of ``x`` [B, C, *in] at output ``positions`` [M, d] of samples
    ``sample_idx`` [M]; one [M, S_g * prod(k)] array per group (channel-major, as the weight)."""
    d = layer.spatial_rank
    pads = conv_pads(layer, x.shape[2:])
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], pads[a + d]) for a in range(d)])
    sizes = padded.shape[2:]
    flat = padded.reshape(padded.shape[0], padded.shape[1], -1)
    taps = np.stack(np.meshgrid(*[np.arange(k) for k in layer.kernel], indexing="ij"), axis=-1).reshape(-1, d)
    coords = positions[:, None, :] * np.asarray(layer.strides) + taps[None] * np.asarray(layer.dilations)
    index = np.ravel_multi_index(tuple(coords[..., a] for a in range(d)), sizes)  # [M, K]
    patches = flat[sample_idx[:, None], :, index]  # [M, K, C]
    patches = np.swapaxes(patches, 1, 2)  # [M, C, K]
    s_g = layer.weight.shape[1]
    return [patches[:, gi * s_g : (gi + 1) * s_g].reshape(len(sample_idx), -1) for gi in range(layer.group)]


def out_spatial(layer: ConvLayer, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
    d = layer.spatial_rank
    pads = conv_pads(layer, in_spatial)
    return tuple(
        (in_spatial[a] + pads[a] + pads[a + d] - layer.dilations[a] * (layer.kernel[a] - 1) - 1) // layer.strides[a] + 1
        for a in range(d)
    )


@dataclass
class _LayerPlan:
    target: Target
    tensor: str  # the layer's input tensor
    fit: list[fit.Moments]
    held: list[fit.Moments]
    # False when another layer of the same asymmetric stage is upstream: that layer's own
    # compensation changes this layer's input after the pass, so compensating here too would
    # correct the same error twice (measured: it blows up); such layers fit the original inputs.
    paired_ok: bool = True


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def input_width(layer) -> tuple[int, int]:
    """(n, groups): the width of the vectors a layer maps (channels, or an im2col patch per group)."""
    if isinstance(layer, ConvLayer):
        return int(np.prod(layer.weight.shape[1:])), layer.group
    return int(layer.weight.shape[0]), 1


def _upstream_layers(graph: onnx.GraphProto, layers: list[Target]) -> dict[int, bool]:
    """For each layer: whether another of ``layers`` lies upstream of its input in ``graph``."""
    producers = {o: n for n in graph.node for o in n.output}
    ids = {id(t.node) for t in layers}
    out = {}
    for t in layers:
        seen, stack, found = set(), [t.node.input[0]], False
        while stack and not found:
            node = producers.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in ids and node is not t.node:
                found = True
            stack.extend(i for i in node.input if i)
        out[id(t)] = found
    return out


def _rows(target: Target, x: np.ndarray, rng: np.random.Generator, row_mask: np.ndarray | None = None) -> tuple:
    """(row selector, sample index of each row) for a batch of this layer's input.

    ``row_mask`` (a token mask such as ``attention_mask`` [batch, seq]) leaves out the rows of a
    linear layer's input [batch, seq, n] where it is 0: padding tokens, whose values the model
    computes but never uses, would otherwise dominate the statistics of short sentences."""
    layer = target.layer
    batch = x.shape[0] if x.ndim else 1
    if isinstance(layer, ConvLayer):
        outs = out_spatial(layer, x.shape[2:])
        sample_idx = np.repeat(np.arange(batch), CONV_POSITIONS)
        positions = np.stack([rng.integers(0, o, size=sample_idx.size) for o in outs], axis=1)
        return (sample_idx, positions), sample_idx
    rows = linear_rows(target, x)
    per_sample = max(rows.shape[0] // max(batch, 1), 1)
    valid = masked_rows(target, x, row_mask)
    if valid is not None:
        picked = []
        for s in range(batch):
            idx = s * per_sample + np.flatnonzero(valid[s * per_sample : (s + 1) * per_sample])
            picked.append(idx if idx.size <= ROWS_PER_SAMPLE else rng.choice(idx, ROWS_PER_SAMPLE, replace=False))
        picked = np.sort(np.concatenate(picked)).astype(np.int64)
    elif per_sample <= ROWS_PER_SAMPLE:
        picked = np.arange(rows.shape[0])
    else:
        picked = np.sort(np.concatenate([
            s * per_sample + rng.choice(per_sample, ROWS_PER_SAMPLE, replace=False) for s in range(batch)
        ]))
    return picked, np.minimum(picked // per_sample, batch - 1)


def masked_rows(target: Target, x: np.ndarray, row_mask: np.ndarray | None) -> np.ndarray | None:
    """Which rows of ``linear_rows(target, x)`` the mask keeps (bool, flat), or None when the mask
    does not line up with this input (a layer after pooling, a transposed Gemm input)."""
    if row_mask is None or (target.gemm is not None and target.gemm.trans_a) or x.ndim < 2:
        return None
    if tuple(x.shape[:-1]) != tuple(row_mask.shape):
        return None
    return np.asarray(row_mask).reshape(-1) != 0


def linear_rows(target: Target, x: np.ndarray) -> np.ndarray:
    if target.gemm is not None and target.gemm.trans_a:
        return x.T
    return x.reshape(-1, x.shape[-1])


def _extract(target: Target, x: np.ndarray, selector) -> list[np.ndarray]:
    if isinstance(target.layer, ConvLayer):
        sample_idx, positions = selector
        return sample_patches(target.layer, x, sample_idx, positions)
    return [linear_rows(target, x)[selector]]


# --- the calibrator ---------------------------------------------------------------------------


class Calibrator:
    """Collects layer statistics on demand and refines replacements with them."""

    def __init__(self, model: onnx.ModelProto, targets: list[Target], data_source, samples: int | None, mode: str,
                 mask: str | None = "auto", merge_held: bool = True, *, memory: int | None = None,
                 stages: int | str | None = None, whitened: dict | None = None, replacement_for=None):
        """``memory``: bytes of statistics held at once (default MEMORY_FRACTION of what is
        available); ``stages``: asymmetric passes at most (an int, or "all" for one pass per
        layer; default ASYMMETRIC_STAGES); ``whitened``: id(target) -> whether its method's refit
        is a whitened truncation (those alone can use a reduced basis; default: all can);
        ``replacement_for``: target -> the data-free replacement that :meth:`refine` will be given
        for it (the same object), or None: the layers of methods with a fixed input space
        (Tucker-2, CP, spatial SVD) then keep projected statistics (fit.ProjectedMoments), exact
        and much smaller than n x n."""
        if mode not in MODES:
            raise OnnxlrError(f"unknown calibration mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self.model = model  # the model being compressed, modified in place by the caller
        # The original model for the passes: its big weights on disk (in a temporary folder, or
        # where a lazily loaded model keeps them), never a second copy in memory.
        self._files = SessionFiles(model)
        self.original = self._files.original
        self._original_signature = _signature(model.graph)
        self.specs = data.model_input_specs(model)
        self.source = data.open_source(data_source, self.specs, what="--calib")
        self.samples = samples
        self.merge_held = merge_held  # refit on all samples once a fit wins (False: budgets score on the held-out ones)
        self.mask_input = data.row_mask_input(self.specs, mask)
        main = {id(n) for n in model.graph.node}
        self.eligible = [t for t in targets if id(t.node) in main and t.node.input and t.layer is not None]
        self.memory = int(memory) if memory else int(MEMORY_FRACTION * available_memory())
        self.reduced: dict[int, int] = {}  # id(target) -> basis size, for layers in a reduced basis
        self.projected: dict[int, Replacement] = {}  # id(target) -> the replacement its statistics are projected for
        self._replacement_for = replacement_for
        self.rows_kept: set[int] = set()  # id(target) of layers whose rows are kept (fit.RowMoments)
        self._samples_seen: int | None = None
        self.stages_reason = ""
        self.unfit: dict[int, str] = {}  # id(target) -> why it is not calibrated
        self.stage_of = self._schedule(stages, whitened or {})
        self.n_stages = max(self.stage_of.values(), default=-1) + 1
        self.moments: dict[int, _LayerPlan] = {}
        self.done_stages: set[int] = set()
        self.total = 0  # samples seen in the last pass
        self.seconds = 0.0

    def _schedule(self, stages, whitened: dict) -> dict[int, int]:
        """Stage of every layer, in graph order: layer i of L goes to stage i * S // L for S
        stages (the even split measured best, see below), and a stage also ends where its
        statistics would pass the memory bound. Layers too wide for full statistics get a reduced
        basis (whitened fits) or stay data-free, with the reason."""
        paired = self.mode == "asymmetric"
        count = len(self.eligible)
        if not paired:
            n_stages = 1
        elif stages == "all":
            n_stages = count
        elif stages is None:
            n_stages = self._default_stages(count)
        else:
            n_stages = min(int(stages), count)
        stage_of, stage, used = {}, 0, 0
        # A pass holds at most as many bytes of statistics as the layers' weights take (and at
        # least one layer's): measured on a BERT-base-shaped encoder, 8 time-based passes held up to
        # nine layers' statistics at once (three 3072-wide FFN outputs) beside the whole model's
        # session, 2.21 GiB at the peak for a 0.40 GiB model.
        # (By default and in asymmetric mode only: --calib-stages N is what the user asked for, and a
        # symmetric calibration, such as a budget's, is one pass of the original model.)
        capped = stages is None and paired
        pass_cap = max(sum(int(t.layer.weight.nbytes) for t in self.eligible), 1) if capped else self.memory
        for i, t in enumerate(self.eligible):
            n, groups = input_width(t.layer)
            need = fit.moments_nbytes(n, groups, paired)
            projected = None if whitened.get(id(t), True) else self._projected_need(t, paired)
            rows_need = self._rows_need(t, paired) if whitened.get(id(t), True) else None
            if projected is not None and projected < need:
                need = projected
            elif rows_need is not None and rows_need < need:
                need = rows_need
                self.rows_kept.add(id(t))
            else:
                self.projected.pop(id(t), None)
                if (n > WIDE_INPUT or need > self.memory) and whitened.get(id(t), True):
                    k = min(REDUCED_BASIS, n)
                    need = fit.moments_nbytes(n, groups, False, reduced=k)
                    if need <= self.memory:
                        self.reduced[id(t)] = k
            if need > self.memory:
                self.projected.pop(id(t), None)
                self.unfit[id(t)] = (f"calib: its statistics need {_size(need)}, over the {_size(self.memory)} bound "
                                     "(--calib-memory); data-free factors kept")
                continue
            wanted = (i * n_stages) // max(count, 1)
            if wanted > stage or (used and used + need > min(self.memory, pass_cap)):
                stage, used = max(wanted, stage + 1), 0
            stage_of[id(t)] = stage
            used += need
        return stage_of

    def _rows_need(self, target: Target, paired: bool) -> int | None:
        """Bytes to keep the layer's calibration rows themselves (fit.RowMoments), or None when it
        would see half its input width in rows or more (a linear layer or an ungrouped conv whose
        output is at most as wide as its input)."""
        layer = target.layer
        n, groups = input_width(layer)
        t = layer.weight.shape[1] if not isinstance(layer, ConvLayer) else layer.out_channels
        if groups != 1 or t > n:
            return None
        rows = self._sample_count() * self._per_sample(target)
        if 2 * rows >= n:
            return None
        return 8 * (rows * n * (2 if paired else 1) * 2 + 4 * t * t)

    def _sample_count(self) -> int:
        """Samples calibration will read: the source's own count when it knows it (a folder of
        images is not decoded once more to count it), else counted by reading it once."""
        if self._samples_seen is None:
            known = getattr(self.source, "count", None)
            if known is not None:
                self._samples_seen = known if self.samples is None else min(known, self.samples)
            else:
                self._samples_seen = sum(1 for _ in data.limited(self.source, self.samples))
        return self._samples_seen

    def _projected_need(self, target: Target, paired: bool) -> int | None:
        """Bytes of projected statistics for ``target`` (and marks it projected), or None when its
        replacement is not known ahead or its method has no fixed input space."""
        if self._replacement_for is None:
            return None
        replacement = self._replacement_for(target)
        method = methods.get(replacement.method) if replacement is not None else None
        if method is None or method.input_space is None:
            return None
        spaces = method.input_space(target.layer, replacement)
        n, groups = input_width(target.layer)
        t_g = target.layer.out_channels // groups if isinstance(target.layer, ConvLayer) else target.layer.weight.shape[1]
        self.projected[id(target)] = replacement
        return fit.projected_nbytes(max(s.shape[0] for s in spaces), t_g, groups, paired) + 8 * t_g * n * groups

    def _default_stages(self, layers: int) -> int:
        """One pass per layer (sequential fitting: every layer sees the compression of all the
        layers before it; measured, EfficientNet-Lite0 auto 0.5: output error 0.33 against 0.51
        with 4 passes, crop agreement 73% against 63%) when it is expected to take at most
        CALIB_SECONDS; else the most passes of 16, 8 that fit; at least ASYMMETRIC_STAGES. A pass
        runs the two models' prefixes up to its layers: about one forward per sample on average."""
        seconds, samples = self._sample_cost()
        for n_stages in (layers, 16, 8):
            if n_stages <= layers and samples * seconds * n_stages <= CALIB_SECONDS:
                self.stages_reason = (f"{n_stages} passes expected to take {samples * seconds * n_stages:.0f} s "
                                      f"(one forward: {seconds * 1e3:.3g} ms, {samples} samples)")
                return n_stages
        n_stages = min(ASYMMETRIC_STAGES, layers)
        self.stages_reason = (f"one pass per layer would take about {samples * seconds * layers:.0f} s: {n_stages} "
                              "passes (--calib-stages all to insist)")
        return n_stages

    def _sample_cost(self) -> tuple[float, int]:
        """(seconds of one forward of one sample, samples calibration will read)."""
        samples = self._sample_count()
        first = next(iter(data.limited(self.source, 1)), None)
        if first is None:
            raise OnnxlrError(f"--calib {self.source.label}: no samples")
        session = self._files.session(self.original, None, {})
        session.run(None, first)
        started = time.perf_counter()
        session.run(None, first)
        return time.perf_counter() - started, samples

    def summary(self) -> str:
        masked = f", padding rows left out by input {self.mask_input!r}" if self.mask_input else ""
        reduced = f", {len(self.reduced)} wide layer(s) in a reduced basis" if self.reduced else ""
        return (f"calibrated ({self.mode}) on {self.total} samples of {self.source.label} in {len(self.done_stages)} "
                f"pass(es){f' ({self.stages_reason})' if self.stages_reason else ''}, {self.seconds:.1f} s, statistics bound {_size(self.memory)}{reduced}{masked}")

    # --- statistics -----------------------------------------------------------------------

    def plan_for(self, target: Target) -> _LayerPlan | None:
        stage = self.stage_of.get(id(target))
        if stage is None:
            return None
        if stage not in self.done_stages:
            self._run_stage(stage)
        return self.moments.get(id(target))

    def _run_stage(self, stage: int) -> None:
        t0 = time.perf_counter()
        # A layer of this stage that the caller already finished without refining (kept because
        # its ranks would not reduce MACs) has released its weight: nothing to collect for it.
        layers = [t for t in self.eligible if self.stage_of.get(id(t)) == stage and t.layer is not None]
        paired = self.mode == "asymmetric"
        plans = []
        for t in layers:
            n, groups = input_width(t.layer)
            if id(t) in self.reduced:
                weights = layer_matrices(t.layer, keep_dtype=True)
                shared = [{} for _ in weights]  # W W^T, computed once for the basis and the fits
                bases = [fit.reduced_basis(w, self.reduced[id(t)], shared=c) for w, c in zip(weights, shared)]
                fits = [fit.ReducedMoments(b, shared=c) for b, c in zip(bases, shared)]
                helds = [fit.ReducedMoments(b, shared=c) for b, c in zip(bases, shared)]
            elif id(t) in self.rows_kept:
                shared = [{} for _ in range(groups)]  # W W^T, computed once for the layer's fits
                fits = [fit.RowMoments(n, paired, c) for c in shared]
                helds = [fit.RowMoments(n, paired, c) for c in shared]
            elif id(t) in self.projected:
                replacement = self.projected[id(t)]
                spaces = methods.get(replacement.method).input_space(t.layer, replacement)
                weights = layer_matrices(t.layer)
                fits = [fit.ProjectedMoments(p, w, paired) for p, w in zip(spaces, weights)]
                helds = [fit.ProjectedMoments(p, w, paired) for p, w in zip(spaces, weights)]
            else:
                fits = [fit.Moments(n, paired) for _ in range(groups)]
                # the held-out rows (every 5th sample) only score candidates: kept as they are when
                # fewer than half the width (a transformer's 3072-wide FFN output: 40 MB, not 225)
                held_rows = self._sample_count() // data.HOLDOUT_EVERY * self._per_sample(t)
                helds = [fit.RowMoments(n, paired) if 2 * held_rows < n else fit.Moments(n, paired)
                         for _ in range(groups)]
            plans.append(_LayerPlan(t, t.node.input[0], fits, helds))
        if paired:
            upstream = _upstream_layers(self.model.graph, layers)
            for plan in plans:
                plan.paired_ok = not upstream[id(plan.target)] and id(plan.target) not in self.reduced
        tensors = sorted({p.tensor for p in plans})
        dtypes = {t.node.input[0]: t.weight_dtype for t in layers}
        # Before any layer is replaced the two models are one: run it once (the first stage).
        same = not paired or _signature(self.model.graph) == self._original_signature
        # The original model's rows of a pass are kept and the two models run one after the other
        # (one session alive at a time: a transformer's two prefix sessions held 0.7 GB together),
        # unless those rows would be big (early layers of a CNN at full resolution).
        one_by_one = not same and self._sample_count() * self._rows_bytes(layers) <= KEPT_ROWS_BYTES
        rng = np.random.default_rng(SEED + stage)
        chunk = _chunk_for(layers)
        label = f"calibration pass {stage + 1}/{self.n_stages}"
        kept: list = []  # per chunk, per plan: (selector, held rows, parts of the original)
        session = self._files.session(self.original, tensors, dtypes)
        current = session if same or one_by_one else self._files.session(self.model, tensors, dtypes)
        seen = 0
        progress = Progress(label + (" (original model)" if one_by_one else ""), self.samples or self.source.count,
                            unit="samples")
        for feed in data.batches(data.limited(self.source, self.samples), self.specs, chunk):
            outs_o = _run(session, feed, tensors)
            outs_c = outs_o if current is session else _run(current, feed, tensors)
            row_mask = feed.get(self.mask_input) if self.mask_input else None
            per_plan = []
            for plan in plans:
                x_o = outs_o[plan.tensor]
                selector, sample_of_row = _rows(plan.target, x_o, rng, row_mask)
                held = ((seen + sample_of_row) % data.HOLDOUT_EVERY) == data.HOLDOUT_EVERY - 1
                parts_o = _extract(plan.target, x_o, selector)
                if one_by_one:
                    per_plan.append((selector, held, parts_o))
                    continue
                parts_c = _extract(plan.target, outs_c[plan.tensor], selector) if paired else parts_o
                _accumulate(plan, parts_c, parts_o, held, paired)
            if one_by_one:
                kept.append(per_plan)
            seen += data.sample_rows(feed, self.specs)
            progress.update(seen)
            del outs_o, outs_c
        progress.close()
        del session, current
        trim_heap()  # the sessions' memory goes back to the system before the next one or the fits
        if one_by_one:  # the model compressed so far, on the same samples and rows
            session = self._files.session(self.model, tensors, dtypes)
            progress = Progress(label + " (compressed model)", seen, unit="samples")
            done = 0
            feeds = data.batches(data.limited(self.source, self.samples), self.specs, chunk)
            for feed, per_plan in zip(feeds, kept):
                outs_c = _run(session, feed, tensors)
                for plan, (selector, held, parts_o) in zip(plans, per_plan):
                    _accumulate(plan, _extract(plan.target, outs_c[plan.tensor], selector), parts_o, held, paired)
                done += data.sample_rows(feed, self.specs)
                progress.update(done)
                del outs_c
            progress.close()
            del session, kept
            trim_heap()
        if seen == 0:
            raise OnnxlrError(f"--calib {self.source.label}: no samples")
        self.total = seen
        for plan in plans:
            self.moments[id(plan.target)] = plan
        self.done_stages.add(stage)
        self.seconds += time.perf_counter() - t0
        log.info("calibration pass %d/%d: %d layers on %d samples (%.1f s)", stage + 1, self.n_stages,
                 len(plans), seen, time.perf_counter() - t0)

    def _rows_bytes(self, layers: list[Target]) -> int:
        """Bytes of the rows one sample gives the layers of a pass (float32)."""
        return sum(4 * n * groups * self._per_sample(t) for t in layers for n, groups in [input_width(t.layer)])

    @staticmethod
    def _per_sample(target: Target) -> int:
        """Rows one sample gives the layer's statistics: conv positions, or rows of a linear input."""
        if isinstance(target.layer, ConvLayer):
            return CONV_POSITIONS
        return min(target.rows or 1, ROWS_PER_SAMPLE)

    def release(self, target: Target) -> None:
        if self.moments.pop(id(target), None) is not None:
            trim_heap()

    # --- refinement -----------------------------------------------------------------------

    def refine(self, target: Target, replacement: Replacement, *, keep: bool = False) -> Replacement:
        """The replacement with data-aware factor values (same ranks, same chain, a refitted bias
        in ``replacement.bias`` where the layer can take one), or the data-free one with a note
        saying why not. ``keep``: keep the layer's statistics for more candidates."""
        if id(target) in self.unfit:
            replacement.notes.append(self.unfit[id(target)])
            return replacement
        if id(target) in self.projected and self.projected[id(target)] is not replacement:
            raise ValueError(f"{target.name}: its statistics are projected for another replacement")
        plan = self.plan_for(target)
        if plan is None:
            replacement.notes.append("calib: layer not calibrated (inside a subgraph); data-free factors kept")
            return replacement
        try:
            bias, fit_bias = read_bias(target)
            new, note = refine_replacement(target.layer, bias, fit_bias, replacement, plan.fit, plan.held,
                                           paired_ok=plan.paired_ok, merge_held=self.merge_held)
        finally:
            if not keep:
                self.release(target)
        if id(target) in self.reduced:
            note += f"; statistics in a reduced basis of {self.reduced[id(target)]} of {input_width(target.layer)[0]} inputs"
        if id(target) in self.rows_kept:
            note += f"; statistics: its {plan.fit[0].count + plan.held[0].count} calibration rows themselves"
        if self.projected.pop(id(target), None) is not None:
            note += f"; statistics projected on the chain's {plan.fit[0].proj.shape[0]} of {plan.fit[0].n} inputs"
        new.notes.append(note)
        log.info("%s: %s", target.name, note)
        return new


def _accumulate(plan: _LayerPlan, parts_c: list, parts_o: list, held: np.ndarray, paired: bool) -> None:
    pair = paired and plan.fit[0].paired
    for gi, (pc, po) in enumerate(zip(parts_c, parts_o)):
        plan.fit[gi].add(pc[~held], po[~held] if pair else None)
        plan.held[gi].add(pc[held], po[held] if pair else None)


def _chunk_for(layers: list[Target]) -> int:
    """Samples per run: CHUNK, or fewer when the layers' input tensors of one sample are large
    (their sizes from the shapes found when sizing the model; unknown sizes count as small)."""
    per_sample = {}
    for t in layers:
        n, groups = input_width(t.layer)
        if isinstance(t.layer, ConvLayer):
            size = t.layer.weight.shape[1] * groups * math.prod(s or 1 for s in (t.in_spatial or ()))
        else:
            size = n * (t.rows or 1)
        per_sample[t.node.input[0]] = 4 * size
    return max(1, min(CHUNK, CHUNK_BYTES // max(sum(per_sample.values()), 1)))


def _signature(graph: onnx.GraphProto) -> tuple:
    """What splicing a replacement changes: the nodes and the initializers' names."""
    return (tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node),
            tuple(t.name for t in graph.initializer))


class SessionFiles:
    """onnxruntime sessions for calibration passes, without a second copy of the model in memory.

    At construction the model's big in-memory weights are written once to ``original.data`` in a
    temporary folder and :attr:`original` is a copy of the model that refers to them (as a lazily
    loaded model refers to its external data): the model being compressed is modified in place
    afterwards. A pass's model (the prefix its layers need) goes to onnxruntime as bytes when it is
    small and all in memory; otherwise it is written with its in-memory weights as external data
    and opened from there (onnxruntime reads external data only from the model file's own folder,
    and refuses links out of it). A model with external data gets these files beside its data file,
    under a hidden name unique to this object, so they refer to it by name (no copy, no hard link:
    onnx.checker refuses a data file with several links); when that folder is not writable, or
    the model has none, they go to a temporary folder (TMPDIR) and on-disk weights are copied. A
    pass's files are deleted once its session is built; all are removed when this object is
    collected or the process exits."""

    def __init__(self, model: onnx.ModelProto):
        beside = writable_data_folder(model)
        if beside is not None:
            self.dir = Path(beside)
            self.prefix = f".onnxlr-calib-{os.getpid()}-{id(self):x}-"
            self._cleanup = weakref.finalize(self, _remove_prefixed, str(self.dir), self.prefix)
        else:
            self.dir, self.prefix = Path(tempfile.mkdtemp(prefix=".onnxlr-calib-")), ""
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self._count = 0
        self.original = self._detach(model)

    def _detach(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` whose big in-memory initializers refer to ``original.data``; they
        are never copied in memory (a protobuf keeps cleared fields' memory until it is freed)."""
        location = str(self.dir / f"{self.prefix}original.data")
        track_temp(location)  # an interruption removes it (onnxlr.model.io.remove_temp_files)
        return detach_weights(model, location)

    def session(self, model: onnx.ModelProto, tensors: list[str] | None, dtypes: dict):
        """A session computing just ``tensors`` (None: the model's outputs): the model cut to the
        prefix they need (measured on the bundled model: the prefix up to its second conv runs 8x
        faster than the whole model, while the whole model with only that tensor as output runs
        about as long as before); None when they are all graph inputs."""
        if tensors is None:
            prefix = prune_to_outputs(model, {o.name: o.type.tensor_type.elem_type for o in model.graph.output})
        else:
            inputs = {vi.name for vi in model.graph.input}
            wanted = {name: dtypes.get(name, onnx.TensorProto.FLOAT) for name in tensors if name not in inputs}
            if not wanted:
                return None
            prefix = prune_to_outputs(model, wanted)
        if not has_lazy_tensors(prefix) and prefix.ByteSize() < SESSION_BYTES:
            return make_session(prefix.SerializeToString(), arena=False)
        self._count += 1
        model_path = self.dir / f"{self.prefix}pass{self._count}.onnx"
        data_path = self.dir / f"{self.prefix}pass{self._count}.data"
        track_temp(model_path)
        track_temp(data_path)
        try:
            with open(data_path, "wb") as f:
                for tensor in list(all_initializers(prefix.graph)):
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                        source, offset, length = external_info(tensor)
                        if Path(source).parent == self.dir:  # beside: refer to it by name
                            refer_external(tensor, Path(source).name, offset, length)
                            continue
                        data = read_range(source, offset, length)
                    elif tensor.ByteSize() >= BIG_INITIALIZER and tensor.data_type != onnx.TensorProto.STRING:
                        data = tensor_bytes(tensor)
                    else:
                        continue
                    refer_external(tensor, data_path.name, *append_aligned(f, data))
                    del data
            model_path.write_bytes(prefix.SerializeToString())
            del prefix
            return make_session(str(model_path), arena=False)
        finally:
            for path in (model_path, data_path):
                path.unlink(missing_ok=True)
                untrack_temp(path)

    def close(self) -> None:
        self._cleanup()


def _remove_prefixed(folder: str, prefix: str) -> None:
    for path in Path(folder).glob(prefix + "*"):
        path.unlink(missing_ok=True)
        untrack_temp(path)


def _run(session, feed, tensors) -> dict[str, np.ndarray]:
    """The ``tensors`` for one feed (graph inputs among them come from the feed itself)."""
    wanted = [t for t in tensors if t not in feed]
    out = dict(zip(wanted, run_session(session, feed, wanted, "the model on the calibration data"))) if wanted else {}
    for t in tensors:
        if t in feed:
            out[t] = feed[t]
    return out


def refine_replacement(layer, bias, fit_bias, replacement: Replacement, fit_moments, held, paired_ok: bool = True,
                       merge_held: bool = True, errors: dict | None = None) -> tuple[Replacement, str]:
    """(new replacement, note). Keeps the data-free replacement when no data-aware one is better
    on the held-out rows; the method's refit and rebuild do the work (onnxlr.methods).
    ``errors`` (a dict), when given, gets "before" and "after": the layer's relative output error
    on the held-out moments (the fitted ones when none are held out) of the data-free and of the
    returned replacement (with ``merge_held`` the returned one is refit on more rows)."""
    method = methods.get(replacement.method)
    if isinstance(fit_moments[0], fit.ReducedMoments) and not method.whitened:
        return replacement, (f"calib: the input is too wide for full statistics and {method.name}'s refit needs "
                             "them; data-free factors kept")
    blockwise = isinstance(fit_moments[0], fit.ReducedMoments | fit.RowMoments)
    weights = layer_matrices(layer, keep_dtype=blockwise)  # such fits work on blocks of the float32 W
    t_g = weights[0].shape[0]
    biases = [None if bias is None else bias[gi * t_g : (gi + 1) * t_g] for gi in range(len(weights))]
    free_maps = _free_maps(layer, replacement)

    def error(maps, new_biases, moments):
        errs = [fit.output_error(w, b, wn, bn, m) for w, b, wn, bn, m in zip(weights, biases, maps, new_biases, moments)]
        e, r = sum(x[0] for x in errs), sum(x[1] for x in errs)
        return math.sqrt(e / r) if r > 0 else math.sqrt(e)

    has_held = all(m.count > 0 for m in held)
    check = held if has_held else fit_moments
    before = error(free_maps, biases, check)
    # Candidates: in asymmetric mode, the fit on the (x_c, x_o) pairs (for whitened methods at each
    # of fit.PAIRED_RIDGES) and the fit on the original inputs alone (more robust when the pairs
    # are few); in symmetric mode the one fit. Whitened fits are also tried with the input
    # covariance shrunk (fit.shrinkage: few rows for the input width). The best on held-out rows wins.
    paired = fit_moments[0].paired and paired_ok
    # With fewer rows than inputs the full correction overfits (see fit.PAIRED_RIDGES): the strongest
    # ridge alone, which halves the fits of the widest layers (VGG-16's fc7 chose it among the three).
    few_rows = fit_moments[0].count < fit_moments[0].n
    ridges = (fit.PAIRED_RIDGES[-1:] if few_rows else fit.PAIRED_RIDGES) if paired and method.whitened else (None,)
    views = [(lambda ms: ms, r, "pairs") for r in ridges] if paired or not fit_moments[0].paired else []
    if fit_moments[0].paired:
        views.append((lambda ms: [m.original_view() for m in ms], None, "original"))
    shrinks = (False, True) if method.whitened else (False,)
    views = [(view, ridge, source, sh) for view, ridge, source in views for sh in shrinks]

    def candidate(moments, ridge, sh):
        return method.refit(layer, replacement, weights, biases, moments, fit_bias, paired_ridge=ridge, shrink=sh)

    scored = []
    for i, (view, ridge, source, sh) in enumerate(views):
        moments = view(fit_moments)
        refitted = candidate(moments, ridge, sh)
        scored.append((error(refitted.maps, refitted.biases, check), i))
        if i + 1 == len(views) or views[i + 1][2] != source:
            for m in moments:  # this source's whitenings are done with (n x n arrays: memory)
                m.forget()
    after, best = min(scored)
    where = "held-out" if has_held else "calibration"
    if errors is not None:
        errors.update(before=before, after=min(after, before))
    if not after < before:
        return replacement, f"calib: data-free factors kept ({where} output error {before:.4g} <= data-aware {after:.4g})"
    merged = [f.merged(h) for f, h in zip(fit_moments, held)] if has_held and merge_held else fit_moments
    view, ridge, source, sh = views[best]
    refitted = candidate(view(merged), ridge, sh)
    new = method.rebuild(layer, replacement, refitted)
    if fit_bias:
        new.bias = np.concatenate([np.zeros(t_g) if b is None else b for b in refitted.biases])
    how = []
    if fit_moments[0].paired:
        how.append("fit on original inputs" if source == "original" else
                   "paired fit" if ridge is None else f"paired fit, ridge {ridge:g}")
    if sh:
        how.append("shrunk covariance")
    how = f" ({'; '.join(how)})" if how else ""
    return new, f"calib: {where} output error {before:.4g} -> {after:.4g}{how}"


def _free_maps(layer, replacement: Replacement) -> list:
    """The data-free replacement's map per group: as its two factors (fit.LowRank) for a linear
    layer whose product was not materialized (too big), else dense [T_g, n]."""
    if replacement.reconstruction is None and isinstance(layer, LinearLayer) and len(replacement.steps) == 2:
        first, second = (np.asarray(step.weight) for step in replacement.steps)  # x @ first @ second
        return [fit.LowRank(second.T, first.T)]
    return group_blocks(layer, replacement.low_rank_weight())


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"
