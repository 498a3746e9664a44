"""The protocol every decomposition method follows, and the layer views they share.

A method is a small frozen record of plain functions (tensorly style: the work is in functions,
the record only names them):

    check(layer) -> str | None           why the method does not apply to this layer (None: it does)
    factorize(layer, ranks, round_to)    ranks: a RankSpec (chosen from the layer's spectra) or a
                                         dict of exact ranks -> (Replacement, RankLog)
    refit(layer, replacement, moments, fit_bias, paired_ridge, shrink) -> Fit
                                         data-aware factor values at the same ranks (onnxlr.calib)
    rebuild(layer, replacement, fit) -> Replacement
    factorize_many(layer, specs, round_to) -> [(Replacement, RankLog) | OnnxlrError]
                                         one result per spec, each equal to factorize's (an error
                                         in place of a spec that fails); methods whose spectra
                                         cost most compute them once per layer, the default
                                         calls factorize per spec
    input_space(layer, replacement)      optional: per group, an orthonormal basis P [m, n] of the
                       -> [P_g]          inputs every refit of this replacement reads (its fixed
                                         first factors), so that calibration keeps the moments of
                                         P x alone (onnxlr.calib.fit.ProjectedMoments)

``whitened`` marks the methods whose refit is an activation-aware truncation (SVD-like): for them
calibration also tries the paired ridges and the shrunk covariance (see onnxlr.calib.fit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer, LinearLayer, Replacement
from onnxlr.ranks import RankLog, RankSpec


@dataclass
class Fit:
    """A refit of one layer: per group the new map W'_g [T_g, n] and bias b'_g (None: unchanged),
    and ``parts``, whatever the method's rebuild needs."""

    maps: list[np.ndarray]
    biases: list[np.ndarray | None]
    parts: list = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # the replacement chain, one line, for help texts and docs
    check: Callable[[ConvLayer | LinearLayer], str | None]
    factorize: Callable[[ConvLayer | LinearLayer, RankSpec | dict, int], tuple[Replacement, RankLog]]
    refit: Callable[..., Fit]
    rebuild: Callable[[ConvLayer | LinearLayer, Replacement, Fit], Replacement]
    whitened: bool = False
    input_space: Callable[[ConvLayer | LinearLayer, Replacement], list[np.ndarray]] | None = None
    factorize_many: Callable[[ConvLayer | LinearLayer, list, int], list] | None = None

    def __post_init__(self):
        if self.factorize_many is None:
            object.__setattr__(self, "factorize_many", lambda layer, specs, round_to: each_spec(
                lambda spec: self.factorize(layer, spec, round_to), specs))


def each_spec(build: Callable, specs: list) -> list:
    """``build(spec)`` for every spec, an OnnxlrError in place of a spec that fails."""
    out = []
    for spec in specs:
        try:
            out.append(build(spec))
        except OnnxlrError as exc:
            out.append(exc)
    return out


def fixed_or_chosen(ranks: RankSpec | dict, key: str, choose: Callable[[], int]) -> int:
    """An exact rank from a dict (``ranks[key]``), else the one ``choose`` derives from a spec."""
    return int(ranks[key]) if isinstance(ranks, dict) else choose()


def layer_matrices(layer: ConvLayer | LinearLayer, keep_dtype: bool = False) -> list[np.ndarray]:
    """W_g [T_g, n] per group, float64: y = W_g x (+ b), x a channel vector or an im2col patch
    (input channels of the group first, then the kernel taps: the order of weight.reshape).
    ``keep_dtype``: a linear layer's float32 weight as a transposed view, no float64 copy (for
    wide layers, whose fits work on blocks of it)."""
    if isinstance(layer, LinearLayer):
        return [(np.asarray(layer.weight) if keep_dtype else np.asarray(layer.weight, dtype=np.float64)).T]
    return [np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1) for w in layer.group_weights()]


def group_blocks(layer: ConvLayer | LinearLayer, weight: np.ndarray) -> list[np.ndarray]:
    """A weight in the layer's own layout (e.g. a reconstruction) as per-group maps [T_g, n]."""
    if isinstance(layer, LinearLayer):
        return [np.asarray(weight, dtype=np.float64).T]
    per = layer.out_channels // layer.group
    return [np.asarray(weight[gi * per : (gi + 1) * per], dtype=np.float64).reshape(per, -1)
            for gi in range(layer.group)]


def is_kxk_conv(layer) -> bool:
    return isinstance(layer, ConvLayer) and not layer.is_pointwise


def needs_kxk_conv(name: str):
    def check(layer) -> str | None:
        return None if is_kxk_conv(layer) else f"{name} applies to KxK convs"
    return check
