"""Factor balancing: rescale the channels between the factors of a chain so that they quantize well.

A replacement chain has no nonlinearity between its steps, and every step is linear in its input,
so dividing intermediate channel r by s_r where one step writes it and multiplying by s_r where the
next step reads it leaves the chain's product unchanged (cross-layer equalization, Nagel et al.
2019, "Data-Free Quantization Through Weight Equalization and Bias Correction")::

    x -> [A: out channel r] -> t_r -> [B: in channel r] -> y
    x -> [A / s_r]          -> t_r / s_r -> [B * s_r]   -> y        (same y, exactly in reals)

Decompositions leave these scales unbalanced: an SVD or Tucker chain has orthonormal outer
factors (entries about 1/sqrt(n)) and puts every singular value in one factor, so the per-channel
ranges of one weight span the whole spectrum while the other's are flat. A per-tensor int8 grid is
then set by the largest channel and the small ones round to a few levels; per-channel weight grids
help the factor whose *output* channels differ, but not the one whose *input* columns differ, nor
the per-tensor activation grid of the intermediate tensor t.

**Ranges.** The range of channel r where A writes it is ``max |A[r, ...]|`` (its output row), where
B reads it ``max |B[:, r, ...]|`` over the rows of r's group and every kernel tap (its input
column). With ranges a_r and b_r, s_r = sqrt(a_r / b_r) makes both sqrt(a_r b_r).

**Depthwise steps pass a channel through.** A depthwise step D (one input and one output channel
per group: CP's per-axis taps) maps channel r to channel r, so a path
``A (out r) -> D_1 -> ... -> D_m -> B (in r)`` carries one channel through m + 2 weights. The
product of their ranges P_r = a_r d_1r ... d_mr b_r is invariant, and the balanced path gives every
weight the range P_r^(1/(m+2)); D_k is multiplied by s_(k-1),r / s_k,r, its bias divided by s_k,r.

**Chains with several junctions** (Tucker-2: 1x1 -> KxK core -> 1x1) are balanced one path at a
time and the passes repeated until the scales settle (each pass can only even out the ranges; the
core's input scaling changes its output rows, which the next path then sees). Biases of
intermediate steps are divided by the scale of the channel they add to; the last step's output
(and bias) is never rescaled, so the chain's output is that of the original.

Plain functions on ``onnxlr.layers.ConvStep`` / ``LinearStep`` lists (``LinearStep`` weights are
``[K, N]``: output channels are columns). Also here: per-channel weight ranges for reports, and a
symmetric int8 fake-quantizer of chain weights (per output channel or per tensor, as onnxruntime
quantizes weights) for measuring what balancing buys without running a quantizer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvStep, LinearStep, Replacement

Step = ConvStep | LinearStep

#: Passes over the junctions of a chain before giving up on convergence (Tucker-2 needs 2-5).
MAX_PASSES = 50
#: A pass that moves no scale by more than this factor ends the balancing.
SETTLED = 1e-4


@dataclass(frozen=True)
class StepRanges:
    """Per-channel weight ranges (max |w|) of one step of a chain."""

    out_ranges: np.ndarray  # per output channel
    in_ranges: np.ndarray  # per input channel (over the rows of that channel's group)

    @property
    def out_spread(self) -> float:
        """Largest over smallest non-zero output-channel range (1.0: all equal)."""
        return _spread(self.out_ranges)

    @property
    def in_spread(self) -> float:
        return _spread(self.in_ranges)

    def to_dict(self) -> dict:
        return {
            "out_spread": self.out_spread,
            "in_spread": self.in_spread,
            "out_range": [float(self.out_ranges.min()), float(self.out_ranges.max())],
            "in_range": [float(self.in_ranges.min()), float(self.in_ranges.max())],
        }


def _spread(ranges: np.ndarray) -> float:
    nonzero = ranges[ranges > 0]
    return float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0


# --- one step as a matrix of channels ----------------------------------------------------------


def _check_step(step: Step) -> None:
    if not isinstance(step, (ConvStep, LinearStep)):
        raise OnnxlrError(
            f"cannot balance a {type(step).__name__}; pass a list of onnxlr.layers.ConvStep or "
            f"LinearStep (a Replacement's steps)"
        )


def _blocks(step: Step) -> np.ndarray:
    """The weight as [group, out/group, in/group, taps] (LinearStep: one group, no taps)."""
    w = np.asarray(step.weight, dtype=np.float64)
    if isinstance(step, LinearStep):
        return w.T[None, :, :, None]
    g = step.group
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def _from_blocks(step: Step, blocks: np.ndarray) -> np.ndarray:
    dtype = np.asarray(step.weight).dtype
    if isinstance(step, LinearStep):
        return blocks[0, :, :, 0].T.astype(dtype)
    return blocks.reshape(step.weight.shape).astype(dtype)


def out_channels(step: Step) -> int:
    return step.weight.shape[1] if isinstance(step, LinearStep) else step.weight.shape[0]


def in_channels(step: Step) -> int:
    if isinstance(step, LinearStep):
        return step.weight.shape[0]
    return step.weight.shape[1] * step.group


def is_passthrough(step: Step) -> bool:
    """A depthwise conv with one output per group: channel r in, channel r out."""
    return (
        isinstance(step, ConvStep)
        and step.weight.shape[1] == 1
        and step.weight.shape[0] == step.group
    )


def step_ranges(step: Step) -> StepRanges:
    """Per-output-channel and per-input-channel max |w| of one step."""
    _check_step(step)
    a = np.abs(_blocks(step))
    out = a.max(axis=(2, 3)).reshape(-1)
    inp = a.max(axis=(1, 3)).reshape(-1)
    return StepRanges(out_ranges=out, in_ranges=inp)


def chain_ranges(steps: list[Step]) -> list[StepRanges]:
    """Per-channel weight ranges of every step, e.g. to report them before and after balancing."""
    return [step_ranges(step) for step in steps]


def scale_out(step: Step, factor: np.ndarray) -> Step:
    """Multiply output channel r (weight row, bias entry) by factor[r]."""
    b = _blocks(step)
    g, per = b.shape[:2]
    b = b * factor.reshape(g, per, 1, 1)
    weight = _from_blocks(step, b)
    if isinstance(step, LinearStep):
        return LinearStep(weight)
    bias = step.bias
    if bias is not None:
        bias = (np.asarray(bias, dtype=np.float64) * factor).astype(np.asarray(bias).dtype)
    return replace(step, weight=weight, bias=bias)


def scale_in(step: Step, factor: np.ndarray) -> Step:
    """Multiply input channel r (every weight entry that reads it) by factor[r]."""
    b = _blocks(step)
    g, _, per = b.shape[:3]
    b = b * factor.reshape(g, 1, per, 1)
    weight = _from_blocks(step, b)
    return LinearStep(weight) if isinstance(step, LinearStep) else replace(step, weight=weight)


# --- balancing ----------------------------------------------------------------------------------


def _paths(steps: list[Step]) -> list[tuple[int, int]]:
    """(i, j) for each mixing step i followed, through pass-through steps only, by mixing step j."""
    mixing = [i for i, s in enumerate(steps) if not is_passthrough(s)]
    return [(i, j) for i, j in itertools.pairwise(mixing)]


def _check_chain(steps: list[Step]) -> None:
    for step in steps:
        _check_step(step)
    for k, (a, b) in enumerate(itertools.pairwise(steps)):
        if out_channels(a) != in_channels(b):
            raise OnnxlrError(
                f"steps {k} and {k + 1} do not chain: step {k} writes {out_channels(a)} channels, "
                f"step {k + 1} reads {in_channels(b)}; pass the steps of one replacement in order"
            )


def _path_scales(steps: list[Step], i: int, j: int) -> list[np.ndarray]:
    """The scales that equalize the ranges along the channels from steps[i] through steps[j]:
    one per junction i..j-1, the tensor after step k is divided by the k-th."""
    ranges = [step_ranges(steps[i]).out_ranges]
    ranges += [step_ranges(steps[k]).out_ranges for k in range(i + 1, j)]  # depthwise: in == out
    ranges.append(step_ranges(steps[j]).in_ranges)
    stacked = np.stack(ranges)  # [m + 2, R]
    alive = np.all(stacked > 0, axis=0)  # a dead channel (all zero somewhere) is left alone
    safe = np.where(stacked > 0, stacked, 1.0)
    target = np.exp(np.log(safe).mean(axis=0))  # geometric mean = P_r^(1/(m+2))
    scales, s = [], np.ones_like(target)
    for k in range(len(ranges) - 1):
        s = s * safe[k] / target  # weight k + 1 times s_(k-1) / s_k has range target
        scales.append(np.where(alive, s, 1.0))
    return scales


def apply_scales(steps: list[Step], scales: list[np.ndarray]) -> list[Step]:
    """Divide the tensor after step k by scales[k] (one array per junction): step k's output
    channels are divided, step k + 1's input channels multiplied. The product is unchanged."""
    out = list(steps)
    for k, s in enumerate(scales):
        out[k] = scale_out(out[k], 1.0 / s)
        out[k + 1] = scale_in(out[k + 1], s)
    return out


