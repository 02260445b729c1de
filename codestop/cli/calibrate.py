"""``codestop calibrate``: the most saving setting whose risk is certified, written as a policy file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from codestop.analysis.calibrate import DEFAULT_ORDERING_FRACTION, calibrate, calibrate_by_drop, format_report
from codestop.analysis.risk import DEFAULT_METHODS, GRID_KNOBS, GRID_RANGES, RISKS, candidate_grid
from codestop.analysis.sweep import KNOBS, parse_range
from codestop.cli.options import add_probe_interval_option
from codestop.errors import CodestopError
from codestop.policies import knob_help, knob_type
from codestop.policy_file import write_policy_file
from codestop.traces import load_traces

# the knobs a grid ranges over (each method's swept knob, CoDE-Stop's r_min and r_max); the others are fixed
RANGED = tuple(dict.fromkeys(k for knobs in GRID_KNOBS.values() for k in knobs))
FIXED = tuple(k for k in knob_help() if k not in RANGED)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_parser(sub: Any) -> None:
    c = sub.add_parser(
        "calibrate",
        help="the most saving stopping setting whose risk is certified (Learn-then-Test), or why none is",
        description="Choose, among a grid of stopping settings (several methods and knobs), the one that saves the most "
        "while its risk is certified: with probability at least 1 - ALPHA over the draw of the calibration traces, it "
        "changes (--risk changed, label-free) or loses (--risk lost, needs labels) the answer of at most MAX_RISK of "
        "questions like them. Learn-then-Test: a part of the traces orders the settings, exact binomial tests on the "
        "rest certify them in that order. Holds only for traffic like the traces: same model, sampling, prompt, "
        "boundaries and cap.",
    )
    c.add_argument("traces", nargs="+",
                   help="trace files (codestop record, or the proxy's shadow and audit traces): paths or glob patterns "
                        "(quote them), e.g. the shadow traces of several proxy hosts, calibrated together")
    c.add_argument("--risk", default="changed", choices=RISKS,
                   help="changed: the answer at the stop differs from the full reasoning's (no labels needed; default); "
                        "lost: the full reasoning was right and the answer at the stop is wrong (labelled traces)")
    c.add_argument("--max-risk", type=_fraction, default=None, help="the risk level to certify, a fraction (e.g. 0.02)")
    c.add_argument("--alpha", type=_fraction, default=0.05,
                   help="the error level: the guarantee holds with probability at least 1 - alpha (default 0.05)")
    c.add_argument("--method", action="append", default=None,
                   help=f"methods to choose among; repeat or comma-separate (default: {','.join(DEFAULT_METHODS)})")
    c.add_argument("--ordering-fraction", type=_fraction, default=DEFAULT_ORDERING_FRACTION,
                   help=f"share of the traces that orders the candidates; the rest tests them (default {DEFAULT_ORDERING_FRACTION})")
    c.add_argument("--seed", type=int, default=0, help="seed of the random ordering/testing split")
    c.add_argument("--out", default=None, metavar="FILE", help="write the chosen policy and its guarantee as a policy file")
    c.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    add_probe_interval_option(c)
    helps = knob_help()
    g = c.add_argument_group("candidate grid (start:stop:step with stop included, a comma list, or one value)")
    for knob in RANGED:
        default = GRID_RANGES.get(knob) or next(d for k, _, d in KNOBS.values() if k == knob)
        g.add_argument("--" + knob.replace("_", "-"), default=None, help=f"{helps[knob].split(' (default')[0]} (default {default})")
    f = c.add_argument_group("fixed options (for the methods that take them)")
    for knob in FIXED:
        f.add_argument("--" + knob.replace("_", "-"), type=knob_type(knob), default=None, help=helps[knob])
    old = c.add_argument_group("the earlier rule, without a guarantee (for comparison)")
    old.add_argument("--max-accuracy-drop", type=float, default=None,
                     help="instead of --max-risk: one method's knob with the fewest reasoning tokens whose measured net "
                          "accuracy drop on a calibration split is within this fraction, measured on the rest")
    old.add_argument("--calibration-fraction", type=float, default=0.5, help="with --max-accuracy-drop: the share used to choose")
    c.set_defaults(func=cmd_calibrate)


def _methods(raw: list[str] | None) -> list[str]:
    if not raw:
        return list(DEFAULT_METHODS)
    return [m.strip() for item in raw for m in item.split(",") if m.strip()]


def _ranges(args: argparse.Namespace) -> dict[str, list[Any]]:
    out = {}
    for knob in RANGED:
        text = getattr(args, knob)
        if text is not None:
            kind = knob_type(knob)
            out[knob] = parse_range(text, kind if kind in (int, float) else float, knob)
    return out


def _fixed(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in FIXED if getattr(args, k) is not None}


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.max_accuracy_drop is not None:
        return _by_drop(args)
    if args.max_risk is None:
        raise CodestopError("--max-risk: give the risk level to certify, e.g. --max-risk 0.02 "
                            "(or --max-accuracy-drop for the earlier rule, which certifies nothing)")
    candidates = candidate_grid(_methods(args.method), _ranges(args), _fixed(args))
    traces = load_traces(args.traces, args.probe_interval)
    result = calibrate(traces, risk=args.risk, max_risk=args.max_risk, alpha=args.alpha, candidates=candidates,
                       ordering_fraction=args.ordering_fraction, seed=args.seed)
    result["traces"] = result["guarantee"]["traces"] = " ".join(args.traces)
    if args.out:
        write_policy_file(args.out, result["policy"], result["guarantee"])
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result), end="")
    if args.out:
        what = "" if result["chosen"]["certified"] else " (vanilla: nothing certified)"
        print(f"wrote {args.out}{what}", file=sys.stderr)
    return 0


def _by_drop(args: argparse.Namespace) -> int:
    methods = _methods(args.method or ["codestop"])
    if len(methods) != 1:
        raise CodestopError("--max-accuracy-drop: the earlier rule calibrates one method's knob; give one --method")
    if args.out:
        raise CodestopError("--out: the earlier rule certifies nothing to write with a policy; use --max-risk")
    method = methods[0]
    if method not in KNOBS:
        raise CodestopError(f"method: {method!r} has no knob to calibrate; choose from {', '.join(KNOBS)}")
    knob, kind, default = KNOBS[method]
    ranges = _ranges(args)
    options = _fixed(args)
    for name, values in ranges.items():  # the ceiling is one fixed value under this rule
        if name != knob:
            if len(values) != 1:
                raise CodestopError(f"--{name.replace('_', '-')}: --max-accuracy-drop takes one value, not a range")
            options[name] = values[0]
    traces = load_traces(args.traces, args.probe_interval)
    result = calibrate_by_drop(traces, args.max_accuracy_drop, method=method, values=ranges.get(knob) or parse_range(default, kind, knob),
                               calibration_fraction=args.calibration_fraction, seed=args.seed, **options)
    print(json.dumps(result) if args.json else result["statement"])
    return 0
