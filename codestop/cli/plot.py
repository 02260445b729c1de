"""``codestop plot`` and ``codestop report``: figures from traces, one HTML page of a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError
from codestop.figures.dynamics import auroc_table, dynamics, plot_dynamics
from codestop.figures.report import report
from codestop.traces import load_traces


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="figures from traces (dynamics: confidence over the reasoning, correct vs incorrect)")
    kinds = p.add_subparsers(dest="plot", metavar="KIND")
    d = kinds.add_parser(
        "dynamics",
        help="confidence against normalised position, lengths, and AUROC of early-confidence features",
        description="Plot confidence dynamics of correct vs incorrect trajectories from recorded traces.",
    )
    d.add_argument("traces", help="a trace file (codestop record)")
    d.add_argument("--out", default=None, help="the PNG to write (default: the trace file's path with .dynamics.png)")
    d.add_argument("--confidence", default="geometric", help="confidence function used to score the probes")
    d.add_argument("--json", action="store_true", help="print the numbers behind the figure as JSON")
    d.set_defaults(func=cmd_plot_dynamics)
    p.set_defaults(func=cmd_plot)

    r = sub.add_parser("report", help="gather a run folder's tables and figures into one HTML page")
    r.add_argument("directory", help="the folder of a run (e.g. bench/results)")
    r.add_argument("--out", default=None, help="the HTML file (default: DIRECTORY/report.html)")
    r.add_argument("--title", default="codestop report")
    r.set_defaults(func=cmd_report)


def cmd_plot(args: argparse.Namespace) -> int:
    if getattr(args, "plot", None) == "dynamics":
        return cmd_plot_dynamics(args)
    raise CodestopError("plot: name a figure, e.g. `codestop plot dynamics TRACES`")


def cmd_plot_dynamics(args: argparse.Namespace) -> int:
    traces = load_traces(args.traces)
    stats = dynamics(traces, args.confidence)
    base = str(args.traces)[: -len(".jsonl")] if str(args.traces).endswith(".jsonl") else str(args.traces)
    out = Path(args.out or base + ".dynamics.png")
    plot_dynamics(stats, out, title=f"{Path(args.traces).name}: {stats['n']} trajectories, {stats['n_correct']} correct")
    if args.json:
        print(json.dumps(stats))
    else:
        print(auroc_table(stats))
        print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = report(args.directory, args.out, args.title)
    print(f"wrote {path}")
    return 0
