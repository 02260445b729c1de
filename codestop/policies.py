"""Stopping policies: numbers in, a decision out. No torch, no engine.

A policy is an immutable, validated configuration with two methods:

* ``decide(probes) -> Decision``: a pure function of the probes seen so far (used by replay);
* ``start() -> tracker``: a fresh per-session tracker whose ``update(probe) -> Decision`` does O(1)
  work per probe (used live). ``decide(probes)`` equals the last ``update`` over the same probes.

plus three attributes the controller reads: ``name`` (the method name), ``confidence`` (the name of
the confidence function it wants probes scored with, see :mod:`codestop.confidence`),
``needs_probes`` (False for policies that never look at a probe, so none is spent live) and
``max_reasoning_tokens`` (a hard cap on reasoning tokens, or None). Any object with these is a
policy; :class:`Policy` is the protocol.

Stop reasons are one fixed vocabulary: ``confident`` and ``degenerate`` (CodeStop), ``threshold``
(Deer), ``consistent`` (Consistency), ``budget`` (TokenBudget), ``max_reasoning_tokens`` (the generation
cap, set by the controller), ``finished`` (the model ended its thinking itself) and
``unclosed_thinking`` (a thinking model ended its turn, an end-of-sequence token, without closing
its thinking: the controller closes it and answers, as after a stop); the last three are set by the
controller, never by a policy.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal, Protocol, runtime_checkable

from codestop.errors import UnknownParameter, is_number, require

STOP_REASONS = ("confident", "degenerate", "threshold", "consistent", "budget", "max_reasoning_tokens", "max_tokens",
                "finished", "unclosed_thinking")
MODEL_ENDED = ("finished", "unclosed_thinking")  # the model ended its reasoning itself: nothing was cut
NOT_EARLY = (*MODEL_ENDED, "max_reasoning_tokens", "max_tokens", "budget")  # the full reasoning, or a token cap: no early stop


@dataclass(frozen=True)
class Probe:
    """One intermediate answer read at a step boundary.

    position: reasoning tokens generated before the probe (prompt and probe tokens excluded), >= 1.
    confidence: a probability in [0, 1], from the probe's answer-token log-probabilities.
    answer: the intermediate answer (the content of the box), "" when there is none.
    text: the raw probe continuation; token_logprobs: its answer tokens' log-probabilities (so replay
    can re-score with another confidence function); probe_tokens: tokens the probe generated (its
    cost); correct: whether ``answer`` is right, when known (traces).
    """

    position: int
    confidence: float
    answer: str = ""
    text: str | None = None
    token_logprobs: tuple[float, ...] | None = None
    probe_tokens: int | None = None
    correct: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.position, bool) or not isinstance(self.position, int) or self.position < 1:
            raise ValueError(f"position: {self.position!r} must be an integer >= 1 (reasoning tokens before the probe)")
        if not isinstance(self.confidence, (int, float)) or not (0.0 <= self.confidence <= 1.0):
            raise ValueError(f"confidence: {self.confidence!r} must be a probability in [0, 1]")
        if self.token_logprobs is not None and not isinstance(self.token_logprobs, tuple):
            object.__setattr__(self, "token_logprobs", tuple(self.token_logprobs))


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str | None = None


CONTINUE = Decision(False, None)


class Tracker(Protocol):
    def update(self, probe: Probe) -> Decision: ...


@runtime_checkable
class Policy(Protocol):
    """What the controller, replay and the server need of a stopping policy."""

    # read-only properties, not plain attributes, so that frozen dataclasses (every policy here) satisfy it

    @property
    def name(self) -> str: ...

    @property
    def confidence(self) -> str: ...

    @property
    def needs_probes(self) -> bool: ...

    @property
    def max_reasoning_tokens(self) -> int | None: ...

    @property
    def answer_from(self) -> str: ...

    def start(self) -> Tracker: ...

    def decide(self, probes: Sequence[Probe]) -> Decision: ...


class _PolicyBase:
    """decide() by running a fresh tracker: the tracker is the one implementation, so they agree."""

    needs_probes: bool = True
    max_reasoning_tokens: int | None = None
    answer_from: str = "stop"  # policies that probe have it as a knob (see ANSWER_FROM)

    def start(self) -> Tracker:  # pragma: no cover - overridden
        raise NotImplementedError

    def decide(self, probes: Sequence[Probe]) -> Decision:
        tracker = self.start()
        decision = CONTINUE
        for probe in probes:
            decision = tracker.update(probe)
        return decision


class _PositionGuard:
    def __init__(self) -> None:
        self.last_position = 0

    def check(self, probe: Probe) -> None:
        if probe.position < self.last_position:
            raise ValueError(
                f"position: {probe.position} goes backwards (previous probe was at {self.last_position})"
            )
        self.last_position = probe.position




ANSWER_FROM = ("stop", "best")


def best_probe(probes: Sequence[Probe]) -> Probe:
    """The probe with the highest confidence (the earliest of equals): where an ``answer_from="best"``
    policy cuts the reasoning back to before answering."""
    return max(probes, key=lambda p: p.confidence)
ANSWER_FROM_HELP = (
    'answer from the reasoning "stop"ped at, or cut back to the "best" probe (the highest confidence so far: '
    "the reference code's rollback); cost still counts up to the stop"
)


def _knob(help: str, sweep: str | None = None) -> dict[str, str]:
    """Field metadata of a policy knob: the CLI, the proxy and sweeps read the knobs from here.
    ``sweep``: the method's trade-off knob, with the range ``codestop sweep`` tries by default."""
    return {"help": help, "sweep": sweep} if sweep else {"help": help}


