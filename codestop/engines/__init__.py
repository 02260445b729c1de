"""Engines: how tokens and probabilities are obtained (see :mod:`codestop.engines.base`)."""

from codestop.engines.base import Boundaries, CodestopError, ContextTooLong, Engine, Sampling, Session

__all__ = ["Boundaries", "CodestopError", "ContextTooLong", "Engine", "Sampling", "Session"]
