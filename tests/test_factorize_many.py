"""factorize_many (one layer, several rank specs, its decompositions computed once) gives exactly
what factorize gives spec by spec, for every method; a spec that fails does not stop the others."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from onnxlr import methods
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, LinearLayer
from onnxlr.methods.base import Method
from onnxlr.ranks import RankSpec, parse_rank

SPECS = [RankSpec("fraction", f) for f in (0.125, 0.25, 0.5, 0.75)] + [parse_rank("energy:0.9"),
                                                                        parse_rank("evbmf"), parse_rank("5")]


def _decaying(rng, shape):
    """A kernel with a decaying channel spectrum, like trained ones (ranks then matter)."""
    return rng.standard_normal(shape) * (0.8 ** np.arange(shape[0])).reshape(-1, *([1] * (len(shape) - 1)))


def _layers(rng):
    conv = ConvLayer(_decaying(rng, (24, 16, 3, 3)), rng.standard_normal(24), 1, (1, 1), (1, 1), (1, 1, 1, 1))
    strided = ConvLayer(_decaying(rng, (16, 24, 3, 5)), None, 1, (2, 1), (1, 2), (1, 2, 1, 2))
    grouped = ConvLayer(_decaying(rng, (16, 8, 3, 3)), None, 2, (1, 1), (1, 1), (1, 1, 1, 1))
    return [conv, strided, grouped]


def _same(a, b):
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", ["tucker", "channel", "spatial-svd", "cp"])
def test_factorize_many_equals_factorize_per_spec_on_kxk_convs(name):
    method = methods.get(name)
    layers, specs = _layers(np.random.default_rng(0)), SPECS
    if name == "cp":  # its ALS is slow: one layer and two specs show the sharing
        layers, specs = layers[:1], [SPECS[0], SPECS[-1]]
    for layer in layers:
        many = method.factorize_many(layer, specs, 8)
        assert len(many) == len(specs)
        for spec, result in zip(specs, many):
            replacement, log = method.factorize(layer, spec, 8)
            assert replacement.method == name
            _same(result, (replacement, log))


def test_factorize_many_equals_factorize_per_spec_on_matrices_and_1x1_convs():
    rng = np.random.default_rng(1)
    method = methods.get("svd")
    pointwise = ConvLayer(_decaying(rng, (32, 20, 1, 1)), None, 1, (1, 1), (1, 1), (0, 0, 0, 0))
    for layer in (LinearLayer(_decaying(rng, (40, 24)).T.copy()), LinearLayer(_decaying(rng, (24, 40))), pointwise):
        for spec, result in zip(SPECS, method.factorize_many(layer, SPECS, 8)):
            _same(result, method.factorize(layer, spec, 8))


def test_a_failing_spec_is_returned_as_its_error_and_the_others_still_factorize():
    calls = []

    def factorize(layer, ranks, round_to):
        calls.append(ranks)
        if ranks == "bad":
            raise OnnxlrError("bad rank")
        return ranks, None

    method = Method("toy", "", lambda layer: None, factorize, None, None)  # the default factorize_many
    out = method.factorize_many(None, ["a", "bad", "b"], 8)
    assert out[0] == ("a", None) and out[2] == ("b", None)
    assert isinstance(out[1], OnnxlrError) and calls == ["a", "bad", "b"]
