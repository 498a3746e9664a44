"""The in-context search after the greedy allocation: swaps of steps between layers, each measured
on the whole model, that keep the allocation's saving."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from builders import cnn_model
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr.budget import allocate as budget
from onnxlr.budget import planning, search
from onnxlr.budget.outputs import output_error, sample_errors2
from onnxlr.cli import main
from onnxlr.pipeline import compress

pytestmark = pytest.mark.usefixtures("fast_timing")


def _hull(*steps):
    """[(cumulative saving, cumulative damage, candidate)] with a labelled stand-in candidate."""
    return [(s, d, planning.Candidate("svd", f, {"rank": 1}, None, None, 0.0, damage=d))
            for (s, d), f in zip(steps, (0.5, 0.25, 0.125))]


def _interacting(hulls, pair_penalty):
    """err2 of a choice: its damages plus a penalty for each listed pair of layers both chosen
    (errors that add up more than their single-layer damages say)."""
    def err2(choice):
        total = sum(c.damage for c in choice.values())
        for (i, j), penalty in pair_penalty.items():
            if i in choice and j in choice:
                total += penalty
        return total
    return err2


def _saving(hulls, positions):
    return sum(hulls[i][k - 1][0] for i, k in positions.items() if k > 0)


def test_a_swap_away_from_two_layers_that_damage_each_other_is_found():
    """A and B look cheapest one at a time, so the greedy takes both; together they cost far more.
    C saves as much as B for a little more single-layer damage: the search takes C instead."""
    hulls = {0: _hull((5.0, 0.01)), 1: _hull((5.0, 0.01)), 2: _hull((5.0, 0.02))}
    err2 = _interacting(hulls, {(0, 1): 0.2})
    start = {0: 1, 1: 1, 2: 0}
    found = search.improve(hulls, start, err2, {0: "A", 1: "B", 2: "C"}, budget_s=30)
    assert found.positions[2] == 1 and found.positions[0] + found.positions[1] == 1
    assert found.error_before == pytest.approx(math.sqrt(0.22))
    assert found.error_after == pytest.approx(math.sqrt(0.03))
    assert _saving(hulls, found.positions) >= _saving(hulls, start)
    assert len(found.swaps) == 1 and "-> kept" in found.swaps[0] and "C: kept -> svd 0.5" in found.swaps[0]


def test_the_search_keeps_an_allocation_no_swap_improves():
    hulls = {0: _hull((5.0, 0.01), (8.0, 0.05)), 1: _hull((5.0, 0.03))}
    err2 = _interacting(hulls, {})
    found = search.improve(hulls, {0: 1, 1: 0}, err2, {0: "A", 1: "B"}, budget_s=30)
    assert found.positions == {0: 1, 1: 0} and not found.swaps
    assert found.stopped == "no measured swap lowers the error"


def test_the_search_does_not_start_when_a_pass_takes_longer_than_its_time():
    import time

    hulls = {i: _hull((5.0, 0.01)) for i in range(6)}

    def slow(choice):
        time.sleep(0.05)
        return 0.0

    found = search.improve(hulls, {i: i % 2 for i in range(6)}, slow, {i: str(i) for i in range(6)}, budget_s=0.1)
    assert found.stopped.startswith("not started: a model pass takes") and found.evaluations == 1


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_search_never_loses_saving_nor_adds_error(draw):
    n = draw.draw(st.integers(2, 6), label="layers")
    hulls = {}
    for i in range(n):
        k = draw.draw(st.integers(1, 3))
        savings = np.cumsum(draw.draw(st.lists(st.floats(0.5, 5.0), min_size=k, max_size=k)))
        damages = np.cumsum(draw.draw(st.lists(st.floats(0.001, 0.1), min_size=k, max_size=k)))
        hulls[i] = _hull(*zip(savings.tolist(), damages.tolist()))
    pairs = {(i, j): draw.draw(st.floats(-0.005, 0.2)) for i in range(n) for j in range(i + 1, n)
             if draw.draw(st.booleans())}
    err2 = _interacting(hulls, pairs)
    start = {i: draw.draw(st.integers(0, len(hulls[i]))) for i in range(n)}
    found = search.improve(hulls, start, err2, {i: str(i) for i in range(n)}, budget_s=30)
    choice = {i: hulls[i][k - 1][2] for i, k in found.positions.items() if k > 0}
    assert _saving(hulls, found.positions) >= _saving(hulls, start) - 1e-9
    assert found.error_after <= found.error_before + 1e-12
    assert found.error_after == pytest.approx(math.sqrt(max(err2(choice), 0.0)), abs=1e-12)
    assert len(found.swaps) <= search.MAX_SWAPS and len(found.path) == len(found.swaps)
    assert found.path[-1] == found.positions if found.path else found.positions == start
    errors = [err2({i: hulls[i][k - 1][2] for i, k in p.items() if k > 0}) for p in [start, *found.path]]
    assert errors == sorted(errors, reverse=True)  # every swap taken lowered the measured error


def _per_sample(err2, noise, samples=32, seed=0):
    """err2 split over ``samples`` samples: each choice's error^2 spread over the samples with
    zero-sum noise of relative size ``noise`` that depends on the choice (the samples' noise)."""
    def parts(choice):
        rng = np.random.default_rng([seed, *sorted(choice)])
        total = err2(choice)
        jitter = rng.standard_normal(samples)
        return total / samples * (1 + noise * (jitter - jitter.mean()))
    return parts


def _two_layer_case():
    """A chosen; B saves the same for a little less damage: swapping A for B lowers error^2 by 2%."""
    hulls = {0: _hull((5.0, 0.050)), 1: _hull((5.0, 0.049))}
    return hulls, {0: 1, 1: 0}, _interacting(hulls, {})


def test_a_swap_is_taken_when_every_sample_agrees_it_helps():
    hulls, start, err2 = _two_layer_case()
    found = search.improve(hulls, start, _per_sample(err2, noise=0.0), {0: "A", 1: "B"}, budget_s=30)
    assert found.positions == {0: 0, 1: 1} and len(found.swaps) == 1


def test_a_swap_whose_gain_is_within_the_samples_noise_is_not_taken():
    """The same 2% drop, but the per-sample errors of the two allocations differ by far more than
    that from sample to sample: the drop is not told apart from noise, the allocation stays."""
    hulls, start, err2 = _two_layer_case()
    found = search.improve(hulls, start, _per_sample(err2, noise=0.5), {0: "A", 1: "B"}, budget_s=30)
    assert found.positions == start and not found.swaps
    assert found.stopped == ("no measured swap lowers the error beyond the samples' noise (1 lowered it less "
                             "than 1 standard error(s) of the paired difference)")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.sampled_from([(1, 4, 3), (7, 2), (12,), (6, 1, 2, 2)]), st.data())
