"""``codestop plot dynamics``: the paper's analysis of confidence along the reasoning, as a figure.

The dynamics figure has three panels, computed from recorded traces alone:

1. mean probe confidence (with a 95% band, normal approximation of the mean) against normalised
   reasoning position (probe position / full reasoning length, in 10 bins), for trajectories whose
   final answer is correct and for those whose final answer is wrong;
2. the reasoning lengths of each group;
3. AUROC of early-confidence features (read from the first 25% / 50% of the reasoning only)
   predicting that the final answer is correct: 0.5 is chance. Not computed from fewer than
   :data:`MIN_PER_CLASS` traces of either outcome (the panel says so instead): with a handful of
   wrong answers an AUROC of 1.0 or 0.0 is noise that looks like a finding.

A trace's outcome is its ``final_correct`` (minimal traces: the last probe's ``correct``); its
length is ``reasoning_tokens`` (minimal traces: the last probe's position).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError
from codestop.policies import CodeStop, Probe
from codestop.replay import rescored
from codestop.traces import Trace

BINS = 10
MIN_PER_CLASS = 10  # fewest traces of each outcome (right, wrong) an AUROC is computed from


def _outcome(t: Trace) -> bool:
    if t.final_correct is not None:
        return t.final_correct
    return bool(t.probes[-1].correct) if t.probes else False


def _length(t: Trace) -> int:
    if t.reasoning_tokens:
        return t.reasoning_tokens
    return t.probes[-1].position if t.probes else 0


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); None when one
    class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, i) for i, s in enumerate(scores))
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(r for r, y in zip(ranks, labels) if y)
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _early(t: Trace, probes: Sequence[Probe], fraction: float) -> list[Probe]:
    limit = fraction * _length(t)
    early = [p for p in probes if p.position <= limit]
    return early or list(probes[:1])


def _drops(ps: Sequence[Probe]) -> float:
    return float(sum(1 for a, b in zip(ps, ps[1:]) if b.confidence < a.confidence))


def _degeneration(ps: Sequence[Probe]) -> float:
    tracker = CodeStop(tau=1e9, r_min=1.0, r_max=1.0).start()  # never stops: just the score D_k
    for p in ps:
        tracker.update(p)
    return tracker.score


# name -> (fraction of the reasoning read, feature; higher should mean "more likely correct")
FEATURES: dict[str, tuple[float, Callable[[Sequence[Probe]], float]]] = {
    "first-probe confidence": (0.0, lambda ps: ps[0].confidence),
    "mean confidence, first 25%": (0.25, lambda ps: sum(p.confidence for p in ps) / len(ps)),
    "mean confidence, first 50%": (0.5, lambda ps: sum(p.confidence for p in ps) / len(ps)),
    "max confidence, first 50%": (0.5, lambda ps: max(p.confidence for p in ps)),
    "minus confidence drops, first 50%": (0.5, lambda ps: -_drops(ps)),
    "minus degeneration score D, first 50%": (0.5, lambda ps: -_degeneration(ps)),
    "minus reasoning length (whole trace)": (1.0, lambda ps: -float(ps[-1].position)),
}


def dynamics(traces: Sequence[Trace], confidence: str = "geometric") -> dict[str, Any]:
    """The numbers behind the figure: per-bin mean confidence and 95% half-width for each group,
    the lengths of each group, and the AUROC of each early feature."""
    usable = [t for t in traces if t.probes]
    if not usable:
        raise CodestopError("traces: no trace has probes; record traces with `codestop record`")
    probes = [rescored(t.probes, confidence) for t in usable]
    labels = [_outcome(t) for t in usable]
    curves: dict[str, dict[str, list[float | None]]] = {}
    for group, want in (("correct", True), ("incorrect", False)):
        sums: list[list[float]] = [[] for _ in range(BINS)]
        for t, ps, y in zip(usable, probes, labels):
            if y != want:
                continue
            length = max(_length(t), ps[-1].position)
            per_bin: list[list[float]] = [[] for _ in range(BINS)]
            for p in ps:
                b = min(BINS - 1, int(p.position / length * BINS))
                per_bin[b].append(p.confidence)
            for b, vals in enumerate(per_bin):
                if vals:  # one value per trace and bin, so long traces do not outweigh short ones
                    sums[b].append(sum(vals) / len(vals))
        mean: list[float | None] = []
        half: list[float | None] = []
        for vals in sums:
            if not vals:
                mean.append(None)
                half.append(None)
                continue
            m = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            mean.append(m)
            half.append(1.96 * sd / math.sqrt(len(vals)))
        curves[group] = {"mean": mean, "half_width": half, "n_per_bin": [len(v) for v in sums]}
    features: dict[str, float | None] = {}
    n_right, n_wrong = sum(labels), len(labels) - sum(labels)
    enough = min(n_right, n_wrong) >= MIN_PER_CLASS
    for name, (fraction, fn) in FEATURES.items():
        scores = [fn(_early(t, ps, fraction)) for t, ps in zip(usable, probes)]
        features[name] = auroc(scores, labels) if enough else None
    return {
        "n": len(usable),
        "n_correct": sum(labels),
        "bins": [(b + 0.5) / BINS for b in range(BINS)],
        "curves": curves,
        "lengths": {"correct": [_length(t) for t, y in zip(usable, labels) if y], "incorrect": [_length(t) for t, y in zip(usable, labels) if not y]},
        "auroc": features,
        "auroc_note": None if enough else (
            f"AUROC needs at least {MIN_PER_CLASS} traces of each outcome; "
            f"these have {n_right} correct and {n_wrong} incorrect"
        ),
        "confidence": confidence,
    }


def plot_dynamics(stats: dict[str, Any], path: Path, title: str = "") -> None:
    """Write :func:`dynamics_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = dynamics_figure(stats, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dynamics_figure(stats: dict[str, Any], title: str = "") -> Any:
    """The three panels, each with its own title; the confidence band is clipped to [0, 1] (a
    confidence cannot leave it, whatever the normal approximation says), counts get integer ticks,
    the length bins span the data (no empty stretch from 0), and the AUROC panel shows a note
    instead of bars when a class has too few traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained", gridspec_kw={"width_ratios": [1, 1, 1.25]})
    ax = axes[0]
    colors = {"correct": "tab:green", "incorrect": "tab:red"}
    for group, c in stats["curves"].items():
        xs = [x for x, m in zip(stats["bins"], c["mean"]) if m is not None]
        ms = [m for m in c["mean"] if m is not None]
        hs = [h for h in c["half_width"] if h is not None]
        n = len(stats["lengths"][group])
        ax.plot(xs, ms, marker="o", color=colors[group], label=f"{group} (n={n})")
        ax.fill_between(xs, [max(0.0, m - h) for m, h in zip(ms, hs)], [min(1.0, m + h) for m, h in zip(ms, hs)],
                        color=colors[group], alpha=0.2)
    ax.set_title("confidence along the reasoning", fontsize=10)
    ax.set_xlabel("normalised reasoning position (bins of 10%)")
    ax.set_ylabel(f"probe confidence ({stats['confidence']}): mean, 95% band")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)

    ax = axes[1]
    data = {g: stats["lengths"][g] for g in ("correct", "incorrect")}
    values = [x for d in data.values() for x in d]
    if values:
        lo, hi = min(values), max(values)
        span = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)  # the bins cover the data, no empty stretch
        for group, d in data.items():
            if d:
                mean = sum(d) / len(d)
                ax.hist(d, bins=20, range=span, alpha=0.5, color=colors[group], label=f"{group}: mean {mean:.0f}")
        ax.set_xlim(*span)
        ax.legend()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("reasoning length by outcome", fontsize=10)
    ax.set_xlabel("reasoning tokens")
    ax.set_ylabel("trajectories")
    ax.grid(alpha=0.3)

    ax = axes[2]
    ax.set_title("early features predicting a correct final answer", fontsize=10)
    names = [k for k, v in stats["auroc"].items() if v is not None]
    vals = [stats["auroc"][k] for k in names]
    ax.set_xlim(0, 1)
    if names:
        ax.set_xlabel("AUROC (0.5 = chance)")
        ax.barh(range(len(names)), vals, color="tab:blue")
        ax.axvline(0.5, color="black", lw=1, ls="--")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        for i, v in enumerate(vals):
            ax.text(min(v + 0.01, 0.9), i, f"{v:.2f}", va="center", fontsize=8, zorder=3,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # the chance line passes behind
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        note = stats.get("auroc_note") or "no AUROC: one outcome has no trace"
        ax.text(0.5, 0.5, note.replace("; ", ";\n"), ha="center", va="center", fontsize=9, transform=ax.transAxes, wrap=True)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def auroc_table(stats: dict[str, Any]) -> str:
    rows = ["| early-confidence feature | AUROC |", "|---|---:|"]
    for name, v in stats["auroc"].items():
        rows.append(f"| {name} | {'n/a' if v is None else f'{v:.3f}'} |")
    note = f"\n{stats['auroc_note']}.\n" if stats.get("auroc_note") else ""
    return "\n".join(rows) + "\n" + note
