"""``codestop report``: one self-contained HTML page of a run folder's summaries, tables and figures."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

from codestop.errors import CodestopError
from codestop.eval.summary import summarize
from codestop.jsonl import read_jsonl


def _md_table_to_html(text: str) -> str:
    """Markdown pipe tables to HTML; other lines as paragraphs."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            head = [c.strip() for c in line.strip("|").split("|")]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
                i += 1
            out.append("</table>")
            continue
        if line.startswith("#"):
            level = min(4, len(line) - len(line.lstrip("#")) + 1)
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


def _csv_to_html(path: Path) -> str:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return ""
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
    return "\n".join(out) + "</table>"


def _run_summary_html(path: Path) -> str | None:
    """A summary row for an eval run file or a trace file (None for other JSON lines)."""
    try:
        records = read_jsonl(path)
    except CodestopError:
        return None
    if not records or "id" not in records[0]:
        return None
    if "probes" in records[0] and "final_correct" in records[0]:
        n = len(records)
        acc = sum(bool(r.get("final_correct")) for r in records) / n
        length = sum(int(r.get("reasoning_tokens") or 0) for r in records) / n
        probes = sum(len(r.get("probes") or ()) for r in records) / n
        return (
            f"<p><b>{html.escape(path.name)}</b>: {n} traces, final accuracy {acc * 100:.1f}%, "
            f"{length:.0f} reasoning tokens and {probes:.1f} probes per question</p>"
        )
    if "correct" in records[0]:
        s = summarize(records)
        ci = s["accuracy_ci95"]
        reasons = ", ".join(f"{k} {v}" for k, v in s["stop_reasons"].items())
        return (f"<p><b>{html.escape(path.name)}</b>: {s['n']} questions, accuracy {s['accuracy'] * 100:.1f}% "
                f"(95% CI {ci[0] * 100:.1f}-{ci[1] * 100:.1f}), mean reasoning tokens {s['mean_reasoning_tokens']:.0f}, "
                f"mean cost tokens {s['mean_cost_tokens']:.0f}; stops: {html.escape(reasons)}</p>")
    return None


def report(directory: str | Path, out: str | Path | None = None, title: str = "codestop report") -> Path:
    """One self-contained HTML page (figures embedded) of everything in ``directory``: run and trace
    summaries, Markdown and CSV tables, PNG figures."""
    d = Path(directory)
    if not d.is_dir():
        raise CodestopError(f"report: {str(d)!r} is not a directory; give the folder holding a run's tables and figures")
    target = Path(out) if out is not None else d / "report.html"
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>from {html.escape(str(d))}</p>"]
    runs = [s for p in sorted(d.glob("*.jsonl")) if (s := _run_summary_html(p))]
    if runs:
        parts += ["<h2>runs and traces</h2>", *runs]
    for p in sorted(d.glob("*.md")):
        parts += [f"<h2>{html.escape(p.name)}</h2>", _md_table_to_html(p.read_text(encoding="utf-8"))]
    for p in sorted(d.glob("*.csv")):
        if p.with_suffix(".md").exists():
            continue  # the same table already shown
        parts += [f"<h2>{html.escape(p.name)}</h2>", _csv_to_html(p)]
    for p in sorted(d.glob("*.png")):
        data = base64.b64encode(p.read_bytes()).decode()
        parts += [f"<h2>{html.escape(p.name)}</h2>", f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,{data}">']
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "img{max-width:100%}")
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
    page = head + "\n".join(parts) + "\n</body></html>\n"
    target.write_text(page, encoding="utf-8")
    return target
