"""Calibration: run the model on data with onnxruntime and refine each layer's factors on it.

``compress(..., calib=DATA)`` builds a :class:`Calibrator`. DATA is an .npz keyed by input name
(samples stacked on the batch axis, as ``verify --inputs`` takes) or a folder of them. Files are
read member by member in chunks of samples (never whole), each target layer's input is exposed as
an extra graph output, and every pass accumulates, per layer, the moments of its input vectors
(:class:`onnxlr.refine.Moments`): channel vectors for Gemm/MatMul rows, im2col patches for convs,
at ``POSITIONS_PER_SAMPLE`` seeded random output positions per sample. Memory is O(n^2) per layer
plus one chunk of activations, whatever the number of samples.

Modes:

* ``symmetric``: one pass over the original model; every layer is fitted to its own inputs.
* ``asymmetric`` (default): each layer is fitted with the inputs it sees in the model compressed
  so far, against the original model's outputs, so errors do not pile up with depth. The layers
  are processed in graph (topological) order in ``ASYMMETRIC_STAGES`` stages: one pass per stage
  runs the original and the partially compressed model side by side and collects the stage's
  layers. One stage per layer would be exact but costs one pass per layer; with stages, a layer
  does not see the compression of layers in its own stage (measured on the real models: see the
  report). Layers inside If/Loop bodies keep their data-free factors.

Every ``HOLDOUT_EVERY``-th sample goes to held-out moments: the data-aware factors replace the
data-free ones only when their layer-output error on those held-out samples is lower, and are then
refitted on all samples. Layers that cannot take a new bias (MatMul, Gemm without constant C) keep
theirs; convs and Gemm with a constant C get a refitted bias.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxlr import graph as g
from onnxlr import refine
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, ConvStep, LinearLayer, LinearStep, Replacement
from onnxlr.runtime import check_data, feed_rows, input_specs, make_session, run_session
from onnxlr.targets import Target

log = logging.getLogger("onnxlr")

MODES = ("asymmetric", "symmetric")
POSITIONS_PER_SAMPLE = 64  # conv output positions (or MatMul rows) sampled per sample
HOLDOUT_EVERY = 5  # every 5th sample is held out to check the refinement
ASYMMETRIC_STAGES = 4  # passes over the data in asymmetric mode
CHUNK = 8  # samples per onnxruntime run when the batch is dynamic
SEED = 0


# --- data -----------------------------------------------------------------------------------


def data_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise OnnxlrError(f"--calib {path}: the folder holds no .npz file")
        return files
    if not path.is_file():
        raise OnnxlrError(f"--calib {path}: no such file or folder; pass an .npz keyed by input name")
    return [path]


def _read_header(stream):
    """(shape, fortran_order, dtype) of an .npy stream, leaving it at the data."""
    major, _ = np.lib.format.read_magic(stream)
    if major == 1:
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


class _MemberReader:
    """Reads an .npy member of an .npz sequentially, ``rows`` samples at a time."""

    def __init__(self, archive: zipfile.ZipFile, member: str):
        self.stream = archive.open(member)
        shape, fortran, dtype = _read_header(self.stream)
        if fortran or dtype.hasobject:
            raise ValueError("unsupported layout")
        self.shape, self.dtype = shape, dtype
        self.row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        self.left = shape[0] if shape else 0

    def read(self, rows: int) -> np.ndarray:
        rows = min(rows, self.left)
        nbytes = rows * self.row_items * self.dtype.itemsize
        buf = self.stream.read(nbytes)
        self.left -= rows
        return np.frombuffer(buf, dtype=self.dtype).reshape((rows,) + tuple(self.shape[1:]))


def iter_chunks(files: list[Path], specs, rows: int, limit: int | None):
    """Yield feeds of ``rows`` samples from the files, in order, up to ``limit`` samples in all."""
    names = [s.name for s in specs]
    seen = 0
    for path in files:
        try:
            archive = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile):
            raise OnnxlrError(f"--calib {path} is not a readable .npz file") from None
        with archive:
            members = {m[:-4]: m for m in archive.namelist() if m.endswith(".npy")}
            missing = [n for n in names if n not in members]
            if missing:
                raise OnnxlrError(
                    f"--calib {path} has no array for input(s) {', '.join(missing)} (it has: "
                    f"{', '.join(sorted(members)) or 'nothing'}); key each array by the input's name"
                )
            try:
                readers = {n: _MemberReader(archive, members[n]) for n in names}
            except (ValueError, OSError, zipfile.BadZipFile):
                raise OnnxlrError(f"--calib {path}: cannot read its arrays; save them with numpy.savez") from None
            counts = {n: r.left for n, r in readers.items() if r.shape}
            if len(set(counts.values())) > 1:
                raise OnnxlrError(f"--calib {path}: the inputs hold different numbers of samples: {counts}")
            while all(r.left > 0 for r in readers.values() if r.shape):
                if limit is not None and seen >= limit:
                    return
                take = rows if limit is None else min(rows, limit - seen)
                chunk = {n: r.read(take) for n, r in readers.items()}
                n_rows = next((a.shape[0] for a in chunk.values() if a.ndim), 1)
                seen += n_rows
                yield check_data(chunk, specs, str(path))
        if limit is not None and seen >= limit:
            return


def count_samples(files: list[Path], specs, limit: int | None) -> int:
    total = 0
    for path in files:
        with zipfile.ZipFile(path) as archive:
            member = f"{specs[0].name}.npy"
            if member not in archive.namelist():
                continue
            with archive.open(member) as f:
                shape = _read_header(f)[0]
            total += shape[0] if shape else 1
    return total if limit is None else min(total, limit)


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
    fit: list[refine.Moments]
    held: list[refine.Moments]
    # False when another layer of the same asymmetric stage is upstream: that layer's own
    # compensation changes this layer's input after the pass, so compensating here too would
    # correct the same error twice (measured: it blows up); such layers fit the original inputs.
    paired_ok: bool = True


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
        sample_idx = np.repeat(np.arange(batch), POSITIONS_PER_SAMPLE)
        positions = np.stack([rng.integers(0, o, size=sample_idx.size) for o in outs], axis=1)
        return (sample_idx, positions), sample_idx
    rows = linear_rows(target, x)
    per_sample = max(rows.shape[0] // max(batch, 1), 1)
    valid = masked_rows(target, x, row_mask)
    if valid is not None:
        picked = []
        for s in range(batch):
            idx = s * per_sample + np.flatnonzero(valid[s * per_sample : (s + 1) * per_sample])
            picked.append(idx if idx.size <= POSITIONS_PER_SAMPLE else rng.choice(idx, POSITIONS_PER_SAMPLE, replace=False))
        picked = np.sort(np.concatenate(picked)).astype(np.int64)
    elif per_sample <= POSITIONS_PER_SAMPLE:
        picked = np.arange(rows.shape[0])
    else:
        picked = np.sort(np.concatenate([
            s * per_sample + rng.choice(per_sample, POSITIONS_PER_SAMPLE, replace=False) for s in range(batch)
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


def find_row_mask(specs, requested: str | None) -> str | None:
    """The input that marks real tokens: ``requested`` by name, ``"none"`` for no mask, or
    ``"auto"``/None: an integer or bool input named ``attention_mask`` (how Hugging Face exports
    name it) if the model has one."""
    names = {s.name: s for s in specs}
    if requested == "none":
        return None
    if requested not in (None, "auto"):
        if requested not in names:
            raise OnnxlrError(f"--calib-mask {requested!r}: the model has no such input (its inputs: "
                              f"{', '.join(names)}); name the input that marks real tokens, or 'none'")
        return requested
    spec = names.get("attention_mask")
    return spec.name if spec is not None and spec.type in _MASK_TYPES else None


_MASK_TYPES = {"tensor(int64)", "tensor(int32)", "tensor(bool)", "tensor(float)"}


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

    def __init__(self, model: onnx.ModelProto, targets: list[Target], data, samples: int | None, mode: str,
                 mask: str | None = "auto"):
        if mode not in MODES:
            raise OnnxlrError(f"unknown calibration mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self.model = model  # the model being compressed, modified in place by the caller
        self.original = model.SerializeToString()
        self.files = data_files(data)
        self.samples = samples
        probe = make_session(self.original, threads=1)
        self.specs = input_specs(probe)
        del probe
        self.mask_input = find_row_mask(self.specs, mask)
        self.total = count_samples(self.files, self.specs, samples)
        if self.total == 0:
            raise OnnxlrError(f"--calib {data}: no samples")
        main = {id(n) for n in model.graph.node}
        self.eligible = [t for t in targets if id(t.node) in main and t.node.input and t.layer is not None]
        count = len(self.eligible)
        n_stages = 1 if mode == "symmetric" else max(1, min(ASYMMETRIC_STAGES, count))
        self.stage_of = {id(t): (i * n_stages) // max(count, 1) for i, t in enumerate(self.eligible)}
        self.n_stages = n_stages
        self.moments: dict[int, _LayerPlan] = {}
        self.done_stages: set[int] = set()
        self.pending_bias: dict[int, np.ndarray] = {}
        self.seconds = 0.0

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
        layers = [t for t in self.eligible if self.stage_of[id(t)] == stage]
        paired = self.mode == "asymmetric"
        plans = []
        for t in layers:
            groups = t.layer.group if isinstance(t.layer, ConvLayer) else 1
            n = int(np.prod(t.layer.weight.shape[1:])) if isinstance(t.layer, ConvLayer) else t.layer.weight.shape[0]
            plans.append(_LayerPlan(t, t.node.input[0], [refine.Moments(n, paired) for _ in range(groups)],
                                    [refine.Moments(n, paired) for _ in range(groups)]))
        if paired:
            upstream = _upstream_layers(self.model.graph, layers)
            for plan in plans:
                plan.paired_ok = not upstream[id(plan.target)]
        tensors = sorted({p.tensor for p in plans})
        original = _session_with_outputs(self.original, tensors, layers)
        current = _session_with_outputs(self.model.SerializeToString(), tensors, layers) if paired else None
        rows, _ = feed_rows([self.specs], CHUNK)  # a fixed batch B: B samples per run
        rng = np.random.default_rng(SEED + stage)
        seen = 0
        progress = _Progress(f"calibration pass {stage + 1}/{self.n_stages}", self.total)
        for feed in iter_chunks(self.files, self.specs, rows, self.samples):
            outs_o = _run(original, feed, tensors)
            outs_c = _run(current, feed, tensors) if paired else outs_o
            batch = next((a.shape[0] for a in feed.values() if a.ndim), 1)
            row_mask = feed.get(self.mask_input) if self.mask_input else None
            for plan in plans:
                x_o = outs_o[plan.tensor]
                selector, sample_of_row = _rows(plan.target, x_o, rng, row_mask)
                held = ((seen + sample_of_row) % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1
                parts_o = _extract(plan.target, x_o, selector)
                parts_c = _extract(plan.target, outs_c[plan.tensor], selector) if paired else parts_o
                for gi, (pc, po) in enumerate(zip(parts_c, parts_o)):
                    plan.fit[gi].add(pc[~held], po[~held] if paired else None)
                    plan.held[gi].add(pc[held], po[held] if paired else None)
            seen += batch
            progress.update(seen)
            del outs_o, outs_c
        progress.close()
        for plan in plans:
            self.moments[id(plan.target)] = plan
        self.done_stages.add(stage)
        self.seconds += time.perf_counter() - t0
        log.info("calibration pass %d/%d: %d layers on %d samples (%.1f s)", stage + 1, self.n_stages,
                 len(plans), seen, time.perf_counter() - t0)

    def release(self, target: Target) -> None:
        self.moments.pop(id(target), None)

    # --- refinement -----------------------------------------------------------------------

    def refine(self, target: Target, replacement: Replacement) -> Replacement:
        """The replacement with data-aware factor values (same ranks, same chain), or the
        data-free one with a note saying why not."""
        plan = self.plan_for(target)
        if plan is None:
            replacement.notes.append("calib: layer not calibrated (inside a subgraph); data-free factors kept")
            return replacement
        try:
            bias, fit_bias = read_bias(target)
            result = refine_replacement(target.layer, bias, fit_bias, replacement, plan.fit, plan.held,
                                        paired_ok=plan.paired_ok)
        finally:
            self.release(target)
        new, new_bias, note = result
        new.notes.append(note)
        log.info("%s: %s", target.name, note)
        if new is replacement:
            return replacement
        if fit_bias:
            self.pending_bias[id(target)] = new_bias
        return new

    def attach(self, target: Target, node_names: list[str], names: g.NameScope) -> None:
        """After splicing: give the chain's last node the refitted bias."""
        bias = self.pending_bias.pop(id(target), None)
        if bias is None:
            return
        write_bias(target, node_names, bias, names)


