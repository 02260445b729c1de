"""Dynamics figures and the HTML report, on synthetic traces with known answers."""

from __future__ import annotations

import json

import pytest

from codestop.cli import main
from codestop.errors import CodestopError
from codestop.figures.dynamics import auroc, auroc_table, dynamics, dynamics_figure
from codestop.figures.report import report
from codestop.traces import load_traces, trace_from_json


def test_auroc():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert auroc([0.9, 0.3, 0.6, 0.1], [True, False, False, True]) == 0.5
    assert auroc([1, 2], [True, True]) is None


def _trace(i: int, correct: bool) -> dict:
    # correct: confident early and short; incorrect: unsure, jumping, and twice as long
    n = 5 if correct else 10
    confs = [0.9] * n if correct else [0.3 if k % 2 else 0.6 for k in range(n)]
    probes = [{"position": 50 * (k + 1), "confidence": c, "answer": "1", "correct": correct, "probe_tokens": 3} for k, c in enumerate(confs)]
    return {"id": f"t{i}", "probes": probes, "final_correct": correct, "reasoning_tokens": 50 * n + 10}


@pytest.fixture()
def traces_file(tmp_path):
    path = tmp_path / "syn.jsonl"
    path.write_text("".join(json.dumps(_trace(i, i % 3 != 0)) + "\n" for i in range(30)))
    return path


def test_dynamics_separates_what_was_built_to_separate(traces_file):
    stats = dynamics(load_traces(traces_file))
    assert stats["n"] == 30 and stats["n_correct"] == 20
    assert all(m == pytest.approx(0.9) for m in stats["curves"]["correct"]["mean"] if m is not None)
    assert all(m < 0.7 for m in stats["curves"]["incorrect"]["mean"] if m is not None)
    assert stats["auroc"]["first-probe confidence"] == 1.0
    assert stats["auroc"]["minus reasoning length (whole trace)"] == 1.0
    assert stats["auroc_note"] is None
    assert sorted(stats["lengths"]["correct"]) == [260] * 20


def test_no_auroc_from_fewer_than_ten_traces_of_a_class(tmp_path):
    # 12 traces, 4 wrong: a perfect-looking AUROC of 1.0 from 4 traces is noise, so none is drawn
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(_trace(i, i % 3 != 0)) + "\n" for i in range(12)))
    stats = dynamics(load_traces(path))
    assert stats["n_correct"] == 8 and all(v is None for v in stats["auroc"].values())
    assert stats["auroc_note"] == "AUROC needs at least 10 traces of each outcome; these have 8 correct and 4 incorrect"
    assert "8 correct and 4 incorrect" in auroc_table(stats)
    fig = dynamics_figure(stats, "few")
    panel = fig.axes[2]
    assert not panel.patches  # no bars
    assert any("at least 10 traces" in t.get_text() for t in panel.texts)


def test_dynamics_figure_panels(traces_file):
    import matplotlib.pyplot as plt

    stats = dynamics(load_traces(traces_file))
    # an incorrect group so spread that the normal band would leave [0, 1]
    stats["curves"]["incorrect"]["half_width"] = [0.9 if h is not None else None for h in stats["curves"]["incorrect"]["half_width"]]
    # counts of one or two per bin: a default locator would tick at 0.25, 0.5, ...
    stats["lengths"] = {"correct": [120, 180, 180], "incorrect": [150, 240]}
    fig = dynamics_figure(stats, "t")
    conf, lengths, roc = fig.axes
    assert all(ax.get_title() for ax in (conf, lengths, roc))  # every panel says what it shows
    for band in conf.collections:  # the filled 95% bands
        for path in band.get_paths():
            ys = path.vertices[:, 1]
            assert ys.min() >= 0.0 and ys.max() <= 1.0
    ticks = [t for t in lengths.get_yticks() if lengths.get_ylim()[0] <= t <= lengths.get_ylim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    lo, hi = lengths.get_xlim()
    assert (lo, hi) == (120, 240)  # the bins span the data: no blank stretch from 0
    assert len(roc.patches) == len(stats["auroc"])
    plt.close(fig)


def test_plot_dynamics_and_report(traces_file, tmp_path, capsys):
    png = tmp_path / "dyn.png"
    assert main(["plot", "dynamics", str(traces_file), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| first-probe confidence | 1.000 |" in capsys.readouterr().out
    (tmp_path / "table.md").write_text("# Results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    page = report(tmp_path).read_text()
    assert "<td>1</td><td>2</td>" in page and "data:image/png;base64," in page
    assert "30 traces, final accuracy 66.7%" in page
    assert main(["plot"]) == 2


def test_dynamics_needs_probes():
    with pytest.raises(CodestopError, match="no trace has probes"):
        dynamics([trace_from_json({"id": "a", "probes": [], "final_correct": True}, "x:1")])
    with pytest.raises(CodestopError, match="not a directory"):
        report("/nonexistent/dir")
