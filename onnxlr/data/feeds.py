"""Feeds: the one input layer of verify, bench, calibration and budgets.

A *feed* is a dict input name -> array at the model's own shapes: one onnxruntime run. A
*sample* is a feed whose batch axis, where an input has one, has size 1. Every source yields
samples, one at a time, so memory never grows with their number; :func:`batches` groups
consecutive samples into feeds for speed where the model allows it.

Sources (:func:`open_source`):

    stacked .npz   arrays keyed by input name, samples stacked along each input's batch axis;
                   inputs without a batch axis (scalars, fixed shapes) are given once
    folder         every .npz in it, in name order, each read by the same rule; a file whose
                   arrays do not hold one sample count along their batch axes is one feed, taken
                   at its exact shapes (a recurrent state [2, batch, H] beside [batch, time])
    arrays         a dict of arrays, read like a stacked .npz
    random         seeded, drawn per sample at the declared shapes (dynamic dims from --shape,
                   else 1), never by stacking along an axis that is not a batch axis
    feeds          any iterable of feed dicts
    loader         ``file.py[:function]``, a function returning feed dicts, re-called per pass
                   (:mod:`.loaders`)
    images         a folder of image files, decoded and preprocessed (:mod:`.images`)

Batch axis of an input (:func:`batch_axes`): the axis of the symbolic dim that carries the model's
batch name (the name most inputs have on axis 0: ``batch`` in [2, batch, 128]); else axis 0 when
it is dynamic (unnamed) or fixed at 1 while another input's axis 0 is dynamic or named the
same. Scalars and inputs with none of these have no batch axis and are passed whole.

Held out: every :data:`HOLDOUT_EVERY`-th sample (the 5th, 10th, ...) is held out from fitting, for
checks; calibration, the budget's damage and its final error all use this one rule.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError
from onnxlr.runtime import InputSpec

log = logging.getLogger("onnxlr")

HOLDOUT_EVERY = 5
#: Samples per run when every input's batch axis is dynamic.
DEFAULT_CHUNK = 16


def batch_axes(specs: Sequence[InputSpec]) -> dict[str, int | None]:
    """The batch axis of every input, or None where it has none (see the module docstring)."""
    first_names = Counter(s.dim_names[0] for s in specs if s.dims and s.dim_names and s.dim_names[0])
    batch_name = first_names.most_common(1)[0][0] if first_names else None
    any_dynamic_first = any(s.dims and s.dims[0] is None for s in specs)
    axes: dict[str, int | None] = {}
    for spec in specs:
        names = spec.dim_names or (None,) * len(spec.dims)
        if batch_name is not None and batch_name in names:
            axes[spec.name] = names.index(batch_name)
        elif spec.dims and spec.dims[0] is None and (batch_name is None or names[0] is None):
            axes[spec.name] = 0
        elif spec.dims and spec.dims[0] == 1 and (any_dynamic_first or len(specs) == 1 or batch_name is None):
            axes[spec.name] = 0
        else:
            axes[spec.name] = None
    return axes


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size the model fixes (the fixed size of a batch axis above 1), else None."""
    axes = batch_axes(specs)
    fixed = {s.dims[axes[s.name]] for s in specs if axes[s.name] is not None and s.dims[axes[s.name]]}
    fixed.discard(1)
    if len(fixed) > 1:
        raise OnnxlrError(f"the inputs fix different batch sizes {sorted(fixed)}; onnxlr cannot split samples across them")
    return fixed.pop() if fixed else None


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a session of ``model`` would declare (graph inputs that are not initializers),
    read from the proto without starting one."""
    weights = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        tensor = vi.type.tensor_type
        elem = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else np.dtype("float32")
        type_name = "tensor(bool)" if elem == np.bool_ else f"tensor({'float' if elem == np.float32 else 'double' if elem == np.float64 else np.dtype(elem).name})"
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        names = tuple(d.dim_param if d.HasField("dim_param") and d.dim_param else None for d in tensor.shape.dim)
        specs.append(InputSpec(vi.name, type_name, dims, names))
    return specs


# --- flags ---------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input:1,3,224,224"`` -> ``("input", (1, 3, 224, 224))``; the name may contain ':'."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise OnnxlrError(f"bad shape {text!r}; write NAME:DIMS, e.g. input:1,3,224,224")
    return name, shape


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Repeated ``--shape NAME:DIMS`` flags -> ``{name: dims}`` (a later flag wins)."""
    return dict(parse_shape(item) for item in items)