# --------------------------------------------------------------------------------------------
# CoDE-Stop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeStop(_PolicyBase):
    """CoDE-Stop (arXiv:2604.04930): stop when confident, or when confidence dynamics degenerate.

    At probe k (0-based) with confidences c_0..c_k at positions T_0..T_k:

    * ramping threshold r_k = min(r_max, r_min + (r_max - r_min) * k / ramp_steps); stop
      ``confident`` when c_k >= r_k;
    * degeneration D_k = sum_{i=1..k} w_i v_i, v_i = [2 c_i - c_{i-1} < delta],
      w_i = ln(T_k / T_i) + 1; stop ``degenerate`` when D_k >= tau.
      Updated in O(1): D_k = (ln T_k + 1) * sum(v_i) - sum(v_i ln T_i).

    ``variant="reference"`` reproduces the released reference code instead: strict comparisons
    (c_k > r_k, D_k > tau), the delta test on log-confidences (which holds for every falling pair),
    only falling pairs (c_{i-1} > c_i) count, and D = 0 while fewer than 3 probes exist.

    Defaults and why: r_min = 0.9 and ramp_steps = 2 are the reference code's tuned values (the
    seed's example r_min = 0, ramp_steps = 5 gives r_0 = 0 and stops at the first probe whatever
    the confidence); r_max = 0.95 and delta = 0.55 are the paper's; tau = 7.0 is the paper's setting
    for "Wait" boundaries on Qwen3-4B (7.1). Blank-line boundaries are more frequent, so tau should be
    calibrated per model and boundary (``codestop calibrate``); 7 is a conservative start.
    Confidence: geometric mean of the answer tokens (``span``, the reference quirk, for the
    reference variant).
    """

    tau: float = field(default=7.0, metadata=_knob("CoDE-Stop degeneration threshold", sweep="0.5:16:0.5"))
    delta: float = field(default=0.55, metadata=_knob("CoDE-Stop instability margin"))
    r_min: float = field(default=0.9, metadata=_knob("CoDE-Stop first confidence threshold"))
    r_max: float = field(default=0.95, metadata=_knob("CoDE-Stop final confidence threshold"))
    ramp_steps: int = field(default=2, metadata=_knob("CoDE-Stop probes to ramp r_min to r_max"))
    variant: Literal["paper", "reference"] = field(default="paper", metadata=_knob("CoDE-Stop variant: paper or reference"))
    confidence: str = field(default="", metadata=_knob("confidence function: mean, geometric, min, span"))
    answer_from: str = field(default="stop", metadata=_knob(ANSWER_FROM_HELP))
    name: str = field(default="codestop", init=False)

    def __post_init__(self) -> None:
        require(is_number(self.tau) and self.tau >= 0, "tau", self.tau, "must be a number >= 0")
        require(is_number(self.delta), "delta", self.delta, "must be a finite number")
        require(is_number(self.r_min) and 0 <= self.r_min <= 1, "r_min", self.r_min, "must be in [0, 1]")
        require(is_number(self.r_max) and 0 <= self.r_max <= 1, "r_max", self.r_max, "must be in [0, 1]")
        require(self.r_min <= self.r_max, "r_min", self.r_min, f"must not exceed r_max ({self.r_max})")
        require(
            isinstance(self.ramp_steps, int) and not isinstance(self.ramp_steps, bool) and self.ramp_steps >= 1,
            "ramp_steps", self.ramp_steps, "must be an integer >= 1",
        )
        require(self.variant in ("paper", "reference"), "variant", self.variant, "must be 'paper' or 'reference'")
        if not self.confidence:
            object.__setattr__(self, "confidence", "span" if self.variant == "reference" else "geometric")
        _check_confidence_name(self.confidence)
        require(self.answer_from in ANSWER_FROM, "answer_from", self.answer_from, "must be 'stop' or 'best'")

    def threshold(self, k: int) -> float:
        """r_k, the confidence needed to stop at probe k (0-based)."""
        return min(self.r_max, self.r_min + (self.r_max - self.r_min) * k / self.ramp_steps)

    def start(self) -> _CodeStopTracker:
        return _CodeStopTracker(self)


