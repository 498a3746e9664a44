"""Whole-model budgets: candidates, measured latencies, damage, allocation; sweeps of the frontier."""
