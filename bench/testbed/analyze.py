"""Issue 10's tables and figures from the testbed's held-out traces (bench/testbed/PROTOCOL.md).

Every number is a replay of ``codestop record`` traces, thinned to ``--probe-interval``:

1. calibration of CoDE-Stop's tau, DEER's threshold and Consistency's window (``calibrate``) on one
   half of the GSM8K traces, measured on the other (the measurement half);
2. the issue's two targets, on the measurement half;
3. the accuracy-vs-tokens sweep of the three methods on the measurement half (figure and Pareto table);
3b. exploratory: CoDE-Stop's tau calibrated at several confidence ceilings (r_max), with a figure;
4. answer rollback (``answer_from="stop"`` vs ``"best"``) at the calibrated values and along each
   method's frontier;
5. the paper's findings on all GSM8K traces: confidence dynamics, AUROC of early features, and
   whether wrong traces are longer;
6. with ``--math``: the GSM8K-calibrated values on MATH (does calibration transfer?) and a MATH sweep;
   with ``--cod``: CoDE-Stop calibrated and swept on Chain-of-Draft traces of the same questions (same
   split), and CoD against the main prompt, paired by question.

Writes DIR/analysis.json (accuracy as fractions), DIR/analysis.md (percentages; figures linked
relative to DIR) and PNGs, and prints the markdown with figures linked relative to the working
directory (run from the repository root, it pastes into BENCHMARKS.md as it is).

Usage: python bench/testbed/analyze.py GSM8K.traces.jsonl [--math MATH.traces.jsonl]
       [--cod COD.traces.jsonl] --probe-interval K --out DIR [--max-accuracy-drop 0.01] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from scipy.stats import mannwhitneyu  # type: ignore[import-untyped]

from codestop.analysis.calibrate import calibrate_by_drop as calibrate
from codestop.analysis.calibrate import compare_to_vanilla
from codestop.analysis.statistics import clopper_pearson_upper, drop_bounds, paired_bootstrap, paired_counts
from codestop.analysis.sweep import KNOBS, Point, knob_setting, markdown_table, parse_range, run_policy, saving, sweep
from codestop.figures.dynamics import auroc_table, dynamics, plot_dynamics
from codestop.figures.tradeoff import method_frontier, plot_tradeoff
from codestop.policies import make_policy
from codestop.replay import Replayed
from codestop.traces import Trace, load_traces

METHODS = ("codestop", "deer", "consistency")
TARGET_SAVING = 0.25  # issue 10: at least 25% fewer cost tokens ...
TARGET_DROP = 0.01  # ... for at most 1 point of accuracy lost


def pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def ci(d: dict[str, Any], scale: float = 100, unit: str = " pts") -> str:
    """A paired-bootstrap result as "+1.2 pts [-0.5, +3.0]"."""
    est = f"{d['estimate'] * scale:+.1f}{unit}"
    return est if d["low"] is None else f"{est} [{d['low'] * scale:+.1f}, {d['high'] * scale:+.1f}]"


def setting(method: str, value: Any) -> str:
    return f"{method} {KNOBS[method][0]}={value}"


def correct(rows: Sequence[Replayed]) -> list[float]:
    return [float(r.correct) for r in rows]


def mean_cost(rows: Sequence[Replayed]) -> float:
    return sum(r.cost_tokens for r in rows) / len(rows)


def measure(traces: Sequence[Trace], method: str, value: Any, seed: int) -> dict[str, Any]:
    """``method`` at ``value`` against vanilla on ``traces``, in the shape of calibrate's ``held_out``."""
    rows = run_policy(traces, make_policy(knob_setting(method, value)))
    vanilla = run_policy(traces, make_policy("vanilla"))
    lost, gained = paired_counts(rows, vanilla)
    bounds = drop_bounds(lost, gained, len(traces))
    return {"n": len(traces), "accuracy": sum(correct(rows)) / len(rows), "vanilla_accuracy": sum(correct(vanilla)) / len(rows),
            "accuracy_drop": bounds["drop"], "lost": lost, "gained": gained, "drop_upper_95_exact": bounds["exact"],
            "drop_upper_95_normal": bounds["normal"], "mean_cost_tokens": mean_cost(rows), "vanilla_mean_cost_tokens": mean_cost(vanilla),
            "saving": saving(mean_cost(rows), mean_cost(vanilla)),
            "paired_bootstrap": compare_to_vanilla(rows, vanilla, seed=seed)}


