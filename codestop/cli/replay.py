"""``codestop replay``: a stopping policy applied to recorded traces."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from codestop.cli.options import add_policy_options, add_probe_interval_option, policy_from_args
from codestop.replay import replay
from codestop.traces import load_traces


def add_parser(sub: Any) -> None:
    r = sub.add_parser(
        "replay",
        help="apply a stopping policy to recorded traces, in milliseconds",
        description="Apply a stopping policy to recorded traces exactly as it would run live.",
    )
    r.add_argument("traces", help="a trace file (codestop record, or minimal traces: id and probes)")
    r.add_argument("--json", action="store_true", help="print one JSON object: summary and per-trace outcome")
    add_probe_interval_option(r)
    add_policy_options(r)
    r.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    policy = policy_from_args(args)
    t0 = time.perf_counter()
    result = replay(load_traces(args.traces, args.probe_interval), policy)
    if args.json:
        print(json.dumps(result))
        return 0
    s = result["summary"]
    stops: dict[str, int] = {}
    for t in result["traces"]:
        stops[t["stop_reason"] or "never"] = stops.get(t["stop_reason"] or "never", 0) + 1
    accuracy = "unknown (unlabelled traces)" if s["accuracy"] is None else f"{s['accuracy'] * 100:.1f}%"
    print(
        f"{policy.name} on {s['n']} traces: accuracy {accuracy}, mean reasoning tokens {s['mean_reasoning_tokens']:.0f}, "
        f"mean cost tokens {s['mean_cost_tokens']:.0f} (incl. probes); stops: "
        + ", ".join(f"{k} {v}" for k, v in sorted(stops.items()))
        + f" ({(time.perf_counter() - t0) * 1000:.0f} ms)"
    )
    return 0
