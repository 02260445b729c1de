"""The page a person reads at a glance (``GET /codestop``): one self-contained HTML page, no script
and no external asset, with a card per segment: its state (watching, serving, reverted), the traces
collected, the policy served and its guarantee, the cost tokens saved, the audits with their changed
share and its anytime-valid interval, and the watch's e-value over the audits as an inline SVG chart
(log scale, the alarm line at 1/alpha).

:func:`render_page` draws a snapshot (the shape ``Guard.snapshot()`` gives, docs/serving.md);
:func:`snapshot_of` takes it from a proxy's ``Served``. Every string from a snapshot is escaped: a
segment's name comes from a client's header.

With a proxy key, the page asks for it (:func:`page_key_ok`): as ``Authorization: Bearer KEY`` like
every other route, or as the password of a browser's Basic login (any user name; the 401 carries
``WWW-Authenticate: Basic``, so a browser asks). Never in the URL's query (it would stay in
histories and access logs), and the page never holds it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from codestop.serve.serving import served_models
from codestop.serve.store import thinned
from codestop.version import __version__

# the response's headers: nothing cached, no referrer, no frame, nothing loaded or run (inline style only)
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'",
}
REFRESH_S = 15  # the page reloads itself (a meta refresh: no script)
MAX_CHART_POINTS = 1000  # the e-value chart's points at most
LOGIN_HEADERS = {"WWW-Authenticate": 'Basic realm="codestop", charset="UTF-8"'}

# each state's badge colour and what it means, in one line
STATES = {
    "watching": ("#52606d", "shadow: answered as the upstream alone would, traces collected"),
    "serving": ("#1f7a3d", "a certified setting stops answers, audited and watched"),
    "reverted": ("#b42318", "the watch alarmed: answered as in shadow again, traces collected anew"),
}


def page_key_ok(authorization: str, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``key`` as a Basic login's password (any user
    name), compared in constant time. (A Bearer key is the proxy's own check.)"""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not key:
        return False
    try:
        login = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(login.partition(":")[2].encode(), key.encode())


def snapshot_of(served: Any) -> dict[str, Any]:
    """The snapshot of a proxy's ``Served`` (codestop.serve.app): its guard's where it has one,
    else one segment per served model from its options: "watching" in shadow mode, else "serving"
    its policy file's policy; no audits. The traces are the shadowed requests this process
    answered (several models share them)."""
    guard = getattr(served, "guard", None)
    if guard is not None:
        return dict(guard.snapshot())
    options = served.options
    policy_file = options.policy_file
    shadowing = served.shadow is not None
    names = list(options.defaults.served_model_name)
    if not names and served.engine is not None:
        names = served_models(served.engine)
    traces = served.metrics.registry.get_sample_value("codestop_shadow_requests_total") or 0
    guarantee = None if shadowing else policy_file.guarantee
    segment: dict[str, Any] = {
        "state": "watching" if shadowing else "serving", "traces": int(traces),
        "policy": None if shadowing else dict(policy_file.policy), "guarantee": guarantee,
        "saved_cost_tokens": 0, "audits": 0, "audits_changed": 0, "audits_failed": 0, "audit_cost_tokens": 0,
        "changed_share": None, "changed_interval": None, "e_values": [],
        "alarm_threshold": 1 / guarantee["alpha"] if guarantee else None, "alarmed_at": None,
    }
    return {"version": __version__, "segments": [{"segment": name, **segment} for name in names or ["(loading)"]]}


# --------------------------------------------------------------------------------------------
# Drawing: every value read defensively (a snapshot is data: a missing or odd value shows as a dash)
# --------------------------------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any) -> float | None:
    """``value`` as a finite number, None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def count(value: Any) -> str:
    x = number(value)
    return "&mdash;" if x is None else f"{x:,.0f}"


def share(value: Any) -> str:
    x = number(value)
    return "&mdash;" if x is None else f"{x:.1%}"


def render_page(snapshot: Mapping[str, Any]) -> str:
    """The whole page for ``snapshot`` (``{"version": ..., "segments": [...]}``)."""
    segments = snapshot.get("segments")
    segments = [s for s in segments if isinstance(s, Mapping)] if isinstance(segments, Sequence) else []
    cards = "\n".join(segment_card(s) for s in segments) or '<p class="none">No segment yet: no request has come.</p>'
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>codestop</title>
<style>{CSS}</style></head>
<body>
<header><h1>codestop</h1><p>Each segment's stopping policy is within its stated risk or not running.
Version {esc(snapshot.get("version", "?"))}; {esc(now)}; reloads every {REFRESH_S} s.</p></header>
<main>
{cards}
</main>
</body></html>
"""


