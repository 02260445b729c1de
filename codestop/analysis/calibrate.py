"""``codestop calibrate``: the knob value that stops earliest within an accuracy-drop limit, with a bound.

Calibration picks the knob value with the fewest mean reasoning tokens whose accuracy drop against
vanilla on a calibration split stays within ``max_accuracy_drop``, then measures the chosen value
on the held-out rest, the only honest estimate, with a one-sided 95% upper bound on the drop (see
:func:`codestop.analysis.statistics.drop_bounds`) and paired bootstrap intervals of the accuracy
and cost changes (see :func:`codestop.analysis.statistics.paired_bootstrap`).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from codestop.analysis.statistics import BOOTSTRAP_RESAMPLES, drop_bounds, paired_bootstrap, paired_counts
from codestop.analysis.sweep import KNOBS, fixed_policy, mean_of, parse_range, run_policy, saving
from codestop.errors import CodestopError
from codestop.policies import Probe, make_policy
from codestop.replay import Replayed
from codestop.traces import Trace


def compare_to_vanilla(rows: Sequence[Replayed], vanilla_rows: Sequence[Replayed], *, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap intervals of the policy minus vanilla on the same traces: accuracy (a
    fraction) and mean cost tokens (replayed: reasoning + probe tokens)."""
    return {
        "accuracy_change": paired_bootstrap([float(r.correct) for r in rows], [float(v.correct) for v in vanilla_rows], seed=seed),
        "cost_change": paired_bootstrap([float(r.cost_tokens) for r in rows], [float(v.cost_tokens) for v in vanilla_rows], seed=seed),
    }


def _interval(d: dict[str, Any], scale: float, unit: str) -> str:
    if d["low"] is None:
        return f"{d['estimate'] * scale:+.1f}{unit}"
    return f"{d['estimate'] * scale:+.1f}{unit} [{d['low'] * scale:+.1f}, {d['high'] * scale:+.1f}]"


