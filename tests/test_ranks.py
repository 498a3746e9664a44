"""onnxlr.ranks: rank specs, energy and EVBMF ranks, rounding up, and raw vs rounded in reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builders import conv_model, exact_rank_matrix, exact_tucker_kernel, gemm_model
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.methods.linalg import left_singular
from onnxlr.methods.tucker import channel_spectra
from onnxlr.pipeline import CompressConfig
from onnxlr.ranks import (
    EVBMF_MIN_FRACTION,
    VALID_FORMS,
    RankLog,
    RankSpec,
    cp_rank,
    energy_rank,
    parse_rank,
    round_up,
    svd_rank,
    tucker_ranks,
)

FAST = settings(max_examples=60, deadline=None)


# --- parse_rank ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("8", "absolute", 8),
        (8, "absolute", 8),
        ("+3", "absolute", 3),
        (" 12 ", "absolute", 12),
        (np.int64(5), "absolute", 5),
        ("0.5", "fraction", 0.5),
        (0.33, "fraction", 0.33),
        ("1.0", "fraction", 1.0),
        (1.0, "fraction", 1.0),
        ("1.", "fraction", 1.0),
        (".25", "fraction", 0.25),
        ("2.5e-1", "fraction", 0.25),
        (np.float32(0.5), "fraction", 0.5),
        ("energy:0.9", "energy", 0.9),
        ("ENERGY:0.9", "energy", 0.9),
        ("  energy:1 ", "energy", 1.0),
        ("energy:.95", "energy", 0.95),
        ("evbmf", "evbmf", 1.0),
        ("EVBMF", "evbmf", 1.0),
        ("evbmf:0.5", "evbmf", 0.5),
        ("evbmf:1", "evbmf", 1.0),
    ],
)
def test_parse_rank_valid_forms(text, kind, value):
    spec = parse_rank(text)
    assert spec == RankSpec(kind, value)
    assert parse_rank(spec) is spec  # a RankSpec passes through
    assert parse_rank(str(spec)) == spec  # str() writes a form parse_rank reads back


@pytest.mark.parametrize(
    "text, detail",
    [
        ("0", "at least 1"),
        ("-4", "at least 1"),
        (0, "at least 1"),
        ("0.0", "fraction must be in (0, 1]"),
        ("1.5", "fraction must be in (0, 1]"),
        (2.0, "fraction must be in (0, 1]"),
        ("-0.5", "fraction must be in (0, 1]"),
        ("energy:0", "needs 0 < X <= 1"),
        ("energy:1.5", "needs 0 < X <= 1"),
        ("energy:-0.1", "needs 0 < X <= 1"),
        ("evbmf:0", "needs 0 < X <= 1"),
        ("evbmf:2", "needs 0 < X <= 1"),
        ("energy:abc", "is not a number"),
        ("evbmf:", ""),
        ("abc", ""),
        ("", ""),
        ("1/3", ""),
        ("50%", ""),
        ("1e-5", ""),  # a fraction is written with a decimal point
        ("energy=0.9", ""),
        ("evbmf:0.5:1", "is not a number"),
        (True, ""),
        (False, ""),
        (None, ""),
        ([8], ""),
    ],
)
def test_parse_rank_invalid_forms_list_the_valid_ones(text, detail):
    with pytest.raises(OnnxlrError) as info:
        parse_rank(text)
    message = str(info.value)
    assert message.startswith("invalid rank")
    assert detail in message
    assert VALID_FORMS in message


def test_parse_rank_energy_without_a_value_shows_an_example():
    with pytest.raises(OnnxlrError, match=r"energy needs a fraction, e.g. energy:0.9"):
        parse_rank("energy")


def test_parse_rank_numpy_float64():
    assert parse_rank(np.float64(0.5)) == RankSpec("fraction", 0.5)


def test_parse_rank_tiny_python_float():
    assert parse_rank(1e-5) == RankSpec("fraction", 1e-5)


@FAST
@given(st.integers(min_value=1, max_value=10**12))
def test_parse_rank_any_positive_integer(n):
    assert parse_rank(n) == RankSpec("absolute", n)
    assert parse_rank(str(n)) == RankSpec("absolute", n)


@FAST
@given(st.floats(min_value=1e-4, max_value=1.0, exclude_min=False))
def test_parse_rank_any_fraction_round_trips(f):
    spec = parse_rank(f)
    assert spec == RankSpec("fraction", f)
    assert parse_rank(str(spec)) == spec


@FAST
@given(st.sampled_from(["energy", "evbmf"]), st.floats(min_value=1e-6, max_value=1.0))
def test_parse_rank_spectral_forms_round_trip(kind, value):
    spec = parse_rank(f"{kind}:{value!r}")
    assert spec == RankSpec(kind, value)
    assert parse_rank(str(spec)).kind == kind
    assert parse_rank(str(spec)).value == pytest.approx(value, rel=1e-5)  # str() uses :g


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not 0 < f <= 1))
def test_parse_rank_rejects_floats_outside_the_unit_interval(f):
    with pytest.raises(OnnxlrError, match="invalid rank"):
        parse_rank(f)


# --- energy_rank --------------------------------------------------------------------------------


def matrix_with_spectrum(values, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """U diag(values) V^T with orthonormal U (rows x n) and V (cols x n)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    u, _ = np.linalg.qr(rng.standard_normal((rows, n)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, n)))
    return (u * np.asarray(values, dtype=np.float64)) @ v.T


