"""codestop: stop reasoning models thinking as soon as more thinking stops paying (CoDE-Stop).

The names below load on first use, so that importing an engine-free part (``codestop.policies``,
``codestop.replay``, ...) does not import the engines and their numerical libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from codestop.lazy import lazy_exports
from codestop.version import __version__ as __version__  # re-exported: the package face

# name -> the module that defines it
_EXPORTS = {
    "calibrate": "codestop.analysis.calibrate",
    "agenerate_question": "codestop.api",
    "generate": "codestop.api",
    "load": "codestop.api",
    "arithmetic_mean": "codestop.confidence",
    "geometric_mean": "codestop.confidence",
    "minimum": "codestop.confidence",
    "span": "codestop.confidence",
    "Event": "codestop.controller",
    "Result": "codestop.controller",
    "agenerate": "codestop.controller",
    "astream": "codestop.controller",
    "GenerationConfig": "codestop.config",
    "Sampling": "codestop.sampling",
    "Engine": "codestop.engines.base",
    "CodestopError": "codestop.errors",
    "CodeStop": "codestop.policies",
    "Consistency": "codestop.policies",
    "Decision": "codestop.policies",
    "Deer": "codestop.policies",
    "Policy": "codestop.policies",
    "Probe": "codestop.policies",
    "TokenBudget": "codestop.policies",
    "Vanilla": "codestop.policies",
    "make_policy": "codestop.policies",
}

# written out (sorted, the same names as _EXPORTS) so that linters and type checkers see the public names
__all__ = [
    "CodeStop",
    "CodestopError",
    "Consistency",
    "Decision",
    "Deer",
    "Engine",
    "Event",
    "GenerationConfig",
    "Policy",
    "Probe",
    "Result",
    "Sampling",
    "TokenBudget",
    "Vanilla",
    "agenerate",
    "agenerate_question",
    "arithmetic_mean",
    "astream",
    "calibrate",
    "generate",
    "geometric_mean",
    "load",
    "make_policy",
    "minimum",
    "span",
]

if TYPE_CHECKING:
    from codestop.analysis.calibrate import calibrate
    from codestop.api import agenerate_question, generate, load
    from codestop.confidence import arithmetic_mean, geometric_mean, minimum, span
    from codestop.config import GenerationConfig
    from codestop.controller import Event, Result, agenerate, astream
    from codestop.engines.base import Engine
    from codestop.errors import CodestopError
    from codestop.policies import CodeStop, Consistency, Decision, Deer, Policy, Probe, TokenBudget, Vanilla, make_policy
    from codestop.sampling import Sampling


__getattr__ = lazy_exports("codestop", _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
