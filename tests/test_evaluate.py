"""codestop eval: one line per question written as it finishes, resume after a kill (a half-written
last line is redone, nothing else rerun), refusal to mix runs, baseline comparison, concurrency."""

from __future__ import annotations

import json

import pytest

from codestop.errors import CodestopError
from codestop.config import GenerationConfig
from codestop.evaluate import evaluate
from codestop.jsonl import read_jsonl
from codestop.policies import CodeStop, Vanilla

# the tiny random model writes spaces but seldom blank lines: a space is its step boundary
GEN = GenerationConfig(family="plain", max_new_tokens=16, probe_interval=1, boundaries=(" ",), temperature=0.0)


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(1, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_question_with_what_a_run_needs(tiny_engine, questions, tmp_path):
    out = tmp_path / "run.jsonl"
    summary = evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=3, generation=GEN)
    lines = _lines(out)
    assert [r["id"] for r in lines] == ["q:1", "q:2", "q:3"]
    for r in lines:
        assert {"id", "gold", "answer", "correct", "tokens", "cost", "probes", "stop_reason", "wall_time", "config"} <= set(r)
        assert set(r["tokens"]) == {"prompt", "reasoning", "probe", "probe_prompt", "answer"}
        assert r["cost"] == r["tokens"]["reasoning"] + r["tokens"]["probe"] + r["tokens"]["answer"]
        assert r["correct"] is False  # a random model
        assert r["config"]["method"]["method"] == "codestop" and r["config"]["method"]["tau"] == 2.0
        assert all(set(p) == {"position", "confidence", "answer", "probe_tokens"} for p in r["probes"])
        assert sum(p["probe_tokens"] for p in r["probes"]) == r["tokens"]["probe"]
    assert summary["n"] == 3 and summary["accuracy"] == 0.0
    assert summary["mean_tokens"] == sum(r["tokens"]["reasoning"] + r["tokens"]["answer"] for r in lines) / 3


def test_resume_after_a_kill_redoes_only_the_cut_line(tiny_engine, questions, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    evaluate(tiny_engine, data=questions, out=out, policy=Vanilla(), limit=3, generation=GEN)
    full = out.read_text()
    first_two = full.splitlines(keepends=True)[:2]
    # a kill in the middle of writing the third line
    out.write_text("".join(first_two) + full.splitlines(keepends=True)[2][:25])
    summary = evaluate(tiny_engine, data=questions, out=out, policy=Vanilla(), limit=4, generation=GEN)
    err = capsys.readouterr().err  # repaired, saying so
    assert f"{out}:3: the last line is not a complete JSON object" in err and "redone" in err
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:2] == first_two  # untouched, not rerun (their wall times would differ)
    assert [json.loads(x)["id"] for x in lines] == ["q:1", "q:2", "q:3", "q:4"]
    assert all(x.endswith("\n") for x in lines)
    assert summary["n"] == 4
    # nothing left to do: a third run answers from the file alone
    before = out.read_text()
    assert evaluate(tiny_engine, data=questions, out=out, policy=Vanilla(), limit=4, generation=GEN)["n"] == 4
    assert out.read_text() == before


def test_resume_with_other_options_is_refused(tiny_engine, questions, tmp_path):
    out = tmp_path / "run.jsonl"
    evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=1, generation=GEN)
    before = out.read_text()
    with pytest.raises(CodestopError, match=r"holds a different run \(method: file has .*\"tau\": 2.0"):
        evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=3.0), limit=2, generation=GEN)
    with pytest.raises(CodestopError, match="holds a different run"):
        evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=2,
                 generation=GEN.replace(max_new_tokens=8))
    assert out.read_text() == before


def test_a_bad_line_inside_the_file_is_named(tmp_path):
    out = tmp_path / "run.jsonl"
    out.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(CodestopError, match=rf"{out}:2: not a valid JSON object"):
        read_jsonl(out)


def test_baseline_comparison_and_concurrency(tiny_engine, questions, tmp_path):
    base = tmp_path / "vanilla.jsonl"
    evaluate(tiny_engine, data=questions, out=base, policy=Vanilla(), generation=GEN)
    out = tmp_path / "stop.jsonl"
    summary = evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=0.5, r_min=0.0, r_max=0.0),
                       generation=GEN, baseline=base, concurrency=3)
    assert sorted(r["id"] for r in _lines(out)) == ["q:1", "q:2", "q:3", "q:4"]
    assert summary["paired_n"] == 4
    base_tokens = sum(r["tokens"]["reasoning"] + r["tokens"]["answer"] for r in _lines(base))
    ours = sum(r["tokens"]["reasoning"] + r["tokens"]["answer"] for r in _lines(out))
    assert summary["compression"] == pytest.approx(1 - ours / base_tokens)
    assert summary["compression"] > 0  # r = 0 stops at the first probe: fewer tokens than vanilla
    assert all(r["stop_reason"] == "confident" for r in _lines(out))


def test_cli_eval_json_summary(tiny_engine, questions, tmp_path, capsys, monkeypatch):
    import codestop.evaluate as ev

    monkeypatch.setattr(ev, "_load_engine", lambda model, engine, options: tiny_engine)
    out = tmp_path / "cli.jsonl"
    from codestop.cli import main

    code = main(["eval", "--data", str(questions), "--model", "tiny", "--method", "deer", "--threshold", "0.5",
                 "--limit", "2", "--out", str(out), "--json", "--family", "plain", "--max-new-tokens", "12",
                 "--boundaries", " ", "--temperature", "0"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    assert _lines(out)[0]["config"]["method"] == {"method": "deer", "threshold": 0.5, "confidence": "mean"}


def test_cli_record_writes_traces_with_the_record_defaults(tiny_engine, questions, tmp_path, capsys, monkeypatch):
    import codestop.evaluate as ev
    from codestop.cli import main

    monkeypatch.setattr(ev, "_load_engine", lambda model, engine, options: tiny_engine)
    out = tmp_path / "t.traces.jsonl"
    code = main(["record", "--data", str(questions), "--model", "tiny", "--limit", "2", "--out", str(out),
                 "--family", "plain", "--max-new-tokens", "12", "--boundaries", " ", "--temperature", "0"])
    assert code == 0
    assert f"\n2 traces in {out}: final accuracy" in capsys.readouterr().out  # after the progress bar
    traces = _lines(out)
    assert [t["id"] for t in traces] == ["q:1", "q:2"] and all(t["schema"] == 1 for t in traces)
    generation = traces[0]["config"]["generation"]
    # a probe at every boundary, and no stopping
    assert generation["probe_interval"] == 1 and generation["always_probe"] is True and generation["max_new_tokens"] == 12
    assert traces[0]["config"]["kind"] == "trace" and traces[0]["config"]["method"] == {"method": "vanilla"}
