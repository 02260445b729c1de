"""Engines: how tokens and probabilities are obtained (see :mod:`codestop.engines.base`)."""

from codestop.engines.base import Engine, ProbeOutput, Session, StepOutput

__all__ = ["Engine", "ProbeOutput", "Session", "StepOutput"]