def brute_energy_rank(values, energy: float) -> int:
    power = [float(v) ** 2 for v in values]
    total = sum(power)
    kept = 0.0
    for r, p in enumerate(power, start=1):
        kept += p
        if kept >= energy * total:
            return r
    return len(power)


# squared singular values 0.4, 0.3, 0.2, 0.1: cumulative energy 0.4, 0.7, 0.9, 1.0
STEPS = np.sqrt([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    "energy, rank",
    [(0.01, 1), (0.4, 1), (0.41, 2), (0.7, 2), (0.7001, 3), (0.9, 3), (0.95, 4), (1.0, 4)],
)
def test_energy_rank_exact_on_a_known_spectrum(energy, rank):
    assert energy_rank(STEPS, energy) == rank
    # The same through a matrix built with that spectrum, measured as onnxlr measures it.
    values, _ = left_singular(matrix_with_spectrum(STEPS, 6, 9))
    np.testing.assert_allclose(values[:4], STEPS, rtol=1e-10)
    assert energy_rank(values, energy) == rank


def test_energy_rank_full_energy_ignores_exact_zeros():
    # Energy 1.0 is the numerical rank: trailing zero (or rounding-level) values are not kept.
    assert energy_rank(np.array([3.0, 2.0, 0.0, 0.0]), 1.0) == 2
    values, _ = left_singular(matrix_with_spectrum([3.0, 2.0, 1.0], 8, 12))  # 8 values, 5 ~ 0
    assert len(values) == 8
    assert energy_rank(values, 1.0) == 3


@pytest.mark.parametrize("energy, rank", [(0.25, 1), (0.5, 2), (0.51, 3), (0.75, 3), (0.76, 4), (1.0, 4)])
def test_energy_rank_ties(energy, rank):
    assert energy_rank(np.ones(4), energy) == rank
    values, _ = left_singular(matrix_with_spectrum(np.ones(4), 4, 7))
    assert energy_rank(values, energy) == rank


@pytest.mark.parametrize("energy", [1e-6, 0.5, 1.0])
def test_energy_rank_single_value_and_degenerate(energy):
    assert energy_rank(np.array([5.0]), energy) == 1
    assert energy_rank(np.array([0.0, 0.0]), energy) == 1  # a zero matrix: at least 1
    assert energy_rank(np.array([]), energy) == 1


@FAST
@given(
    st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=40),
    st.floats(min_value=1e-3, max_value=1.0),
)
def test_energy_rank_is_the_smallest_rank_reaching_the_energy(values, energy):
    values = sorted(values, reverse=True)
    power = np.asarray(values) ** 2
    fractions = np.cumsum(power) / power.sum()
    assume(np.all(np.abs(fractions[:-1] - energy) > 1e-9))  # not on a float boundary
    rank = energy_rank(np.asarray(values), energy)
    assert rank == brute_energy_rank(values, energy)
    assert fractions[rank - 1] >= energy - 1e-9
    assert rank == 1 or fractions[rank - 2] < energy


# --- round_up -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, multiple, full, expected",
    [
        (21, 8, 64, 24),
        (24, 8, 64, 24),
        (16, 8, 64, 16),
        (1, 8, 64, 8),
        (61, 8, 64, 64),
        (57, 16, 60, 60),  # capped at a full dimension that is not a multiple
        (3, 8, 5, 5),
        (21, 1, 64, 21),
        (100, 1, 64, 64),
        (21, 0, 64, 21),  # <= 1 means no rounding
        (85, 32, 256, 96),
    ],
)
def test_round_up(rank, multiple, full, expected):
    assert round_up(rank, multiple, full) == expected


