"""Channel decomposition of a KxK conv (Zhang, Zou, He and Sun, "Accelerating very deep
convolutional networks for classification and detection", TPAMI 2016): the truncated SVD of each
group's [S_g * prod(kernel), T_g] matrix.

Math: y = W x with x the im2col patch; W_g ~= Q P with P [R, S_g k] (a KxK conv S->R with the
original kernel, strides, dilations and pads) and Q [T_g, R] (a 1x1 conv R->T with the bias).

Chain:
    x -Conv KxK (S->R, original attributes)-> -Conv 1x1 (R->T, bias)-> y

The factorization, refit and rebuild are those of :mod:`onnxlr.methods.svd` (the same matrix
math); only the layers it applies to differ.
"""

from __future__ import annotations

from onnxlr.layers import ConvLayer, Replacement
from onnxlr.methods import svd
from onnxlr.methods.base import Method, needs_kxk_conv
from onnxlr.ranks import RankLog, RankSpec


def factorize(layer: ConvLayer, ranks: RankSpec | dict, round_to: int) -> tuple[Replacement, RankLog]:
    replacement, log = svd.factorize(layer, ranks, round_to)
    replacement.method = "channel"
    return replacement, log


def factorize_many(layer: ConvLayer, specs: list, round_to: int) -> list:
    results = svd.factorize_many(layer, specs, round_to)
    for r in results:
        if isinstance(r, tuple):
            r[0].method = "channel"
    return results


METHOD = Method(
    name="channel",
    summary="KxK conv: KxK S->R (original attributes), 1x1 R->T (bias)",
    check=needs_kxk_conv("the channel decomposition"),
    factorize=factorize,
    refit=svd.refit,
    rebuild=svd.rebuild,
    whitened=True,
    factorize_many=factorize_many,
)