def segment_card(seg: Mapping[str, Any]) -> str:
    state = str(seg.get("state", "?"))
    colour, meaning = STATES.get(state, ("#7a5af8", "unknown state"))
    guarantee = seg.get("guarantee") if isinstance(seg.get("guarantee"), Mapping) else None
    threshold = number(seg.get("alarm_threshold"))
    rows = [
        ("traces collected", count(seg.get("traces"))),
        ("policy", policy_text(seg.get("policy"))),
        ("guarantee", guarantee_text(guarantee)),
        ("saved so far", f"{count(seg.get('saved_cost_tokens'))} cost tokens"),
        ("audits", f"{count(seg.get('audits'))} ({count(seg.get('audits_changed'))} changed; "
                   f"{count(seg.get('audits_failed'))} failed; {count(seg.get('audit_cost_tokens'))} cost tokens spent)"),
        ("changed share", changed_text(seg, threshold)),
        ("e-value", e_value_text(seg.get("e_values"), threshold)),
    ]
    table = "\n".join(f'<tr><th>{name}</th><td class="{name.split()[0]}">{value}</td></tr>' for name, value in rows)
    alarmed = number(seg.get("alarmed_at"))
    alarm = "" if alarmed is None else (f'<p class="alarm">Alarm at audit {alarmed:,.0f}: the audits reject "risk within its '
                                         'bound"; answered as in shadow since.</p>')
    max_risk = number(guarantee.get("max_risk")) if guarantee else None
    return f"""<section class="segment" data-segment="{esc(seg.get("segment", "?"))}" data-state="{esc(state)}">
<h2><span class="name">{esc(seg.get("segment", "?"))}</span>
<span class="badge" style="background:{colour}" title="{esc(meaning)}">{esc(state)}</span></h2>
<p class="meaning">{esc(meaning)}</p>{alarm}
<table>{table}</table>
{interval_bar(seg.get("changed_share"), seg.get("changed_interval"), max_risk)}
{e_value_chart(seg.get("e_values"), threshold, alarmed)}
</section>"""


def policy_text(policy: Any) -> str:
    if not isinstance(policy, Mapping):
        return "none (shadow: nothing stops)"
    knobs = ", ".join(f"{esc(k)}={esc(v)}" for k, v in policy.items() if k != "method")
    return f"<code>{esc(policy.get('method', '?'))}</code>" + (f" ({knobs})" if knobs else "")


def guarantee_text(g: Mapping[str, Any] | None) -> str:
    if g is None:
        return "none"
    max_risk, alpha = number(g.get("max_risk")), number(g.get("alpha"))
    level = "?" if alpha is None else f"{1 - alpha:g}"
    n = sum(int(x) for x in (number(g.get("n_ordering")), number(g.get("n_testing"))) if x is not None)
    traces = f" for traffic like its {n:,} calibration traces" if n else ""
    return (f"{esc(g.get('risk', '?'))} risk &le; {esc('?' if max_risk is None else f'{max_risk:g}')} "
            f"with probability &ge; {esc(level)}{traces}")


def changed_text(seg: Mapping[str, Any], threshold: float | None) -> str:
    if number(seg.get("changed_share")) is None:
        return "no audit yet"
    interval = seg.get("changed_interval")
    lo, hi = (number(x) for x in interval) if isinstance(interval, Sequence) and len(interval) == 2 else (None, None)
    level = f"{1 - 1 / threshold:.0%} " if threshold and threshold > 1 else ""
    bounds = "" if lo is None or hi is None else f" (anytime-valid {level}interval {share(lo)} to {share(hi)})"
    return share(seg.get("changed_share")) + bounds


def e_value_text(points: Any, threshold: float | None) -> str:
    series = e_series(points)
    alarm = "" if threshold is None else f"; alarms at {threshold:g} (1/&alpha;)"
    return ("no audit yet" if not series else f"{series[-1][1]:.3g}") + alarm


def interval_bar(value: Any, interval: Any, max_risk: float | None) -> str:
    """The changed share and its interval on a 0..top bar, the bound certified as a tick."""
    x = number(value)
    lo, hi = (number(v) for v in interval) if isinstance(interval, Sequence) and len(interval) == 2 else (None, None)
    if x is None or lo is None or hi is None:
        return ""
    top = min(1.0, max(hi, x, max_risk or 0.0) * 1.25) or 1.0
    w, h, pad = 640, 34, 16

    def at(v: float) -> float:
        return pad + (w - 2 * pad) * min(max(v, 0.0), top) / top

    tick = "" if max_risk is None else (
        f'<line x1="{at(max_risk):.1f}" x2="{at(max_risk):.1f}" y1="2" y2="24" class="bound"/>'
        f'<text x="{at(max_risk):.1f}" y="33" class="label" text-anchor="middle">max risk {max_risk * 100:g}%</text>')
    return f"""<svg class="interval" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"
 aria-label="changed share {x:.3f}, interval {lo:.3f} to {hi:.3f}"><title>changed share and its interval</title>
<line x1="{pad}" x2="{w - pad}" y1="13" y2="13" class="axis"/>
<rect x="{at(lo):.1f}" y="7" width="{max(at(hi) - at(lo), 1):.1f}" height="12" class="band"/>
<circle cx="{at(x):.1f}" cy="13" r="4" class="point"/>{tick}
<text x="{pad}" y="33" class="label">0</text><text x="{w - pad}" y="33" class="label" text-anchor="end">{top:.0%}</text>
</svg>"""