@FAST
@given(st.integers(1, 5000), st.integers(1, 64), st.integers(1, 5000))
def test_round_up_properties(rank, multiple, full):
    assume(rank <= full)
    out = round_up(rank, multiple, full)
    assert rank <= out <= full
    assert out == full or out % multiple == 0
    assert out - rank < multiple or out == rank  # the nearest multiple, no further
    assert round_up(out, multiple, full) == out  # idempotent


# --- svd_rank -----------------------------------------------------------------------------------


def test_svd_rank_absolute_is_capped_and_never_rounded():
    log = RankLog()
    assert svd_rank(parse_rank("21"), [], (64, 128), 8, log) == 21
    assert log.raw == {"rank": 21}
    log = RankLog()
    assert svd_rank(parse_rank("500"), [], (64, 128), 8, log) == 64
    assert log.raw == {"rank": 64}


@pytest.mark.parametrize(
    "fraction, round_to, raw, rounded",
    [(0.33, 8, 22, 24), (0.33, 1, 22, 22), (0.25, 8, 16, 16), (0.01, 8, 1, 8), (0.99, 8, 64, 64),
     (0.9, 16, 58, 64), (0.33, 32, 22, 32)],
)
def test_svd_rank_fraction_raw_and_rounded(fraction, round_to, raw, rounded):
    log = RankLog()
    assert svd_rank(parse_rank(fraction), [], (128, 64), round_to, log) == rounded
    assert log.raw == {"rank": raw}
    assert log.notes == []


def test_svd_rank_energy_takes_the_max_over_groups_then_rounds():
    spectra = [STEPS, np.sqrt([0.9, 0.05, 0.03, 0.02])]  # energy 0.9: ranks 3 and 1
    log = RankLog()
    assert svd_rank(parse_rank("energy:0.9"), spectra, (4, 40), 1, log) == 3
    assert log.raw == {"rank": 3}
    log = RankLog()
    assert svd_rank(parse_rank("energy:0.9"), spectra, (20, 40), 8, log) == 8
    assert log.raw == {"rank": 3}


def test_svd_rank_evbmf_finds_the_signal_and_rounds():
    rng = np.random.default_rng(1)
    # true rank 9
    matrix = exact_rank_matrix(48, 96, 9, rng) + 1e-3 * rng.standard_normal((48, 96))
    values, _ = left_singular(matrix)
    log = RankLog()
    assert svd_rank(parse_rank("evbmf"), [values], matrix.shape, 8, log) == 16
    assert log.raw == {"rank": 9}
    assert len(log.notes) == 1 and log.notes[0].startswith("matrix: ")
    assert "found rank 9 of 48" in log.notes[0] and "using rank 9." in log.notes[0]
    log = RankLog()
    assert svd_rank(parse_rank("evbmf"), [values], matrix.shape, 1, log) == 9


def test_svd_rank_evbmf_below_an_eighth_is_kept():
    # the 1/8 floor is for "no signal" only: a found rank 5 < ceil(48 / 8) = 6 is used (issue 12)
    rng = np.random.default_rng(1)
    matrix = exact_rank_matrix(48, 96, 5, rng) + 1e-3 * rng.standard_normal((48, 96))
    values, _ = left_singular(matrix)
    log = RankLog()
    assert svd_rank(parse_rank("evbmf"), [values], matrix.shape, 1, log) == 5
    assert log.raw == {"rank": 5}
    assert len(log.notes) == 1 and "found rank 5" in log.notes[0]
    assert "floor" not in log.notes[0]


def test_svd_rank_evbmf_fallback_on_pure_noise_is_noted():
    rng = np.random.default_rng(2)
    values, _ = left_singular(rng.standard_normal((64, 256)))
    log = RankLog()
    rank = svd_rank(parse_rank("evbmf"), [values], (64, 256), 1, log)
    minimum = math.ceil(64 * EVBMF_MIN_FRACTION)
    assert rank == minimum == log.raw["rank"]
    assert len(log.notes) == 1
    assert log.notes[0].startswith("matrix: ")
    assert "no signal" in log.notes[0] and f"no-signal floor, rank {minimum}" in log.notes[0]