def parse_int_range(text: str) -> tuple[int, int]:
    """``"LO:HI"`` -> ``(lo, hi)``, the half-open range of random integer inputs."""
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise OnnxlrError(f"bad integer range {text!r}; write LO:HI, e.g. 0:30522") from None


# --- checking arrays against the inputs -----------------------------------------------------


def cast_inputs(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    """The arrays of the model's inputs, cast to their dtypes (same kind only: float to float,
    int to int); a missing input or a wrong kind or rank is an OnnxlrError naming ``where``."""
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise OnnxlrError(
            f"{where} has no array for input(s) {', '.join(missing)} (it has: "
            f"{', '.join(sorted(arrays)) or 'nothing'}); key each array by the input's name"
        )
    out = {}
    for spec in specs:
        arr, want = np.asarray(arrays[spec.name]), spec.dtype
        if not (arr.dtype.kind == want.kind or {arr.dtype.kind, want.kind} <= set("iu")):
            raise OnnxlrError(f"{where}: array {spec.name!r} has dtype {arr.dtype} but the model wants {want}")
        if arr.ndim != len(spec.dims):
            raise OnnxlrError(
                f"{where}: array {spec.name!r} has shape {list(arr.shape)} but the model's input is "
                f"{format_dims(spec.dims)} (stack samples along its batch axis, or give one feed per file)"
            )
        out[spec.name] = arr.astype(want, copy=False)
    return out


def check_feed_shapes(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str,
                      skip: Mapping[str, int | None] | None = None) -> None:
    """Every fixed dim agrees with the model's (``skip``: a batch axis per input, not checked)."""
    for spec in specs:
        shape = feed[spec.name].shape
        for axis, (got, declared) in enumerate(zip(shape, spec.dims)):
            if skip is not None and skip.get(spec.name) == axis:
                continue
            if declared is not None and got != declared:
                raise OnnxlrError(
                    f"{where}: array {spec.name!r} has shape {list(shape)} but the model's input is "
                    f"{format_dims(spec.dims)}"
                )


def format_dims(dims: Sequence[int | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _sample_count(arrays: Mapping[str, np.ndarray], axes: Mapping[str, int | None], specs) -> int | None:
    """How many samples ``arrays`` stack along their batch axes; None when they do not agree
    (or a fixed batch axis above 1 holds one feed exactly)."""
    counts = {arrays[s.name].shape[axes[s.name]] for s in specs if axes[s.name] is not None}
    if len(counts) != 1:
        return None if counts else 1
    return counts.pop()


def split_samples(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> Iterator[dict]:
    """The samples of one stacked set of arrays; the whole set as one feed when its batch axes
    do not agree on a sample count."""
    arrays = cast_inputs(arrays, specs, where)
    axes = batch_axes(specs)
    count = _sample_count(arrays, axes, specs)
    check_feed_shapes(arrays, specs, where, skip=axes if count is not None else None)
    if count is None:
        yield arrays
        return
    if count == 0:
        raise OnnxlrError(f"{where} holds no samples (its batch axis has length 0)")
    for i in range(count):
        yield {s.name: (arrays[s.name] if axes[s.name] is None else
                        np.take(arrays[s.name], [i], axis=axes[s.name])) for s in specs}


# --- sources --------------------------------------------------------------------------------


@dataclass
class Source:
    """A re-iterable stream of samples, and what to call it in messages and reports."""

    label: str
    samples: Callable[[], Iterator[dict]]
    count: int | None = None  # known up front, or None

    def __iter__(self) -> Iterator[dict]:
        return self.samples()


def npz_files(path: str | os.PathLike, what: str = "data") -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise OnnxlrError(f"{what} {path}: the folder holds no .npz file")
        return files
    if not path.is_file():
        raise OnnxlrError(f"{what} {path}: no such file or folder; pass an .npz keyed by input name, or a folder of them")
    return [path]


_WARNED: set = set()  # files whose extra arrays were reported: once per process, not once per pass


def _read_npz(path: Path, specs, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            _warn_extra(path, npz.files, specs)
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise OnnxlrError(f"{what} {path} is not a readable .npz file; save the arrays with numpy.savez, "
                          "keyed by input name") from None


def _warn_extra(path: Path, names, specs) -> None:
    extra = sorted(set(names) - {s.name for s in specs})
    if extra and path not in _WARNED:
        _WARNED.add(path)
        log.warning("ignoring arrays %s in %s: the model has no such inputs", extra, path)


class _Member:
    """Reads an .npy member of an .npz sequentially, ``rows`` entries of axis 0 at a time."""

    def __init__(self, archive: zipfile.ZipFile, member: str):
        self.stream = archive.open(member)
        major, _ = np.lib.format.read_magic(self.stream)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read_header(self.stream)
        self.streamable = bool(self.shape) and not fortran and not self.dtype.hasobject
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, rows: int) -> np.ndarray:
        data = self.stream.read(rows * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((-1,) + tuple(self.shape[1:]))


def _stream_npz(path: Path, specs, what: str, rows: int = 64) -> Iterator[dict] | None:
    """The samples of a stacked .npz whose batch axes are all axis 0, read ``rows`` at a time, so
    memory does not grow with the file; None when the file needs reading whole (another batch
    axis, a file that is one feed, Fortran order)."""
    axes = batch_axes(specs)
    try:
        archive = zipfile.ZipFile(path)
        members = {m[:-4]: m for m in archive.namelist() if m.endswith(".npy")}
        _warn_extra(path, members, specs)
        if any(s.name not in members for s in specs):
            return None
        readers = {s.name: _Member(archive, members[s.name]) for s in specs if axes[s.name] == 0}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    counts = {r.shape[0] for r in readers.values()}
    if not readers or len(counts) != 1 or not all(r.streamable for r in readers.values()) or any(
            axes[s.name] not in (0, None) for s in specs):
        archive.close()
        return None
    whole = {}
    with np.load(path, allow_pickle=False) as npz:
        whole = {s.name: npz[s.name] for s in specs if axes[s.name] is None}

    def samples() -> Iterator[dict]:
        with archive:
            left = counts.pop()
            while left > 0:
                take = min(rows, left)
                chunk = {name: reader.read(take) for name, reader in readers.items()}
                chunk.update(whole)
                left -= take
                yield from split_samples(chunk, specs, f"{what} {path}")

    return samples()


def npz_source(path: str | os.PathLike, specs: Sequence[InputSpec], what: str = "data") -> Source:
    """An .npz (samples stacked) or a folder of .npz files (each stacked, or one feed)."""
    files = npz_files(path, what)

    def samples() -> Iterator[dict]:
        for f in files:
            streamed = _stream_npz(f, specs, what)
            if streamed is not None:
                yield from streamed
            else:
                yield from split_samples(_read_npz(f, specs, what), specs, f"{what} {f}")

    return Source(str(path), samples)


def arrays_source(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], label: str = "arrays") -> Source:
    return Source(label, lambda: split_samples(arrays, specs, label))


def feeds_source(feeds: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable], specs, label: str) -> Source:
    """Samples from feed dicts (each split along its batch axes where they agree)."""

    def samples() -> Iterator[dict]:
        iterable = feeds() if callable(feeds) else feeds
        for i, feed in enumerate(iterable):
            if not isinstance(feed, Mapping):
                raise OnnxlrError(f"{label}: item {i} is a {type(feed).__name__}, not a dict of input name -> array")
            yield from split_samples(feed, specs, f"{label}, item {i}")

    return Source(label, samples)


def random_source(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = 16,
    *,
    seed: int = 0,
    int_range: tuple[int, int] = (0, 100),
) -> Source:
    """``samples`` seeded random samples, each drawn at its own feed shape (batch axis 1)."""
    lo, hi = int_range
    if hi <= lo:
        raise OnnxlrError(f"bad integer range {lo}:{hi}; write LO:HI with LO < HI, e.g. 0:30522")
    if samples < 1:
        raise OnnxlrError(f"samples must be at least 1, got {samples}")
    feed_shapes = resolve_shapes(specs, shapes)
    for spec in specs:
        if spec.dtype.kind in "iu":
            info = np.iinfo(spec.dtype)
            if lo < info.min or hi - 1 > info.max:
                raise OnnxlrError(f"integer range {lo}:{hi} does not fit input {spec.name!r} of type {spec.dtype}")

    def draw() -> Iterator[dict]:
        rng = np.random.default_rng(seed)
        for _ in range(samples):
            feed = {}
            for spec in specs:
                shape, dtype = feed_shapes[spec.name], spec.dtype
                if dtype.kind == "f":
                    feed[spec.name] = rng.standard_normal(shape).astype(dtype)
                elif dtype.kind in "iu":
                    feed[spec.name] = rng.integers(lo, hi, size=shape).astype(dtype)
                else:
                    feed[spec.name] = rng.random(shape) < 0.5
            yield feed

    return Source(f"random (seed {seed})", draw, samples)


def resolve_shapes(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]] | None = None,
                   batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of one feed: ``shapes`` overrides, a dynamic batch axis becomes ``batch``
    (when given), every other dynamic dim 1. A fixed dim that disagrees is an OnnxlrError."""
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise OnnxlrError(f"--shape names unknown input(s) {', '.join(unknown)}; the model's inputs are: "
                          f"{', '.join(s.name for s in specs)}")
    axes = batch_axes(specs)
    out = {}
    for spec in specs:
        if spec.name in shapes:
            shape = tuple(int(d) for d in shapes[spec.name])
            if len(shape) != len(spec.dims):
                raise OnnxlrError(f"--shape gives input {spec.name!r} {len(shape)} dims but the model declares "
                                  f"{len(spec.dims)}: {format_dims(spec.dims)}")
            for given, declared in zip(shape, spec.dims):
                if declared is not None and given != declared:
                    raise OnnxlrError(f"--shape {spec.name}:{','.join(map(str, shape))} disagrees with the "
                                      f"model's fixed shape {format_dims(spec.dims)}")
        else:
            shape = [1 if d is None else d for d in spec.dims]
            axis = axes[spec.name]
            if batch is not None and axis is not None:
                if spec.dims[axis] is None:
                    shape[axis] = batch
                elif spec.dims[axis] != batch:
                    raise OnnxlrError(f"--batch {batch} but input {spec.name!r} has a fixed batch of "
                                      f"{spec.dims[axis]} ({format_dims(spec.dims)}); use --batch {spec.dims[axis]}")
            shape = tuple(shape)
        out[spec.name] = shape
    return out


def open_source(data, specs: Sequence[InputSpec], *, shapes=None, samples: int = 16, seed: int = 0,
                int_range: tuple[int, int] = (0, 100), what: str = "--inputs") -> Source:
    """A Source from what a user passes: None (random), a path (.npz or folder), a dict of
    arrays, a Source, an object with a ``to_source(specs, what)`` method
    (:class:`~onnxlr.data.loaders.DataLoader`, :class:`~onnxlr.data.images.ImageFolder`), or an
    iterable of feed dicts. ``onnxlr.data.open_source`` (:func:`.loaders.open_source`) also takes
    ``"file.py[:function]"``."""
    if isinstance(data, Source):
        return data
    if data is None:
        return random_source(specs, shapes, samples, seed=seed, int_range=int_range)
    if shapes:
        raise OnnxlrError("--shape applies to random inputs only; with data the data's shapes are used, so drop --shape")
    if isinstance(data, (str, os.PathLike)):
        return npz_source(data, specs, what)
    if callable(getattr(data, "to_source", None)):
        return data.to_source(specs, what)
    if isinstance(data, Mapping):
        return arrays_source(data, specs)
    return feeds_source(data, specs, "feeds")


# --- grouping samples into feeds ------------------------------------------------------------


def limited(source: Iterable[dict], limit: int | None) -> Iterator[dict]:
    for i, sample in enumerate(source):
        if limit is not None and i >= limit:
            return
        yield sample


def split_held_out(source: Iterable[dict], held: bool) -> Iterator[dict]:
    """The samples used for fitting (``held=False``) or the held-out ones (every 5th)."""
    for i, sample in enumerate(source):
        if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == held:
            yield sample


def is_held_out(index: int) -> bool:
    return index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def batches(samples: Iterable[dict], specs: Sequence[InputSpec], chunk: int = DEFAULT_CHUNK) -> Iterator[dict]:
    """Feeds made of consecutive samples: stacked along the batch axes up to ``chunk`` samples
    when every batched input's batch axis is dynamic and the unbatched inputs are equal; exactly
    the model's fixed batch B when it fixes one; one sample per feed otherwise."""
    axes = batch_axes(specs)
    fixed = fixed_batch(specs)
    dynamic = all(axes[s.name] is None or s.dims[axes[s.name]] is None for s in specs) and any(
        axes[s.name] is not None for s in specs)
    size = fixed or (max(1, chunk) if dynamic else 1)
    pending: list[dict] = []
    for sample in samples:
        if pending and not _stackable(pending[0], sample, axes, fixed):
            yield _stack(pending, axes)
            pending = []
        pending.append(sample)
        if _rows(pending, axes) >= size:
            yield _stack(pending, axes)
            pending = []
    if pending:
        if fixed and _rows(pending, axes) % fixed:
            raise OnnxlrError(f"{_rows(pending, axes)} samples are left over for the model's fixed batch of "
                              f"{fixed}; give a multiple of {fixed} samples")
        yield _stack(pending, axes)


def _rows(pending: list[dict], axes) -> int:
    name = next((n for n, a in axes.items() if a is not None), None)
    return len(pending) if name is None else sum(p[name].shape[axes[name]] for p in pending)


def _stackable(a: dict, b: dict, axes, fixed) -> bool:
    for name, axis in axes.items():
        x, y = a[name], b[name]
        if axis is None:
            if x.shape != y.shape or not np.array_equal(x, y):
                return False
        elif x.shape[:axis] + x.shape[axis + 1:] != y.shape[:axis] + y.shape[axis + 1:]:
            return False
    return True


def _stack(pending: list[dict], axes) -> dict:
    if len(pending) == 1:
        return pending[0]
    return {name: (pending[0][name] if axis is None else np.concatenate([p[name] for p in pending], axis=axis))
            for name, axis in axes.items()}


def sample_rows(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    """Samples in one feed: the size of its batch axis (1 when no input has one)."""
    axes = batch_axes(specs)
    for spec in specs:
        if axes[spec.name] is not None:
            return int(feed[spec.name].shape[axes[spec.name]])
    return 1


def load(samples: Iterable[dict]) -> list[dict]:
    """Samples held in memory (for the small held-out sets budgets score on)."""
    return list(samples)


def row_mask_input(specs: Sequence[InputSpec], requested: str | None) -> str | None:
    """The input that marks real tokens (zeros: padding): ``requested`` by name, ``"none"`` for
    no mask, or ``"auto"``/None: an integer, bool or float input named ``attention_mask`` (how
    Hugging Face exports name it) if the model has one."""
    names = {s.name: s for s in specs}
    if requested == "none":
        return None
    if requested not in (None, "auto"):
        if requested not in names:
            raise OnnxlrError(f"--calib-mask {requested!r}: the model has no such input (its inputs: "
                              f"{', '.join(names)}); name the input that marks real tokens, or 'none'")
        return requested
    spec = names.get("attention_mask")
    mask_types = {"tensor(int64)", "tensor(int32)", "tensor(bool)", "tensor(float)"}
    return spec.name if spec is not None and spec.type in mask_types else None
