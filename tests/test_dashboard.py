"""docs/grafana-codestop.json, the Grafana dashboard of the proxy's Prometheus metrics: importable
(a Prometheus datasource variable every panel uses), and every metric it queries is one codestop
exposes, or one the guard's audits and watch expose (named in GUARD_METRICS: issue 28)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness import free_port
from prometheus_client.parser import text_string_to_metric_families

from codestop.engines.server import ServerEngine
from codestop.serve.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-codestop.json"
# the audits' and the watch's series (codestop/serve/audit.py, guard.py), each labelled by segment;
# codestop_guard_state{segment,state} is 1 for the segment's current state, 0 for the other two
GUARD_METRICS = {"codestop_audits_total", "codestop_audits_changed_total", "codestop_audit_cost_tokens_total",
                 "codestop_audits_failed_total", "codestop_guard_state", "codestop_watch_e_value"}
# PromQL's words that are not metric names (functions and aggregations are known by their "(")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its words, less strings, label matchers, ranges,
    label lists, Grafana's variables, numbers and what is called."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\{?\w+\}?", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return {m.group() for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr)
            if not expr[m.end():].lstrip().startswith("(") and m.group() not in PROMQL_WORDS}


def exposed() -> set[str]:
    """Every series name codestop's /metrics gives, with a server engine's counters (one that never
    connected: the names are there, the counts 0)."""
    engine = ServerEngine.connect(f"http://127.0.0.1:{free_port()}/v1", wait=False, model="m")
    names: set[str] = set()
    for family in text_string_to_metric_families(Metrics(lambda: engine).render().decode()):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
        names.update(s.name for s in family.samples)
    return names


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets, its variables' label_values."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else ""
        exprs += re.findall(r"label_values\(([^,]+),", query)
    return exprs


def test_the_metric_name_reader_reads_promql() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, endpoint) (rate(a_bucket{x="y(z)"}[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("1 - sum(increase(b_total[$__range])) / sum(c_total) + 2 * max by (s) (d{s=~\"$segment\"}) or 1e-3") == \
        {"b_total", "c_total", "d"}
    assert metric_names("1 / $alpha") == set()


def test_every_metric_the_dashboard_queries_is_one_codestop_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    assert len(exprs) > 20
    read = set().union(*map(metric_names, exprs))
    known = exposed()
    assert {"codestop_requests_total", "codestop_upstream_requests_total", "codestop_shadow_saving_bucket"} <= known
    assert read - known - GUARD_METRICS == set()
    assert GUARD_METRICS <= read  # the guarantee's series are all on it
    assert {"codestop_requests_total", "codestop_request_duration_seconds_bucket", "codestop_stops_total",
            "codestop_shadow_cost_tokens_total", "codestop_upstream_connections"} <= read


def test_the_dashboard_imports_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert all(t["datasource"] == p["datasource"] and t["expr"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "no two panels overlap"
