"""Decomposition methods behind one protocol (:mod:`onnxlr.methods.base`), and their registry.

One module per method; adding one is a file plus a line in :data:`REGISTRY`. The pipeline, the
budget, calibration and the CLI's choices all read the registry.

    svd          Gemm, MatMul, 1x1 Conv    x @ P @ Q; 1x1 S->R, 1x1 R->T
    channel      KxK Conv                  KxK S->R, 1x1 R->T            (Zhang et al. 2016)
    tucker       KxK Conv                  1x1 S->R3, KxK R3->R4, 1x1 R4->T
    cp           KxK Conv                  1x1 S->R, depthwise per axis, 1x1 R->T
    spatial-svd  KxK Conv (2-D, 3-D)       Kx1 S->R, 1xK R->T            (Jaderberg et al. 2014)

``auto`` is a policy over them, not a method: SVD for Gemm, MatMul and 1x1 convs, Tucker-2 for
KxK convs. Asking for ``svd`` on a KxK conv means the channel decomposition (the SVD of its
matrix). A method that does not apply to a layer hands it to the auto policy, with a note saying
why.
"""

from __future__ import annotations

from onnxlr.methods import channel, cp, spatial_svd, svd, tucker
from onnxlr.methods.base import Method, is_kxk_conv

REGISTRY: dict[str, Method] = {m.name: m for m in (
    svd.METHOD, channel.METHOD, tucker.METHOD, cp.METHOD, spatial_svd.METHOD,
)}
CHOICES = ("auto", *REGISTRY)
#: Methods a budget tries on a KxK conv under ``auto`` (CP only when asked for: its chains are
#: rarely faster on onnxruntime at the ranks that keep accuracy, and its fit is slow).
BUDGET_KXK = ("tucker", "channel", "spatial-svd")


def get(name: str) -> Method:
    return REGISTRY[name]


def auto(layer) -> Method:
    return REGISTRY["tucker"] if is_kxk_conv(layer) else REGISTRY["svd"]


def resolve(layer, requested: str) -> tuple[Method, str | None]:
    """The method a layer gets for ``requested`` (a registry name or ``auto``), and a note when
    the requested one does not apply to it."""
    if requested == "auto":
        return auto(layer), None
    if requested == "svd" and is_kxk_conv(layer):
        return REGISTRY["channel"], None
    method = REGISTRY[requested]
    reason = method.check(layer)
    if reason is None:
        return method, None
    fallback = auto(layer)
    return fallback, f"{reason}; this layer uses {fallback.name}"


def budget_methods(layer, requested: str) -> list[Method]:
    """The methods whose candidates a budget compares on this layer."""
    if requested == "auto" and is_kxk_conv(layer):
        return [REGISTRY[n] for n in BUDGET_KXK if REGISTRY[n].check(layer) is None]
    return [resolve(layer, requested)[0]]
