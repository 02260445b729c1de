"""Learn-then-Test: choose a stopping setting whose risk is certified, with probability 1 - alpha.

The machinery behind :func:`codestop.analysis.calibrate.calibrate` (Angelopoulos, Bates, Candes,
Jordan, Lei, "Learn then Test", 2021), in four parts:

* :func:`candidate_grid`: the settings to choose from, several knobs and methods at once, each a
  policy dict naming the method and all its knobs (what :func:`codestop.policy_file.write_policy_file`
  takes);
* :func:`outcomes`: every candidate replayed once on every trace, kept as 0/1 and token matrices
  (the loss of each risk, the cost), so that choosing on any subset of the traces is array work;
* :func:`learn_then_test`: order the candidates from cautious to aggressive on one part of the
  traces (empirical risk, then cost, on that part; those that save nothing there are left out),
  then walk that order on the other part with exact
  binomial p-values, P(Binomial(n, max_risk) <= losses), certifying while p <= alpha and stopping at
  the first candidate that is not. Fixed-sequence testing controls the family-wise error, so every
  certified candidate has risk <= max_risk, together, with probability >= 1 - alpha over the draw of
  the traces; the most saving of them is chosen (vanilla, risk 0, when none is);
* :func:`min_certifiable_n`: the least number of testing traces that could certify a risk level
  even with no loss at all.

The two risks (``RISKS``): ``changed``, the answer at the stop differs from the full reasoning's
(label-free), and ``lost``, the full reasoning was right and the answer at the stop is wrong (needs
labels; gains never offset losses). A trace the policy never stops on has neither. Engine-free;
numpy and scipy are imported where used.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from codestop.analysis.sweep import KNOBS, first_unlabelled, run_policy
from codestop.errors import CodestopError
from codestop.policies import Probe, make_policy, options_for, policy_options
from codestop.policy_file import RISKS
from codestop.traces import Trace

if TYPE_CHECKING:
    import numpy as np

DEFAULT_METHODS = ("codestop", "deer", "consistency")
# the default grid: each method's swept knob over its sweep range, and CoDE-Stop's confidence ceiling
# (r_min x r_max, pairs with r_min > r_max dropped): on the testbed the ceiling, not tau, decided everything
GRID_RANGES: dict[str, str] = {"tau": "1:16:1", "r_min": "0.9,1", "r_max": "0.95,0.99,0.999,1"}
GRID_KNOBS: dict[str, tuple[str, ...]] = {method: (knob,) for method, (knob, _, _) in KNOBS.items()}
GRID_KNOBS["codestop"] = ("tau", "r_min", "r_max")


def candidate_label(policy: Mapping[str, Any]) -> str:
    """``codestop tau=4 r_min=0.9 r_max=0.99``: the method and its grid knobs."""
    method = str(policy["method"])
    knobs = " ".join(f"{k}={policy[k]:g}" if isinstance(policy[k], float) else f"{k}={policy[k]}"
                     for k in GRID_KNOBS.get(method, ()) if k in policy)
    return f"{method} {knobs}".strip()


def candidate_grid(
    methods: Sequence[str] = DEFAULT_METHODS,
    ranges: Mapping[str, Sequence[Any]] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every combination of each method's grid knobs (``ranges``, else :data:`GRID_RANGES` and the
    swept knobs' default ranges), with ``fixed`` options for the methods that take them: a list of
    full policy dicts, duplicates removed, in a stable order."""
    from codestop.analysis.sweep import parse_range

    ranges = dict(ranges or {})
    fixed = dict(fixed or {})
    unknown = [m for m in methods if m not in GRID_KNOBS]
    if unknown:
        raise CodestopError(f"method: {unknown[0]!r} has no knob to calibrate; choose from {', '.join(GRID_KNOBS)}")
    unused = sorted(set(ranges) - {k for m in methods for k in GRID_KNOBS[m]})
    if unused:
        raise CodestopError(f"{unused[0]}: a range for a knob none of the methods ({', '.join(methods)}) has")
    out: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for method in methods:
        knobs = GRID_KNOBS[method]
        values = []
        for knob in knobs:
            if knob in ranges:
                values.append(list(ranges[knob]))
            else:
                kind = KNOBS[method][1] if knob == KNOBS[method][0] else float
                values.append(parse_range(GRID_RANGES.get(knob) or KNOBS[method][2], kind, knob))
        extra = {k: v for k, v in options_for(method, fixed).items() if k not in knobs}
        for combo in itertools.product(*values):
            given = dict(zip(knobs, combo))
            if method == "codestop" and given["r_min"] > given["r_max"]:
                continue
            policy = policy_options(make_policy({"method": method, **given, **extra}))
            key = tuple(sorted(policy.items()))
            if key not in seen:
                seen.add(key)
                out.append(policy)
    if not out:
        raise CodestopError("candidates: the grid is empty (every r_min above every r_max?)")
    return out


