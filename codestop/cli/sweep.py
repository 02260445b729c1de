"""``codestop sweep``: the trade-off on recorded traces (``codestop calibrate``: :mod:`codestop.cli.calibrate`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from codestop.analysis.sweep import FIXED_OPTIONS, KNOBS, markdown_table, parse_range, sweep, write_csv
from codestop.cli.options import add_probe_interval_option
from codestop.errors import CodestopError
from codestop.figures.tradeoff import plot_tradeoff
from codestop.policies import knob_help, knob_type
from codestop.traces import load_traces


def _add_knob_options(p: argparse.ArgumentParser) -> None:
    helps = knob_help()
    g = p.add_argument_group("knob ranges (start:stop:step with stop included, a comma list, or one value)")
    for knob, _, default in KNOBS.values():
        g.add_argument("--" + knob.replace("_", "-"), default=None, help=f"{helps[knob].split(' (default')[0]} (default range {default})")
    f = p.add_argument_group("fixed options (for the methods that take them)")
    for knob in FIXED_OPTIONS:
        f.add_argument("--" + knob.replace("_", "-"), type=knob_type(knob), default=None, help=helps[knob])


def _ranges(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, list[Any]]:
    out = {}
    for method in methods:
        if method == "vanilla":
            continue
        if method not in KNOBS:
            raise CodestopError(f"method: unknown method {method!r}; choose from {', '.join(['vanilla', *KNOBS])}")
        knob, kind, default = KNOBS[method]
        out[method] = parse_range(getattr(args, knob) or default, kind, knob)
    return out


def _fixed(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in FIXED_OPTIONS if getattr(args, k) is not None}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="replay methods over a range of their knob: Pareto table and accuracy-vs-tokens plot",
        description="Replay one or several methods over a range of their knob on recorded traces; write "
        "PREFIX.csv, PREFIX.md (the Pareto table) and PREFIX.png (accuracy against mean reasoning tokens).",
    )
    p.add_argument("traces", help="a trace file (codestop record)")
    p.add_argument(
        "--method", action="append", default=None,
        help="codestop, deer, consistency, budget; repeat or comma-separate (default: codestop,deer,consistency)",
    )
    p.add_argument("--out", default=None, help="output prefix (default: the trace file's path without .jsonl, plus .sweep)")
    p.add_argument("--json", action="store_true", help="print the points as JSON")
    add_probe_interval_option(p)
    _add_knob_options(p)
    p.set_defaults(func=cmd_sweep)


def _methods(raw: Sequence[str] | None) -> list[str]:
    if not raw:
        return ["codestop", "deer", "consistency"]
    return [m.strip() for item in raw for m in item.split(",") if m.strip()]


def cmd_sweep(args: argparse.Namespace) -> int:
    traces = load_traces(args.traces, args.probe_interval)
    points = sweep(traces, _ranges(args, _methods(args.method)), **_fixed(args))
    prefix = args.out or (str(args.traces)[: -len(".jsonl")] if str(args.traces).endswith(".jsonl") else str(args.traces)) + ".sweep"
    out = Path(prefix)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(points, Path(prefix + ".csv"))
    Path(prefix + ".md").write_text(markdown_table(points), encoding="utf-8")
    plot_tradeoff(points, Path(prefix + ".png"), title=f"{Path(args.traces).name}: {len(traces)} traces")
    if args.json:
        print(json.dumps([asdict(p) for p in points]))
    else:
        print(markdown_table(points, only_pareto=True))
        print(f"wrote {prefix}.csv, {prefix}.md, {prefix}.png", file=sys.stderr)
    return 0
