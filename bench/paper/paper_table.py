"""The paper's reported figures and the tables that set this run's figures beside them.

Source: Hosseini, Nawathe, Salmani, Razaviyayn, Feizi, "Early Stopping for Large Reasoning Models
via Confidence Dynamics", arXiv:2604.04930 (2026), as summarised in the project's method notes
(Table 1: accuracy % / mean tokens, the mean over its four benchmarks; the per-benchmark figures
its summary quotes). Nothing here is computed: these are the paper's numbers, typed in.
"""

from __future__ import annotations

from typing import Any

PAPER = "Hosseini et al., arXiv:2604.04930 (2026)"
METHODS = ("vanilla", "deer", "codestop", "codestop-paper")
METHOD_LABELS = {
    "vanilla": "vanilla",
    "deer": "DEER",
    "codestop": "CoDE-Stop",
    "codestop-paper": "CoDE-Stop (paper variant)",
}
BENCHMARKS = ("gsm8k", "math500", "aime24", "aime25", "gpqa-diamond")
BENCHMARK_LABELS = {
    "gsm8k": "GSM8K",
    "math500": "MATH-500",
    "aime24": "AIME 2024",
    "aime25": "AIME 2025",
    "gpqa-diamond": "GPQA-Diamond",
}
# the paper's four benchmarks, ours pooled into them for the mean row: its two AIME years are
# taken as one benchmark (how the paper combines them is not in what we read)
MEAN_GROUPS = {"GSM8K": ("gsm8k",), "MATH-500": ("math500",), "AIME": ("aime24", "aime25"), "GPQA-Diamond": ("gpqa-diamond",)}

# Table 1, the mean over the paper's four benchmarks: method -> (accuracy %, mean tokens);
# CoDE-Stop's cost with its probes, where the paper gives it, in PAPER_COST
PAPER_TABLE1: dict[str, dict[str, tuple[float, int]]] = {
    "Qwen3-4B": {"vanilla": (78.4, 8344), "deer": (77.4, 6176), "codestop": (76.9, 5865)},
    "Qwen3-14B": {"vanilla": (83.3, 7532), "deer": (79.6, 4605), "codestop": (78.1, 4208)},
    "DeepSeek-R1-Distill-Llama-8B": {"vanilla": (66.0, 7514), "deer": (64.2, 5855), "codestop": (63.3, 5466)},
    "Llama-3.1-Nemotron-Nano-8B": {"vanilla": (73.2, 5729), "deer": (72.0, 4736), "codestop": (71.3, 4531)},
}
PAPER_COST = {("Qwen3-4B", "codestop"): 5960}
# per-benchmark figures the paper's summary quotes: (model, benchmark) -> method -> (accuracy % or
# None when not quoted, mean tokens)
PAPER_BENCHMARK: dict[tuple[str, str], dict[str, tuple[float | None, int]]] = {
    ("Qwen3-4B", "gsm8k"): {"vanilla": (94.8, 2306), "codestop": (94.6, 1233)},
    ("Qwen3-14B", "math500"): {"vanilla": (93.0, 4878), "codestop": (None, 2529)},
}
PAPER_NOTES = {
    "Qwen3-4B": "On AIME the paper quotes about 13,400 tokens for DEER against 12,800 for CoDE-Stop at similar accuracy.",
    "Qwen3-14B": "On MATH-500 the paper quotes 93.0% accuracy kept with 4,878 -> 2,529 tokens.",
}
# hub ids whose last part differs from the paper's name for the same model
ALIASES = {"llama-3.1-nemotron-nano-8b-v1": "Llama-3.1-Nemotron-Nano-8B"}


def paper_model(model: str) -> str | None:
    """The paper's name for ``model`` (a hub id or a path; its last part is compared, case
    ignored), or None when the paper reports nothing for it."""
    base = model.rstrip("/").rsplit("/", 1)[-1].lower()
    if base in ALIASES:
        return ALIASES[base]
    return next((name for name in PAPER_TABLE1 if name.lower() == base), None)


def _cell(figure: tuple[float | None, int] | None) -> str:
    if figure is None:
        return ""
    acc, tokens = figure
    return f"{'—' if acc is None else f'{acc:.1f}'} / {tokens:,}"


