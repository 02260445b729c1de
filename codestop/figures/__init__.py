"""Figures from traces and sweeps: the trade-off, the confidence dynamics, and the HTML report."""