def _session_with_outputs(model_bytes: bytes, tensors: list[str], layers: list[Target]):
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    inputs = {vi.name for vi in model.graph.input}
    outputs = {vo.name for vo in model.graph.output}
    dtype = {t.node.input[0]: t.weight_dtype for t in layers}
    for name in tensors:
        if name not in inputs and name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, dtype.get(name, onnx.TensorProto.FLOAT), None))
    data = model.SerializeToString()
    del model
    return make_session(data)


def _run(session, feed, tensors) -> dict[str, np.ndarray]:
    if session is None:
        return {}
    wanted = [t for t in tensors if t not in feed]
    values = run_session(session, feed, wanted, "the model on the calibration data")
    out = dict(zip(wanted, values))
    for t in tensors:
        if t in feed:
            out[t] = feed[t]
    return out


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.tty and (now - self.last > 0.2 or done >= self.total):
            self.last = now
            sys.stderr.write(f"\ronnxlr: {self.label}: {done}/{self.total} samples")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- bias in the graph ----------------------------------------------------------------------


def read_bias(target: Target) -> tuple[np.ndarray | None, bool]:
    """(the layer's effective bias [T] or None, whether a new bias can be written)."""
    node = target.node
    constants = g.constants_in(target.graph)
    if target.op_type == "Conv":
        if len(node.input) > 2 and node.input[2]:
            source = constants.get(node.input[2])
            if source is None:
                return None, False
            return np.asarray(source.to_array(), dtype=np.float64).reshape(-1), True
        return None, True
    if target.gemm is not None and target.gemm.bias is not None:
        source = constants.get(target.gemm.bias)
        n_out = target.layer.weight.shape[1]
        if source is None:
            return None, False
        c = np.asarray(source.to_array(), dtype=np.float64)
        if c.size == 1:
            c = np.full(n_out, float(c.reshape(-1)[0]))
        elif c.shape not in ((n_out,), (1, n_out)):
            return None, False
        return target.gemm.beta * c.reshape(-1), target.gemm.beta != 0
    if target.op_type == "MatMul":  # x @ W followed by Add(bias): the Add's constant is the bias
        found = _following_add(target, target.layer.weight.shape[1])
        if found is not None:
            return found[1], True
    return None, False