class _CodeStopTracker:
    __slots__ = ("policy", "guard", "k", "prev", "sum_v", "sum_v_log_t", "score")

    def __init__(self, policy: CodeStop) -> None:
        self.policy = policy
        self.guard = _PositionGuard()
        self.k = -1
        self.prev: float | None = None
        self.sum_v = 0
        self.sum_v_log_t = 0.0
        self.score = 0.0  # D_k after the last update

    def update(self, probe: Probe) -> Decision:
        p = self.policy
        self.guard.check(probe)
        self.k += 1
        c = probe.confidence
        log_t = math.log(probe.position)
        if self.prev is not None:
            if p.variant == "paper":
                unstable = 2 * c - self.prev < p.delta
            else:
                # only falling pairs count; in log space 2 ln c_i - ln c_{i-1} < delta then holds
                # whenever delta >= 0, so the log test only matters for a negative delta.
                unstable = self.prev > c and _log_delta_test(c, self.prev, p.delta)
            if unstable:
                self.sum_v += 1
                self.sum_v_log_t += log_t
        self.prev = c
        self.score = (log_t + 1) * self.sum_v - self.sum_v_log_t
        if p.variant == "reference" and self.k < 2:
            self.score = 0.0
        r_k = p.threshold(self.k)
        if p.variant == "paper":
            if c >= r_k:
                return Decision(True, "confident")
            if self.score >= p.tau:
                return Decision(True, "degenerate")
        else:
            if c > r_k:
                return Decision(True, "confident")
            if self.score > p.tau:
                return Decision(True, "degenerate")
        return CONTINUE


def _log_delta_test(c: float, prev: float, delta: float) -> bool:
    lc = math.log(c) if c > 0 else -math.inf
    lp = math.log(prev) if prev > 0 else -math.inf
    if lc == -math.inf:
        return True
    return 2 * lc - lp < delta


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deer(_PolicyBase):
    """DEER (arXiv:2504.15895): exit when the probe's confidence exceeds ``threshold``.

    Confidence: arithmetic mean of the answer-token probabilities (DEER's default).
    """

    threshold: float = field(
        default=0.95, metadata=_knob("DEER exit threshold", sweep="0.5,0.6,0.7,0.8,0.85,0.9,0.93,0.95,0.97,0.98,0.99,0.995,0.999")
    )
    confidence: str = field(default="mean", metadata=_knob("confidence function: mean, geometric, min, span"))
    answer_from: str = field(default="stop", metadata=_knob(ANSWER_FROM_HELP))
    name: str = field(default="deer", init=False)

    def __post_init__(self) -> None:
        require(is_number(self.threshold) and 0 <= self.threshold <= 1, "threshold", self.threshold, "must be in [0, 1]")
        _check_confidence_name(self.confidence)
        require(self.answer_from in ANSWER_FROM, "answer_from", self.answer_from, "must be 'stop' or 'best'")

    def start(self) -> _DeerTracker:
        return _DeerTracker(self)