def test_svd_rank_weakened_evbmf_keeps_more():
    rng = np.random.default_rng(3)
    matrix = exact_rank_matrix(40, 80, 8, rng) + 1e-3 * rng.standard_normal((40, 80))
    values, _ = left_singular(matrix)
    plain, weak = RankLog(), RankLog()
    r_plain = svd_rank(parse_rank("evbmf"), [values], matrix.shape, 1, plain)
    r_weak = svd_rank(parse_rank("evbmf:0.5"), [values], matrix.shape, 1, weak)
    assert r_plain == 8
    assert r_weak == math.floor(40 - 0.5 * (40 - 8)) == 24
    assert weak.raw == {"rank": 24}


# --- tucker_ranks -------------------------------------------------------------------------------


def test_tucker_ranks_absolute_capped_per_mode_not_rounded():
    log = RankLog()
    assert tucker_ranks(parse_rank(40), [], [], (32, 48, 3, 3), 8, log) == (32, 40)
    assert log.raw == {"rank_out": 32, "rank_in": 40}
    log = RankLog()
    assert tucker_ranks(parse_rank(21), [], [], (32, 48, 3, 3), 8, log) == (21, 21)
    assert log.raw == {"rank_out": 21, "rank_in": 21}


def test_tucker_ranks_fraction_raw_and_rounded():
    log = RankLog()
    # 0.33 * 32 = 10.56 -> 11 -> 16; 0.33 * 48 = 15.84 -> 16 -> 16
    assert tucker_ranks(parse_rank(0.33), [], [], (32, 48, 3, 3), 8, log) == (16, 16)
    assert log.raw == {"rank_out": 11, "rank_in": 16}
    log = RankLog()
    assert tucker_ranks(parse_rank(0.9), [], [], (30, 44, 3, 3), 8, log) == (30, 40)  # 27 -> capped 30
    assert log.raw == {"rank_out": 27, "rank_in": 40}


def test_tucker_ranks_energy_finds_the_multilinear_rank():
    rng = np.random.default_rng(4)
    weight = exact_tucker_kernel(24, 40, (3, 3), 5, 7, rng)
    (s_out, _), (s_in, _) = channel_spectra(weight)
    log = RankLog()
    assert tucker_ranks(parse_rank("energy:1.0"), [s_out], [s_in], weight.shape, 1, log) == (5, 7)
    assert log.raw == {"rank_out": 5, "rank_in": 7}
    log = RankLog()
    assert tucker_ranks(parse_rank("energy:1.0"), [s_out], [s_in], weight.shape, 8, log) == (8, 8)
    assert log.raw == {"rank_out": 5, "rank_in": 7}


def test_tucker_ranks_evbmf_and_its_fallback_notes():
    rng = np.random.default_rng(5)
    weight = exact_tucker_kernel(32, 32, (3, 3), 6, 6, rng) + 1e-3 * rng.standard_normal((32, 32, 3, 3))
    (s_out, _), (s_in, _) = channel_spectra(weight)
    log = RankLog()
    assert tucker_ranks(parse_rank("evbmf"), [s_out], [s_in], weight.shape, 8, log) == (8, 8)
    assert log.raw == {"rank_out": 6, "rank_in": 6}
    assert [n.split(":")[0] for n in log.notes] == ["output channels", "input channels"]
    assert all("found rank 6" in n and "floor" not in n for n in log.notes)

    noise = rng.standard_normal((32, 32, 3, 3))
    (s_out, _), (s_in, _) = channel_spectra(noise)
    log = RankLog()
    r4, r3 = tucker_ranks(parse_rank("evbmf"), [s_out], [s_in], noise.shape, 1, log)
    assert (r4, r3) == (4, 4)  # ceil(32 / 8)
    assert [n.split(":")[0] for n in log.notes] == ["output channels", "input channels"]
    assert all("no signal" in n and "no-signal floor, rank 4" in n for n in log.notes)


@FAST
@given(
    st.integers(1, 600), st.integers(1, 600), st.floats(min_value=1e-3, max_value=1.0),
    st.sampled_from([1, 2, 4, 8, 16, 32]),
)
def test_tucker_ranks_fraction_property(t, s, fraction, round_to):
    log = RankLog()
    r4, r3 = tucker_ranks(RankSpec("fraction", fraction), [], [], (t, s, 3, 3), round_to, log)
    raw4, raw3 = log.raw["rank_out"], log.raw["rank_in"]
    assert raw4 == max(1, math.ceil(fraction * t)) and raw3 == max(1, math.ceil(fraction * s))
    assert (r4, r3) == (round_up(raw4, round_to, t), round_up(raw3, round_to, s))
    assert raw4 <= r4 <= t and raw3 <= r3 <= s


# --- cp_rank ------------------------------------------------------------------------------------