def _following_add(target: Target, n_out: int):
    """(Add node, its constant [n_out] as float64, index of the constant input) when the MatMul's
    only consumer adds a 1-D constant of ``n_out`` values that nothing else reads; else None.
    ``n_out`` is passed in: after splicing, ``target.layer`` has been freed."""
    graph, out = target.graph, target.node.output[0]
    consumers = [n for n in graph.node if out in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "Add" or any(o.name == out for o in graph.output):
        return None
    add = consumers[0]
    other = 1 if add.input[0] == out else 0
    constants = g.constants_in(graph)
    source = constants.get(add.input[other])
    if source is None or g.count_uses(graph).get(add.input[other], 0) != 1:
        return None
    value = np.asarray(source.to_array(), dtype=np.float64)
    if value.shape != (n_out,):
        return None
    return add, value, other


def write_bias(target: Target, node_names: list[str], bias: np.ndarray, names: g.NameScope) -> None:
    graph = target.graph
    if target.op_type == "MatMul":
        found = _following_add(target, bias.size)
        if found is None:
            return
        add, _, other = found
        name = names(f"{target.name}_lr_bias")
        graph.initializer.append(g.make_initializer(name, bias.reshape(-1), target.weight_dtype))
        old = add.input[other]
        add.input[other] = name
        g.remove_unused_constants(graph, [old])
        return
    last = next(n for n in graph.node if n.name == node_names[-1])
    value = bias if target.op_type == "Conv" else bias / target.gemm.beta
    name = names(f"{target.name}_lr_bias")
    graph.initializer.append(g.make_initializer(name, value.reshape(-1), target.weight_dtype))
    old = last.input[2] if len(last.input) > 2 else None
    if target.op_type == "Conv":
        if len(last.input) > 2:
            last.input[2] = name
        else:
            last.input.append(name)
    else:
        last.input[2] = name
    if old:
        g.remove_unused_constants(graph, [old])


# --- layer <-> matrices -----------------------------------------------------------------------


def layer_matrices(layer) -> list[np.ndarray]:
    """W_g [T_g, n] per group: y = W_g x (+ b)."""
    if isinstance(layer, LinearLayer):
        return [np.asarray(layer.weight, dtype=np.float64).T]
    return [np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1) for w in layer.group_weights()]


