"""codestop: stop reasoning models thinking as soon as more thinking stops paying (CoDE-Stop)."""

from codestop.api import agenerate_question, generate, load
from codestop.confidence import arithmetic_mean, geometric_mean, minimum, span
from codestop.controller import Event, Result
from codestop.engines.base import Boundaries, CodestopError, Engine, Sampling
from codestop.policies import (
    CodeStop,
    Consistency,
    Decision,
    Deer,
    Policy,
    Probe,
    TokenBudget,
    Vanilla,
    make_policy,
)

__version__ = "0.1.0"

__all__ = [
    "Boundaries",
    "CodeStop",
    "CodestopError",
    "Consistency",
    "Decision",
    "Deer",
    "Engine",
    "Event",
    "Policy",
    "Probe",
    "Result",
    "Sampling",
    "TokenBudget",
    "Vanilla",
    "agenerate_question",
    "arithmetic_mean",
    "generate",
    "geometric_mean",
    "load",
    "make_policy",
    "minimum",
    "span",
]
