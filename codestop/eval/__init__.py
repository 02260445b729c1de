"""Benchmarks: datasets, grading, prompt styles, the eval/record runner and run summaries."""