class _DeerTracker:
    __slots__ = ("policy", "guard")

    def __init__(self, policy: Deer) -> None:
        self.policy = policy
        self.guard = _PositionGuard()

    def update(self, probe: Probe) -> Decision:
        self.guard.check(probe)
        if probe.confidence > self.policy.threshold:
            return Decision(True, "threshold")
        return CONTINUE


DEFAULT_HEDGES = ("wait", "hmm", "hold on", "let me check", "double-check", "not sure", "re-evaluate", "recheck", "actually")


@dataclass(frozen=True)
class Consistency(_PolicyBase):
    """Dynasor-CoT style: stop when the last ``window`` intermediate answers agree (non-empty, equal
    after whitespace normalisation) and none of those probes' texts hedges (contains one of ``hedges``,
    case-insensitive). Uses no probabilities; the confidence function only fills ``Probe.confidence``.
    """

    window: int = field(default=3, metadata=_knob("Consistency: agreeing answers needed", sweep="2:8:1"))
    hedges: tuple[str, ...] = DEFAULT_HEDGES
    confidence: str = field(default="mean", metadata=_knob("confidence function: mean, geometric, min, span"))
    answer_from: str = field(default="stop", metadata=_knob(ANSWER_FROM_HELP))
    name: str = field(default="consistency", init=False)

    def __post_init__(self) -> None:
        require(
            isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 1,
            "window", self.window, "must be an integer >= 1",
        )
        object.__setattr__(self, "hedges", tuple(h.lower() for h in self.hedges))
        _check_confidence_name(self.confidence)
        require(self.answer_from in ANSWER_FROM, "answer_from", self.answer_from, "must be 'stop' or 'best'")

    def start(self) -> _ConsistencyTracker:
        return _ConsistencyTracker(self)


_SPACES = re.compile(r"\s+")


def normalize_answer(answer: str) -> str:
    """Whitespace-insensitive form used to compare intermediate answers."""
    return _SPACES.sub("", answer)


class _ConsistencyTracker:
    __slots__ = ("policy", "guard", "recent")

    def __init__(self, policy: Consistency) -> None:
        self.policy = policy
        self.guard = _PositionGuard()
        self.recent: deque[tuple[str, bool]] = deque(maxlen=policy.window)

    def update(self, probe: Probe) -> Decision:
        self.guard.check(probe)
        text = (probe.text or "").lower()
        hedged = any(h in text for h in self.policy.hedges)
        self.recent.append((normalize_answer(probe.answer), hedged))
        if len(self.recent) == self.policy.window:
            first = self.recent[0][0]
            if first and all(a == first and not h for a, h in self.recent):
                return Decision(True, "consistent")
        return CONTINUE


@dataclass(frozen=True)
class TokenBudget(_PolicyBase):
    """Stop thinking after ``budget`` reasoning tokens. Spends no probes live; in replay it stops at the
    first probe at or past the budget."""

    budget: int = field(default=1024, metadata=_knob("TokenBudget: reasoning tokens", sweep="64:1024:64"))
    confidence: str = "geometric"
    name: str = field(default="budget", init=False)
    needs_probes: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        require(
            isinstance(self.budget, int) and not isinstance(self.budget, bool) and self.budget >= 1,
            "budget", self.budget, "must be an integer >= 1",
        )
        object.__setattr__(self, "max_reasoning_tokens", self.budget)

    def start(self) -> _BudgetTracker:
        return _BudgetTracker(self)


class _BudgetTracker:
    __slots__ = ("policy", "guard")

    def __init__(self, policy: TokenBudget) -> None:
        self.policy = policy
        self.guard = _PositionGuard()

    def update(self, probe: Probe) -> Decision:
        self.guard.check(probe)
        if probe.position >= self.policy.budget:
            return Decision(True, "budget")
        return CONTINUE


@dataclass(frozen=True)
class Vanilla(_PolicyBase):
    """Never stops early: the model thinks until it ends its thinking or hits max_reasoning_tokens."""

    confidence: str = "geometric"
    name: str = field(default="vanilla", init=False)
    needs_probes: bool = field(default=False, init=False)

    def start(self) -> _VanillaTracker:
        return _VanillaTracker()


class _VanillaTracker:
    __slots__ = ("guard",)

    def __init__(self) -> None:
        self.guard = _PositionGuard()

    def update(self, probe: Probe) -> Decision:
        self.guard.check(probe)
        return CONTINUE


