"""Plain-data views of the layers onnxlr factorizes, and of the chains that replace them.

A target layer is read out of the graph into a ``ConvLayer`` or ``LinearLayer`` (numpy arrays and
tuples, no protobuf); a decomposition turns it into a list of ``ConvStep`` or ``LinearStep``; the
splicer turns those into nodes. MAC counts live here because they only need these plain shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ConvLayer:
    """An N-d Conv: weight [T, S/group, *kernel], every attribute explicit."""

    weight: np.ndarray
    bias: np.ndarray | None
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin of every axis, then end of every axis (ONNX order)
    auto_pad: str = "NOTSET"

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def spatial_rank(self) -> int:
        return self.weight.ndim - 2

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)

    @property
    def is_depthwise(self) -> bool:
        return self.group > 1 and self.group == self.in_channels

    def group_weights(self) -> list[np.ndarray]:
        per_group = self.out_channels // self.group
        return [self.weight[g * per_group : (g + 1) * per_group] for g in range(self.group)]


@dataclass(frozen=True)
class LinearLayer:
    """y = x @ weight (+ bias), weight [K, N]; Gemm's alpha and transB are already folded in."""

    weight: np.ndarray


@dataclass(frozen=True)
class ConvStep:
    """One Conv of a replacement chain."""

    weight: np.ndarray  # [out, in/group, *kernel]
    bias: np.ndarray | None = None
    group: int = 1
    strides: tuple[int, ...] | None = None  # None: all ones
    dilations: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None  # None: no padding
    auto_pad: str = "NOTSET"


@dataclass(frozen=True)
class LinearStep:
    """One matrix product x @ weight of a replacement chain."""

    weight: np.ndarray  # [K, N]


@dataclass
class Replacement:
    """What a decomposition produced for one layer."""

    method: str
    steps: list
    ranks: dict[str, int]
    # The low-rank weight in the original layout; None for matrices too big to materialize twice
    # (then weight_rel_error comes from the discarded singular values).
    reconstruction: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    weight_rel_error: float | None = None
    # A refitted bias [T] that the splice writes in place of the layer's own (the effective bias:
    # beta * C for a Gemm, the constant of a following Add for a MatMul); None keeps the layer's.
    bias: np.ndarray | None = None

    def low_rank_weight(self) -> np.ndarray:
        """The reconstruction, computed from the factors when it was not kept."""
        if self.reconstruction is not None:
            return self.reconstruction
        first, second = (np.asarray(step.weight, dtype=np.float64) for step in self.steps)
        return first @ second


# --- MAC counting ---------------------------------------------------------------------------


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad_total: int) -> int:
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv_macs(weight_shape: tuple[int, ...], group: int, out_spatial: tuple[int | None, ...] | None) -> int | None:
    """MACs of one conv for one sample; None when an output size is unknown."""
    if out_spatial is None or any(s is None for s in out_spatial):
        return None
    per_position = int(np.prod(weight_shape))  # out * in/group * prod(kernel)
    return per_position * math.prod(out_spatial)


def chain_conv_macs(
    steps: list[ConvStep], in_spatial: tuple[int | None, ...] | None, out_spatial: tuple[int | None, ...] | None
) -> int | None:
    """MACs of a conv chain, following each step's effect on the spatial sizes.

    Each step's output size is computed from its own kernel, stride, dilation and pads; with
    ``auto_pad`` SAME the size is ceil(in/stride). Unknown sizes give None.
    """
    if in_spatial is None or any(s is None for s in in_spatial):
        return None
    sizes = list(in_spatial)
    total = 0
    for step in steps:
        kernel = step.weight.shape[2:]
        ndim = len(kernel)
        strides = step.strides or (1,) * ndim
        dilations = step.dilations or (1,) * ndim
        pads = step.pads or (0,) * (2 * ndim)
        for a in range(ndim):
            if step.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                sizes[a] = -(-sizes[a] // strides[a])
            elif step.auto_pad == "VALID":
                sizes[a] = conv_output_size(sizes[a], kernel[a], strides[a], dilations[a], 0)
            else:
                sizes[a] = conv_output_size(sizes[a], kernel[a], strides[a], dilations[a], pads[a] + pads[a + ndim])
        total += int(np.prod(step.weight.shape)) * math.prod(sizes)
    if out_spatial is not None and all(s is not None for s in out_spatial) and tuple(sizes) != tuple(out_spatial):
        raise AssertionError(f"chain output size {sizes} differs from the layer's {out_spatial}")
    return total


def linear_macs(steps_or_weights: list[np.ndarray], rows: int | None) -> int | None:
    """MACs of x @ W1 @ W2 ... for ``rows`` rows of x (per sample); None if unknown."""
    if rows is None:
        return None
    return rows * sum(int(w.shape[0] * w.shape[1]) for w in steps_or_weights)
