"""Rank specs: parse and validate them up front, then turn them into ranks per layer.

Forms of ``--rank``:
    N            an absolute rank (an integer >= 1), capped at the layer's dimension
    F            a fraction 0 < F <= 1 of the channels (written with a decimal point: 0.33, 1.0)
    energy:E     the smallest rank keeping fraction E of the squared singular values
    evbmf        Empirical Variational Bayes Matrix Factorization (Nakajima et al. 2013)
    evbmf:W      weakened EVBMF, W in (0, 1]: W = 1 is plain EVBMF, smaller W keeps more rank

What "the layer's dimension" means per method:
    svd     min(K, N) of the weight matrix (per group for convs: min(S_g * prod(k), T_g))
    tucker  S_g for the input rank R3 and T_g for the output rank R4
    cp      max(S_g, T_g) for fractions (the post's heuristic is 1/3 of it); an integer is capped
            at the largest rank a CP of that shape can need: min over modes of the product of the
            other modes' sizes. For energy and EVBMF, CP takes max(R3, R4) of the Tucker-2
            estimates on the two channel unfoldings.

EVBMF uses the rank it finds, however small. Only where it finds no signal above its noise model
(rank 0: untrained, tiny or noise-like layers) does it use a floor, EVBMF_MIN_FRACTION of the full
rank (at least 1). Each EVBMF estimate leaves one note per matrix (per channel mode for Tucker-2)
saying which happened.

Derived ranks (fractions, energy, EVBMF) are rounded up to a multiple of ``round_to`` (never past
the full dimension); an explicit integer rank is used as given. Both raw and rounded ranks are
reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from onnxlr.errors import OnnxlrError

if TYPE_CHECKING:
    from onnxlr.evbmf import EvbmfEstimate

VALID_FORMS = "an integer N >= 1, a fraction 0 < F <= 1 (e.g. 0.33), energy:E (0 < E <= 1), evbmf, or evbmf:W (0 < W <= 1)"

# When EVBMF finds no signal above the noise it would return rank 0; we use this fraction of the
# full rank instead (at least 1), and say so in the report. Where it finds signal it is not used.
EVBMF_MIN_FRACTION = 1 / 8


@dataclass(frozen=True)
class RankSpec:
    kind: str  # "absolute", "fraction", "energy", "evbmf"
    value: float

    def __str__(self) -> str:
        if self.kind == "absolute":
            return str(int(self.value))
        if self.kind == "fraction":
            return repr(self.value)
        if self.kind == "evbmf" and self.value == 1.0:
            return "evbmf"
        return f"{self.kind}:{self.value:g}"


def parse_rank(text: str | float | RankSpec) -> RankSpec:
    """Parse a rank spec; an invalid one raises OnnxlrError listing the valid forms."""
    if isinstance(text, RankSpec):
        return text
    if isinstance(text, bool):
        raise OnnxlrError(f"invalid rank {text!r}: use {VALID_FORMS}")
    if isinstance(text, (int, np.integer)):
        text = str(int(text))
    elif isinstance(text, (float, np.floating)):
        value = float(text)
        if not 0 < value <= 1:
            raise OnnxlrError(f"invalid rank {value!r}: a fraction must be in (0, 1]; use {VALID_FORMS}")
        return RankSpec("fraction", value)
    raw = str(text).strip().lower()
    if re.fullmatch(r"[+-]?\d+", raw):
        value = int(raw)
        if value < 1:
            raise OnnxlrError(f"invalid rank {text!r}: a rank must be at least 1; use {VALID_FORMS}")
        return RankSpec("absolute", value)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+)(e[+-]?\d+)?", raw):
        value = float(raw)
        if not 0 < value <= 1:
            raise OnnxlrError(f"invalid rank {text!r}: a fraction must be in (0, 1]; use {VALID_FORMS}")
        return RankSpec("fraction", value)
    match = re.fullmatch(r"(energy|evbmf)(?::(.+))?", raw)
    if match:
        kind, arg = match.groups()
        if arg is None:
            if kind == "energy":
                raise OnnxlrError(f"invalid rank {text!r}: energy needs a fraction, e.g. energy:0.9; use {VALID_FORMS}")
            return RankSpec("evbmf", 1.0)
        try:
            value = float(arg)
        except ValueError:
            raise OnnxlrError(f"invalid rank {text!r}: {arg!r} is not a number; use {VALID_FORMS}") from None
        if not 0 < value <= 1:
            raise OnnxlrError(f"invalid rank {text!r}: {kind}:X needs 0 < X <= 1; use {VALID_FORMS}")
        return RankSpec(kind, value)
    raise OnnxlrError(f"invalid rank {text!r}: use {VALID_FORMS}")


@dataclass
class RankLog:
    """What a rank choice decided, for the report."""

    raw: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def round_up(rank: int, multiple: int, full: int) -> int:
    if multiple <= 1:
        return min(rank, full)
    return min(full, math.ceil(rank / multiple) * multiple)


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2) (at least 1)."""
    power = np.asarray(singular_values, dtype=np.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(power) / total
    # A tiny tolerance so that energy=1.0 does not demand the last float rounding error.
    return int(min(len(power), np.searchsorted(kept, energy - 1e-12) + 1))


def _evbmf_note(estimates: list[EvbmfEstimate], label: str) -> str:
    """One note for a matrix role: what EVBMF found and which rank it used (the max over groups)."""
    chosen = max(estimates, key=lambda e: e.rank)
    if len(estimates) == 1:
        return f"{label}: {chosen.note}"
    empty = sum(e.signal_rank == 0 for e in estimates)
    return (
        f"{label}: largest of {len(estimates)} groups ({empty} with no signal): {chosen.note}"
    )


def _spectral_rank(spec: RankSpec, spectra: list[np.ndarray], shape: tuple[int, int], log: RankLog, label: str) -> int:
    """energy / evbmf rank of one matrix shape: the max over the groups' spectra."""
    if spec.kind == "energy":
        return max(energy_rank(s, spec.value) for s in spectra)
    from onnxlr.evbmf import evbmf_rank

    full = min(shape)
    floor = max(1, math.ceil(full * EVBMF_MIN_FRACTION))
    # A Gram matrix of the long side has more eigenvalues than the matrix has singular values:
    # the extra ones are zeros.
    estimates = [
        evbmf_rank(np.asarray(s)[:full], shape, weaken=spec.value, no_signal_rank=floor)
        for s in spectra
    ]
    log.notes.append(_evbmf_note(estimates, label))
    return max(e.rank for e in estimates)


def svd_rank(spec: RankSpec, spectra: list[np.ndarray], shape: tuple[int, int], round_to: int, log: RankLog) -> int:
    """Rank of a truncated SVD of a (K x N) matrix (per group)."""
    full = min(shape)
    if spec.kind == "absolute":
        rank = min(int(spec.value), full)
        log.raw["rank"] = rank
        return rank
    if spec.kind == "fraction":
        raw = max(1, math.ceil(spec.value * full))
    else:
        raw = _spectral_rank(spec, spectra, shape, log, "matrix")
    log.raw["rank"] = raw
    return round_up(raw, round_to, full)


def tucker_ranks(
    spec: RankSpec,
    spectra_out: list[np.ndarray],
    spectra_in: list[np.ndarray],
    group_shape: tuple[int, ...],
    round_to: int,
    log: RankLog,
) -> tuple[int, int]:
    """(R4, R3): output- and input-channel ranks of a Tucker-2 of a [T_g, S_g, *k] kernel."""
    t_g, s_g = group_shape[:2]
    k = int(np.prod(group_shape[2:]))
    if spec.kind == "absolute":
        r4, r3 = min(int(spec.value), t_g), min(int(spec.value), s_g)
        log.raw.update(rank_out=r4, rank_in=r3)
        return r4, r3
    if spec.kind == "fraction":
        raw4 = max(1, math.ceil(spec.value * t_g))
        raw3 = max(1, math.ceil(spec.value * s_g))
    else:
        raw4 = _spectral_rank(spec, spectra_out, (t_g, s_g * k), log, "output channels")
        raw3 = _spectral_rank(spec, spectra_in, (s_g, t_g * k), log, "input channels")
    log.raw.update(rank_out=raw4, rank_in=raw3)
    return round_up(raw4, round_to, t_g), round_up(raw3, round_to, s_g)


def cp_rank(
    spec: RankSpec,
    spectra_out: list[np.ndarray],
    spectra_in: list[np.ndarray],
    group_shape: tuple[int, ...],
    round_to: int,
    log: RankLog,
) -> int:
    dims = list(group_shape)
    cap = min(int(np.prod(dims)) // d for d in dims)
    if spec.kind == "absolute":
        rank = min(int(spec.value), cap)
        log.raw["rank"] = rank
        return rank
    if spec.kind == "fraction":
        raw = max(1, math.ceil(spec.value * max(dims[0], dims[1])))
    else:
        inner = RankLog()
        r4, r3 = tucker_ranks(spec, spectra_out, spectra_in, group_shape, 1, inner)
        log.notes.extend(inner.notes)
        raw = max(r4, r3)
    log.raw["rank"] = raw
    return round_up(raw, round_to, cap)
