"""Policy files: a stopping policy and the guarantee it was calibrated with, as a small JSON file.

``codestop calibrate`` writes one (``--out``); ``serve --policy-file``, ``eval``, ``run`` and
``replay`` read it. The file says what to run (``policy``: the method and all its knobs) and why
(``guarantee``: the risk certified, its level, the error level, the sample sizes and the plain
statement; null for a policy written by hand, which is then "uncalibrated")::

    {"schema": 1, "kind": "codestop-policy",
     "policy": {"method": "codestop", "tau": 6.0, "r_max": 0.95},
     "guarantee": {"risk": "changed", "max_risk": 0.02, "alpha": 0.05, "n_ordering": 60,
                   "n_testing": 140, "traces": "shadow.traces.jsonl", "statement": "..."}}

Engine-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError
from codestop.policies import METHODS, Policy, make_policy

POLICY_FILE_SCHEMA = 1
POLICY_FILE_KIND = "codestop-policy"


@dataclass(frozen=True)
class PolicyFile:
    """A policy file's content: ``policy`` (``{"method": ..., knob: value}``), ``guarantee`` (None:
    uncalibrated) and ``path`` (where it was read from, for messages)."""

    policy: dict[str, Any]
    guarantee: dict[str, Any] | None = None
    path: str | None = None

    @property
    def method(self) -> str:
        return str(self.policy["method"])

    @property
    def knobs(self) -> dict[str, Any]:
        return {k: v for k, v in self.policy.items() if k != "method"}

    def build(self) -> Policy:
        """The policy object."""
        return make_policy(self.method, **self.knobs)

    def describe(self) -> str:
        """One line: the policy and its guarantee (or that it has none), for start-up lines and /health."""
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items())
        what = f"{self.method}" + (f" ({knobs})" if knobs else "")
        g = self.guarantee
        if not g:
            return f"{what}; uncalibrated (no guarantee)"
        return (f"{what}; calibrated: {g['risk']} risk <= {g['max_risk']:g} with probability >= {1 - g['alpha']:g} "
                f"for traffic like its {g.get('n_ordering', 0) + g.get('n_testing', 0)} calibration traces")

    def to_json(self) -> dict[str, Any]:
        return {"schema": POLICY_FILE_SCHEMA, "kind": POLICY_FILE_KIND, "policy": dict(self.policy), "guarantee": self.guarantee}


def _checked_policy(policy: Any, where: str) -> dict[str, Any]:
    """``policy`` if it builds (its method known, every knob the method's own and allowed)."""
    if not isinstance(policy, dict) or not isinstance(policy.get("method"), str):
        raise CodestopError(f"{where}: 'policy' must be an object with a 'method' (one of {', '.join(METHODS)})")
    try:
        make_policy(policy["method"], **{k: v for k, v in policy.items() if k != "method"})
    except (ValueError, TypeError) as err:  # ParameterError is a ValueError
        raise CodestopError(f"{where}: {err}") from None
    return dict(policy)


_GUARANTEE_KEYS = ("risk", "max_risk", "alpha")


def read_policy_file(path: str | os.PathLike[str]) -> PolicyFile:
    """Read and check a policy file; every problem is one CodestopError naming the file."""
    where = f"policy file {str(path)!r}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise CodestopError(f"{where}: cannot read it ({err.strerror}); write one with `codestop calibrate ... --out FILE`") from None
    except ValueError as err:
        raise CodestopError(f"{where}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("kind") != POLICY_FILE_KIND:
        raise CodestopError(f"{where}: not a codestop policy file (no \"kind\": \"{POLICY_FILE_KIND}\")")
    if data.get("schema") != POLICY_FILE_SCHEMA:
        raise CodestopError(f"{where}: schema {data.get('schema')!r} is not one this codestop reads ({POLICY_FILE_SCHEMA})")
    guarantee = data.get("guarantee")
    if guarantee is not None and (not isinstance(guarantee, dict) or any(k not in guarantee for k in _GUARANTEE_KEYS)):
        raise CodestopError(f"{where}: 'guarantee' must be null or an object with {', '.join(_GUARANTEE_KEYS)}")
    return PolicyFile(_checked_policy(data.get("policy"), where), guarantee, str(path))


def write_policy_file(path: str | os.PathLike[str], policy: dict[str, Any], guarantee: dict[str, Any] | None) -> PolicyFile:
    """Write ``policy`` (checked) and its ``guarantee`` to ``path`` (replaced whole, atomically)."""
    pf = PolicyFile(_checked_policy(policy, f"policy for {str(path)!r}"), guarantee, str(path))
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(pf.to_json(), indent=2) + "\n")
        os.replace(tmp, p)
    except OSError as err:
        raise CodestopError(f"policy file {str(path)!r}: cannot write it ({err.strerror})") from None
    return pf
