"""``codestop calibrate``: the most saving stopping setting whose risk is certified, or a refusal.

:func:`calibrate` states a risk level ``max_risk`` and an error level ``alpha`` and returns the
setting (a method and all its knobs) that saves the most cost tokens among those Learn-then-Test
certifies (:mod:`codestop.analysis.risk`): with probability at least 1 - alpha over the draw of the
calibration traces, its risk on traffic exchangeable with them is at most ``max_risk``. The risk is
``changed`` (the answer at the stop differs from the full reasoning's; label-free, the default) or
``lost`` (the full reasoning was right, the answer at the stop is wrong; needs labels). When nothing
is certified it says why, and the least number of traces that could certify that level; running
without stopping (vanilla, risk 0) is then the answer. The saving and the net accuracy drop are
reported with intervals, never certified.

:func:`calibrate_by_drop` is the earlier rule (choose by the measured accuracy drop), kept to compare.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from codestop.analysis.risk import (
    RISKS,
    LttResult,
    Outcomes,
    candidate_grid,
    candidate_label,
    learn_then_test,
    min_certifiable_n,
    outcomes,
    split,
)
from codestop.analysis.statistics import (
    BOOTSTRAP_RESAMPLES,
    drop_bounds,
    paired_bootstrap,
    paired_counts,
    saving_interval,
)
from codestop.analysis.sweep import KNOBS, knob_setting, mean_of, parse_range, require_labels, run_policy, saving
from codestop.errors import CodestopError, ParameterError
from codestop.policies import Probe, make_policy, policy_options
from codestop.replay import Replayed
from codestop.traces import Trace, load_traces

DEFAULT_ORDERING_FRACTION = 0.3

WHAT_RISK_MEANS = {
    "changed": "changes the answer the full reasoning would give",
    "lost": "turns a right answer of the full reasoning into a wrong one",
}


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def calibrate(
    traces: Sequence[Trace] | str | os.PathLike[str],
    *,
    risk: str = "changed",
    max_risk: float,
    alpha: float,
    candidates: Sequence[Mapping[str, Any]] | None = None,
    ordering_fraction: float = DEFAULT_ORDERING_FRACTION,
    seed: int = 0,
) -> dict[str, Any]:
    """The most saving setting among ``candidates`` (policy dicts; default
    :func:`codestop.analysis.risk.candidate_grid`) whose ``risk`` Learn-then-Test certifies to be at
    most ``max_risk`` with probability at least 1 - ``alpha``, or vanilla with the reason none is.

    ``traces``: a list or a trace file. ``ordering_fraction`` of them (a seeded random part) order the
    candidates, the rest test them. The result (JSON-ready) holds ``policy`` (the chosen method and
    all its knobs), ``guarantee`` (for :func:`codestop.policy_file.write_policy_file`), ``statement``
    (the guarantee in plain words), the sample sizes, every candidate's test (p-value, observed
    risk, saving) and the chosen setting's saving with its bootstrap interval (``saving_interval``)
    and its accuracy change. Every ``saving`` is a fraction, 1 - cost tokens / vanilla's."""
    source = None
    if isinstance(traces, (str, os.PathLike)):
        source = str(traces)
        traces = load_traces(traces)
    if risk not in RISKS:
        raise CodestopError(f"risk: {risk!r} must be one of {', '.join(RISKS)}")
    for name, value in (("max_risk", max_risk), ("alpha", alpha), ("ordering_fraction", ordering_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise CodestopError(f"{name}: {value!r} must be a fraction strictly between 0 and 1")
    if len(traces) < 2:
        raise CodestopError(f"traces: {len(traces)} trace(s): calibration needs at least 2 (one to order the "
                            "candidates, one to test them), and far more to certify anything")
    cands = candidate_grid() if candidates is None else _full_policies(candidates)
    if not cands:
        raise CodestopError("candidates: no candidate to calibrate")
    out = outcomes(traces, cands)
    loss = out.loss(risk)
    ordering, testing = split(len(traces), ordering_fraction, seed)
    ltt = learn_then_test(loss, out.cost, out.vanilla_cost, ordering, testing, max_risk=max_risk, alpha=alpha)
    report = _report(out, ltt, risk, max_risk, alpha, ordering_fraction, seed, len(ordering), len(testing), source)
    report["ordering_ids"] = [out.ids[j] for j in ordering]
    report["testing_ids"] = [out.ids[j] for j in testing]
    return report


def _full_policies(candidates: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each candidate with all its knobs written out; a bad one named by its place (``candidates[2].tau``)."""
    out = []
    for i, candidate in enumerate(candidates):
        try:
            out.append(policy_options(make_policy(candidate)))
        except ParameterError as err:
            raise err.under(f"candidates[{i}].") from None
    return out


def _report(out: Outcomes, ltt: LttResult, risk: str, max_risk: float, alpha: float, ordering_fraction: float,
            seed: int, n_ordering: int, n_testing: int, source: str | None) -> dict[str, Any]:
    n = n_ordering + n_testing
    loss = out.loss(risk)
    vanilla_mean = float(out.vanilla_cost.mean())

    def row(i: int, rank: int | None) -> dict[str, Any]:
        """Candidate ``i``'s test; ``rank`` its place in the order, None: it saved nothing on the
        ordering part and was never tested."""
        mean_cost = float(out.cost[i].mean())
        return {
            "rank": rank, "label": candidate_label(out.candidates[i]), "policy": out.candidates[i],
            "ordering_risk": float(ltt.ordering_risk[i]), "testing_losses": int(ltt.testing_losses[i]),
            "testing_risk": float(ltt.testing_losses[i] / n_testing),
            "p_value": None if rank is None else float(ltt.p_values[i]),
            "tested": rank is not None and rank < ltt.n_tested, "certified": rank is not None and rank < ltt.n_certified,
            "mean_cost_tokens": mean_cost, "saving": saving(mean_cost, vanilla_mean),
        }

    tested = [row(i, rank) for rank, i in enumerate(ltt.order)] + [row(i, None) for i in ltt.skipped]
    n_min = min_certifiable_n(max_risk, alpha)
    chosen_i = ltt.chosen
    policy = out.candidates[chosen_i] if chosen_i is not None else {"method": "vanilla"}
    costs = out.cost[chosen_i] if chosen_i is not None else out.vanilla_cost
    chosen: dict[str, Any] = {
        "label": candidate_label(policy), "policy": policy, "certified": chosen_i is not None,
        "mean_cost_tokens": float(costs.mean()), "vanilla_mean_cost_tokens": vanilla_mean,
        "saving": saving(float(costs.mean()), vanilla_mean),
        "saving_interval": saving_interval(costs, out.vanilla_cost, seed=seed),
        "changed": None if out.changed is None else int(out.changed[chosen_i].sum()) if chosen_i is not None else 0,
        "risk_observed": float(loss[chosen_i].mean()) if chosen_i is not None else 0.0,
    }
    if out.lost is not None and out.gained is not None and out.vanilla_correct is not None:
        lost = int(out.lost[chosen_i].sum()) if chosen_i is not None else 0
        gained = int(out.gained[chosen_i].sum()) if chosen_i is not None else 0
        v_acc = float(out.vanilla_correct.mean())
        chosen.update(lost=lost, gained=gained, vanilla_accuracy=v_acc, accuracy=v_acc - (lost - gained) / n,
                      net_accuracy_drop=(lost - gained) / n)
    statement = _statement(out, ltt, tested, chosen, risk, max_risk, alpha, n_ordering, n_testing, n_min, ordering_fraction)
    guarantee = {
        "risk": risk, "max_risk": max_risk, "alpha": alpha, "method": "learn-then-test", "certified": chosen_i is not None,
        "n_ordering": n_ordering, "n_testing": n_testing, "seed": seed, "traces": source,
        "saving": chosen["saving"], "statement": statement, "policy": policy,
    }
    return {
        "risk": risk, "max_risk": max_risk, "alpha": alpha, "n": n, "n_ordering": n_ordering, "n_testing": n_testing,
        "ordering_fraction": ordering_fraction, "seed": seed, "traces": source,
        "min_n_testing": n_min, "n_candidates": len(out.candidates), "n_certified": ltt.n_certified,
        "policy": policy, "chosen": chosen, "candidates": tested, "guarantee": guarantee, "statement": statement,
    }


def _statement(out: Outcomes, ltt: LttResult, tested: list[dict[str, Any]], chosen: dict[str, Any], risk: str,
               max_risk: float, alpha: float, n_ordering: int, n_testing: int, n_min: int, ordering_fraction: float) -> str:
    n = n_ordering + n_testing
    certified = f"certified the first {ltt.n_certified} in that order" if ltt.n_certified else "certified none"
    how = (f"Learn-then-Test: {n_ordering} of the {n} calibration traces ordered the {len(ltt.order)} of "
           f"{len(out.candidates)} candidate settings that saved tokens on them from cautious to aggressive, and exact "
           f"binomial tests on the other {n_testing} {certified} (p <= {alpha:g}; the walk stops at the first p above it).")
    vanilla = "Run without stopping (vanilla: it never cuts an answer, risk 0)."
    estimate, s = saving_of(chosen)
    if ltt.chosen is not None:
        interval = (f" (95% bootstrap interval {_pct(s['low'])} to {_pct(s['high'])})"
                    if s["low"] is not None and s["method"] != "degenerate" else "")
        observed = (f" Reported, not certified: net accuracy drop {chosen['net_accuracy_drop'] * 100:+.1f} pts "
                    f"({chosen['lost']} lost, {chosen['gained']} gained of {n})." if "net_accuracy_drop" in chosen
                    else " The traces are unlabelled: no accuracy is known.")
        return (
            f"With probability at least {1 - alpha:g} over the draw of these {n} calibration traces, {chosen['label']} "
            f"{WHAT_RISK_MEANS[risk]} on at most {_pct(max_risk)} of questions like them (traffic exchangeable with "
            f"them: the same model, sampling, prompt, step boundaries and token cap). {how} The most saving certified "
            f"setting is chosen: it saves {_pct(estimate)} of vanilla's cost tokens on the calibration "
            f"traces{interval}, with {_pct(chosen['risk_observed'])} {risk} there.{observed}"
        )
    if ltt.n_certified:
        return (f"No setting is chosen: {ltt.n_certified} are certified, but none costs less than running without "
                f"stopping on these traces. {vanilla} {how}")
    if not ltt.order:
        return (f"No setting is certified: none of the {len(out.candidates)} candidates saved tokens on the {n_ordering} "
                f"ordering traces. {vanilla}")
    first = tested[0]
    least = (f"Even with no {risk} answer at all, certifying {_pct(max_risk)} at alpha {alpha:g} takes at least {n_min} "
             f"testing traces (the least n with (1 - {max_risk:g})^n <= {alpha:g}), i.e. "
             f"{math.ceil(n_min / (1 - ordering_fraction))} calibration traces at ordering fraction {ordering_fraction:g}")
    least += (f"; these {n_testing} could not certify it whatever they showed." if n_testing < n_min else
              f"; these {n_testing} are enough if fewer answers are {risk}.")
    return (f"No setting is certified: the most cautious candidate in the order, {first['label']}, had "
            f"{first['testing_losses']} {risk} of {n_testing} testing traces (p = {first['p_value']:.3g} > {alpha:g}). "
            f"{vanilla} {least} {how}")


def saving_of(chosen: Mapping[str, Any]) -> tuple[float, Mapping[str, Any]]:
    """The chosen setting's saving (a fraction, as every ``saving``) and its bootstrap interval
    (``saving_interval``); reports written before the two were apart held the interval under ``saving``."""
    s = chosen["saving"]
    if isinstance(s, Mapping):
        return float(s["estimate"]), s
    return float(s), chosen.get("saving_interval") or {"estimate": s, "low": None, "high": None, "method": None}


def format_report(result: Mapping[str, Any], top: int = 12) -> str:
    """The calibration as text: the statement, the sample sizes, the tested candidates with their
    p-values, observed risk and saving (at most ``top`` rows before the first failure's), the choice."""
    risk = result["risk"]
    lines = [result["statement"], "",
             f"risk {risk} <= {result['max_risk']:g} at alpha {result['alpha']:g}: {result['n_ordering']} traces ordered, "
             f"{result['n_testing']} tested (at least {result['min_n_testing']} needed to certify this level); "
             f"{result['n_candidates']} candidates, {result['n_certified']} certified",
             "", f"| rank | candidate | {risk} on the ordering part | {risk} on the testing part | p-value | certified | saving |",
             "|---:|---|---:|---:|---:|:-:|---:|"]
    shown = [c for c in result["candidates"] if c["tested"]]
    if len(shown) > top:
        shown = shown[: top - 1] + shown[-1:]  # the first failure is always shown
    for c in shown:
        lines.append(f"| {c['rank']} | {c['label']} | {_pct(c['ordering_risk'])} | {c['testing_losses']}/{result['n_testing']} | "
                     f"{c['p_value']:.3g} | {'yes' if c['certified'] else 'no'} | {_pct(c['saving'])} |")
    ch = result["chosen"]
    estimate, s = saving_of(ch)
    knobs = ", ".join(f"{k}={v}" for k, v in ch["policy"].items() if k != "method")
    lines += ["", f"chosen: {ch['policy']['method']}" + (f" ({knobs})" if knobs else "") +
              f"; saving {_pct(estimate)}" + (f" [{_pct(s['low'])}, {_pct(s['high'])}]" if s["low"] is not None else "")]
    return "\n".join(lines) + "\n"


def compare_to_vanilla(rows: Sequence[Replayed], vanilla_rows: Sequence[Replayed], *, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap intervals of the policy minus vanilla on the same traces: accuracy (a
    fraction) and mean cost tokens (replayed: reasoning + probe tokens)."""
    return {
        "accuracy_change": paired_bootstrap([float(bool(r.correct)) for r in rows], [float(bool(v.correct)) for v in vanilla_rows],
                                            seed=seed),
        "cost_change": paired_bootstrap([float(r.cost_tokens) for r in rows], [float(v.cost_tokens) for v in vanilla_rows], seed=seed),
    }


def _interval(d: dict[str, Any], scale: float, unit: str) -> str:
    if d["low"] is None:
        return f"{d['estimate'] * scale:+.1f}{unit}"
    return f"{d['estimate'] * scale:+.1f}{unit} [{d['low'] * scale:+.1f}, {d['high'] * scale:+.1f}]"


def calibrate_by_drop(
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
    """The rule before risk control, kept for comparison (``bench/guarantee.py``) and for
    ``codestop calibrate --max-accuracy-drop``: ``method``'s knob with the fewest mean reasoning
    tokens whose measured net accuracy drop on a calibration split is within ``max_accuracy_drop``,
    then measured on the held-out rest. It certifies nothing: choosing the best of many settings on
    the same traces makes the measured drop optimistic, and gains offset losses in it.

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
    require_labels(traces, "--max-accuracy-drop (an accuracy drop)")
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
        rows = run_policy(cal, make_policy(knob_setting(method, value, **options)), cache)
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
        policy = make_policy(knob_setting(method, chosen["value"], **options))
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
