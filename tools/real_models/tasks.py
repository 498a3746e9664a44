"""Task metrics per model and ``evaluate``: run onnxruntime CPU over a model's evaluation sets.

Each model module (``effnet``, ``ppocr``, ``minilm``) exposes:

- ``NAME``: the folder name under the output root;
- ``EVAL_SETS``: names of its evaluation sets (``<set>.npz`` inputs, ``<set>_gt.npz`` truth);
- ``score(eval_set, outputs, gt, meta) -> dict``: the task metric(s) from the model's outputs
  (list of numpy arrays, onnxruntime order), the ground-truth arrays and the model's
  metadata_props (the OCR character set lives there);
- ``parts(eval_set, outputs, gt, meta) -> {metric: array [2, n]}``: each sample's numerator and
  denominator of its metrics (a metric is the ratio of their sums), for paired comparisons of two
  models on the same samples (``sample_parts``, ``tools/compare_frontiers.py``);
- optionally ``fresh(root, n, seed) -> (inputs, ground truth)``: ``n`` more samples made on demand
  as the sets were and in neither of them, scored by ``parts`` under the set name ``FRESH``
  (``fresh_parts``; the generated models, PP-OCRv6 and MiniLM);
- optionally ``compact(outputs) -> outputs``: shrinks each batch's outputs before they are kept
  (``score`` accepts both forms).

The metric functions themselves are importable from here too (``topk_accuracy``,
``top1_agreement``, ``char_accuracy``, ``embedding_metrics``).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from . import common, effnet, minilm, ppocr
from .effnet import top1_agreement, topk_accuracy
from .minilm import embedding_metrics
from .ppocr import char_accuracy

MODELS: dict[str, ModuleType] = {m.NAME: m for m in (effnet, ppocr, minilm)}

__all__ = [
    "MODELS",
    "char_accuracy",
    "embedding_metrics",
    "evaluate",
    "fresh_parts",
    "sample_parts",
    "score",
    "top1_agreement",
    "topk_accuracy",
]


def model_module(model_name: str) -> ModuleType:
    try:
        return MODELS[model_name]
    except KeyError:
        raise ValueError(f"unknown model {model_name!r}; valid: {', '.join(MODELS)}") from None


def score(model_name: str, eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None = None) -> dict:
    """The task metric(s) of ``model_name`` on ``eval_set`` from onnxruntime outputs."""
    return model_module(model_name).score(eval_set, outputs, gt, meta or {})


def evaluate(model_name: str, onnx_path: str | Path, data_dir: str | Path,
             batch_size: int = 32) -> dict:
    """Run ``onnx_path`` with onnxruntime CPU over every evaluation set in ``data_dir``.

    ``data_dir`` is the model's folder (``<root>/<model_name>``) or the root above it.
    Batches of ``batch_size`` where the model's batch dimension is dynamic.
    Returns ``{eval_set: {metric: value, ...}, ...}``.
    """
    mod = model_module(model_name)
    return {eval_set: mod.score(eval_set, *_run(mod, onnx_path, data_dir, eval_set, batch_size))
            for eval_set in mod.EVAL_SETS}


def sample_parts(model_name: str, onnx_path: str | Path, data_dir: str | Path, eval_set: str,
                 batch_size: int = 32) -> dict[str, np.ndarray]:
    """``{metric: [numerators, denominators]}`` per sample of ``eval_set`` (see the module doc)."""
    mod = model_module(model_name)
    return mod.parts(eval_set, *_run(mod, onnx_path, data_dir, eval_set, batch_size))


def fresh_parts(model_name: str, onnx_paths: list[Path], data_dir: str | Path, n: int, seed: int,
                batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """:func:`sample_parts` of each model on the same ``n`` fresh samples (``fresh`` above); the
    root of the model folders is ``data_dir``'s parent or ``data_dir``."""
    mod = model_module(model_name)
    if not hasattr(mod, "fresh"):
        raise ValueError(f"{model_name} has no generator of fresh samples")
    data_dir = Path(data_dir)
    root = data_dir.parent if data_dir.name == mod.NAME else data_dir
    inputs, gt = mod.fresh(root, n, seed)
    found = []
    for path in onnx_paths:
        outputs, meta = _outputs(mod, path, inputs, batch_size)
        found.append(mod.parts(mod.FRESH, outputs, gt, meta))
    return found


def _run(mod: ModuleType, onnx_path, data_dir, eval_set: str, batch_size: int) -> tuple:
    """(outputs, ground truth, metadata) of one evaluation set."""
    data_dir = Path(data_dir)
    if not (data_dir / f"{mod.EVAL_SETS[0]}.npz").exists() and (data_dir / mod.NAME).is_dir():
        data_dir = data_dir / mod.NAME
    outputs, meta = _outputs(mod, onnx_path, common.load_npz(data_dir / f"{eval_set}.npz"), batch_size)
    return outputs, common.load_npz(data_dir / f"{eval_set}_gt.npz"), meta


def _outputs(mod: ModuleType, onnx_path, inputs: dict[str, np.ndarray], batch_size: int) -> tuple[list, dict]:
    """(the model's outputs on ``inputs``, compacted as the model module asks; its metadata)."""
    sess = common.session(Path(onnx_path))
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    return common.run_batched(sess, inputs, batch_size, getattr(mod, "compact", None)), meta