def paper_table1() -> list[str]:
    """The paper's Table 1 as markdown lines."""
    lines = [f"| model | {' | '.join(METHOD_LABELS[m] for m in METHODS[:3])} |", "|---|---|---|---|"]
    for model, row in PAPER_TABLE1.items():
        cells = []
        for m in METHODS[:3]:
            cost = PAPER_COST.get((model, m))
            cells.append(_cell(row[m]) + (f" (cost {cost:,})" if cost else ""))
        lines.append(f"| {model} | {' | '.join(cells)} |")
    return lines


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _saving(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def results_table(results: dict[str, Any]) -> list[str]:
    """This run's figures, one row per benchmark and method and the mean rows, with the paper's
    figure for the same model beside them where it has one."""
    ours = results["paper_model"]
    head = f" paper ({ours}): accuracy % / tokens |" if ours else ""  # no column for a model the paper did not run
    lines = [
        f"| benchmark | traces | method | accuracy % | reasoning tokens | cost tokens | saving |{head}",
        "|---|---:|---|---:|---:|---:|---:|" + ("---|" if ours else ""),
    ]
    rows: list[tuple[str, dict[str, Any], dict[str, tuple[float | None, int]]]] = []
    for name, bench in results["benchmarks"].items():
        rows.append((BENCHMARK_LABELS.get(name, name), bench, PAPER_BENCHMARK.get((ours or "", name), {})))
    mean = results.get("mean")
    if mean:
        rows.append((mean["label"], mean, PAPER_TABLE1.get(ours or "", {}) if mean["complete"] else {}))  # type: ignore[arg-type]
    for label, bench, paper in rows:
        for m in METHODS:
            fig = bench["methods"].get(m)
            if fig is None:
                continue
            lines.append(
                f"| {label} | {bench.get('traces', '')} | {METHOD_LABELS[m]} | {_pct(fig['accuracy'])} | "
                f"{fig['mean_reasoning_tokens']:,.0f} | {fig['mean_cost_tokens']:,.0f} | {_saving(fig['saving'])} |"
                + (f" {_cell(paper.get(m))} |" if ours else "")
            )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole report: this run's table, the paper's Table 1, and what each number means."""
    s = results["settings"]
    ours = results["paper_model"]
    model = results["model"]
    out = [f"# CoDE-Stop's Table 1 on {model}", ""]
    out.append(
        f"Traces recorded with {results['engine']} ({s['sampling_text']}, at most {s['max_reasoning_tokens']:,} reasoning "
        f"tokens, a probe at every step boundary: {', '.join(repr(b) for b in s['boundaries'])}), then replayed: "
        f"vanilla, DEER (threshold {s['deer_threshold']}) and CoDE-Stop ({s['codestop_text']}). Rollouts per question: "
        + ", ".join(f"{BENCHMARK_LABELS.get(k, k)} {v}" for k, v in s["rollouts"].items()) + "."
    )
    out += ["", *results_table(results), ""]
    out.append(
        "Accuracy is over every trace (questions x rollouts). Reasoning tokens: up to the stop; cost adds the probes spent "
        "up to it (the paper's accounting; the forced answer's few tokens are not counted in a replay). Saving: cost "
        "against vanilla's. The mean row averages the benchmarks' figures (AIME 2024 and 2025 pooled as one)."
    )
    if ours:
        out.append(f"The paper column is the paper's figure for {ours} ({PAPER}); an empty cell: the paper quotes none there.")
        note = PAPER_NOTES.get(ours)
        if note:
            out.append(note)
    else:
        out.append(f"The paper reports no figures for {model}; its Table 1 below is for the four models it ran.")
    timed = [(BENCHMARK_LABELS.get(b, b), v["recording"]) for b, v in results["benchmarks"].items()
             if (v.get("recording") or {}).get("traces")]
    if timed:
        out.append("Recording took (measured here, summed over the invocations that recorded): " + "; ".join(
            f"{label} {t['traces']} traces in {t['seconds']:,.0f} s ({t['tokens_per_second'] or 0:,.0f} generated tokens/s)"
            for label, t in timed) + ".")
    out += ["", f"## The paper's Table 1 ({PAPER}; accuracy % / mean tokens, the mean over its four benchmarks)", ""]
    out += paper_table1()
    for line in results.get("caveats", []):
        out += ["", line]
    return "\n".join(out) + "\n"