@dataclass(frozen=True)
class Outcomes:
    """Each candidate's outcome on each trace (rows: candidates, columns: traces), computed once.

    ``changed``: the answer at the stop differs from the trace's reference (None when a trace has no
    reference answer); ``lost`` / ``gained``: the full reasoning right and the answer at the stop wrong,
    and the reverse (None on unlabelled traces); ``cost`` / ``reasoning``: cost and reasoning tokens;
    ``vanilla_cost`` / ``vanilla_correct``: running without stopping."""

    candidates: list[dict[str, Any]]
    ids: list[str]
    changed: np.ndarray | None
    lost: np.ndarray | None
    gained: np.ndarray | None
    cost: np.ndarray
    reasoning: np.ndarray
    vanilla_cost: np.ndarray
    vanilla_correct: np.ndarray | None
    no_reference: str | None  # the id of a trace without a reference answer, if any

    def loss(self, risk: str) -> np.ndarray:
        """The 0/1 loss matrix of ``risk``; a clear error when the traces cannot give it."""
        if risk == "changed":
            if self.changed is None:
                raise CodestopError(
                    f"traces: risk 'changed' compares the answer at the stop with the full reasoning's, and trace "
                    f"{self.no_reference!r} has neither a final answer nor a reference probe")
            return self.changed
        if risk == "lost":
            if self.lost is None:
                raise CodestopError("traces: risk 'lost' needs labelled traces (every probe's and the final answer's "
                                    "'correct'); unlabelled traces (e.g. the proxy's shadow traces) can use --risk changed")
            return self.lost
        raise CodestopError(f"risk: {risk!r} must be one of {', '.join(RISKS)}")


def outcomes(traces: Sequence[Trace], candidates: Sequence[Mapping[str, Any]]) -> Outcomes:
    """Replay every candidate on every trace once (see :class:`Outcomes`)."""
    import numpy as np

    if not traces:
        raise CodestopError("traces: no traces to calibrate on")
    labelled = first_unlabelled(traces) is None
    cache: dict[str, list[list[Probe]]] = {}
    vanilla = run_policy(traces, make_policy("vanilla"), cache)
    n_c, n_t = len(candidates), len(traces)
    changed = np.zeros((n_c, n_t), dtype=bool)
    lost = np.zeros((n_c, n_t), dtype=bool)
    gained = np.zeros((n_c, n_t), dtype=bool)
    cost = np.zeros((n_c, n_t))
    reasoning = np.zeros((n_c, n_t))
    no_reference = next((t.id for t in traces if t.reference_answer is None), None)
    for i, cand in enumerate(candidates):
        rows = run_policy(traces, make_policy(cand), cache)
        for j, (r, v) in enumerate(zip(rows, vanilla)):
            stopped = r.stop_index is not None
            changed[i, j] = stopped and bool(r.changed)
            if labelled:
                lost[i, j] = stopped and bool(v.correct) and not r.correct
                gained[i, j] = stopped and not v.correct and bool(r.correct)
            cost[i, j] = r.cost_tokens
            reasoning[i, j] = r.reasoning_tokens
    return Outcomes(
        candidates=[dict(c) for c in candidates], ids=[t.id for t in traces],
        changed=None if no_reference is not None else changed,
        lost=lost if labelled else None, gained=gained if labelled else None,
        cost=cost, reasoning=reasoning,
        vanilla_cost=np.array([v.cost_tokens for v in vanilla], dtype=float),
        vanilla_correct=np.array([bool(v.correct) for v in vanilla]) if labelled else None,
        no_reference=no_reference,
    )


