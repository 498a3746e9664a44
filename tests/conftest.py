"""Fixtures shared by test files (pytest finds this file by itself)."""

from __future__ import annotations

import pytest

from onnxlr.budget import allocate as budget
from onnxlr.budget import latency, planning, search


@pytest.fixture
def fast_timing(monkeypatch):
    """Budgets plan in a fraction of a second: short timing loops, few check samples."""
    monkeypatch.setattr(latency, "LAYER_BUDGET_S", 0.05)
    monkeypatch.setattr(latency, "MIN_RUNS", 5)
    monkeypatch.setattr(latency, "WARMUP", 2)
    monkeypatch.setattr(budget, "MODEL_BUDGET_S", 0.3)
    monkeypatch.setattr(budget, "FINAL_BUDGET_S", 1.0)
    monkeypatch.setattr(planning, "CHECK_SAMPLES", 4)
    monkeypatch.setattr(planning, "DAMAGE_SAMPLES", 4)
    monkeypatch.setattr(search, "SEARCH_BUDGET_S", 5.0)
