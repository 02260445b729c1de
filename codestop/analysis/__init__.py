"""Analyses of recorded traces: sweeps, calibration with a bound, and their statistics."""