def test_per_sample_errors_add_up_to_the_output_error(samples, outputs, tail, draw):
    rng = np.random.default_rng(draw.draw(st.integers(0, 2**31), label="seed"))
    ref = [rng.standard_normal((samples, *tail)).astype(np.float32) for _ in range(outputs)]
    cand = [r + draw.draw(st.floats(0.0, 1.0), label="noise") * rng.standard_normal(r.shape).astype(np.float32)
            for r in ref]
    ref.append(np.arange(samples, dtype=np.int64))  # integer outputs are not errors
    cand.append(np.zeros(samples, dtype=np.int64))
    parts = sample_errors2(ref, cand, samples)
    assert parts.shape == (samples,) and np.all(parts >= 0)
    assert parts.sum() == pytest.approx(output_error(ref, cand) ** 2, rel=1e-9, abs=1e-15)
    # a sample's part is that sample's own squared difference
    first = sum(float(np.sum((r[0].astype(np.float64) - c[0]) ** 2)) for r, c in zip(ref[:-1], cand[:-1]))
    assert parts[0] == pytest.approx(first / sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref[:-1]))


def _calibrated(tmp_path, model):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([40] + shape[1:]).astype(np.float32)
    np.savez(tmp_path / "calib.npz", **{model.graph.input[0].name: x})
    return str(tmp_path / "calib.npz")


def test_a_calibrated_budget_reports_its_search_and_the_model_written_is_the_one_measured(tmp_path):
    model = cnn_model(channels=(8, 64, 64), spatial=16, classes=10)
    calib = _calibrated(tmp_path, model)
    out, report = compress(model, target_macs=0.5, calib=calib, cache_dir=tmp_path)
    onnx.checker.check_model(out, full_check=True)
    found = report.budget["search"]
    assert found is not None and found["evaluations"] >= 1 and found["kept"]
    assert found["error_after"] <= found["error_before"]
    assert any(n.startswith("budget search (swaps measured on the whole model)") for n in report.model_notes)
    chosen = {c["name"]: c["method"] for c in report.budget["chosen"]}
    assert chosen == {d.name: d.method for d in report.replaced}
    _, off = compress(model, target_macs=0.5, calib=calib, cache_dir=tmp_path, search_time=0)
    assert off.budget["search"] is None


def test_search_time_is_validated_through_the_cli(tmp_path, capsys):
    model = cnn_model(channels=(8, 32, 32), spatial=8, classes=10)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rc = main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--target-speedup", "1.2",
               "--search-time", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--search-time must be a number of seconds >= 0" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_with_less_saving_needed_a_step_goes_back_alone():
    """Where the allocation's check measured more speed than the target asks, the search may give
    the excess back: the least efficient step goes back without a step elsewhere."""
    hulls = {0: _hull((5.0, 0.01)), 1: _hull((2.0, 0.05))}
    err2 = _interacting(hulls, {})
    found = search.improve(hulls, {0: 1, 1: 1}, err2, {0: "A", 1: "B"}, budget_s=30, need=5.0)
    assert found.positions == {0: 1, 1: 0} and found.error_after == pytest.approx(math.sqrt(0.01))


@pytest.mark.parametrize("measured, expected", [(1.25, 1.0), (1.30, 1.0), (1.5, None)])
def test_the_search_gives_back_only_the_speed_measured_beyond_the_target_and_its_margin(measured, expected):
    plan = planning.Plan(b"", [], "cpu", 10.0, 0, True, [], {}, [])
    best = budget.Allocation({}, 0.0, 0.0, 0.0, 0, measured_speedup=measured)
    need = budget._search_need(plan, best, {0: _hull((4.0, 0.01))}, {0: 1}, target_speedup=1.3)
    if expected is not None:
        assert need == pytest.approx(4.0 * expected)
    else:  # 1.5x measured: the saving that reaches 1.3x x 1.01 is (1 - 1/1.313) / (1 - 1/1.5) of it
        assert need == pytest.approx(4.0 * (1 - 1 / (1.3 * (1 + budget.SEARCH_MARGIN))) / (1 - 1 / 1.5))
        assert need < 4.0