def chain_maps(layer, replacement: Replacement) -> list[np.ndarray] | None:
    """B_g [R, n] per group: the chain up to its last 1x1 step, as a map of the patch."""
    if not isinstance(layer, ConvLayer) or replacement.method not in ("tucker", "cp"):
        return None
    g_, steps = layer.group, replacement.steps
    s_g, kernel = layer.weight.shape[1], layer.kernel
    maps = []
    if replacement.method == "tucker":
        first, core = steps[0].weight, steps[1].weight
        r3, r4 = first.shape[0] // g_, core.shape[0] // g_
        for gi in range(g_):
            u_in_t = first[gi * r3 : (gi + 1) * r3].reshape(r3, s_g)
            c = core[gi * r4 : (gi + 1) * r4].reshape(r4, r3, -1)
            maps.append(np.einsum("rqk,qs->rsk", c, u_in_t).reshape(r4, -1))
        return maps
    rank = steps[-1].weight.shape[1]
    first = steps[0].weight.reshape(g_ * rank, s_g)
    d = layer.spatial_rank
    real_axes = [a for a in range(d) if kernel[a] > 1]
    taps = {a: steps[1 + i].weight.reshape(g_ * rank, kernel[a]) for i, a in enumerate(real_axes)}
    for gi in range(g_):
        rows = slice(gi * rank, (gi + 1) * rank)
        b = first[rows]
        for a in range(d):
            t = taps[a][rows] if a in taps else np.ones((rank, 1))
            b = b[..., None] * t.reshape((rank,) + (1,) * (b.ndim - 1) + (t.shape[1],))
        maps.append(b.reshape(rank, -1))
    return maps