def _float64(step: Step) -> Step:
    weight = np.asarray(step.weight, dtype=np.float64)
    if isinstance(step, LinearStep):
        return LinearStep(weight)
    bias = None if step.bias is None else np.asarray(step.bias, dtype=np.float64)
    return replace(step, weight=weight, bias=bias)


def balance_scales(steps: list[Step]) -> list[np.ndarray]:
    """Cross-layer equalization scales, one array per junction (see :func:`apply_scales`),
    iterated in float64 until no scale moves by more than ``SETTLED``."""
    _check_chain(steps)
    work = [_float64(s) for s in steps]
    total = [np.ones(out_channels(s)) for s in steps[:-1]]
    for _ in range(MAX_PASSES):
        moved = 0.0
        for i, j in _paths(work):
            path = _path_scales(work, i, j)
            junctions = [np.ones(out_channels(s)) for s in work[:-1]]
            for k, s in enumerate(path, start=i):
                junctions[k] = s
                total[k] = total[k] * s
                moved = max(moved, float(np.abs(np.log(s)).max(initial=0.0)))
            work = apply_scales(work, junctions)
        if moved < SETTLED:
            break
    return total


def balance_chain(steps: list[Step], *, power_of_two: bool = False) -> list[Step]:
    """The chain with its intermediate channels rescaled so that adjacent factors have equal
    per-channel weight ranges; the chain computes the same function (see the module docstring).

    ``power_of_two`` rounds every scale to a power of two, so that the rescaling is exact in
    floating point too (the balanced chain computes what the original computes up to the order
    of rounding), at a balance within a factor sqrt(2) of the optimum.
    """
    scales = balance_scales(steps)
    if power_of_two:
        scales = [np.exp2(np.round(np.log2(s))) for s in scales]
    return apply_scales(list(steps), scales)


