"""The watch and auto mode on replayed traffic: false alarms, detection delay, what audits cost, net saving.

    PYTHONPATH=. python bench/watch.py [--seeds 100] [--requests 10000] [--out bench/results/watch]

Streams of requests drawn with replacement from the committed held-out testbed traces (Qwen2.5-Coder-1.5B,
greedy, solve-then-check prompt: **an instruct model, not a reasoning model**), each request's outcome under
every candidate setting of ``codestop calibrate``'s default grid replayed once (replay's cost model:
reasoning tokens to the stop plus the probes spent to it; no model). Cost accounting per request:

* shadow (auto mode's ``watching`` and ``reverted``, and after a static setting's revert): the upstream's
  answer, at vanilla's cost plus the probes the shadow takes at every boundary (the trace it records;
  the final reference probe is not in the traces and not counted);
* serving a setting: its replayed cost; with probability ``F`` (``--audit-fraction``) the request is
  audited: stopped early, its reasoning continues to the end with the shadow's probes (cost: the shadow's
  cost less what was served); not stopped, it is unchanged at no cost. Either way it is a trace.

Scenarios, each at audit fractions 0.01, 0.05, 0.2:

* **stationary**: GSM8K solve-then-check (300 traces), ``--requests`` requests, auto mode
  (:class:`codestop.autopilot.Autopilot` at ``--max-risk``/``--alpha``, calibrations by Learn-then-Test on
  the traces since the last alarm, exactly as :func:`codestop.analysis.calibrate.calibrate` would choose:
  one stream's first calibration is checked against it). False alarms: an alarm while the served
  setting's true risk (its rate on the whole file) is within max_risk. Then the watch alone at each
  certified setting's true risk over many more seeds (``--watch-seeds``), for a tighter false-alarm rate.
* **shift**: GSM8K, then MATH-500 solve-then-check (100 traces) from request ``--shift-at``. The static
  setting is the issue's: CoDE-Stop tau 5 with its ceiling off, what ``calibrate --risk lost --max-risk
  0.1 --alpha 0.05`` picks on the 300 GSM8K traces; it changes 11% of GSM8K answers, so its watch tests
  ``changed <= --shift-max-risk`` (0.15: at 0.1 it is over the level before any shift). Served with and
  without the watch; auto mode at the same level on the same stream.

Writes ``OUT.json`` and ``OUT.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest  # type: ignore[import-untyped]

from codestop.analysis.calibrate import DEFAULT_ORDERING_FRACTION, calibrate
from codestop.analysis.risk import candidate_grid, candidate_label, learn_then_test, outcomes, split
from codestop.autopilot import Autopilot
from codestop.traces import load_traces
from codestop.watch import RiskWatch

RESULTS = Path(__file__).resolve().parent / "results"
POPULATIONS = {
    "gsm8k": "testbed-gsm8k-heldout-solve-then-check.traces.jsonl",
    "math500": "testbed-math500-solve-then-check.traces.jsonl",
}
STATIC = {"method": "codestop", "tau": 5.0, "r_min": 1.0, "r_max": 1.0}  # the setting (knobs beyond: defaults)


@dataclass
class Pool:
    """Every population's traces side by side (columns), every candidate's outcome on each (rows)."""

    candidates: list[dict[str, Any]]
    changed: np.ndarray  # bool [candidates x traces]
    cost: np.ndarray  # served cost tokens
    vanilla: np.ndarray  # vanilla's cost tokens per trace
    shadow: np.ndarray  # vanilla plus every probe: what a shadowed request costs
    columns: dict[str, np.ndarray]  # population -> its column indices
    traces: list[Any]

    def true_risk(self, c: int, population: str) -> float:
        return float(self.changed[c, self.columns[population]].mean())

    def true_saving(self, c: int, population: str) -> float:
        cols = self.columns[population]
        return float(1 - self.cost[c, cols].mean() / self.vanilla[cols].mean())


def load_pool() -> Pool:
    cands = candidate_grid()
    changed, cost, vanilla, shadow, columns, traces = [], [], [], [], {}, []
    start = 0
    for name, file in POPULATIONS.items():
        tr = load_traces(RESULTS / file)
        out = outcomes(tr, cands)
        assert out.changed is not None
        changed.append(out.changed)
        cost.append(out.cost)
        vanilla.append(out.vanilla_cost)
        shadow.append(out.vanilla_cost + np.array([sum(p.probe_tokens or 0 for p in t.probes) for t in tr], dtype=float))
        columns[name] = np.arange(start, start + len(tr))
        start += len(tr)
        traces += tr
    return Pool(cands, np.concatenate(changed, axis=1), np.concatenate(cost, axis=1), np.concatenate(vanilla),
                np.concatenate(shadow), columns, traces)


def ltt_report(pool: Pool, sample: np.ndarray, max_risk: float, alpha: float) -> dict[str, Any]:
    """What ``calibrate(traces, risk="changed", ...)`` reports on the traces ``sample`` (columns, repeats
    allowed), as much of it as Autopilot.calibrated reads: the same split (seed 0), the same walk."""
    o, t = split(len(sample), DEFAULT_ORDERING_FRACTION, 0)
    ltt = learn_then_test(pool.changed, pool.cost, pool.vanilla, sample[o], sample[t], max_risk=max_risk, alpha=alpha)
    if ltt.chosen is None:
        return {"policy": {"method": "vanilla"}, "chosen": {"certified": False, "saving": 0.0}, "guarantee": {}, "index": None}
    saving = float(1 - pool.cost[ltt.chosen, sample].mean() / pool.vanilla[sample].mean())
    policy = pool.candidates[ltt.chosen]
    return {"policy": policy, "chosen": {"certified": True, "saving": saving},
            "guarantee": {"risk": "changed", "max_risk": max_risk, "alpha": alpha, "saving": saving, "policy": policy},
            "index": ltt.chosen}


def cross_check(pool: Pool, max_risk: float, alpha: float) -> str:
    """One drawn calibration sample through ``calibrate`` itself: it must choose what ltt_report chooses."""
    sample = np.random.default_rng(12345).choice(pool.columns["gsm8k"], 400)
    lib = calibrate([pool.traces[j] for j in sample], risk="changed", max_risk=max_risk, alpha=alpha, candidates=pool.candidates)
    ours = ltt_report(pool, sample, max_risk, alpha)
    assert lib["policy"] == ours["policy"], (lib["policy"], ours["policy"])
    return f"calibrate on 400 drawn GSM8K traces chose {candidate_label(lib['policy'])}, as the array code does"


def run_stream(pool: Pool, stream: np.ndarray, fraction: float, rng: np.random.Generator, *, max_risk: float, alpha: float,
               static: int | None = None, watch: bool = True, population_at: Any = None) -> dict[str, Any]:
    """One stream. ``static`` None: auto mode from shadow; else that candidate served from the first
    request (watched at max_risk/alpha unless ``watch`` is False; after a revert, shadow). ``population_at(i)``:
    the population request i is drawn from (for the served setting's true risk)."""
    audited = rng.random(len(stream)) < fraction
    ap = Autopilot(max_risk, alpha)
    served: int | None = static
    w = RiskWatch(max_risk, alpha) if static is not None and watch else None
    since_alarm: list[int] = []
    cost = vanilla = shadow_cost = audit_cost = serving_cost = serving_vanilla = 0.0
    changed_served = audits = 0
    first_served = alarm_at = None
    false_alarm = bad_certified = False
    changed_by_request = np.zeros(len(stream), dtype=bool)
    for i, j in enumerate(stream):
        vanilla += pool.vanilla[j]
        if served is None:
            cost += pool.shadow[j]
            shadow_cost += pool.shadow[j] - pool.vanilla[j]
            if static is not None:
                continue  # a static setting after its revert: shadow (its traces are a later calibration's)
            since_alarm.append(int(j))
            ap.traced()
        else:
            c = served
            cost += pool.cost[c, j]
            serving_cost += pool.cost[c, j]
            serving_vanilla += pool.vanilla[j]
            changed = bool(pool.changed[c, j])
            changed_served += changed
            changed_by_request[i] = changed
            if audited[i] and (w is not None or static is None):
                audits += 1
                extra = max(0.0, pool.shadow[j] - pool.cost[c, j])  # 0 when it ran to the end
                cost += extra
                audit_cost += extra
                if static is None:
                    since_alarm.append(int(j))
                    ap.traced()
                    alarmed = ap.audited(changed)
                else:
                    assert w is not None
                    alarmed = w.update(changed)
                if alarmed:
                    population = population_at(i) if population_at else "gsm8k"
                    if alarm_at is None:
                        alarm_at = i
                    false_alarm |= pool.true_risk(c, population) <= max_risk
                    served = None
                    since_alarm = []
                    continue
        if static is None and ap.due():
            report = ltt_report(pool, np.array(since_alarm), max_risk, ap.attempt_alpha())
            if ap.calibrated(report):
                served = report["index"]
                if first_served is None:
                    first_served = i + 1
                population = population_at(i) if population_at else "gsm8k"
                bad_certified |= pool.true_risk(served, population) > max_risk
    return {"cost": cost, "vanilla": vanilla, "net_saving": 1 - cost / vanilla, "shadow_probe_cost": shadow_cost,
            "audit_cost": audit_cost, "audits": audits, "changed_served": changed_served,
            "serving_saving": (1 - serving_cost / serving_vanilla) if serving_vanilla else None,
            "serving_share": serving_vanilla / vanilla, "first_served": first_served, "alarm_at": alarm_at,
            "false_alarm": false_alarm, "bad_certified": bad_certified, "final": None if served is None else candidate_label(pool.candidates[served]),
            "attempts": ap.attempt, "changed_by_request": changed_by_request}


def rate(k: int, n: int) -> dict[str, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"rate": k / n, "low": float(ci.low), "high": float(ci.high), "count": k, "runs": n}


def quantiles(xs: list[float | int | None]) -> dict[str, Any]:
    got = sorted(x for x in xs if x is not None)
    if not got:
        return {"median": None, "p90": None, "runs_with": 0}
    return {"median": float(np.median(got)), "p90": float(np.quantile(got, 0.9)), "runs_with": len(got)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        vals = [r[key] for r in runs if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    finals: dict[str, int] = {}
    for r in runs:
        finals[str(r["final"])] = finals.get(str(r["final"]), 0) + 1
    return {"runs": len(runs), "false_alarm": rate(sum(r["false_alarm"] for r in runs), len(runs)),
            "alarms": sum(r["alarm_at"] is not None for r in runs), "bad_certified": sum(r["bad_certified"] for r in runs),
            "first_served": quantiles([r["first_served"] for r in runs]), "serving_saving": mean("serving_saving"),
            "serving_share": mean("serving_share"), "audit_cost_share": float(np.mean([r["audit_cost"] / r["vanilla"] for r in runs])),
            "shadow_probe_share": float(np.mean([r["shadow_probe_cost"] / r["vanilla"] for r in runs])),
            "audits": mean("audits"), "net_saving": mean("net_saving"), "attempts": mean("attempts"), "final_settings": finals}


def stationary(pool: Pool, args: argparse.Namespace) -> dict[str, Any]:
    cols = pool.columns["gsm8k"]
    safe = [c for c in range(len(pool.candidates)) if pool.true_risk(c, "gsm8k") <= args.max_risk]
    best = max(safe, key=lambda c: pool.true_saving(c, "gsm8k"))
    out: dict[str, Any] = {"best_safe": {"setting": candidate_label(pool.candidates[best]), "saving": pool.true_saving(best, "gsm8k"),
                                         "risk": pool.true_risk(best, "gsm8k")}, "fractions": {}}
    certified: set[str] = set()
    for f in args.fractions:
        runs = []
        for seed in range(args.seeds):
            rng = np.random.default_rng([seed, 1])
            runs.append(run_stream(pool, rng.choice(cols, args.requests), f, rng, max_risk=args.max_risk, alpha=args.alpha))
        out["fractions"][str(f)] = summarize(runs)
        certified |= {r["final"] for r in runs if r["final"]}
        print(f"stationary F={f}: {time.perf_counter() - T0:.0f} s", file=sys.stderr)
    # the watch alone at each setting auto mode ended up serving, at its true risk, many more seeds
    watch_only: dict[str, Any] = {}
    for label in sorted(certified):
        c = next(k for k, cand in enumerate(pool.candidates) if candidate_label(cand) == label)
        p = pool.true_risk(c, "gsm8k")
        row: dict[str, Any] = {"true_risk": p}
        for f in args.fractions:
            n_audits = int(round(args.requests * f))
            rng = np.random.default_rng([7, int(f * 1000)])
            alarms = 0
            for outcomes_ in rng.random((args.watch_seeds, n_audits)) < p:
                w = RiskWatch(args.max_risk, args.alpha)
                for x in outcomes_:
                    if w.update(bool(x)):
                        alarms += 1
                        break
            row[str(f)] = rate(alarms, args.watch_seeds)
        watch_only[label] = row
    # and at the null's boundary itself (true risk exactly max_risk): the hardest case Ville's bound covers
    row = {"true_risk": args.max_risk}
    for f in args.fractions:
        n_audits = int(round(args.requests * f))
        rng = np.random.default_rng([8, int(f * 1000)])
        alarms = 0
        for outcomes_ in rng.random((args.watch_seeds, n_audits)) < args.max_risk:
            w = RiskWatch(args.max_risk, args.alpha)
            alarms += any(w.update(bool(x)) for x in outcomes_)
        row[str(f)] = rate(alarms, args.watch_seeds)
    watch_only["at the boundary (risk = max_risk)"] = row
    out["watch_only"] = watch_only
    return out


def shift(pool: Pool, args: argparse.Namespace) -> dict[str, Any]:
    c = next(k for k, cand in enumerate(pool.candidates) if all(cand.get(key) == v for key, v in STATIC.items()))
    level = args.shift_max_risk
    out: dict[str, Any] = {"static": candidate_label(pool.candidates[c]), "max_risk": level,
                           "risk_before": pool.true_risk(c, "gsm8k"), "risk_after": pool.true_risk(c, "math500"),
                           "saving_before": pool.true_saving(c, "gsm8k"), "saving_after": pool.true_saving(c, "math500"),
                           "shadow_overhead": {name: float(pool.shadow[cols].sum() / pool.vanilla[cols].sum() - 1)
                                               for name, cols in pool.columns.items()}, "rows": []}

    def population_at(i: int) -> str:
        return "gsm8k" if i < args.shift_at else "math500"

    def streams() -> list[tuple[np.random.Generator, np.ndarray]]:
        got = []
        for seed in range(args.seeds):
            rng = np.random.default_rng([seed, 2])
            got.append((rng, np.concatenate([rng.choice(pool.columns["gsm8k"], args.shift_at),
                                             rng.choice(pool.columns["math500"], args.requests - args.shift_at)])))
        return got

    def row(mode: str, f: float | None, runs: list[dict[str, Any]]) -> dict[str, Any]:
        after = [r["alarm_at"] - args.shift_at for r in runs if r["alarm_at"] is not None and r["alarm_at"] >= args.shift_at]
        before = sum(r["alarm_at"] is not None and r["alarm_at"] < args.shift_at for r in runs)
        delays = quantiles(list(after))
        reached = [int(r["changed_by_request"][args.shift_at:].sum()) for r in runs]
        expected = level * (args.requests - args.shift_at)
        return {"mode": mode, "audit_fraction": f, "runs": len(runs), "alarms_before_shift": before, "detected": len(after),
                "delay": delays, "changed_after_shift": float(np.mean(reached)),
                "changed_after_shift_over_level": float(np.mean([max(0.0, x - expected) for x in reached])),
                "net_saving": float(np.mean([r["net_saving"] for r in runs])),
                "audit_cost_share": float(np.mean([r["audit_cost"] / r["vanilla"] for r in runs]))}

    base = streams()
    runs = [run_stream(pool, s, 0.0, rng, max_risk=level, alpha=args.alpha, static=c, watch=False) for rng, s in base]
    out["rows"].append(row("static, no watch", None, runs))
    for f in args.fractions:
        runs = [run_stream(pool, s, f, rng, max_risk=level, alpha=args.alpha, static=c, population_at=population_at) for rng, s in streams()]
        out["rows"].append(row("static + watch", f, runs))
        runs = [run_stream(pool, s, f, rng, max_risk=level, alpha=args.alpha, population_at=population_at) for rng, s in streams()]
        r = row("auto", f, runs)
        r["summary"] = summarize(runs)
        out["rows"].append(r)
        print(f"shift F={f}: {time.perf_counter() - T0:.0f} s", file=sys.stderr)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _rate(r: dict[str, float]) -> str:
    return f"{_pct(r['rate'])} [{_pct(r['low'])}, {_pct(r['high'])}] ({r['count']}/{r['runs']})"


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    st, sh = result["stationary"], result["shift"]
    md = [f"Streams of {a['requests']:,} requests drawn with replacement from the held-out testbed traces "
          "(Qwen2.5-Coder-1.5B, greedy, solve-then-check: an instruct model, not a reasoning model); replay's cost model; "
          f"{a['seeds']} seeds per row (`--seeds`); intervals are exact 95% (Clopper-Pearson) for the simulation's error. "
          "Savings are shares of vanilla's cost tokens over the whole stream, shadow probes and audits included.", "",
          f"**Stationary** (GSM8K, auto mode at changed <= {a['max_risk']:g}, alpha {a['alpha']:g}): the best safe setting "
          f"for this stream (an oracle) is {st['best_safe']['setting']}, saving {_pct(st['best_safe']['saving'])} "
          f"(changed {_pct(st['best_safe']['risk'])}).", "",
          "| audit fraction | false alarms | bad certifications | requests to first certified setting (median / p90) | "
          "served share | saving while serving | audits | audit cost | shadow probe cost | net saving | settings served at the end |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for f, s in st["fractions"].items():
        fs = s["first_served"]
        finals = ", ".join(f"{k} ({v})" for k, v in sorted(s["final_settings"].items(), key=lambda kv: -kv[1]))
        md.append(f"| {f} | {_rate(s['false_alarm'])} | {s['bad_certified']} | {_n(fs['median'])} / {_n(fs['p90'])} "
                  f"({fs['runs_with']}/{s['runs']}) | {_pct(s['serving_share'])} | {_pct(s['serving_saving'])} | {_n(s['audits'])} | "
                  f"{_pct(s['audit_cost_share'])} | {_pct(s['shadow_probe_share'])} | {_pct(s['net_saving'])} | {finals} |")
    md += ["", f"The watch alone over {a['requests']:,} requests ({a['watch_seeds']} seeds, `--watch-seeds`) at each setting auto mode "
           "served at the end of some stream, audits drawn at its true changed rate on GSM8K: the share of streams with an alarm. "
           f"At a true risk within {a['max_risk']:g} that is the false-alarm rate (its promise: at most alpha, whatever the length); "
           "above it (marked *over*), an alarm is a detection.", "",
           "| setting | true risk | " + " | ".join(f"F = {f}" for f in a["fractions"]) + " |",
           "|---|---:|" + "---:|" * len(a["fractions"])]
    for label, row in st["watch_only"].items():
        over = " *over*" if row["true_risk"] > a["max_risk"] + 1e-12 else ""
        md.append(f"| {label} | {_pct(row['true_risk'])}{over} | " + " | ".join(_rate(row[str(f)]) for f in a["fractions"]) + " |")
    md += ["", f"**Shift** (GSM8K, then MATH-500 from request {a['shift_at']:,}): the static setting {sh['static']} (the issue's: "
           f"`calibrate --risk lost --max-risk 0.1 --alpha 0.05` on the 300 GSM8K traces) changes {_pct(sh['risk_before'])} "
           f"of GSM8K answers and **{_pct(sh['risk_after'])} of MATH-500's** (saving {_pct(sh['saving_before'])} and "
           f"{_pct(sh['saving_after'])}); watched at changed <= {sh['max_risk']:g}, alpha {a['alpha']:g}. Delay: requests from the "
           "shift to the revert; 'changed after the shift': changed answers that reached clients after it (mean per stream; "
           f"'over the level': beyond {sh['max_risk']:g} of those requests). After a revert the proxy answers as shadow does, "
           f"probing every boundary to record traces: {_pct(sh['shadow_overhead']['math500'])} more than vanilla on MATH-500 "
           f"({_pct(sh['shadow_overhead']['gsm8k'])} on GSM8K), which is why reverting early costs net saving.", "",
           "| mode | audit fraction | alarms before the shift | detected | delay median / p90 (requests) | changed after the shift "
           "| over the level | audit cost | net saving |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sh["rows"]:
        d = r["delay"]
        md.append(f"| {r['mode']} | {r['audit_fraction'] if r['audit_fraction'] is not None else '-'} | {r['alarms_before_shift']} | "
                  f"{r['detected']}/{r['runs']} | {_n(d['median'])} / {_n(d['p90'])} | {r['changed_after_shift']:.0f} | "
                  f"{r['changed_after_shift_over_level']:.0f} | {_pct(r['audit_cost_share'])} | {_pct(r['net_saving'])} |")
    md += ["", f"Check: {result['check']}. {result['seconds']:.0f} s."]
    return "\n".join(md) + "\n"


T0 = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seeds", type=int, default=100, help="streams per row (default 100; BENCHMARKS.md has a run with more)")
    ap.add_argument("--watch-seeds", type=int, default=2000, help="streams per row of the watch-alone false-alarm table")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--shift-at", type=int, default=2_000)
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.05, 0.2])
    ap.add_argument("--max-risk", type=float, default=0.1)
    ap.add_argument("--shift-max-risk", type=float, default=0.15)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--out", default=str(RESULTS / "watch"), help="output prefix: PREFIX.md and PREFIX.json")
    args = ap.parse_args(argv)
    pool = load_pool()
    check = cross_check(pool, args.max_risk, args.alpha)
    print(f"loaded {pool.changed.shape[1]} traces x {len(pool.candidates)} candidates: {time.perf_counter() - T0:.0f} s", file=sys.stderr)
    result: dict[str, Any] = {"args": vars(args), "candidates": len(pool.candidates), "check": check,
                              "stationary": stationary(pool, args), "shift": shift(pool, args)}
    result["seconds"] = time.perf_counter() - T0
    md = markdown(result)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=lambda x: None if isinstance(x, np.ndarray) else str(x)) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