MEASURED_HEAD = ("| method | setting | vanilla accuracy | vanilla mean cost | accuracy | mean cost | saving | "
                 "accuracy change [95% CI] | cost change [95% CI] | lost / gained | 95% bound on the drop |\n"
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def measured_row(method: str, value: Any, h: dict[str, Any] | None) -> str:
    if h is None:
        return f"| {method} | none within the drop | - | - | - | - | - | - | - | - | - |"
    boot = h["paired_bootstrap"]
    return (f"| {method} | {KNOBS[method][0]}={value} | {pct(h['vanilla_accuracy'])} | {h['vanilla_mean_cost_tokens']:.0f} | "
            f"{pct(h['accuracy'])} | {h['mean_cost_tokens']:.0f} | {pct(h['saving'])} | {ci(boot['accuracy_change'])} | "
            f"{ci(boot['cost_change'], 1, ' tok')} | {h['lost']} / {h['gained']} | {h['drop_upper_95_exact'] * 100:.1f} pts |")


def section_calibration(traces: Sequence[Trace], drop: float, seed: int) -> tuple[str, dict[str, Any], list[Trace]]:
    results = {m: calibrate(traces, drop, method=m, seed=seed) for m in METHODS}
    first = results[METHODS[0]]
    if any(r["held_out_ids"] != first["held_out_ids"] for r in results.values()):
        sys.exit("analyze: calibrate split the traces differently per method")
    by_id = {t.id: t for t in traces}
    if len(by_id) != len(traces):
        sys.exit("analyze: trace ids repeat; the measurement half cannot be rebuilt from calibrate's ids")
    measurement = [by_id[i] for i in first["held_out_ids"]]  # in calibrate's order
    n_cal, n_meas = first["n_calibration"], first["n_held_out"]
    md = [(f"Split (calibrate, seed {seed}): n_calibration = {n_cal}, n_measurement = {n_meas} of {len(traces)} traces. "
          f"Each knob is the fewest reasoning tokens with a drop of at most {drop * 100:g} pts on the calibration half, "
          "then measured on the measurement half below: cost = reasoning + probe tokens, changes = method minus vanilla "
          "on the same questions (paired bootstrap 95%), bound = exact one-sided 95% Clopper-Pearson bound on the "
          "lost-question rate (gains not credited). Calibrate minimises reasoning tokens, not cost: a setting can save "
          "tokens and still cost more than vanilla once its probes are counted."), "", MEASURED_HEAD]
    md += [measured_row(m, r["chosen"], r.get("held_out")) for m, r in results.items()]
    data = {m: {**r, "n_measurement": r["n_held_out"]} for m, r in results.items()}
    return "\n".join(md), data, measurement


def section_targets(cal: dict[str, Any], measurement: Sequence[Trace], points: Sequence[Point], seed: int) -> tuple[str, dict[str, Any]]:
    h = cal["codestop"].get("held_out")
    n = len(measurement)
    floor = clopper_pearson_upper(0, n)
    if h is None:
        a = {"met": False, "certified": False, "reason": "calibrate found no tau within the drop"}
        line_a = "**(a) NOT MET**: calibrate found no tau within the allowed drop on the calibration half."
    else:
        met = h["saving"] >= TARGET_SAVING and h["accuracy_drop"] <= TARGET_DROP
        a = {"met": met, "certified": met and h["drop_upper_95_exact"] <= TARGET_DROP, "saving": h["saving"],
             "accuracy_drop": h["accuracy_drop"], "drop_upper_95_exact": h["drop_upper_95_exact"], "bound_with_no_loss": floor}
        line_a = (f"**(a) {'MET' if met else 'NOT MET'}**: CoDE-Stop tau={cal['codestop']['chosen']} saves {pct(h['saving'])} "
                  f"of the cost (target >= {TARGET_SAVING * 100:.0f}%) for a drop of {h['accuracy_drop'] * 100:+.1f} pts "
                  f"(target <= {TARGET_DROP * 100:g}); the exact 95% bound on the drop is {h['drop_upper_95_exact'] * 100:.1f} pts, "
                  f"{'which' if a['certified'] else 'which does not'} certify {TARGET_DROP * 100:g} pt "
                  f"(on {n} questions even no loss at all bounds it at {floor * 100:.1f} pts).")
    rows_cache: dict[tuple[str, Any], list[Replayed]] = {}

    def rows(method: str, value: Any) -> list[Replayed]:
        if (method, value) not in rows_cache:
            rows_cache[(method, value)] = run_policy(measurement, make_policy(knob_setting(method, value)))
        return rows_cache[(method, value)]

    ours = [p for p in points if p.method == "codestop"]
    md = [("| vs | their setting | their accuracy | their cost | CoDE-Stop setting (cost <= theirs) | CoDE-Stop accuracy | "
           "CoDE-Stop cost | CoDE-Stop minus them [95% CI] |"), "|---|---|---:|---:|---|---:|---:|---:|"]
    b: dict[str, Any] = {"points": []}
    for other in METHODS[1:]:
        # the other method's own frontier in cost: method_frontier reads mean_reasoning_tokens, so give it the cost there
        frontier = method_frontier([replace(p, mean_reasoning_tokens=p.mean_cost_tokens) for p in points if p.method == other])
        for f in frontier:
            cheaper = [p for p in ours if p.mean_cost_tokens <= f.mean_cost_tokens]
            entry: dict[str, Any] = {"vs": other, "value": f.value, "accuracy": f.accuracy, "mean_cost_tokens": f.mean_cost_tokens}
            theirs = f"| {other} | {KNOBS[other][0]}={f.value} | {pct(f.accuracy)} | {f.mean_cost_tokens:.0f} |"
            if not cheaper:
                entry.update(codestop=None, below=True)
                md.append(theirs + " none this cheap | - | - | counts as below |")
            else:
                best = max(cheaper, key=lambda p: (p.accuracy, -p.mean_cost_tokens))
                diff = paired_bootstrap(correct(rows("codestop", best.value)), correct(rows(other, f.value)), seed=seed)
                below = diff["high"] is not None and diff["high"] < 0
                entry.update(codestop={"value": best.value, "accuracy": best.accuracy, "mean_cost_tokens": best.mean_cost_tokens},
                             difference=diff, below=below)
                md.append(theirs + f" tau={best.value} | {pct(best.accuracy)} | {best.mean_cost_tokens:.0f} | "
                          f"{ci(diff)}{' (below)' if below else ''} |")
            b["points"].append(entry)
    b["met"] = not any(e["below"] for e in b["points"])
    below = sum(e["below"] and e["codestop"] is not None for e in b["points"])
    uncovered = sum(e["codestop"] is None for e in b["points"])
    text = (f"{line_a}\n\n**(b) {'MET' if b['met'] else 'NOT MET'}** ({below} of {len(b['points'])} frontier points below, "
            f"{uncovered} with no CoDE-Stop setting as cheap): CoDE-Stop's curve against DEER's and Consistency's at "
            "equal cost, on the measurement half (default knob ranges). For each point of their own frontier in mean cost "
            "(reasoning + probe tokens), the most accurate CoDE-Stop setting that costs no more; the rule: MET when no "
            "paired 95% interval of the difference lies wholly below 0 (a point with no CoDE-Stop setting as cheap counts "
            "as below).\n\n" + "\n".join(md))
    return text, {"a": a, "b": b}


def section_rollback(cal: dict[str, Any], measurement: Sequence[Trace], points: Sequence[Point], seed: int) -> tuple[str, dict[str, Any]]:
    """``answer_from="stop"`` against ``"best"`` at the calibrated values and along each probing method's own
    frontier of the measurement sweep (so rollback is measured even where calibrate chose nothing)."""
    md = ["| where | setting | accuracy (stop) | accuracy (best) | mean cost (both) | best minus stop [95% CI] |",
          "|---|---|---:|---:|---:|---:|"]
    data: dict[str, Any] = {"calibrated": {}, "frontier": []}
    settings: list[tuple[str, str, Any]] = [("calibrated", m, cal[m]["chosen"]) for m in METHODS]
    # DEER is left out of the frontier rows: it stops at its first probe over the threshold, which is then the most
    # confident so far, so "best" is the stop by construction
    for method in ("codestop", "consistency"):
        settings += [("frontier", method, p.value) for p in method_frontier([p for p in points if p.method == method])]
    for where, method, value in settings:
        if value is None:
            md.append(f"| {where} | {method}: none within the drop | - | - | - | - |")
            continue
        stop = run_policy(measurement, make_policy(knob_setting(method, value, answer_from="stop")))
        best = run_policy(measurement, make_policy(knob_setting(method, value, answer_from="best")))
        diff = paired_bootstrap(correct(best), correct(stop), seed=seed)
        entry = {"method": method, "value": value, "accuracy_stop": sum(correct(stop)) / len(stop),
                 "accuracy_best": sum(correct(best)) / len(best), "mean_cost_tokens": mean_cost(stop), "difference": diff}
        if where == "calibrated":
            data["calibrated"][method] = entry
        else:
            data["frontier"].append(entry)
        md.append(f"| {where} | {setting(method, value)} | {pct(entry['accuracy_stop'])} | {pct(entry['accuracy_best'])} | "
                  f"{entry['mean_cost_tokens']:.0f} | {ci(diff)} |")
    gains = [e for e in data["frontier"] if e["difference"]["low"] is not None and e["difference"]["low"] > 0]
    losses = [e for e in data["frontier"] if e["difference"]["high"] is not None and e["difference"]["high"] < 0]
    caption = ("Answer rollback on the measurement half: the answer of the probe stopped at (stop) or of the most confident "
               "probe up to it (best), at each method's calibrated value and at each setting on its own frontier of the "
               "sweep in section 3 (DEER's frontier is left out: it stops at its first probe over the threshold, so the most "
               "confident probe is the one it stopped at); the cost is the same, counted to the stop. "
               f"Of {len(data['frontier'])} frontier settings, rollback is significantly better at {len(gains)} and "
               f"significantly worse at {len(losses)}.")
    return caption + "\n\n" + "\n".join(md), data


# CoDE-Stop's r_max: the default, then ever fewer confident stops, then none (r_min = r_max = 1: the degeneration
# score alone; a probe's confidence is never exactly 1 in floating point here)
CEILINGS = (0.95, 0.99, 0.999, 0.9999, 1.0)
CEILING_TAUS = "1,1.5,2,2.5,3,4,5,7,10,16"


def section_ceiling(traces: Sequence[Trace], measurement: Sequence[Trace], others: Sequence[Point], drop: float, seed: int,
                    out: Path, k: int) -> tuple[str, dict[str, Any]]:
    """Exploratory, beyond the frozen protocol: CoDE-Stop's tau moves only its degeneration stop, while its
    confident stop (c >= r_max after the ramp) is fixed by r_max. Calibrate tau at several r_max on the same
    calibration half, pick the r_max there too, and measure on the measurement half."""
    md = [("| r_max | tau (calibrated) | calibration: drop / saving | accuracy | mean cost | saving | "
           "accuracy change [95% CI] | lost / gained | stops at tau=16: confident / degenerate / none |"),
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    data: dict[str, Any] = {"rows": []}
    sweep_points: list[Point] = []
    for r in CEILINGS:
        ramp = {"r_max": r, "r_min": 1.0} if r == 1.0 else {"r_max": r}
        c = calibrate(traces, drop, method="codestop", seed=seed, **ramp)
        h = c.get("held_out")
        loose = run_policy(measurement, make_policy(knob_setting("codestop", 16.0, **ramp)))
        reasons = {x: sum(row.stop_reason == x for row in loose) for x in ("confident", "degenerate", None)}
        label = "1 (and r_min = 1: D alone)" if r == 1.0 else f"{r:g}"
        data["rows"].append({**ramp, "label": label, "tau": c["chosen"], "calibration": c["calibration"], "measured": h,
                             "stops_at_tau_16": {str(x): n for x, n in reasons.items()}})
        stops = f"{reasons['confident']} / {reasons['degenerate']} / {reasons[None]}"
        if h is None:
            md.append(f"| {label} | none within the drop | - | - | - | - | - | - | {stops} |")
        else:
            cal_row = c["calibration"]
            md.append(f"| {label} | {c['chosen']:g} | {cal_row['drop'] * 100:+.1f} pts / {pct(cal_row['saving'])} | "
                      f"{pct(h['accuracy'])} | {h['mean_cost_tokens']:.0f} | {pct(h['saving'])} | "
                      f"{ci(h['paired_bootstrap']['accuracy_change'])} | {h['lost']} / {h['gained']} | {stops} |")
        points = sweep(measurement, {"codestop": parse_range(CEILING_TAUS, float, "tau")}, **ramp)
        sweep_points += [replace(p, method="codestop D alone" if r == 1.0 else f"codestop r_max={r:g}") for p in points if p.method != "vanilla"]
    ok = [row for row in data["rows"] if row["calibration"] is not None]
    choice = min(ok, key=lambda row: (row["calibration"]["mean_reasoning_tokens"], row["calibration"]["drop"])) if ok else None
    data["two_knob_choice"] = None if choice is None else {k: choice[k] for k in ("r_max", "r_min", "tau") if k in choice}
    figure = "gsm8k-ceiling.png"
    # vanilla, DEER and Consistency from section 3's sweep of the same measurement half
    plot_tradeoff([p for p in others if p.method in ("vanilla", "deer", "consistency")] + sweep_points, out / figure,
                  title=f"gsm8k: CoDE-Stop at several r_max, measurement half, {len(measurement)} traces, probe interval {k}")
    chosen = ("no r_max has a tau within the drop on the calibration half" if choice is None else
              f"chosen on the calibration half alone (fewest reasoning tokens within the drop): r_max={choice['label']}, "
              f"tau={choice['tau']:g}")
    text = ("Exploratory, outside the frozen protocol (no target is judged on it). CoDE-Stop's tau moves only its "
            "degeneration stop; its confident stop fires once a probe's confidence reaches the ramp's ceiling r_max "
            "(default 0.95). Each row calibrates tau on the same calibration half at one r_max and measures it on the "
            "measurement half (the last row also sets r_min = 1, so only the degeneration score stops); the last "
            "column counts, on the measurement half, which stop ends each trace at the "
            f"loosest tau (16), where the degeneration stop almost never fires. Two-knob calibration: {chosen}.\n\n"
            + "\n".join(md) + f"\n\n![CoDE-Stop's tau sweep at each r_max, with DEER and Consistency]({figure})\n\n"
            f"CoDE-Stop over tau in {{{CEILING_TAUS}}} at each r_max, against DEER's and Consistency's default sweeps, "
            "on the measurement half (accuracy against mean reasoning tokens).")
    return text, data


def probes_by_fifth(traces: Sequence[Trace], r_max: float = 0.95) -> tuple[str, dict[str, Any]]:
    """Where along the reasoning the probes hold the right answer, and how confident they are there; and the
    first probe at or above ``r_max`` (where CoDE-Stop's confident stop and DEER at that threshold fire)."""
    md = ["| final answer | fifth of the reasoning | probes | probe answer right | mean confidence |", "|---|---|---:|---:|---:|"]
    data: dict[str, Any] = {"by_fifth": {}, "first_confident": {}}
    for group, want in (("correct", True), ("incorrect", False)):
        mine = [t for t in traces if t.final_correct == want and t.probes]
        cells: list[list[Any]] = [[] for _ in range(5)]
        for t in mine:
            for p in t.probes:
                cells[min(4, int(5 * p.position / max(1, t.reasoning_tokens)))].append(p)
        data["by_fifth"][group] = []
        for i, ps in enumerate(cells):
            right = sum(p.correct for p in ps) / len(ps) if ps else None
            conf = statistics.fmean(p.confidence for p in ps) if ps else None
            data["by_fifth"][group].append({"probes": len(ps), "answer_right": right, "mean_confidence": conf})
            md.append(f"| {group} | {20 * i}-{20 * (i + 1)}% | {len(ps)} | " + ("- | - |" if not ps else f"{pct(right or 0.0)} | {conf:.2f} |"))
        firsts = [(next((p for p in t.probes if p.confidence >= r_max), None), t) for t in mine]
        reached = [(p, t) for p, t in firsts if p is not None]
        data["first_confident"][group] = {
            "traces": len(mine), "reached": len(reached), "answer_right": sum(p.correct for p, _ in reached),
            "mean_relative_position": statistics.fmean(p.position / t.reasoning_tokens for p, t in reached) if reached else None}
    lines = []
    for group, f in data["first_confident"].items():
        if f["reached"]:
            lines.append(f"{f['reached']} of {f['traces']} {group} traces reach it, at {f['mean_relative_position'] * 100:.0f}% of "
                         f"their reasoning on average, and its answer is right in {f['answer_right']} of them")
    text = (f"Where the probes hold the right answer: each probe by the fifth of its trace's reasoning it sits in. The first "
            f"probe with confidence >= {r_max:g} (DEER's stop at that threshold; CoDE-Stop's default ramp reaches this ceiling "
            "at its third probe, and is lower before): "
            + "; ".join(lines) + ".\n\n" + "\n".join(md))
    return text, data


def section_findings(traces: Sequence[Trace], out: Path, name: str, k: int) -> tuple[str, dict[str, Any]]:
    stats = dynamics(traces)
    figure = f"{name}-dynamics.png"
    plot_dynamics(stats, out / figure, title=f"{name}: {stats['n']} trajectories, {stats['n_correct']} correct, probe interval {k}")
    right, wrong = stats["lengths"]["correct"], stats["lengths"]["incorrect"]
    p = float(mannwhitneyu(wrong, right, alternative="greater").pvalue) if right and wrong else None
    groups: dict[str, dict[str, Any]] = {
        group: {"n": len(xs), "mean": statistics.fmean(xs) if xs else None, "median": statistics.median(xs) if xs else None}
        for group, xs in (("correct", right), ("incorrect", wrong))
    }
    table = ["| final answer | traces | mean reasoning tokens | median |", "|---|---:|---:|---:|"]
    for group, g in groups.items():
        table.append(f"| {group} | {g['n']} | " + ("- | - |" if not g["n"] else f"{g['mean']:.0f} | {g['median']:.0f} |"))
    p_text = "n/a (one outcome has no trace)" if p is None else f"{p:.3g}"
    md = (f"![confidence dynamics, lengths and AUROC of early features]({figure})\n\n"
          f"Confidence along the reasoning (probes at the replay's interval), reasoning lengths and early-feature AUROCs, "
          f"all {stats['n']} traces with a probe ({stats['n_correct']} correct)"
          + (f"; {len(traces) - stats['n']} of the {len(traces)} traces have none (no boundary in their reasoning) and are left "
             "out of this section" if len(traces) > stats["n"] else "") + ".\n\n"
          "AUROC of early-confidence features predicting a correct final answer (0.5 = chance):\n\n"
          f"{auroc_table(stats).strip()}\n\n"
          f"Are wrong traces longer? Reasoning tokens by final answer; one-sided Mann-Whitney U (incorrect longer): p = {p_text}.\n\n"
          + "\n".join(table))
    where_md, where = probes_by_fifth(traces)
    return md + "\n\n" + where_md, {"dynamics": stats, "lengths": {**groups, "mannwhitney_p_incorrect_longer": p}, "where": where}


def section_sweep(traces: Sequence[Trace], out: Path, name: str, what: str, k: int) -> tuple[str, list[Point]]:
    ranges: dict[str, Sequence[Any]] = {m: parse_range(KNOBS[m][2], KNOBS[m][1], KNOBS[m][0]) for m in METHODS}
    points = sweep(traces, ranges)
    figure = f"{name}-tradeoff.png"
    plot_tradeoff(points, out / figure, title=f"{name}: {what}, {len(traces)} traces, probe interval {k}")
    md = (f"![accuracy against mean reasoning tokens, every method's sweep]({figure})\n\n"
          f"Accuracy against mean reasoning tokens (probes not counted on this axis) on {what} ({len(traces)} traces), "
          "each method over its default knob range; vanilla as reference lines.\n\n"
          "The Pareto points of that sweep over all methods (fewer reasoning tokens or higher accuracy than every other point):\n\n"
          + markdown_table(points, only_pareto=True).strip())
    return md, points


def section_math(traces: Sequence[Trace], cal: dict[str, Any], out: Path, seed: int, k: int) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {"n": len(traces)}
    rows = [MEASURED_HEAD]
    for m in METHODS:
        value = cal[m]["chosen"]
        data[m] = None if value is None else measure(traces, m, value, seed)
        rows.append(measured_row(m, value, data[m]))
    sweep_md, points = section_sweep(traces, out, "math", "all MATH traces", k)
    data["sweep"] = [asdict(p) for p in points]
    where_md, data["where"] = probes_by_fifth(traces)
    md = (f"Does the calibration transfer? The GSM8K-calibrated values applied to all {len(traces)} MATH traces "
          "(none of which was used to choose them); columns as in section 1.\n\n" + "\n".join(rows) + "\n\n" + sweep_md
          + "\n\n" + where_md)
    return md, data


COD_TAUS = "1,2,3,4,6,8,10,16"


def section_cod(main: Sequence[Trace], cod: Sequence[Trace], cal: dict[str, Any], drop: float, seed: int) -> tuple[str, dict[str, Any]]:
    """Does CoDE-Stop save on top of Chain-of-Draft? Its tau calibrated on the CoD traces of the GSM8K
    calibration half (the main prompt's tau, if any, was chosen on other traces), measured on the CoD
    traces of the measurement half, with a tau sweep there, and CoD against the main prompt."""
    cod_by_id = {t.id: t for t in cod}
    main_by_id = {t.id: t for t in main}
    ids = [i for i in cal["codestop"]["held_out_ids"] if i in cod_by_id]
    cal_ids = [i for i in cal["codestop"]["calibration_ids"] if i in cod_by_id]
    if not ids or not cal_ids:
        return (f"The Chain-of-Draft file has {len(cal_ids)} questions of the calibration half and {len(ids)} of the "
                "measurement half: it needs both."), {"n_calibration": len(cal_ids), "n_measurement": len(ids)}
    cod_meas, main_meas = [cod_by_id[i] for i in ids], [main_by_id[i] for i in ids]
    c = calibrate([cod_by_id[i] for i in cal_ids + ids], drop, method="codestop", seed=seed, calibration_ids=cal_ids)
    probes = sum(len(t.probes) for t in cod_meas) / len(cod_meas)
    md = [(f"{len(cod)} Chain-of-Draft traces of the held-out GSM8K questions ({probes:.1f} probes per trace on the measurement "
           f"half). CoDE-Stop's tau calibrated on the CoD traces of the calibration half (n = {len(cal_ids)}) by section 1's "
           f"rule, measured on those of the measurement half (n = {len(ids)}); cost, changes and bound as in section 1."),
          "", MEASURED_HEAD, measured_row("codestop", c["chosen"], c.get("held_out"))]
    sweep_rows = {tau: measure(cod_meas, "codestop", tau, seed) for tau in parse_range(COD_TAUS, float, "tau")}
    md += ["", "CoDE-Stop's tau swept on the CoD measurement half (not a choice: every value shown):", "", MEASURED_HEAD]
    md += [measured_row("codestop", tau, h) for tau, h in sweep_rows.items()]
    md += ["", "Chain-of-Draft against the main prompt (paired, same measurement-half questions, bootstrap 95%):", "",
           "| comparison | accuracy | mean cost | accuracy change [95% CI] | cost change [95% CI] |", "|---|---:|---:|---:|---:|"]
    vanilla = {"main prompt": run_policy(main_meas, make_policy("vanilla")), "chain-of-draft": run_policy(cod_meas, make_policy("vanilla"))}
    comparisons = {"CoD vanilla minus main-prompt vanilla": (vanilla["chain-of-draft"], vanilla["main prompt"])}
    if c["chosen"] is not None:
        comparisons[f"CoD + CoDE-Stop tau={c['chosen']} minus main-prompt vanilla"] = (
            run_policy(cod_meas, make_policy(knob_setting("codestop", c["chosen"]))), vanilla["main prompt"])
    data: dict[str, Any] = {"calibration": c, "sweep": {str(t): h for t, h in sweep_rows.items()}, "comparisons": {}}
    for label, (a, b) in comparisons.items():
        d = compare_to_vanilla(a, b, seed=seed)
        data["comparisons"][label] = {"accuracy": sum(correct(a)) / len(a), "mean_cost_tokens": mean_cost(a), **d}
        md.append(f"| {label} | {pct(sum(correct(a)) / len(a))} | {mean_cost(a):.0f} | {ci(d['accuracy_change'])} | "
                  f"{ci(d['cost_change'], 1, ' tok')} |")
    return "\n".join(md), data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gsm8k", type=Path, help="held-out GSM8K traces (codestop record, a probe at every boundary)")
    ap.add_argument("--math", type=Path, help="MATH-500 traces recorded with the same choices")
    ap.add_argument("--cod", type=Path, help="Chain-of-Draft traces of the same GSM8K questions")
    ap.add_argument("--probe-interval", type=int, required=True, help="replay as if probed this many reasoning tokens apart")
    ap.add_argument("--out", type=Path, required=True, help="folder for analysis.json, analysis.md and the PNGs")
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01, help="calibration's allowed drop, a fraction (default 0.01)")
    ap.add_argument("--seed", type=int, default=0, help="calibration split and bootstrap seed")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    k = args.probe_interval

    traces = load_traces(args.gsm8k, probe_interval=k)
    probes = sum(len(t.probes) for t in traces) / len(traces)
    md = [f"## Testbed analysis: `{args.gsm8k.name}`", "",
          (f"{len(traces)} GSM8K traces replayed at probe interval {k} ({probes:.1f} probes per trace), "
          f"allowed drop {args.max_accuracy_drop * 100:g} pts, seed {args.seed}. "
          f"`python bench/testbed/analyze.py {' '.join(sys.argv[1:])}`")]
    data: dict[str, Any] = {"inputs": {"gsm8k": str(args.gsm8k), "n": len(traces), "probe_interval": k, "probes_per_trace": probes,
                                       "max_accuracy_drop": args.max_accuracy_drop, "seed": args.seed,
                                       "math": str(args.math) if args.math else None, "cod": str(args.cod) if args.cod else None}}
    print("calibrating...", file=sys.stderr)
    text, data["calibration"], measurement = section_calibration(traces, args.max_accuracy_drop, args.seed)
    md += ["", "### 1. Calibration (GSM8K)", "", text]
    print("sweeping...", file=sys.stderr)
    sweep_md, points = section_sweep(measurement, args.out, "gsm8k", "the measurement half", k)
    data["sweep"] = [asdict(p) for p in points]
    text, data["targets"] = section_targets(data["calibration"], measurement, points, args.seed)
    md += ["", "### 2. Targets (measurement half)", "", text, "", "### 3. Accuracy against reasoning tokens (measurement half)", "", sweep_md]
    print("confidence ceilings...", file=sys.stderr)
    text, data["ceiling"] = section_ceiling(traces, measurement, points, args.max_accuracy_drop, args.seed, args.out, k)
    md += ["", "### 3b. CoDE-Stop's confidence ceiling (exploratory)", "", text]
    text, data["rollback"] = section_rollback(data["calibration"], measurement, points, args.seed)
    md += ["", "### 4. Answer rollback", "", text]
    text, data["findings"] = section_findings(traces, args.out, "gsm8k", k)
    md += ["", "### 5. The paper's findings (all GSM8K traces)", "", text]
    if args.math:
        text, data["math"] = section_math(load_traces(args.math, probe_interval=k), data["calibration"], args.out, args.seed, k)
        md += ["", "### 6a. MATH-500: GSM8K calibration applied", "", text]
    if args.cod:
        text, data["cod"] = section_cod(traces, load_traces(args.cod, probe_interval=k), data["calibration"], args.max_accuracy_drop, args.seed)
        md += ["", "### 6b. Chain-of-Draft", "", text]
    report = "\n".join(md) + "\n"
    (args.out / "analysis.md").write_text(report, encoding="utf-8")
    (args.out / "analysis.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(re.sub(r"\]\(([\w.-]+\.png)\)", lambda m: f"]({Path(os.path.relpath(args.out)) / m[1]})", report), end="")
    print(f"wrote {args.out}/analysis.md, analysis.json and the PNGs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
