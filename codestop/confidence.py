"""Confidence of an intermediate answer, from the log-probabilities of its tokens.

Every function takes the natural-log probabilities of the *answer tokens* of one probe: the tokens
the model wrote inside ``\\boxed{...}`` (the probe prompt ends with ``\\boxed{``; the token that
closes the box is not an answer token). Each returns a probability in [0, 1]. Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

ConfidenceFn = Callable[[Sequence[float]], float]


def _check(logprobs: Sequence[float]) -> None:
    for lp in logprobs:
        if not (lp <= 0.0) or math.isnan(lp):
            raise ValueError(f"logprobs: {lp!r} is not a log-probability (must be <= 0)")


def arithmetic_mean(logprobs: Sequence[float]) -> float:
    """Mean of the token probabilities (DEER's default)."""
    _check(logprobs)
    if not logprobs:
        return 0.0
    return sum(math.exp(lp) for lp in logprobs) / len(logprobs)


def geometric_mean(logprobs: Sequence[float]) -> float:
    """exp(mean log-probability): the per-token probability of the whole answer."""
    _check(logprobs)
    if not logprobs:
        return 0.0
    return math.exp(sum(logprobs) / len(logprobs))


def minimum(logprobs: Sequence[float]) -> float:
    """Probability of the least certain answer token."""
    _check(logprobs)
    if not logprobs:
        return 0.0
    return math.exp(min(logprobs))


def span(logprobs: Sequence[float]) -> float:
    """The reference code's confidence, quirk included.

    The reference decodes ``{ a_1 .. a_m }`` after ``\\boxed``, sums the log-probabilities of
    a_1..a_m (all generated tokens but the first and the last) and divides by n - 1 = m + 1,
    the number of generated tokens minus one, not by m. Over the answer tokens that is
    exp(sum / (m + 1)): a little lower than the geometric mean, most for short answers.
    """
    _check(logprobs)
    if not logprobs:
        return 0.0
    return math.exp(sum(logprobs) / (len(logprobs) + 1))


CONFIDENCE_FUNCTIONS: dict[str, ConfidenceFn] = {
    "mean": arithmetic_mean,
    "geometric": geometric_mean,
    "min": minimum,
    "span": span,
}


def confidence_function(name: str) -> ConfidenceFn:
    """The confidence function called ``name`` (one of mean, geometric, min, span)."""
    try:
        return CONFIDENCE_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"confidence: unknown function {name!r}; choose one of {', '.join(CONFIDENCE_FUNCTIONS)}"
        ) from None


def score_probe(logprobs: Sequence[float], name: str) -> float:
    """A probe's confidence: the named function over its answer-token log-probabilities, each
    clamped to <= 0 (engines round) and the result to [0, 1]. Live generation and replay both
    score probes with this, so a confidence means the same thing in both."""
    value = confidence_function(name)(tuple(min(0.0, lp) for lp in logprobs))
    return min(1.0, max(0.0, value))