def refine_replacement(layer, bias, fit_bias, replacement: Replacement, fit, held, paired_ok: bool = True):
    """(new replacement, new bias, note). Keeps the data-free replacement when the data-aware one
    is not better on the held-out rows."""
    weights = layer_matrices(layer)
    t_g = weights[0].shape[0]
    biases = [None if bias is None else bias[gi * t_g : (gi + 1) * t_g] for gi in range(len(weights))]
    free_maps = [np.asarray(r, dtype=np.float64).reshape(r.shape[0], -1) for r in _group_blocks(layer, replacement.low_rank_weight())]

    def candidate(moments, paired_ridge=None, shrink=False):
        if replacement.method == "svd":
            rank = replacement.ranks["rank"]
            out = [refine.whitened_svd(w, b, m, rank, fit_bias, paired_ridge=paired_ridge,
                                       shrink=refine.shrinkage(m) if shrink else 0.0)
                   for w, b, m in zip(weights, biases, moments)]
            return [q @ p for p, q, _ in out], [nb for _, _, nb in out], out
        if replacement.method == "tucker":
            out = _tucker_refit(layer, replacement, weights, biases, moments, fit_bias)
            return [u @ bm for u, bm, _, _ in out], [nb for _, _, nb, _ in out], out
        maps = chain_maps(layer, replacement)
        out = [(*refine.refit_last(w, b, bm, m, fit_bias), bm) for w, b, bm, m in zip(weights, biases, maps, moments)]
        return [u @ bm for u, _, bm in out], [nb for _, nb, _ in out], out

    def error(maps, new_biases, moments):
        errs = [refine.output_error(w, b, wn, bn, m) for w, b, wn, bn, m in zip(weights, biases, maps, new_biases, moments)]
        e, r = sum(x[0] for x in errs), sum(x[1] for x in errs)
        return math.sqrt(e / r) if r > 0 else math.sqrt(e)

    has_held = all(m.count > 0 for m in held)
    check = held if has_held else fit
    before = error(free_maps, biases, check)
    # Candidates: in asymmetric mode, the fit on the (x_c, x_o) pairs (for SVD at each of
    # refine.PAIRED_RIDGES) and the fit on the original inputs alone (more robust when the pairs
    # are few); in symmetric mode the one fit. SVD fits are also tried with the input covariance
    # shrunk (refine.shrinkage: few rows for the input width). The best on held-out rows wins.
    paired = fit[0].paired and paired_ok
    ridges = refine.PAIRED_RIDGES if paired and replacement.method == "svd" else (None,)
    views = [(lambda ms: ms, r, "pairs") for r in ridges] if paired or not fit[0].paired else []
    if fit[0].paired:
        views.append((lambda ms: [m.original_view() for m in ms], None, "original"))
    shrinks = (False, True) if replacement.method == "svd" else (False,)
    views = [(view, ridge, source, sh) for sh in shrinks for view, ridge, source in views]
    scored = []
    for i, (view, ridge, _, sh) in enumerate(views):
        maps, new_biases, _ = candidate(view(fit), ridge, sh)
        scored.append((error(maps, new_biases, check), i))
    after, best = min(scored)
    where = "held-out" if has_held else "calibration"
    if not after < before:
        return replacement, None, f"calib: data-free factors kept ({where} output error {before:.4g} <= data-aware {after:.4g})"
    merged = [f.merged(h) for f, h in zip(fit, held)] if has_held else fit
    view, ridge, source, sh = views[best]
    maps, new_biases, parts = candidate(view(merged), ridge, sh)
    new = _rebuild(layer, replacement, parts)
    bias_out = None
    if fit_bias:
        bias_out = np.concatenate([np.zeros(t_g) if b is None else b for b in new_biases])
    how = []
    if fit[0].paired:
        how.append("fit on original inputs" if source == "original" else
                   "paired fit" if ridge is None else f"paired fit, ridge {ridge:g}")
    if sh:
        how.append("shrunk covariance")
    how = f" ({'; '.join(how)})" if how else ""
    return new, bias_out, f"calib: {where} output error {before:.4g} -> {after:.4g}{how}"


