"""Is the calibration guarantee kept? Checked on the testbed's traces treated as populations.

    PYTHONPATH=. python bench/guarantee.py [--draws 1000] [--seed 0] [--out bench/results/guarantee]

Each committed held-out testbed trace file (GSM8K 300 solve-then-check, GSM8K 300 Chain-of-Draft,
MATH-500 100; Qwen2.5-Coder-1.5B, an instruct model, not a reasoning model) is a population: every
candidate setting's true risk is its rate on the whole file, its true saving its saving there. From
each, ``--draws`` calibration samples of n traces are drawn i.i.d. (with replacement: the guarantee's
own assumption, and what lets n exceed the MATH-500 file), and three rules choose a setting on each
from the same default grid of ``codestop calibrate`` (CoDE-Stop tau x r_min x r_max, DEER, Consistency):

* ``ltt``: ``codestop calibrate`` (Learn-then-Test, ordering fraction 0.3): risk <= max_risk with
  probability >= 1 - alpha is what it promises;
* ``by drop``: the rule before it (``calibrate_by_drop`` with ``--calibration-fraction 1``, over the
  same grid): the fewest reasoning tokens whose measured net accuracy drop is <= max_risk;
* ``by measured risk``: the most saving setting whose measured risk on the sample is <= max_risk
  (the natural rule without the multiple-testing correction).

For each it reports how often the chosen setting's true risk exceeds max_risk, with a 95%
Clopper-Pearson interval for that rate (the simulation's own error), and the mean true saving
(vanilla, the fallback, saves 0). Every candidate's per-trace outcome is replayed once per
population, so 1,000 draws are array work. One draw per population is checked against the library
functions themselves (``calibrate`` and ``calibrate_by_drop`` on the drawn traces give the same choice).

Then, on the testbed's measurement half (the 150 GSM8K traces the testbed measured on, ids in
``bench/results/testbed-heldout/analysis.json``), ``codestop calibrate`` for ``changed`` and ``lost``
at a few (max_risk, alpha), each chosen setting measured on the other half, which it never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest  # type: ignore[import-untyped]

from codestop.analysis.calibrate import DEFAULT_ORDERING_FRACTION, calibrate, calibrate_by_drop
from codestop.analysis.risk import Outcomes, candidate_grid, candidate_label, learn_then_test, outcomes, split
from codestop.traces import Trace, load_traces

RESULTS = Path(__file__).resolve().parent / "results"
POPULATIONS = {
    "GSM8K solve-then-check": "testbed-gsm8k-heldout-solve-then-check.traces.jsonl",
    "GSM8K chain-of-draft": "testbed-gsm8k-heldout-chain-of-draft.traces.jsonl",
    "MATH-500 solve-then-check": "testbed-math500-solve-then-check.traces.jsonl",
}
SIZES = (100, 200)
RISKS = ("changed", "lost")
LEVELS = ((0.05, 0.05), (0.10, 0.05), (0.10, 0.10))
HALF_LEVELS = ((0.05, 0.05), (0.10, 0.05), (0.10, 0.10), (0.20, 0.05))


def true_figures(out: Outcomes) -> dict[str, np.ndarray]:
    assert out.lost is not None and out.gained is not None and out.changed is not None
    return {"changed": out.changed.mean(axis=1), "lost": out.lost.mean(axis=1),
            "saving": 1 - out.cost.mean(axis=1) / out.vanilla_cost.mean()}


def by_drop(out: Outcomes, sample: np.ndarray, max_drop: float) -> int | None:
    """calibrate_by_drop's rule over the grid: the fewest mean reasoning tokens with a measured net drop
    <= max_drop (the smaller drop among equals; the first candidate among equal both), else None."""
    assert out.lost is not None and out.gained is not None
    drop = (out.lost[:, sample].sum(axis=1) - out.gained[:, sample].sum(axis=1)) / len(sample)
    tokens = out.reasoning[:, sample].mean(axis=1)
    ok = [i for i in range(len(drop)) if drop[i] <= max_drop + 1e-12]
    return min(ok, key=lambda i: (tokens[i], drop[i])) if ok else None


def by_measured_risk(loss: np.ndarray, out: Outcomes, sample: np.ndarray, max_risk: float) -> int | None:
    """The most saving setting whose measured risk on the sample is <= max_risk (None: vanilla)."""
    measured = loss[:, sample].mean(axis=1)
    cost = out.cost[:, sample].mean(axis=1)
    ok = [i for i in range(len(measured)) if measured[i] <= max_risk + 1e-12]
    best = min(ok, key=lambda i: cost[i]) if ok else None
    return best if best is not None and cost[best] < out.vanilla_cost[sample].mean() else None


def rate(k: int, n: int) -> dict[str, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"rate": k / n, "low": float(ci.low), "high": float(ci.high), "count": k, "draws": n}


def simulate(name: str, traces: list[Trace], out: Outcomes, draws: int, seed: int) -> list[dict[str, Any]]:
    truth = true_figures(out)
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        samples = [rng.integers(0, len(traces), n) for _ in range(draws)]
        splits = [split(n, DEFAULT_ORDERING_FRACTION, seed + d) for d in range(draws)]
        for risk in RISKS:
            loss = out.loss(risk)
            for max_risk, alpha in LEVELS:
                chosen: dict[str, list[int | None]] = {"ltt": [], "by drop": [], "by measured risk": []}
                for sample, (o, t) in zip(samples, splits):
                    chosen["ltt"].append(learn_then_test(loss, out.cost, out.vanilla_cost, sample[o], sample[t],
                                                         max_risk=max_risk, alpha=alpha).chosen)
                    chosen["by drop"].append(by_drop(out, sample, max_risk))
                    chosen["by measured risk"].append(by_measured_risk(loss, out, sample, max_risk))
                safe = [truth["saving"][i] for i in range(len(out.candidates)) if truth[risk][i] <= max_risk + 1e-12]
                row: dict[str, Any] = {"population": name, "n": n, "risk": risk, "max_risk": max_risk, "alpha": alpha,
                                       "best_true_saving": max([0.0, *safe])}
                for rule, picks in chosen.items():
                    over = int(sum(c is not None and truth[risk][c] > max_risk + 1e-12 for c in picks))
                    row[rule] = {"over": rate(over, draws),
                                 "certified_share": sum(c is not None for c in picks) / draws,
                                 "mean_true_saving": float(np.mean([truth["saving"][c] if c is not None else 0.0 for c in picks]))}
                rows.append(row)
    return rows


def cross_check(traces: list[Trace], out: Outcomes, seed: int) -> str:
    """One draw through the library functions: the array rules above must choose what they choose."""
    rng = np.random.default_rng(seed + 99)
    sample = rng.integers(0, len(traces), 200)
    drawn = [traces[j] for j in sample]
    o, t = split(200, DEFAULT_ORDERING_FRACTION, seed)
    res = calibrate(drawn, risk="lost", max_risk=0.1, alpha=0.05, candidates=out.candidates, seed=seed)
    ours = learn_then_test(out.loss("lost"), out.cost, out.vanilla_cost, sample[o], sample[t], max_risk=0.1, alpha=0.05).chosen
    want = out.candidates[ours] if ours is not None else {"method": "vanilla"}
    assert res["policy"] == want, (res["policy"], want)
    # the old rule, one method at a time as the function takes it: CoDE-Stop's tau at the paper's ceiling
    taus = sorted({c["tau"] for c in out.candidates if c["method"] == "codestop"})
    old = calibrate_by_drop(drawn, 0.05, method="codestop", values=taus, calibration_fraction=1)
    sub = [i for i, c in enumerate(out.candidates) if c["method"] == "codestop" and (c["r_min"], c["r_max"]) == (0.9, 0.95)]
    assert out.lost is not None and out.gained is not None
    restricted = replace(out, candidates=[out.candidates[i] for i in sub], lost=out.lost[sub], gained=out.gained[sub],
                         reasoning=out.reasoning[sub])
    pick = by_drop(restricted, sample, 0.05)
    assert old["chosen"] == (restricted.candidates[pick]["tau"] if pick is not None else None), (old["chosen"], pick)
    return f"calibrate -> {candidate_label(want)}; calibrate_by_drop -> tau={old['chosen']}"


def measurement_half(draws_seed: int) -> list[dict[str, Any]]:
    analysis = json.loads((RESULTS / "testbed-heldout" / "analysis.json").read_text())
    half = set(analysis["calibration"]["codestop"]["held_out_ids"])
    rows = []
    for name in ("GSM8K solve-then-check", "GSM8K chain-of-draft"):
        traces = load_traces(RESULTS / POPULATIONS[name])
        meas = [t for t in traces if t.id in half]
        other = [t for t in traces if t.id not in half]
        cands = candidate_grid()
        other_out = outcomes(other, cands)
        for risk in RISKS:
            for max_risk, alpha in HALF_LEVELS:
                r = calibrate(meas, risk=risk, max_risk=max_risk, alpha=alpha, candidates=cands, seed=draws_seed)
                i = next((k for k, c in enumerate(cands) if c == r["policy"]), None)
                other_fig = ({"changed": float(other_out.loss("changed")[i].mean()), "lost": float(other_out.loss("lost")[i].mean()),
                              "saving": float(1 - other_out.cost[i].mean() / other_out.vanilla_cost.mean())}
                             if i is not None else {"changed": 0.0, "lost": 0.0, "saving": 0.0})
                ch = r["chosen"]
                rows.append({"prompt": name, "risk": risk, "max_risk": max_risk, "alpha": alpha, "n": r["n"],
                             "n_ordering": r["n_ordering"], "n_testing": r["n_testing"], "n_certified": r["n_certified"],
                             "chosen": ch["label"], "policy": r["policy"], "saving": ch["saving"],
                             "risk_observed": ch["risk_observed"], "net_accuracy_drop": ch.get("net_accuracy_drop"),
                             "other_half": other_fig, "statement": r["statement"]})
    return rows


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def markdown(sim: list[dict[str, Any]], half: list[dict[str, Any]], draws: int, checks: dict[str, str], seconds: float) -> str:
    md = [f"Each row: {draws} calibration samples of n traces drawn i.i.d. from the population (the whole file); "
          "'over' = share of samples whose chosen setting's true risk (its rate on the whole file) exceeds max_risk, "
          "with its exact 95% interval (the simulation's error); 'saving' = the chosen setting's true saving of cost "
          "tokens on the whole file, averaged over samples (vanilla, the fallback, counts 0); 'chose' = share of samples "
          "where the rule chose a setting other than vanilla. LTT = `codestop calibrate` (Learn-then-Test, ordering "
          "fraction 0.3); by drop = the earlier rule at max drop = max_risk, choosing on the whole sample; by measured "
          "risk = the most saving setting whose measured risk is within max_risk; best safe saving = the largest true saving "
          "of any candidate whose true risk is within max_risk (what an oracle would pick).", ""]
    for pop in POPULATIONS:
        rows = [r for r in sim if r["population"] == pop]
        if not rows:
            continue
        md += [f"**{pop}** (population {rows[0].get('population_size', '?')} traces)", "",
               "| n | risk | max_risk | alpha | LTT over | LTT chose | LTT saving | by drop over | by drop saving "
               "| by measured risk over | its saving | best safe saving |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            cells = []
            for rule in ("ltt", "by drop", "by measured risk"):
                o = r[rule]["over"]
                cells.append(f"{_pct(o['rate'])} [{_pct(o['low'])}, {_pct(o['high'])}]")
                if rule == "ltt":
                    cells.append(_pct(r[rule]["certified_share"]))
                cells.append(_pct(r[rule]["mean_true_saving"]))
            cells.append(_pct(r["best_true_saving"]))
            md.append(f"| {r['n']} | {r['risk']} | {r['max_risk']:g} | {r['alpha']:g} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["Checks against the library on one draw of 200 per population: " +
           "; ".join(f"{k}: {v}" for k, v in checks.items()) + ".", "",
           "**On the testbed's measurement half** (150 GSM8K traces; `codestop calibrate` on them, default grid, "
           "ordering fraction 0.3, seed 0), and the chosen setting on the other 150 traces, which it never saw:", "",
           "| prompt | risk | max_risk | alpha | certified | chosen | saving [95% bootstrap] | observed risk | net accuracy drop "
           "| other half: changed | lost | saving |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in half:
        s = r["saving"]
        interval = f" [{_pct(s['low'])}, {_pct(s['high'])}]" if s["low"] is not None and s["method"] != "degenerate" else ""
        drop = "-" if r["net_accuracy_drop"] is None else f"{r['net_accuracy_drop'] * 100:+.1f} pts"
        o = r["other_half"]
        md.append(f"| {r['prompt']} | {r['risk']} | {r['max_risk']:g} | {r['alpha']:g} | {r['n_certified']} | {r['chosen']} | "
                  f"{_pct(s['estimate'])}{interval} | {_pct(r['risk_observed'])} | {drop} | {_pct(o['changed'])} | "
                  f"{_pct(o['lost'])} | {_pct(o['saving'])} |")
    md += ["", f"({seconds:.0f} s on this machine.)"]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "guarantee"), help="output prefix: PREFIX.md and PREFIX.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cands = candidate_grid()
    sim: list[dict[str, Any]] = []
    checks: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for name, file in POPULATIONS.items():
        traces = load_traces(RESULTS / file)
        out = outcomes(traces, cands)
        sizes[name] = len(traces)
        checks[name] = cross_check(traces, out, args.seed)
        rows = simulate(name, traces, out, args.draws, args.seed)
        for r in rows:
            r["population_size"] = len(traces)
        sim += rows
        print(f"{name}: {len(traces)} traces, {len(cands)} candidates, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    half = measurement_half(args.seed)
    seconds = time.perf_counter() - t0
    md = markdown(sim, half, args.draws, checks, seconds)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"draws": args.draws, "seed": args.seed, "candidates": len(cands),
                                                    "populations": sizes, "simulation": sim, "measurement_half": half,
                                                    "checks": checks, "seconds": seconds}, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
