"""``codestop sweep`` and ``codestop calibrate``: the accuracy/tokens trade-off on recorded traces.

A sweep replays each method over a range of its one knob (CoDE-Stop's ``tau``, DEER's
``threshold``, Consistency's ``window``, TokenBudget's ``budget``) and writes the Pareto table
(CSV and Markdown) and a PNG of accuracy against mean tokens: every point labelled with its knob
value, each method's frontier drawn, its dominated settings faded, vanilla as reference lines.

Calibration picks the knob value that saves the most tokens while the accuracy drop against vanilla
on a calibration split stays within ``max_accuracy_drop``, then measures the chosen value on the
held-out rest, the only honest estimate, with a one-sided 95% upper bound on the drop (see
:func:`drop_bounds`) and paired bootstrap intervals of the accuracy and cost changes (see
:func:`paired_bootstrap`). The statistics come from scipy, not from code of our own.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError
from codestop.policies import (
    METHOD_OPTIONS,
    Policy,
    Probe,
    knob_help,
    make_policy,
    swept_knobs,
)
from codestop.replay import Replayed, Trace, replay_trace, rescored

# each method's one knob, its type and the range swept when none is given (from the policies' fields)
KNOBS: dict[str, tuple[str, type, str]] = swept_knobs()
# the other knobs: fixed at one value for the methods that take them
FIXED_OPTIONS = tuple(k for k in knob_help() if k not in {knob for knob, _, _ in KNOBS.values()})


def parse_range(text: str, kind: type = float, name: str = "range") -> list[Any]:
    """``start:stop:step`` (stop included), a comma list, or one value."""
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, step = (float(p) for p in parts)
            if step <= 0 or stop < start:
                raise CodestopError(f"{name}: {text!r}: need start <= stop and step > 0 (start:stop:step)")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CodestopError(f"{name}: {text!r} is not start:stop:step, a comma list, or a number") from None
    if not values:
        raise CodestopError(f"{name}: {text!r} holds no value")
    if kind is int:
        if any(v != int(v) for v in values):
            raise CodestopError(f"{name}: {text!r} must hold whole numbers")
        return sorted({int(v) for v in values})
    return sorted(set(values))


@dataclass
class Point:
    """One policy's replayed outcome on all traces; ``pareto``: no other point of the sweep is at
    least as accurate with fewer tokens (or more accurate with as few)."""

    method: str
    knob: str
    value: float | int | None
    n: int
    accuracy: float
    mean_tokens: float
    mean_cost: float
    accuracy_change: float  # vs vanilla on the same traces, a fraction
    token_saving: float  # 1 - mean_tokens / vanilla's
    pareto: bool = False


def run_policy(traces: Sequence[Trace], policy: Policy, cache: dict[str, list[list[Probe]]] | None = None) -> list[Replayed]:
    """Replay ``policy`` on every trace; ``cache`` keeps the re-scored probes per confidence function."""
    if cache is not None:
        if policy.confidence not in cache:
            cache[policy.confidence] = [rescored(t.probes, policy.confidence) for t in traces]
        probes = cache[policy.confidence]
        return [replay_trace(t, policy, p) for t, p in zip(traces, probes)]
    return [replay_trace(t, policy) for t in traces]


def _point(method: str, knob: str, value: Any, rows: Sequence[Replayed], vanilla: Sequence[Replayed]) -> Point:
    n = len(rows)
    acc = sum(r.correct for r in rows) / n
    toks = sum(r.reasoning_tokens for r in rows) / n
    v_acc = sum(r.correct for r in vanilla) / n
    v_toks = sum(r.reasoning_tokens for r in vanilla) / n
    return Point(method, knob, value, n, acc, toks, sum(r.cost for r in rows) / n, acc - v_acc, 1 - toks / v_toks if v_toks else 0.0)


def mark_pareto(points: list[Point]) -> None:
    for p in points:
        p.pareto = not any(
            (q.accuracy >= p.accuracy and q.mean_tokens <= p.mean_tokens) and (q.accuracy > p.accuracy or q.mean_tokens < p.mean_tokens)
            for q in points
        )


def fixed_policy(method: str, value: Any = None, **options: Any) -> Policy:
    """``method`` with its knob at ``value`` and the options it takes from ``options``."""
    allowed = METHOD_OPTIONS[method]
    given = {k: v for k, v in options.items() if k in allowed and v is not None}
    if method in KNOBS and value is not None:
        given[KNOBS[method][0]] = value
    return make_policy(method, **given)


def sweep(traces: Sequence[Trace], ranges: Mapping[str, Sequence[Any]], **options: Any) -> list[Point]:
    """Points for vanilla and for each method over its knob values; ``options`` (delta, r_min, ...,
    confidence) go to the methods that take them."""
    if not traces:
        raise CodestopError("traces: no traces to sweep")
    cache: dict[str, list[list[Probe]]] = {}
    vanilla = run_policy(traces, make_policy("vanilla"), cache)
    points = [_point("vanilla", "", None, vanilla, vanilla)]
    for method, values in ranges.items():
        if method == "vanilla":
            continue
        if method not in KNOBS:
            raise CodestopError(f"method: {method!r} has no knob to sweep; choose from {', '.join(KNOBS)}")
        knob = KNOBS[method][0]
        for value in values:
            policy = fixed_policy(method, value, **options)
            points.append(_point(method, knob, value, run_policy(traces, policy, cache), vanilla))
    mark_pareto(points)
    return points


# --------------------------------------------------------------------------------------------
# Tables and the figure
# --------------------------------------------------------------------------------------------


def markdown_table(points: Sequence[Point], only_pareto: bool = False) -> str:
    rows = ["| method | knob | accuracy | mean tokens | mean cost (incl. probes) | accuracy change | fewer tokens | Pareto |",
            "|---|---|---:|---:|---:|---:|---:|:-:|"]
    for p in points:
        if only_pareto and not p.pareto:
            continue
        knob = f"{p.knob}={p.value}" if p.knob else "-"
        rows.append(
            f"| {p.method} | {knob} | {p.accuracy * 100:.1f}% | {p.mean_tokens:.0f} | {p.mean_cost:.0f} | "
            f"{p.accuracy_change * 100:+.1f} pts | {p.token_saving * 100:.1f}% | {'yes' if p.pareto else ''} |"
        )
    return "\n".join(rows) + "\n"


def write_csv(points: Sequence[Point], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(asdict(points[0])))
        w.writeheader()
        for p in points:
            w.writerow(asdict(p))


STYLE = {"codestop": ("tab:red", "o"), "deer": ("tab:blue", "s"), "consistency": ("tab:green", "^"), "budget": ("tab:gray", "x")}
# for series named otherwise (e.g. one method at several fixed options), in order of appearance
EXTRA_STYLES = (("tab:purple", "d"), ("tab:orange", "v"), ("tab:brown", "P"), ("tab:pink", "X"), ("tab:olive", "<"), ("tab:cyan", ">"))


def method_frontier(points: Sequence[Point]) -> list[Point]:
    """One method's own frontier: going right (more tokens), only the points that raise accuracy."""
    frontier: list[Point] = []
    best = -1.0
    for p in sorted(points, key=lambda p: (p.mean_tokens, -p.accuracy)):
        if p.accuracy > best:
            frontier.append(p)
            best = p.accuracy
    return frontier


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _runs_text(points: Sequence[Point], indices: Sequence[int]) -> str:
    """The knob values of ``points[i]`` for ``indices``, consecutive ones as ranges: "0.25-1, 3"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(
        _fmt(points[r[0]].value) if len(r) == 1 else f"{_fmt(points[r[0]].value)}-{_fmt(points[r[-1]].value)}" for r in runs
    )


def knob_labels(points: Sequence[Point], near: Any = None) -> list[tuple[list[int], str]]:
    """Labels for one method's points (in sweep order): one per group of points that coincide, or
    that ``near(i, j)`` says sit on top of each other in the figure, naming every knob value of the
    group (runs of consecutive values as ranges), so 64 swept values stay readable."""
    parent = list(range(len(points)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(points)):
        for j in range(i):
            same = points[i].mean_tokens == points[j].mean_tokens and points[i].accuracy == points[j].accuracy
            if same or (near is not None and near(i, j)):
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(points)):
        groups.setdefault(root(i), []).append(i)
    return [(members, _runs_text(points, members)) for members in groups.values()]


def place_labels(
    fig: Any, ax: Any, labels: Sequence[tuple[float, float, str, str, bool]],
    markers: Sequence[tuple[float, float]] = (), fontsize: float = 6,
) -> None:
    """Write each (x, y, text, color, strong) label next to its point where it overlaps no marker
    (``markers`` and the labelled points, in data coordinates) and no label already placed:
    candidate spots on rings of growing radius, a thin leader line from the second ring on, a
    faint white backing so lines crossing a label do not hide it. A dense cluster of sweep points
    stays readable without a layout library."""
    import math

    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    pad = 3 * px_per_pt
    gap = 1.2 * px_per_pt
    obstacles = [Bbox.from_bounds(x - pad, y - pad, 2 * pad, 2 * pad) for x, y in
                 (ax.transData.transform(xy) for xy in [*markers, *((lx, ly) for lx, ly, *_ in labels)])]
    angles = [math.radians(a) for a in (30, -30, 150, -150, 90, -90, 0, 180, 60, -60, 120, -120)]
    for x, y, text, color, strong in labels:
        probe = ax.text(0, 0, text, fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width, ext.height
        px, py = ax.transData.transform((x, y))
        best: tuple[int, float, float, Bbox] | None = None
        for radius in (5, 13, 22, 32, 44):
            for a in angles:
                dx, dy = radius * math.cos(a) * px_per_pt, radius * math.sin(a) * px_per_pt
                left = px + dx if dx >= -1e-9 else px + dx - w
                bottom = py + dy if dy >= -1e-9 else py + dy - h
                if abs(dy) < 1e-9:
                    bottom = py - h / 2
                box = Bbox.from_bounds(left - gap, bottom - gap, w + 2 * gap, h + 2 * gap)  # a little air around it
                inside = frame.contains(left, bottom) and frame.contains(left + w, bottom + h)
                hits = sum(box.overlaps(o) for o in obstacles) + (0 if inside else 5)
                if best is None or hits < best[0]:
                    best = (hits, dx / px_per_pt, dy / px_per_pt, box)
                if hits == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None
        _, ox, oy, box = best
        far = math.hypot(ox, oy) > 6
        ax.annotate(
            text, (x, y), xytext=(ox, oy), textcoords="offset points", fontsize=fontsize, color=color, zorder=6,
            alpha=1.0 if strong else 0.65, ha="left" if ox >= -1e-9 else "right",
            va="center" if abs(oy) < 1e-9 else ("bottom" if oy > 0 else "top"),
            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.4, "alpha": 0.5, "shrinkA": 0, "shrinkB": 2} if far else None,
            bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none", "alpha": 0.7},
        )
        obstacles.append(box)


def plot_tradeoff(points: Sequence[Point], path: Path, title: str = "") -> None:
    """Write :func:`tradeoff_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(points, title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def tradeoff_figure(points: Sequence[Point], title: str = "") -> Any:
    """Accuracy (%) against mean reasoning tokens: each method's own frontier as a line, its
    dominated settings faded (the legend says so), every position labelled with the knob values
    that reach it, and vanilla's accuracy and tokens as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 6))
    handles: list[Any] = []
    labels: list[tuple[float, float, str, str, bool]] = []
    per_method: list[tuple[list[Point], str, set[int]]] = []
    extra = itertools.cycle(EXTRA_STYLES)
    for method in dict.fromkeys(p.method for p in points):
        mine = [p for p in points if p.method == method]
        if method == "vanilla":
            v = mine[0]
            ax.axhline(v.accuracy * 100, color="black", lw=1, ls="--", zorder=1)
            ax.axvline(v.mean_tokens, color="black", lw=0.8, ls=":", zorder=1)
            handles.append(ax.scatter([v.mean_tokens], [v.accuracy * 100], marker="*", s=200, color="black", zorder=5,
                                      label=f"vanilla: {v.accuracy * 100:.1f}%, {v.mean_tokens:.0f} tokens (reference lines)"))
            continue
        color, marker = STYLE.get(method) or next(extra)
        frontier = method_frontier(mine)
        on = {id(p) for p in frontier}
        faded = [p for p in mine if id(p) not in on]
        ax.scatter([p.mean_tokens for p in faded], [p.accuracy * 100 for p in faded], color=color, marker=marker, alpha=0.3, s=20)
        (line,) = ax.plot([p.mean_tokens for p in frontier], [p.accuracy * 100 for p in frontier], color=color, marker=marker,
                          ms=5, label=f"{method} ({mine[0].knob} values labelled)")
        handles.append(line)
        per_method.append((mine, color, on))
    # points whose markers overlap in the figure share one label (limits are final once all is drawn)
    fig.canvas.draw()
    touch = 5 * fig.dpi / 72
    for mine, color, on in per_method:
        xy = ax.transData.transform([(p.mean_tokens, p.accuracy * 100) for p in mine])

        def near(i: int, j: int, xy: Any = xy) -> bool:
            return bool(abs(xy[i][0] - xy[j][0]) <= touch and abs(xy[i][1] - xy[j][1]) <= touch)

        for members, text in knob_labels(mine, near):
            strong = [i for i in members if id(mine[i]) in on]
            anchor = mine[strong[0]] if strong else mine[members[len(members) // 2]]
            labels.append((anchor.mean_tokens, anchor.accuracy * 100, text, color, bool(strong)))
    markers = [(p.mean_tokens, p.accuracy * 100) for p in points]
    place_labels(fig, ax, sorted(labels, key=lambda item: not item[4]), markers)  # frontier labels get the best places
    handles.append(Line2D([], [], color="gray", marker="o", ls="", alpha=0.3,
                          label="faded: a setting off its method's frontier\n(another is as accurate for fewer tokens)"))
    ax.set_xlabel("mean reasoning tokens (replayed)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact (Clopper-Pearson) one-sided upper confidence bound on a binomial rate after ``k``
    events in ``n`` trials, from scipy's exact binomial test (1.0 with no trials or all events)."""
    from scipy.stats import binomtest

    if n == 0 or k >= n:
        return 1.0
    return float(binomtest(k, n, alternative="less").proportion_ci(confidence_level=confidence, method="exact").high)


def paired_counts(policy_rows: Sequence[Replayed], vanilla_rows: Sequence[Replayed]) -> tuple[int, int]:
    """(lost, gained): questions vanilla gets right and the policy wrong, and the reverse."""
    lost = sum(v.correct and not r.correct for r, v in zip(policy_rows, vanilla_rows))
    gained = sum(r.correct and not v.correct for r, v in zip(policy_rows, vanilla_rows))
    return lost, gained


def drop_bounds(lost: int, gained: int, n: int, confidence: float = 0.95) -> dict[str, float]:
    """The accuracy drop (lost - gained) / n and two one-sided upper bounds on it:

    * ``exact``: the Clopper-Pearson upper bound on the rate of lost questions. The drop can never
      exceed that rate, so this bound holds whatever the gains (conservative, no approximation);
    * ``normal``: mean + z * sd / sqrt(n) of the paired differences (tighter, approximate).
    """
    from scipy.stats import norm

    if n == 0:
        return {"drop": 0.0, "exact": 1.0, "normal": 1.0}
    d = (lost - gained) / n
    var = (lost + gained) / n - d * d
    z = float(norm.ppf(confidence))
    return {"drop": d, "exact": clopper_pearson_upper(lost, n, confidence), "normal": d + z * math.sqrt(max(var, 0.0) / n)}


BOOTSTRAP_RESAMPLES = 9999


def paired_bootstrap(
    ours: Sequence[float], theirs: Sequence[float], *, confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> dict[str, Any]:
    """mean(ours) - mean(theirs) over paired observations (the same questions), with a two-sided
    bootstrap interval from ``scipy.stats.bootstrap`` resampling questions, not answers
    (``paired=True``), under a fixed seed so a report is reproducible. BCa, the percentile
    interval where BCa is undefined (nearly all differences equal); a point when all are equal."""
    import inspect
    import warnings

    import numpy as np
    from scipy.stats import bootstrap

    a = np.asarray(ours, dtype=float)
    b = np.asarray(theirs, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: {a.shape} and {b.shape} are not one pair per question")
    n = int(a.size)
    diff = a - b
    out: dict[str, Any] = {"estimate": float(diff.mean()) if n else 0.0, "low": None, "high": None,
                           "n": n, "confidence": confidence, "n_resamples": n_resamples, "seed": seed, "method": None}
    if n == 0:
        return out
    if np.all(diff == diff[0]):  # nothing varies: every resample gives the same difference
        out.update(low=float(diff[0]), high=float(diff[0]), method="degenerate")
        return out

    def statistic(x: Any, y: Any, axis: int = -1) -> Any:
        # the mean of the differences, not the difference of the means: on 0/1 or integer data it is exact, so a
        # resample equal to the estimate compares equal, and BCa's bias correction sees the ties (with
        # mean(x) - mean(y), rounding split them, e.g. 2 lost of 50 gave [-16, -2] pts instead of [-14, 0])
        return np.mean(x - y, axis=axis)

    # scipy >= 1.15 names the generator ``rng``; older releases ``random_state``
    seed_arg = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's degenerate-data warning: the percentile interval follows
            res = bootstrap((a, b), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=confidence, method=method, **{seed_arg: np.random.default_rng(seed)})
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            out.update(low=lo, high=hi, method=method)
            break
    return out


def compare_to_vanilla(rows: Sequence[Replayed], vanilla_rows: Sequence[Replayed], *, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap intervals of the policy minus vanilla on the same traces: accuracy (a
    fraction) and mean cost (reasoning + probe tokens)."""
    return {
        "accuracy_change": paired_bootstrap([float(r.correct) for r in rows], [float(v.correct) for v in vanilla_rows], seed=seed),
        "cost_change": paired_bootstrap([float(r.cost) for r in rows], [float(v.cost) for v in vanilla_rows], seed=seed),
    }


def _interval(d: dict[str, Any], scale: float, unit: str) -> str:
    if d["low"] is None:
        return f"{d['estimate'] * scale:+.1f}{unit}"
    return f"{d['estimate'] * scale:+.1f}{unit} [{d['low'] * scale:+.1f}, {d['high'] * scale:+.1f}]"


def calibrate(
    traces: Sequence[Trace],
    max_accuracy_drop: float,
    *,
    method: str = "codestop",
    values: Sequence[Any] | None = None,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    calibration_ids: Collection[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Choose ``method``'s knob on a calibration split and measure it on the held-out rest.

    The split is a seeded shuffle cut at ``calibration_fraction``, or, with ``calibration_ids``, the
    traces with those ids (to calibrate a second recording of the same questions on the same split)."""
    if not (0 <= max_accuracy_drop < 1):
        raise CodestopError(f"max_accuracy_drop: {max_accuracy_drop!r} must be a fraction in [0, 1), e.g. 0.01 for one point")
    if not (0 < calibration_fraction <= 1):
        raise CodestopError(f"calibration_fraction: {calibration_fraction!r} must be in (0, 1]")
    if method not in KNOBS:
        raise CodestopError(f"method: {method!r} has no knob to calibrate; choose from {', '.join(KNOBS)}")
    knob, kind, default = KNOBS[method]
    values = list(values) if values is not None else parse_range(default, kind, knob)
    if len(traces) < 2:
        raise CodestopError("traces: calibration needs at least 2 traces")
    order = list(traces)
    if calibration_ids is None:
        random.Random(seed).shuffle(order)
        n_cal = max(1, round(len(order) * calibration_fraction))
        cal, held = order[:n_cal], order[n_cal:]
    else:
        wanted = set(calibration_ids)
        cal, held = [t for t in order if t.id in wanted], [t for t in order if t.id not in wanted]
        if not cal:
            raise CodestopError("calibration_ids: none of these ids is among the traces")
    # every size below is len() of these two lists: what the report says is what was used
    sizes = f"{len(cal)} calibration and {len(held)} held-out traces of {len(order)} " + (
        f"(seed {seed})" if calibration_ids is None else "(the given calibration ids)")

    cache: dict[str, list[list[Probe]]] = {}
    vanilla_cal = run_policy(cal, make_policy("vanilla"), cache)
    v_tokens = sum(r.reasoning_tokens for r in vanilla_cal) / len(cal)
    candidates = []
    for value in values:
        rows = run_policy(cal, fixed_policy(method, value, **options), cache)
        lost, gained = paired_counts(rows, vanilla_cal)
        drop = (lost - gained) / len(cal)
        tokens = sum(r.reasoning_tokens for r in rows) / len(cal)
        candidates.append({"value": value, "drop": drop, "mean_tokens": tokens, "token_saving": 1 - tokens / v_tokens if v_tokens else 0.0})
    ok = [c for c in candidates if c["drop"] <= max_accuracy_drop + 1e-12]
    # the fewest tokens; among equals, the smaller drop
    chosen = min(ok, key=lambda c: (c["mean_tokens"], c["drop"])) if ok else None

    out: dict[str, Any] = {
        "method": method,
        "knob": knob,
        "max_accuracy_drop": max_accuracy_drop,
        "n_calibration": len(cal),
        "n_held_out": len(held),
        "seed": seed,
        "calibration_ids": [t.id for t in cal],
        "held_out_ids": [t.id for t in held],
        "chosen": chosen["value"] if chosen else None,
        "calibration": chosen,
        "candidates": candidates,
    }
    if chosen is None:
        out["statement"] = (
            f"Split: {sizes}. No {knob} in the range keeps the drop on the {len(cal)} calibration traces within "
            f"{max_accuracy_drop * 100:.1f} points: run without stopping (vanilla), or allow a larger drop."
        )
        return out
    if held:
        policy = fixed_policy(method, chosen["value"], **options)
        rows = run_policy(held, policy)
        vanilla_held = run_policy(held, make_policy("vanilla"))
        lost, gained = paired_counts(rows, vanilla_held)
        bounds = drop_bounds(lost, gained, len(held))
        vt = sum(r.reasoning_tokens for r in vanilla_held) / len(held)
        mt = sum(r.reasoning_tokens for r in rows) / len(held)
        out["held_out"] = {
            "n": len(held),
            "accuracy": sum(r.correct for r in rows) / len(held),
            "vanilla_accuracy": sum(r.correct for r in vanilla_held) / len(held),
            "accuracy_drop": bounds["drop"],
            "lost": lost,
            "gained": gained,
            "drop_upper_95_exact": bounds["exact"],
            "drop_upper_95_normal": bounds["normal"],
            "mean_tokens": mt,
            "vanilla_mean_tokens": vt,
            "token_saving": 1 - mt / vt if vt else 0.0,
            "mean_cost": sum(r.cost for r in rows) / len(held),
            "vanilla_mean_cost": sum(r.cost for r in vanilla_held) / len(held),
            # two-sided 95% paired bootstrap intervals, policy minus vanilla
            "paired_bootstrap": compare_to_vanilla(rows, vanilla_held, seed=seed),
        }
        h = out["held_out"]
        boot = h["paired_bootstrap"]
        certified = "which certifies" if h["drop_upper_95_exact"] <= max_accuracy_drop else "which does NOT certify"
        out["statement"] = (
            f"Split: {sizes}. "
            f"{knob}={chosen['value']} was chosen on the {len(cal)} calibration traces (drop {chosen['drop'] * 100:+.1f} pts, "
            f"{chosen['token_saving'] * 100:.1f}% fewer tokens). On the {len(held)} held-out traces, not used to choose it: "
            f"drop {h['accuracy_drop'] * 100:+.1f} pts ({lost} lost, {gained} gained), {h['token_saving'] * 100:.1f}% fewer tokens. "
            f"With 95% confidence the drop on new questions like these is at most {h['drop_upper_95_exact'] * 100:.1f} pts "
            f"(exact one-sided Clopper-Pearson bound on the lost-question rate, gains not credited; "
            f"normal approximation of the paired difference: {h['drop_upper_95_normal'] * 100:.1f} pts), {certified} "
            f"the {max_accuracy_drop * 100:.1f}-point target. Paired bootstrap, policy minus vanilla on the held-out "
            f"traces (95%, {boot['accuracy_change']['method']}, {BOOTSTRAP_RESAMPLES} resamples, seed {seed}): accuracy "
            f"{_interval(boot['accuracy_change'], 100, ' pts')}, mean cost {_interval(boot['cost_change'], 1, ' tokens')}. "
            "This holds only for questions exchangeable with these traces, "
            "with the same model, sampling, boundaries and token cap; the calibration-split figures are optimistic "
            "(the value was picked on them)."
        )
    else:
        out["statement"] = (
            f"Split: {sizes}. {knob}={chosen['value']} was chosen on all {len(cal)} traces: no held-out traces remain, so there is no "
            "honest estimate of its drop on new questions (use --calibration-fraction below 1)."
        )
    return out


__all__ = ["Point", "calibrate", "clopper_pearson_upper", "compare_to_vanilla", "drop_bounds", "paired_bootstrap", "parse_range", "sweep"]
