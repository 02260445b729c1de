"""Policy files: a stopping policy and the guarantee it was calibrated with, as a small JSON file.

``codestop calibrate`` writes one (``--out``); ``serve --policy-file``, ``eval``, ``run`` and
``replay`` read it. The file says what to run (``policy``: the method and all its knobs) and why
(``guarantee``: the risk certified, its level, the error level, the sample sizes and the plain
statement; null for a policy written by hand, which is then "uncalibrated")::

    {"schema": 1, "kind": "codestop-policy",
     "policy": {"method": "codestop", "tau": 6.0, "r_max": 0.95},
     "guarantee": {"risk": "changed", "max_risk": 0.02, "alpha": 0.05, "n_ordering": 60,
                   "n_testing": 140, "traces": "shadow.traces.jsonl", "statement": "...",
                   "policy": {"method": "codestop", "tau": 6.0, "r_max": 0.95, ...}}}

Both are checked whole when the file is read or written (:func:`check_guarantee`), each problem one
error naming the file and the key: a proxy never starts on a guarantee it cannot state truly.

Engine-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError, ParameterError, is_integer, is_number
from codestop.policies import METHODS, make_policy, policy_options

POLICY_FILE_SCHEMA = 1
POLICY_FILE_KIND = "codestop-policy"
RISKS = ("changed", "lost")  # what a guarantee may bound (codestop.analysis.risk computes them)


@dataclass(frozen=True)
class PolicyFile:
    """A policy file's content: ``policy`` (``{"method": ..., knob: value}``; build it with
    :func:`~codestop.policies.make_policy`), ``guarantee`` (None: uncalibrated; checked here, however
    the object is made: :func:`check_guarantee`) and ``path`` (where it was read from, for messages)."""

    policy: dict[str, Any]
    guarantee: dict[str, Any] | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        where = f"policy file {self.path!r}" if self.path else "policy file"
        object.__setattr__(self, "guarantee", check_guarantee(self.guarantee, self.policy, where))

    @property
    def method(self) -> str:
        return str(self.policy["method"])

    @property
    def knobs(self) -> dict[str, Any]:
        return {k: v for k, v in self.policy.items() if k != "method"}

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


def _check_policy(policy: Any, where: str) -> dict[str, Any]:
    """``policy`` if it builds (its method known, every knob the method's own and allowed)."""
    if not isinstance(policy, dict) or not isinstance(policy.get("method"), str):
        raise CodestopError(f"{where}: 'policy' must be an object with a 'method' (one of {', '.join(METHODS)})")
    try:
        make_policy(policy)
    except (ValueError, TypeError) as err:  # ParameterError is a ValueError
        raise CodestopError(f"{where}: policy: {err}") from None
    return dict(policy)


def _fraction(x: Any) -> bool:
    return is_number(x) and 0 < x < 1


# Each key a guarantee may hold: (whether it must be there, the check, what it must be). What
# ``codestop calibrate`` writes; a key not here is refused (a misspelt key would silently not count).
_GUARANTEE: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "risk": (True, lambda x: x in RISKS, f"must be one of {', '.join(RISKS)}"),
    "max_risk": (True, _fraction, "must be a number strictly between 0 and 1 (the risk level certified)"),
    "alpha": (True, _fraction, "must be a number strictly between 0 and 1 (the chance the certificate is wrong)"),
    "n_ordering": (False, lambda x: is_integer(x) and x >= 0, "must be an integer >= 0"),
    "n_testing": (False, lambda x: is_integer(x) and x >= 0, "must be an integer >= 0"),
    "method": (False, lambda x: x == "learn-then-test", "must be \"learn-then-test\""),
    "certified": (False, lambda x: isinstance(x, bool), "must be true or false"),
    "seed": (False, lambda x: x is None or is_integer(x), "must be an integer or null"),
    "traces": (False, lambda x: x is None or isinstance(x, str), "must be a path or null"),
    "saving": (False, lambda x: x is None or is_number(x), "must be a number or null"),
    "statement": (False, lambda x: isinstance(x, str), "must be a text"),
    "policy": (False, lambda x: isinstance(x, dict), "must be an object: the policy the guarantee was certified for"),
}


def check_guarantee(guarantee: Any, policy: dict[str, Any], where: str) -> dict[str, Any] | None:
    """``guarantee`` if it is null, or an object whose every key is one a guarantee holds, with the
    value it must have; and, when it names the policy it was certified for (``policy``; files
    written before it do not), that policy is the file's (a guarantee covers that policy only)."""
    if guarantee is None:
        return None
    if not isinstance(guarantee, dict):
        raise CodestopError(f"{where}: 'guarantee' must be null (uncalibrated) or an object")
    missing = [k for k, (required, _, _) in _GUARANTEE.items() if required and k not in guarantee]
    if missing:
        raise CodestopError(f"{where}: guarantee: no {missing[0]!r} (a guarantee states {', '.join(k for k, v in _GUARANTEE.items() if v[0])})")
    for key, value in guarantee.items():
        if key not in _GUARANTEE:
            raise CodestopError(f"{where}: guarantee.{key}: not a key of a guarantee (its keys: {', '.join(_GUARANTEE)})")
        _, ok, must = _GUARANTEE[key]
        if not ok(value):
            raise CodestopError(f"{where}: guarantee.{key}: {value!r} {must}")
    if "policy" in guarantee:
        try:
            certified = policy_options(make_policy(guarantee["policy"]))
        except ParameterError as err:
            raise CodestopError(f"{where}: guarantee.policy: {err}") from None
        if certified != policy_options(make_policy(policy)):
            raise CodestopError(f"{where}: the guarantee was certified for {guarantee['policy']}, not for this file's "
                                f"policy {policy}: it covers that policy only (calibrate again, or set the guarantee to null)")
    return dict(guarantee)


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
    return PolicyFile(_check_policy(data.get("policy"), where), data.get("guarantee"), str(path))


def write_policy_file(path: str | os.PathLike[str], policy: dict[str, Any], guarantee: dict[str, Any] | None) -> PolicyFile:
    """Write ``policy`` and its ``guarantee`` (both checked as a reader checks them) to ``path``
    (replaced whole, atomically)."""
    pf = PolicyFile(_check_policy(policy, f"policy for {str(path)!r}"), guarantee, str(path))
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(pf.to_json(), indent=2) + "\n")
        os.replace(tmp, p)
    except OSError as err:
        raise CodestopError(f"policy file {str(path)!r}: cannot write it ({err.strerror})") from None
    return pf