def _group_blocks(layer, reconstruction: np.ndarray) -> list[np.ndarray]:
    if isinstance(layer, LinearLayer):
        return [np.asarray(reconstruction, dtype=np.float64).T]
    per = layer.out_channels // layer.group
    return [reconstruction[gi * per : (gi + 1) * per] for gi in range(layer.group)]


def _tucker_refit(layer, replacement, weights, biases, moments, fit_bias):
    """Core refit (whitened least squares given U_in, U_out), then last factor and bias."""
    g_, steps = layer.group, replacement.steps
    s_g, k = layer.weight.shape[1], int(np.prod(layer.kernel))
    first, last = steps[0].weight, steps[2].weight
    r3 = first.shape[0] // g_
    r4 = last.shape[1]
    t_g = weights[0].shape[0]
    out = []
    for gi, (w, b, m) in enumerate(zip(weights, biases, moments)):
        u_in = first[gi * r3 : (gi + 1) * r3].reshape(r3, s_g).T.astype(np.float64)
        u_out = last[gi * t_g : (gi + 1) * t_g].reshape(t_g, r4).astype(np.float64)
        q, _ = np.linalg.qr(u_out)
        core = refine.refit_tucker_core(w, u_in, q, k, m, fit_bias)  # [R4, R3*k]
        chain = np.einsum("rqk,qs->rsk", core.reshape(r4, r3, k), u_in.T).reshape(r4, -1)
        u, nb = refine.refit_last(w, b, chain, m, fit_bias)
        out.append((u, chain, nb, core.reshape(r4, r3, *layer.kernel)))
    return out


