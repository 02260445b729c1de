"""The trade-off figure of a sweep: accuracy against mean reasoning tokens, one curve per method.

Every point is labelled with its knob value, each method's own frontier drawn, its dominated
settings faded, vanilla as reference lines (:func:`tradeoff_figure`, :func:`plot_tradeoff`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codestop.analysis.sweep import Point

STYLE = {"codestop": ("tab:red", "o"), "deer": ("tab:blue", "s"), "consistency": ("tab:green", "^"), "budget": ("tab:gray", "x")}
# for series named otherwise (e.g. one method at several fixed options), in order of appearance
EXTRA_STYLES = (("tab:purple", "d"), ("tab:orange", "v"), ("tab:brown", "P"), ("tab:pink", "X"), ("tab:olive", "<"), ("tab:cyan", ">"))


def method_frontier(points: Sequence[Point]) -> list[Point]:
    """One method's own frontier: going right (more tokens), only the points that raise accuracy."""
    frontier: list[Point] = []
    best = -1.0
    for p in sorted(points, key=lambda p: (p.mean_reasoning_tokens, -p.accuracy)):
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
            same = points[i].mean_reasoning_tokens == points[j].mean_reasoning_tokens and points[i].accuracy == points[j].accuracy
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
            ax.axvline(v.mean_reasoning_tokens, color="black", lw=0.8, ls=":", zorder=1)
            handles.append(ax.scatter([v.mean_reasoning_tokens], [v.accuracy * 100], marker="*", s=200, color="black", zorder=5,
                                      label=f"vanilla: {v.accuracy * 100:.1f}%, {v.mean_reasoning_tokens:.0f} tokens (reference lines)"))
            continue
        color, marker = STYLE.get(method) or next(extra)
        frontier = method_frontier(mine)
        on = {id(p) for p in frontier}
        faded = [p for p in mine if id(p) not in on]
        ax.scatter([p.mean_reasoning_tokens for p in faded], [p.accuracy * 100 for p in faded], color=color, marker=marker, alpha=0.3, s=20)
        (line,) = ax.plot([p.mean_reasoning_tokens for p in frontier], [p.accuracy * 100 for p in frontier], color=color, marker=marker,
                          ms=5, label=f"{method} ({mine[0].knob} values labelled)")
        handles.append(line)
        per_method.append((mine, color, on))
    # points whose markers overlap in the figure share one label (limits are final once all is drawn)
    fig.canvas.draw()
    touch = 5 * fig.dpi / 72
    for mine, color, on in per_method:
        xy = ax.transData.transform([(p.mean_reasoning_tokens, p.accuracy * 100) for p in mine])

        def near(i: int, j: int, xy: Any = xy) -> bool:
            return bool(abs(xy[i][0] - xy[j][0]) <= touch and abs(xy[i][1] - xy[j][1]) <= touch)

        for members, text in knob_labels(mine, near):
            strong = [i for i in members if id(mine[i]) in on]
            anchor = mine[strong[0]] if strong else mine[members[len(members) // 2]]
            labels.append((anchor.mean_reasoning_tokens, anchor.accuracy * 100, text, color, bool(strong)))
    markers = [(p.mean_reasoning_tokens, p.accuracy * 100) for p in points]
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
