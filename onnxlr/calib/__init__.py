"""Calibration: statistics of layer inputs on real data (collect), and the refinement math (fit)."""