def _check_confidence_name(name: str) -> None:
    from codestop.confidence import CONFIDENCE_FUNCTIONS

    require(isinstance(name, str) and name in CONFIDENCE_FUNCTIONS, "confidence", name, f"must be one of {', '.join(CONFIDENCE_FUNCTIONS)}")


METHODS = {"codestop": CodeStop, "deer": Deer, "consistency": Consistency, "budget": TokenBudget, "vanilla": Vanilla}

# Which knobs each method takes, by Python parameter name (CLI flags are these in kebab-case): the
# policy dataclasses' own fields marked with _knob, the one registry for the CLI, the proxy and sweeps.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    method: tuple(f.name for f in fields(cls) if "help" in f.metadata) for method, cls in METHODS.items()
}


def swept_knobs() -> dict[str, tuple[str, type, str]]:
    """Each method's trade-off knob: ``{method: (knob, its type, default sweep range)}``."""
    return {
        method: (f.name, type(f.default), f.metadata["sweep"])
        for method, cls in METHODS.items()
        for f in fields(cls)
        if "sweep" in f.metadata
    }


def knob_type(name: str) -> type:
    """The type a knob's values have (for parsing flags): its field default's, str for text."""
    for cls in METHODS.values():
        for f in fields(cls):
            if f.name == name and "help" in f.metadata:
                return type(f.default)
    raise ValueError(f"{name}: not a policy knob")


def knob_help() -> dict[str, str]:
    """Every knob of every method with its help text (a knob shared by methods, such as
    ``confidence``, appears once)."""
    out: dict[str, str] = {}
    for cls in METHODS.values():
        for f in fields(cls):
            if "help" in f.metadata:
                default = f" (default {f.default})" if f.default != "" and f.name != "confidence" else ""
                out.setdefault(f.name, f.metadata["help"] + default)
    return out


def make_policy(spec: str | Mapping[str, object] | None = None, /, *, base: Mapping[str, object] | None = None,
                **options: object) -> Policy:
    """The one way to build a policy: from a method name and its knobs (``make_policy("codestop",
    tau=7)``) or from a policy dict, as policy files, run configs, requests and candidate grids hold
    it (``make_policy({"method": "codestop", "tau": 7})``, ``make_policy(**d)``). Knobs that are None
    stay at their defaults.

    ``base``: a policy dict the given one adjusts (the proxy's default policy under a request's
    knobs): knobs given with no method, or with base's method, go over base's; another method starts
    from its own defaults. Without a method here or in ``base``: CoDE-Stop.

    An unknown method is a ParameterError naming ``method``; a knob the method does not take an
    :class:`~codestop.errors.UnknownParameter` naming the knob; a bad value the policy's own error."""
    given = {**(dict(spec) if isinstance(spec, Mapping) else {} if spec is None else {"method": spec}), **options}
    base_knobs = dict(base or {})
    base_method = base_knobs.pop("method", "codestop")
    method = given.pop("method", base_method)
    require(isinstance(method, str) and method in METHODS, "method", method, f"is not a method; choose one of {', '.join(METHODS)}")
    assert isinstance(method, str)
    knobs = {**(base_knobs if method == base_method else {}), **given}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    foreign = sorted(set(knobs) - set(METHOD_OPTIONS[method]))
    if foreign:
        raise UnknownParameter(foreign[0], knobs[foreign[0]],
                               f"is not an option of method {method!r} (its options: {', '.join(METHOD_OPTIONS[method]) or 'none'})")
    return METHODS[method](**knobs)  # type: ignore[arg-type]


def options_for(method: str, options: Mapping[str, object]) -> dict[str, object]:
    """The ``options`` that ``method`` takes (set, not None): options shared by a sweep or a grid
    go to the methods that have them."""
    return {k: v for k, v in options.items() if k in METHOD_OPTIONS.get(method, ()) and v is not None}


def policy_options(policy: object) -> dict[str, object]:
    """The method name and every knob of a policy as a JSON-ready dict, defaults written out (what
    :func:`make_policy` builds the same policy from, under later defaults too)."""
    method = getattr(policy, "name", type(policy).__name__)
    out: dict[str, object] = {"method": method}
    for key in METHOD_OPTIONS.get(method, ()):
        if hasattr(policy, key):
            out[key] = getattr(policy, key)
    return out