def _rebuild(layer, replacement: Replacement, parts) -> Replacement:
    method, steps = replacement.method, list(replacement.steps)
    if isinstance(layer, LinearLayer):
        p, q, _ = parts[0]
        reconstruction = (q @ p).T
        return replace(replacement, steps=[LinearStep(p.T), LinearStep(q.T)], reconstruction=reconstruction, weight_rel_error=None,
                       notes=list(replacement.notes))
    g_, kernel, s_g = layer.group, layer.kernel, layer.weight.shape[1]
    ones = (1,) * layer.spatial_rank
    t_g = layer.out_channels // g_
    if method == "svd":
        rank = replacement.ranks["rank"]
        first = np.concatenate([p.reshape(rank, s_g, *kernel) for p, _, _ in parts], axis=0)
        second = np.concatenate([q.reshape(t_g, rank, *ones) for _, q, _ in parts], axis=0)
        steps = [replace(steps[0], weight=first), replace(steps[1], weight=second)]
        recon = np.concatenate([(q @ p).reshape(t_g, s_g, *kernel) for p, q, _ in parts], axis=0)
    elif method == "tucker":
        r4 = steps[2].weight.shape[1]
        new_cores = [core for _, _, _, core in parts]
        core_w = np.concatenate(new_cores, axis=0)
        last = np.concatenate([u.reshape(t_g, r4, *ones) for u, _, _, _ in parts], axis=0)
        steps = [steps[0], replace(steps[1], weight=core_w), replace(steps[2], weight=last)]
        recon = np.concatenate([(u @ chain).reshape(t_g, s_g, *kernel) for u, chain, _, _ in parts], axis=0)
    else:  # cp
        rank = steps[-1].weight.shape[1]
        last = np.concatenate([u.reshape(t_g, rank, *ones) for u, _, _ in parts], axis=0)
        steps[-1] = replace(steps[-1], weight=last)
        recon = np.concatenate([(u @ bm).reshape(t_g, s_g, *kernel) for u, _, bm in parts], axis=0)
    for i, s in enumerate(steps):
        if isinstance(s, ConvStep) and s.bias is not None and i == len(steps) - 1:
            steps[i] = replace(s, bias=None)  # the bias is written by Calibrator.attach
    return replace(replacement, steps=steps, reconstruction=recon, notes=list(replacement.notes), weight_rel_error=None)