# --- fake quantization of weights ---------------------------------------------------------------


def fake_quantize(
    weight: np.ndarray, *, per_channel: bool, axis: int = 0, bits: int = 8
) -> np.ndarray:
    """Symmetric signed round-to-nearest quantize-dequantize of a weight, as onnxruntime quantizes
    weights (``WeightSymmetric``): scale = max|w| / (2^(bits-1) - 1), per slice along ``axis`` when
    ``per_channel``, else one scale for the tensor."""
    w = np.asarray(weight, dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        moved = np.moveaxis(w, axis, 0)
        amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
        amax = np.moveaxis(amax.reshape((-1,) + (1,) * (w.ndim - 1)), 0, axis)
    else:
        amax = np.abs(w).max()
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(np.asarray(weight).dtype)


def fake_quantize_chain(steps: list[Step], *, per_channel: bool, bits: int = 8) -> list[Step]:
    """Every step's weight fake-quantized (per output channel: axis 0 of a Conv weight, axis 1 of a
    ``[K, N]`` MatMul weight, as onnxruntime's per-channel QDQ does); biases stay in float."""
    out = []
    for step in steps:
        _check_step(step)
        axis = 1 if isinstance(step, LinearStep) else 0
        w = fake_quantize(step.weight, per_channel=per_channel, axis=axis, bits=bits)
        out.append(LinearStep(w) if isinstance(step, LinearStep) else replace(step, weight=w))
    return out


def balance_replacement(replacement: Replacement) -> Replacement:
    """The replacement with its factors balanced (same product; :func:`balance_chain`) and a note
    of the worst per-channel range spread before and after; a one-step replacement as it is."""
    if len(replacement.steps) < 2:
        return replacement

    def spread(steps) -> float:
        return max(max(r.out_spread, r.in_spread) for r in chain_ranges(steps))

    before = spread(replacement.steps)
    steps = balance_chain(replacement.steps)
    balanced = replace(replacement, steps=steps, notes=list(replacement.notes))
    balanced.notes.append(f"factors balanced for int8: channel range spread {before:.3g} -> {spread(steps):.3g}")
    return balanced