def test_cp_rank_absolute_capped_at_the_largest_cp_rank():
    log = RankLog()
    # cap = min over modes of the product of the others: min(48*9, 32*9, 32*48*3, 32*48*3) = 288
    assert cp_rank(parse_rank(500), [], [], (32, 48, 3, 3), 8, log) == 288
    assert log.raw == {"rank": 288}
    log = RankLog()
    assert cp_rank(parse_rank(21), [], [], (32, 48, 3, 3), 8, log) == 21


def test_cp_rank_fraction_of_the_larger_channel_count():
    log = RankLog()
    assert cp_rank(parse_rank(0.3), [], [], (32, 48, 3, 3), 8, log) == 16  # ceil(14.4) = 15 -> 16
    assert log.raw == {"rank": 15}
    log = RankLog()
    assert cp_rank(parse_rank(1.0), [], [], (4, 4, 1, 1), 8, log) == 4  # rounding capped at 4
    assert log.raw == {"rank": 4}


def test_cp_rank_energy_and_evbmf_use_the_tucker_estimates():
    rng = np.random.default_rng(6)
    weight = exact_tucker_kernel(24, 40, (3, 3), 5, 7, rng)
    (s_out, _), (s_in, _) = channel_spectra(weight)
    log = RankLog()
    assert cp_rank(parse_rank("energy:1.0"), [s_out], [s_in], weight.shape, 8, log) == 8
    assert log.raw == {"rank": 7}  # max(5, 7), raw: not rounded before the max
    log = RankLog()
    assert cp_rank(parse_rank("energy:1.0"), [s_out], [s_in], weight.shape, 1, log) == 7

    noise = rng.standard_normal((16, 24, 3, 3))
    (s_out, _), (s_in, _) = channel_spectra(noise)
    log = RankLog()
    assert cp_rank(parse_rank("evbmf"), [s_out], [s_in], noise.shape, 1, log) == 3  # ceil(24/8)
    assert len(log.notes) == 2  # both Tucker notes reach the CP log
    assert all("no-signal floor" in n for n in log.notes)


# --- through onnxlr.compress: the report shows raw and rounded ranks ------------------------------


def test_compress_reports_raw_and_rounded_tucker_ranks():
    rng = np.random.default_rng(7)
    model = conv_model([1, 32, 8, 8], rng.standard_normal((32, 32, 3, 3)), pads=[1, 1, 1, 1])
    _, report = onnxlr.compress(model, method="tucker", rank=0.3, round_to=8)
    layer = report.layers[0]
    assert layer.raw_ranks == {"rank_out": 10, "rank_in": 10}
    assert layer.ranks == {"rank_out": 16, "rank_in": 16}
    assert '"raw_ranks"' in report.to_json()
    _, report = onnxlr.compress(model, method="tucker", rank=0.3, round_to=1)
    assert report.layers[0].ranks == report.layers[0].raw_ranks == {"rank_out": 10, "rank_in": 10}


def test_compress_svd_energy_on_a_known_spectrum():
    weight = matrix_with_spectrum(np.linspace(10, 1, 20), 64, 96, seed=8)
    model = gemm_model([2, 64], weight)
    for round_to in (1, 8, 16):
        _, report = onnxlr.compress(model, method="svd", rank="energy:0.8", round_to=round_to)
        layer = report.layers[0]
        raw = brute_energy_rank(np.linspace(10, 1, 20), 0.8)
        assert layer.raw_ranks == {"rank": raw}
        assert layer.ranks == {"rank": round_up(raw, round_to, 64)}


def test_compress_integer_rank_is_not_rounded():
    rng = np.random.default_rng(9)
    model = gemm_model([2, 64], rng.standard_normal((64, 96)))
    _, report = onnxlr.compress(model, method="svd", rank=13, round_to=8)
    assert report.layers[0].ranks == report.layers[0].raw_ranks == {"rank": 13}


def test_compress_default_round_to_applies():
    default = CompressConfig().round_to
    assert default >= 1
    rng = np.random.default_rng(10)
    model = gemm_model([2, 128], rng.standard_normal((128, 256)))
    _, report = onnxlr.compress(model, method="svd", rank=0.17)  # ceil(0.17 * 128) = 22
    assert report.layers[0].raw_ranks == {"rank": 22}
    assert report.layers[0].ranks == {"rank": round_up(22, default, 128)}


@pytest.mark.parametrize("bad", [0, -8])
def test_round_to_must_be_positive(bad):
    with pytest.raises(OnnxlrError, match="--round-to must be an integer >= 1"):
        CompressConfig(round_to=bad)