def min_certifiable_n(max_risk: float, alpha: float) -> int:
    """The least number of testing traces n that can certify ``max_risk`` at ``alpha`` at all: with no
    loss the p-value is (1 - max_risk)^n, so the smallest n with (1 - max_risk)^n <= alpha."""
    n = max(1, math.ceil(math.log(alpha) / math.log1p(-max_risk)))
    while n > 1 and (1 - max_risk) ** (n - 1) <= alpha:  # floating point: the least such n
        n -= 1
    while (1 - max_risk) ** n > alpha:
        n += 1
    return n


@dataclass(frozen=True)
class LttResult:
    """One Learn-then-Test run: ``order`` (the candidate indices tested, cautious first) and
    ``skipped`` (those that saved nothing on the ordering part, never tested); per candidate (indexed
    like the candidates) its ordering-part risk, testing-part losses and p-value; ``n_tested`` (how
    far the walk went: the certified ones and the first failure), ``n_certified`` (the first
    ``n_certified`` of ``order``), and ``chosen`` (a candidate index; None: vanilla)."""

    order: list[int]
    skipped: list[int]
    ordering_risk: np.ndarray
    testing_losses: np.ndarray
    p_values: np.ndarray
    n_tested: int
    n_certified: int
    chosen: int | None


def learn_then_test(
    loss: np.ndarray, cost: np.ndarray, vanilla_cost: np.ndarray, ordering: np.ndarray, testing: np.ndarray,
    *, max_risk: float, alpha: float,
) -> LttResult:
    """Learn-then-Test on the columns ``ordering`` and ``testing`` (index arrays, disjoint draws) of
    the ``loss`` and ``cost`` matrices. On the ordering part: drop the candidates that cost at least
    what vanilla costs there (they could only end the walk early), and order the rest cautious
    first (the lowest risk, then the highest cost). On the testing part: fixed-sequence binomial
    tests in that order. Chosen: the certified candidate with the lowest mean cost on both parts
    together (the earliest in the order among equals), provided it costs less than vanilla there;
    else None (vanilla). Which candidates are tested, and in which order, depends on the ordering
    part alone: that is what keeps the family-wise error at alpha."""
    import numpy as np
    from scipy.stats import binom

    ordering_risk = loss[:, ordering].mean(axis=1)
    ordering_cost = cost[:, ordering].mean(axis=1)
    saves = ordering_cost < vanilla_cost[ordering].mean()
    ranked = [int(i) for i in np.lexsort((-ordering_cost, ordering_risk))]
    order = [i for i in ranked if saves[i]]
    skipped = [i for i in ranked if not saves[i]]
    losses = loss[:, testing].sum(axis=1)
    p_values = binom.cdf(losses, len(testing), max_risk)
    passed = p_values[order] <= alpha
    n_certified = len(order) if passed.all() else int(np.argmin(passed))
    n_tested = min(n_certified + 1, len(order))
    chosen = None
    if n_certified:
        both = np.concatenate([ordering, testing])
        certified = order[:n_certified]
        mean_cost = cost[certified][:, both].mean(axis=1)
        best = int(np.argmin(mean_cost))  # argmin: the first, i.e. the most cautious, among equals
        if mean_cost[best] < vanilla_cost[both].mean():
            chosen = certified[best]
    return LttResult(order, skipped, ordering_risk, losses, p_values, n_tested, n_certified, chosen)


def split(n: int, ordering_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into the ordering part (``ordering_fraction`` of it,
    at least one) and the testing part (the rest, at least one)."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    n_order = min(n - 1, max(1, round(n * ordering_fraction)))
    return np.sort(perm[:n_order]), np.sort(perm[n_order:])