def e_series(points: Any) -> list[tuple[float, float]]:
    """The (audit, e-value) pairs that are numbers, an e-value of 0 raised to 1e-12 (a log scale)."""
    pairs = [(number(p[0]), number(p[1])) for p in points if isinstance(p, Sequence) and len(p) == 2] \
        if isinstance(points, Sequence) and not isinstance(points, str) else []
    return [(n, max(e, 1e-12)) for n, e in pairs if n is not None and e is not None and e >= 0]


def e_value_chart(points: Any, threshold: float | None, alarmed_at: float | None) -> str:
    """The e-value after each audit on a log scale, with the alarm line at ``threshold`` (1/alpha)."""
    series = e_series(points)
    if not series:
        return '<p class="none chart">No e-value yet: no audit has come.</p>'
    series = thinned(series, MAX_CHART_POINTS)  # a long watch: the page stays small
    w, h, left, right, top, bottom = 640, 220, 56, 16, 12, 34
    n_max = max(max(n for n, _ in series), 1.0)
    es = [e for _, e in series] + ([threshold] if threshold else [])
    lo = math.floor(math.log10(min(min(es), 0.5)))
    hi = max(math.ceil(math.log10(max(es) * 1.5)), lo + 1)

    def x(n: float) -> float:
        return left + (w - left - right) * n / n_max

    def y(e: float) -> float:
        return top + (h - top - bottom) * (hi - math.log10(e)) / (hi - lo)

    step = max(1, math.ceil((hi - lo) / 6))  # at most ~6 grid lines
    grid = "".join(f'<line x1="{left}" x2="{w - right}" y1="{y(10.0 ** k):.1f}" y2="{y(10.0 ** k):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y(10.0 ** k) + 4:.1f}" class="label" text-anchor="end">{10.0 ** k:g}</text>'
                   for k in range(lo, hi + 1, step))
    line = " ".join(f"{x(n):.1f},{y(e):.1f}" for n, e in series)
    alarm_line = "" if not threshold else (
        f'<line x1="{left}" x2="{w - right}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" class="alarmline"/>'
        f'<text x="{left + 4}" y="{y(threshold) - 4:.1f}" class="label alarmtext">alarm at 1/&alpha; = {threshold:g}</text>')
    marker = "" if alarmed_at is None else (
        f'<line x1="{x(alarmed_at):.1f}" x2="{x(alarmed_at):.1f}" y1="{top}" y2="{h - bottom}" class="alarmline"/>')
    last_n, last_e = series[-1]
    return f"""<svg class="evalue" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"
 aria-label="e-value {last_e:.3g} after {last_n:,.0f} audits"><title>the watch's e-value over the audits (log scale)</title>
{grid}{alarm_line}{marker}
<polyline points="{line}" class="series"/>
<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" class="axis"/>
<text x="{left}" y="{h - bottom + 16}" class="label">0</text>
<text x="{w - right}" y="{h - bottom + 16}" class="label" text-anchor="end">{n_max:,.0f} audits</text>
<text x="{(left + w - right) / 2:.0f}" y="{h - 4}" class="label" text-anchor="middle">e-value after each audit (log scale)</text>
</svg>"""


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f5f7fa; color: #1f2933; }
header { padding: 16px 24px; background: #1f2933; color: #f5f7fa; }
header h1 { margin: 0; font-size: 22px; } header p { margin: 4px 0 0; color: #cbd2d9; font-size: 13px; }
main { display: flex; flex-wrap: wrap; gap: 16px; padding: 16px 24px; }
.segment { background: #fff; border: 1px solid #d9e2ec; border-radius: 8px; padding: 12px 16px; flex: 1 1 660px; max-width: 700px; }
.segment h2 { margin: 0 0 4px; font-size: 18px; display: flex; align-items: center; gap: 10px; overflow-wrap: anywhere; }
.badge { color: #fff; border-radius: 999px; padding: 2px 10px; font-size: 13px; font-weight: 600; text-transform: uppercase; }
.meaning { margin: 0 0 8px; color: #52606d; font-size: 13px; }
.alarm { margin: 0 0 8px; padding: 6px 10px; background: #fef3f2; border: 1px solid #fda29b; color: #b42318; border-radius: 6px; }
table { border-collapse: collapse; width: 100%; margin-bottom: 8px; }
th { text-align: left; font-weight: 600; color: #52606d; padding: 3px 12px 3px 0; white-space: nowrap; vertical-align: top; width: 1%; }
td { padding: 3px 0; overflow-wrap: anywhere; }
.none { color: #7b8794; }
svg { display: block; max-width: 100%; height: auto; }
.grid { stroke: #e4e7eb; } .axis { stroke: #9aa5b1; }
.label { font-size: 11px; fill: #616e7c; }
.series { fill: none; stroke: #2563eb; stroke-width: 2; }
.alarmline { stroke: #d92d20; stroke-dasharray: 6 4; stroke-width: 1.5; } .alarmtext { fill: #d92d20; }
.band { fill: #bfdbfe; } .point { fill: #2563eb; } .bound { stroke: #d92d20; stroke-width: 2; }
"""