def calibrate(
    traces: Sequence[Trace],
    max_accuracy_drop: float,
    *,
    method: str = "codestop",
    values: Sequence[Any] | None = None,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    calibration_ids: Collection[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Choose ``method``'s knob on a calibration split and measure it on the held-out rest.

    The split is a seeded shuffle cut at ``calibration_fraction``, or, with ``calibration_ids``, the
    traces with those ids (to calibrate a second recording of the same questions on the same split)."""
    if not (0 <= max_accuracy_drop < 1):
        raise CodestopError(f"max_accuracy_drop: {max_accuracy_drop!r} must be a fraction in [0, 1), e.g. 0.01 for one point")
    if not (0 < calibration_fraction <= 1):
        raise CodestopError(f"calibration_fraction: {calibration_fraction!r} must be in (0, 1]")
    if method not in KNOBS:
        raise CodestopError(f"method: {method!r} has no knob to calibrate; choose from {', '.join(KNOBS)}")
    knob, kind, default = KNOBS[method]
    values = list(values) if values is not None else parse_range(default, kind, knob)
    if len(traces) < 2:
        raise CodestopError("traces: calibration needs at least 2 traces")
    order = list(traces)
    if calibration_ids is None:
        random.Random(seed).shuffle(order)
        n_cal = max(1, round(len(order) * calibration_fraction))
        cal, held = order[:n_cal], order[n_cal:]
    else:
        wanted = set(calibration_ids)
        cal, held = [t for t in order if t.id in wanted], [t for t in order if t.id not in wanted]
        if not cal:
            raise CodestopError("calibration_ids: none of these ids is among the traces")
    # every size below is len() of these two lists: what the report says is what was used
    sizes = f"{len(cal)} calibration and {len(held)} held-out traces of {len(order)} " + (
        f"(seed {seed})" if calibration_ids is None else "(the given calibration ids)")

    cache: dict[str, list[list[Probe]]] = {}
    vanilla_cal = run_policy(cal, make_policy("vanilla"), cache)
    _, _, v_cost = mean_of(vanilla_cal)
    candidates = []
    for value in values:
        rows = run_policy(cal, fixed_policy(method, value, **options), cache)
        lost, gained = paired_counts(rows, vanilla_cal)
        _, tokens, cost = mean_of(rows)
        candidates.append({"value": value, "drop": (lost - gained) / len(cal), "mean_reasoning_tokens": tokens,
                           "mean_cost_tokens": cost, "saving": saving(cost, v_cost)})
    ok = [c for c in candidates if c["drop"] <= max_accuracy_drop + 1e-12]
    # the fewest reasoning tokens; among equals, the smaller drop
    chosen = min(ok, key=lambda c: (c["mean_reasoning_tokens"], c["drop"])) if ok else None

    out: dict[str, Any] = {
        "method": method,
        "knob": knob,
        "max_accuracy_drop": max_accuracy_drop,
        "n_calibration": len(cal),
        "n_held_out": len(held),
        "seed": seed,
        "calibration_ids": [t.id for t in cal],
        "held_out_ids": [t.id for t in held],
        "chosen": chosen["value"] if chosen else None,
        "calibration": chosen,
        "candidates": candidates,
    }
    if chosen is None:
        out["statement"] = (
            f"Split: {sizes}. No {knob} in the range keeps the drop on the {len(cal)} calibration traces within "
            f"{max_accuracy_drop * 100:.1f} points: run without stopping (vanilla), or allow a larger drop."
        )
        return out
    if held:
        policy = fixed_policy(method, chosen["value"], **options)
        rows = run_policy(held, policy)
        vanilla_held = run_policy(held, make_policy("vanilla"))
        lost, gained = paired_counts(rows, vanilla_held)
        bounds = drop_bounds(lost, gained, len(held))
        acc, mt, cost = mean_of(rows)
        v_acc, vt, v_cost = mean_of(vanilla_held)
        out["held_out"] = {
            "n": len(held),
            "accuracy": acc,
            "vanilla_accuracy": v_acc,
            "accuracy_drop": bounds["drop"],
            "lost": lost,
            "gained": gained,
            "drop_upper_95_exact": bounds["exact"],
            "drop_upper_95_normal": bounds["normal"],
            "mean_reasoning_tokens": mt,
            "vanilla_mean_reasoning_tokens": vt,
            "mean_cost_tokens": cost,
            "vanilla_mean_cost_tokens": v_cost,
            "saving": saving(cost, v_cost),
            # two-sided 95% paired bootstrap intervals, policy minus vanilla
            "paired_bootstrap": compare_to_vanilla(rows, vanilla_held, seed=seed),
        }
        h = out["held_out"]
        boot = h["paired_bootstrap"]
        certified = "which certifies" if h["drop_upper_95_exact"] <= max_accuracy_drop else "which does NOT certify"
        out["statement"] = (
            f"Split: {sizes}. "
            f"{knob}={chosen['value']} was chosen on the {len(cal)} calibration traces (drop {chosen['drop'] * 100:+.1f} pts, "
            f"saving {chosen['saving'] * 100:.1f}% of vanilla's cost tokens). On the {len(held)} held-out traces, not used to choose it: "
            f"drop {h['accuracy_drop'] * 100:+.1f} pts ({lost} lost, {gained} gained), saving {h['saving'] * 100:.1f}%. "
            f"With 95% confidence the drop on new questions like these is at most {h['drop_upper_95_exact'] * 100:.1f} pts "
            f"(exact one-sided Clopper-Pearson bound on the lost-question rate, gains not credited; "
            f"normal approximation of the paired difference: {h['drop_upper_95_normal'] * 100:.1f} pts), {certified} "
            f"the {max_accuracy_drop * 100:.1f}-point target. Paired bootstrap, policy minus vanilla on the held-out "
            f"traces (95%, {boot['accuracy_change']['method']}, {BOOTSTRAP_RESAMPLES} resamples, seed {seed}): accuracy "
            f"{_interval(boot['accuracy_change'], 100, ' pts')}, mean cost {_interval(boot['cost_change'], 1, ' tokens')}. "
            "This holds only for questions exchangeable with these traces, "
            "with the same model, sampling, boundaries and token cap; the calibration-split figures are optimistic "
            "(the value was picked on them)."
        )
    else:
        out["statement"] = (
            f"Split: {sizes}. {knob}={chosen['value']} was chosen on all {len(cal)} traces: no held-out traces remain, so there is no "
            "honest estimate of its drop on new questions (use --calibration-fraction below 1)."
        )
    return out
