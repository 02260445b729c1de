"""The watch: an anytime-valid test that a served stopping setting's risk stays within its stated level.

A certified setting (``codestop calibrate``) promises ``P(changed) <= max_risk`` on traffic like the
calibration traffic. Audits (a sample of served requests continued to their natural end) give a stream
of 0/1 outcomes, ``changed`` or not; :class:`RiskWatch` tests H0: P(changed) <= max_risk on that stream
by betting (Waudby-Smith and Ramdas, "Estimating means of bounded random variables by betting", JRSS-B
2023; Timans et al., "On continuous monitoring of risk violations under unknown shift", UAI 2025).

The bettor starts with wealth 1 and before each audit stakes a fraction ``lam`` in [0, MAX_BET / max_risk]
on "changed": wealth *= 1 + lam * (x - max_risk). ``lam`` is chosen from the audits before this one only
(predictable): the Kelly bet for a Bernoulli mean, (p - m) / (m (1 - m)), at a smoothed estimate p of the
recent changed share (discounted: a memory of about 100 audits, so the bet follows a shift), clipped at 0
(never bet that the risk is low) and at MAX_BET / m (a single unchanged audit then costs at most half the
wealth, so the wealth stays positive). While every audit's conditional chance of ``changed`` is at most
max_risk, in any order and under any drift, each factor has mean at most 1, so the wealth is a
nonnegative supermartingale and by Ville's inequality it ever reaches 1/alpha with probability at most
alpha: the alarm is a false alarm with probability at most alpha for ever.

:meth:`RiskWatch.interval` is a confidence sequence for the changed share: Robbins' beta-binomial
mixture (Jeffreys prior), closed form in (audits, changed), covering a constant share at every audit at
once with probability at least 1 - alpha. The state is six numbers (the counts, the log wealth, the
alarm, and the discounted counts the bet is made from), JSON-ready, so a restart resumes exactly.
Pure Python, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from codestop.errors import ParameterError, is_integer, is_number

# the largest stake, as a fraction of 1 / max_risk: an unchanged audit then costs at most half the wealth
MAX_BET = 0.5
# the smoothed estimate of the changed share starts at max_risk as one pseudo-audit: no bet before evidence
PRIOR_AUDITS = 1.0
# the estimate weighs an audit k audits ago by MEMORY^k (a memory of about 100 audits), so that after a shift
# the bet follows the new share instead of the long average before it (on the testbed's GSM8K -> MATH-500
# shift at audit fraction 0.2 this halves the detection delay; stationary power is unchanged)
MEMORY = 0.99
# the confidence sequence's Beta prior (Jeffreys)
PRIOR_A = PRIOR_B = 0.5


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float strictly between 0 and 1, else one ParameterError naming ``name``."""
    if not is_number(value) or not 0 < float(value) < 1:  # type: ignore[arg-type]
        raise ParameterError(name, value, "must be a number strictly between 0 and 1")
    return float(value)  # type: ignore[arg-type]


