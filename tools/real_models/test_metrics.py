"""Fast checks of the metric functions on hand-made outputs (no models, no data, no torch).

    python -m pytest tools/real_models/test_metrics.py
"""

import numpy as np
import pytest

from tools.real_models import tasks
from tools.real_models.ppocr import charset_from_meta, ctc_greedy, edit_distance


def test_topk_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    r = tasks.topk_accuracy(logits, np.array([1, 1, 0]), ks=(1, 2))
    assert r["top1_count"] == 1 and r["top2_count"] == 2 and r["n"] == 3


def test_top1_agreement():
    r = tasks.top1_agreement(np.eye(4), np.array([0, 1, 2, 0]))
    assert r["agree_count"] == 3 and r["top1_agreement"] == pytest.approx(0.75)


def test_ctc_greedy_collapses_repeats_and_drops_blank():
    charset = charset_from_meta({"character": "a\nb"})  # blank, a, b, space
    assert charset == ["blank", "a", "b", " "]
    assert ctc_greedy(np.array([[1, 1, 0, 1, 2, 2, 3, 0, 2]]), charset) == ["aab b"]


@pytest.mark.parametrize(("a", "b", "d"), [("", "", 0), ("abc", "abc", 0), ("abc", "abd", 1),
                                           ("kitten", "sitting", 3), ("", "xy", 2)])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d


def test_char_accuracy():
    r = tasks.char_accuracy(["abc", "xy"], np.array(["abd", "xy"]))
    assert r["char_accuracy"] == pytest.approx(1 - 1 / 5) and r["line_accuracy"] == 0.5


def test_embedding_metrics():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16))
    labels = np.repeat(np.arange(3), 5)
    emb = centers[labels] + 0.01 * rng.normal(size=(15, 16))
    r = tasks.embedding_metrics(emb, emb * 2.0, labels)
    assert r["mean_cosine"] == pytest.approx(1.0) and r["knn_top1"] == 1.0
    r = tasks.embedding_metrics(-emb, emb, labels)
    assert r["mean_cosine"] == pytest.approx(-1.0)


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        tasks.model_module("resnet")
