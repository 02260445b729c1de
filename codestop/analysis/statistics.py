"""The statistics behind calibration and the reports, from scipy, not from code of our own.

* :func:`clopper_pearson_upper`: the exact one-sided upper bound on a binomial rate;
* :func:`paired_counts` and :func:`drop_bounds`: the accuracy drop of a policy against vanilla on
  the same questions, with an exact and a normal-approximation upper bound;
* :func:`paired_bootstrap`: a paired bootstrap interval of a mean difference (questions resampled);
* :func:`saving_interval`: the same for a saving, 1 - mean cost / vanilla's mean cost.

The binomial p-values of risk-controlled calibration are in :mod:`codestop.analysis.risk`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol


class Graded(Protocol):
    """Anything with a verdict, e.g. a replayed trace (:class:`codestop.replay.Replayed`)."""

    @property
    def correct(self) -> bool | None: ...


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact (Clopper-Pearson) one-sided upper confidence bound on a binomial rate after ``k``
    events in ``n`` trials, from scipy's exact binomial test (1.0 with no trials or all events)."""
    from scipy.stats import binomtest

    if n == 0 or k >= n:
        return 1.0
    return float(binomtest(k, n, alternative="less").proportion_ci(confidence_level=confidence, method="exact").high)


def paired_counts(policy_rows: Sequence[Graded], vanilla_rows: Sequence[Graded]) -> tuple[int, int]:
    """(lost, gained): questions vanilla gets right and the policy wrong, and the reverse."""
    lost = sum(bool(v.correct) and not r.correct for r, v in zip(policy_rows, vanilla_rows))
    gained = sum(bool(r.correct) and not v.correct for r, v in zip(policy_rows, vanilla_rows))
    return lost, gained


def drop_bounds(lost: int, gained: int, n: int, confidence: float = 0.95) -> dict[str, float]:
    """The accuracy drop (lost - gained) / n and two one-sided upper bounds on it:

    * ``exact``: the Clopper-Pearson upper bound on the rate of lost questions. The drop can never
      exceed that rate, so this bound holds whatever the gains (conservative, no approximation);
    * ``normal``: mean + z * sd / sqrt(n) of the paired differences (tighter, approximate).
    """
    from scipy.stats import norm

    if n == 0:
        return {"drop": 0.0, "exact": 1.0, "normal": 1.0}
    d = (lost - gained) / n
    var = (lost + gained) / n - d * d
    z = float(norm.ppf(confidence))
    return {"drop": d, "exact": clopper_pearson_upper(lost, n, confidence), "normal": d + z * math.sqrt(max(var, 0.0) / n)}


BOOTSTRAP_RESAMPLES = 9999


def paired_bootstrap(
    ours: Sequence[float], theirs: Sequence[float], *, confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> dict[str, Any]:
    """mean(ours) - mean(theirs) over paired observations (the same questions), with a two-sided
    bootstrap interval from ``scipy.stats.bootstrap`` resampling questions, not answers
    (``paired=True``), under a fixed seed so a report is reproducible. BCa, the percentile
    interval where BCa is undefined (nearly all differences equal); a point when all are equal."""
    import numpy as np

    a = np.asarray(ours, dtype=float)
    b = np.asarray(theirs, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: {a.shape} and {b.shape} are not one pair per question")
    n = int(a.size)
    diff = a - b
    out: dict[str, Any] = {"estimate": float(diff.mean()) if n else 0.0, "low": None, "high": None,
                           "n": n, "confidence": confidence, "n_resamples": n_resamples, "seed": seed, "method": None}
    if n == 0:
        return out
    if np.all(diff == diff[0]):  # nothing varies: every resample gives the same difference
        out.update(low=float(diff[0]), high=float(diff[0]), method="degenerate")
        return out

    def statistic(x: Any, y: Any, axis: int = -1) -> Any:
        # the mean of the differences, not the difference of the means: on 0/1 or integer data it is exact, so a
        # resample equal to the estimate compares equal, and BCa's bias correction sees the ties (with
        # mean(x) - mean(y), rounding split them, e.g. 2 lost of 50 gave [-16, -2] pts instead of [-14, 0])
        return np.mean(x - y, axis=axis)

    return _bootstrap_interval((a, b), statistic, out, confidence=confidence, n_resamples=n_resamples, seed=seed)


def _bootstrap_interval(data: tuple[Any, ...], statistic: Any, out: dict[str, Any], *, confidence: float,
                        n_resamples: int, seed: int) -> dict[str, Any]:
    """``out`` with the paired bootstrap interval of ``statistic`` (BCa, else percentile) filled in."""
    import inspect
    import warnings

    import numpy as np
    from scipy.stats import bootstrap

    # scipy >= 1.15 names the generator ``rng``; older releases ``random_state``
    seed_arg = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's degenerate-data warning: the percentile interval follows
            res = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=confidence, method=method, **{seed_arg: np.random.default_rng(seed)})
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            out.update(low=lo, high=hi, method=method)
            break
    return out


def saving_interval(
    costs: Iterable[float], vanilla_costs: Iterable[float], *, confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> dict[str, Any]:
    """The saving 1 - mean(costs) / mean(vanilla_costs) over the same questions, with a two-sided paired
    bootstrap interval (questions resampled; BCa, else percentile; a point when every question saves
    the same share)."""
    import numpy as np

    c = np.asarray(list(costs), dtype=float)
    v = np.asarray(list(vanilla_costs), dtype=float)
    if c.shape != v.shape or c.ndim != 1:
        raise ValueError(f"saving_interval: {c.shape} and {v.shape} are not one pair per question")
    n = int(c.size)
    estimate = float(1 - c.sum() / v.sum()) if n and v.sum() else 0.0
    out: dict[str, Any] = {"estimate": estimate, "low": None, "high": None, "n": n, "confidence": confidence,
                           "n_resamples": n_resamples, "seed": seed, "method": None}
    if n == 0 or not v.sum():
        return out
    if np.allclose(c, v * (1 - estimate)):  # the same share saved on every question: every resample agrees
        out.update(low=estimate, high=estimate, method="degenerate")
        return out

    def statistic(x: Any, y: Any, axis: int = -1) -> Any:
        return 1 - np.sum(x, axis=axis) / np.sum(y, axis=axis)

    return _bootstrap_interval((c, v), statistic, out, confidence=confidence, n_resamples=n_resamples, seed=seed)