@dataclass
class RiskWatch:
    """Anytime-valid test of H0: P(changed) <= max_risk on a stream of audit outcomes (testing by betting).

    ``update(changed)`` feeds one audit; the alarm is raised the first time the wealth (``e_value``)
    reaches ``1 / alpha`` and stays raised (``alarmed_at``: the audit count then)."""

    max_risk: float
    alpha: float
    n: int = 0  # audits seen
    changed: int = 0  # audits whose answer changed
    log_wealth: float = 0.0  # log e-value
    alarmed_at: int | None = None  # n at the first crossing of 1/alpha (sticky)
    recent_changed: float = 0.0  # betting state: the changed audits, each weighed MEMORY^(its age)
    recent_audits: float = 0.0  # and the audits, weighed alike

    def __post_init__(self) -> None:
        self.max_risk = check_fraction("max_risk", self.max_risk)
        self.alpha = check_fraction("alpha", self.alpha)
        if not is_integer(self.n) or self.n < 0:
            raise ParameterError("n", self.n, "must be a whole number of audits, at least 0")
        if not is_integer(self.changed) or not 0 <= self.changed <= self.n:
            raise ParameterError("changed", self.changed, f"must be a whole number between 0 and n ({self.n})")
        if not is_number(self.log_wealth):
            raise ParameterError("log_wealth", self.log_wealth, "must be a finite number")
        self.log_wealth = float(self.log_wealth)
        for name in ("recent_changed", "recent_audits"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ParameterError(name, value, "must be a finite number, at least 0")
            setattr(self, name, float(value))
        if self.recent_changed > self.recent_audits:
            raise ParameterError("recent_changed", self.recent_changed, f"must be at most recent_audits ({self.recent_audits})")
        if self.alarmed_at is not None and (not is_integer(self.alarmed_at) or not 1 <= self.alarmed_at <= self.n):
            raise ParameterError("alarmed_at", self.alarmed_at, f"must be null or an audit count between 1 and n ({self.n})")

    @property
    def threshold(self) -> float:
        """The wealth that raises the alarm: 1 / alpha."""
        return 1.0 / self.alpha

    def bet(self) -> float:
        """The stake on "changed" for the next audit, from the audits so far only (predictable): Kelly's
        fraction at the smoothed recent changed share, clipped to [0, MAX_BET / max_risk]."""
        m = self.max_risk
        p = (self.recent_changed + PRIOR_AUDITS * m) / (self.recent_audits + PRIOR_AUDITS)
        return min(max((p - m) / (m * (1 - m)), 0.0), MAX_BET / m)

    def update(self, changed: bool) -> bool:
        """Feed one audit outcome; True when this audit raised the alarm (the first crossing only)."""
        lam = self.bet()
        self.log_wealth += math.log1p(lam * ((1.0 if changed else 0.0) - self.max_risk))
        self.n += 1
        self.changed += bool(changed)
        self.recent_changed = MEMORY * self.recent_changed + bool(changed)
        self.recent_audits = MEMORY * self.recent_audits + 1.0
        if self.alarmed_at is None and self.log_wealth >= math.log(self.threshold):
            self.alarmed_at = self.n
            return True
        return False

    @property
    def alarm(self) -> bool:
        return self.alarmed_at is not None

    @property
    def e_value(self) -> float:
        """The wealth: evidence against risk <= max_risk (1 at the start; the alarm at 1 / alpha)."""
        return math.exp(min(self.log_wealth, 709.0))

    @property
    def changed_share(self) -> float | None:
        """The audited changed share; None before any audit."""
        return self.changed / self.n if self.n else None

    def interval(self) -> tuple[float, float]:
        """An anytime-valid confidence sequence for P(changed) at level alpha: the shares p at which the
        beta-binomial mixture's likelihood ratio against p is below 1 / alpha ((0, 1) before any audit)."""
        return confidence_interval(self.changed, self.n, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return {"max_risk": self.max_risk, "alpha": self.alpha, "n": self.n, "changed": self.changed,
                "log_wealth": self.log_wealth, "alarmed_at": self.alarmed_at,
                "recent_changed": self.recent_changed, "recent_audits": self.recent_audits}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RiskWatch:
        if not isinstance(d, Mapping):
            raise ParameterError("watch", d, "must be an object")
        for key in ("max_risk", "alpha"):
            if key not in d:
                raise ParameterError(f"watch.{key}", None, "is missing")
        try:
            return cls(d["max_risk"], d["alpha"], d.get("n", 0), d.get("changed", 0), d.get("log_wealth", 0.0),
                       d.get("alarmed_at"), d.get("recent_changed", 0.0), d.get("recent_audits", 0.0))
        except ParameterError as err:
            raise err.under("watch.") from None


def _log_mixture(changed: int, n: int, p: float) -> float:
    """log of the beta-binomial mixture's likelihood ratio against a constant share ``p``."""
    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    mixed = log_beta(PRIOR_A + changed, PRIOR_B + n - changed) - log_beta(PRIOR_A, PRIOR_B)
    return mixed - (changed * math.log(p) if changed else 0.0) - ((n - changed) * math.log1p(-p) if n > changed else 0.0)


def confidence_interval(changed: int, n: int, alpha: float) -> tuple[float, float]:
    """{p : mixture ratio against p < 1 / alpha} for ``changed`` of ``n``: an interval (the log ratio is
    convex in p), found by bisection on each side of the observed share."""
    if n == 0:
        return (0.0, 1.0)
    level = math.log(1.0 / alpha)
    share = changed / n
    inside = min(max(share, 1e-12), 1 - 1e-12)

    def edge(outside: float) -> float:
        # the boundary between ``inside`` (ratio below the level there: its log is the smallest) and ``outside``
        if _log_mixture(changed, n, outside) < level:
            return outside
        a, b = inside, outside
        for _ in range(60):
            mid = (a + b) / 2
            if _log_mixture(changed, n, mid) < level:
                a = mid
            else:
                b = mid
        return a

    return (0.0 if changed == 0 else edge(1e-15), 1.0 if changed == n else edge(1 - 1e-15))
