"""codestop eval: one line per question written as it finishes, resume after a kill (a half-written
last line is redone, nothing else rerun), refusal to mix runs, baseline comparison, concurrency."""

from __future__ import annotations

import json

import pytest

from codestop.config import GenerationConfig
from codestop.errors import CodestopError
from codestop.eval.runner import evaluate, samples_path
from codestop.eval.summary import print_summary, regrade, regrade_file, summarize
from codestop.jsonl import read_jsonl
from codestop.policies import CodeStop, Vanilla

# the tiny random model writes spaces but seldom blank lines: a space is its step boundary
GEN = GenerationConfig(family="plain", max_reasoning_tokens=16, probe_interval=1, boundaries=(" ",), temperature=0.0)


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
        assert {"id", "gold", "answer", "correct", "tokens", "cost_tokens", "probes", "stop_reason", "wall_time", "config"} <= set(r)
        assert set(r["tokens"]) == {"prompt", "reasoning", "probe", "probe_prompt", "answer", "overrun"}
        assert r["cost_tokens"] == r["tokens"]["reasoning"] + r["tokens"]["probe"] + r["tokens"]["answer"] + r["tokens"]["overrun"]
        assert r["correct"] is False  # a random model
        assert r["config"]["policy"]["method"] == "codestop" and r["config"]["policy"]["tau"] == 2.0 and "method" not in r["config"]
        assert all(set(p) == {"position", "confidence", "answer", "probe_tokens"} for p in r["probes"])
        assert sum(p["probe_tokens"] for p in r["probes"]) == r["tokens"]["probe"]
    assert summary["n"] == 3 and summary["accuracy"] == 0.0
    assert summary["mean_reasoning_tokens"] == sum(r["tokens"]["reasoning"] for r in lines) / 3
    assert summary["mean_cost_tokens"] == sum(r["cost_tokens"] for r in lines) / 3 > summary["mean_reasoning_tokens"]


def test_a_run_spec_is_the_same_run_as_its_fields(tiny_engine, questions, tmp_path):
    from codestop.eval.runner import RunSpec

    spec = RunSpec(tiny_engine, tmp_path / "spec.jsonl", data=questions, limit=2, generation=GEN)
    by_spec = evaluate(spec, policy=Vanilla())
    by_fields = evaluate(tiny_engine, data=questions, out=tmp_path / "fields.jsonl", limit=2, generation=GEN, policy=Vanilla())
    assert {k: by_spec[k] for k in ("n", "accuracy", "mean_cost_tokens")} == {k: by_fields[k] for k in ("n", "accuracy", "mean_cost_tokens")}
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in _lines(tmp_path / "spec.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time"} for r in _lines(tmp_path / "fields.jsonl")]
    with pytest.raises(TypeError, match="give limit in it"):
        evaluate(spec, limit=3)


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
    with pytest.raises(CodestopError, match=r"holds a different run \(policy: file has .*\"tau\": 2.0"):
        evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=3.0), limit=2, generation=GEN)
    with pytest.raises(CodestopError, match="holds a different run"):
        evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=2,
                 generation=GEN.replace(max_reasoning_tokens=8))
    assert out.read_text() == before


def test_a_run_file_with_the_old_keys_resumes_and_summarizes(tiny_engine, questions, tmp_path):
    # written before the vocabulary (docs/vocabulary.md): config "method" for the policy, "cost" per line
    out = tmp_path / "old.jsonl"
    evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=2, generation=GEN)
    old = []
    for r in _lines(out):
        config = {("method" if k == "policy" else k): v for k, v in r["config"].items()}
        old.append({**{("cost" if k == "cost_tokens" else k): v for k, v in r.items()}, "config": config})
    out.write_text("".join(json.dumps(r) + "\n" for r in old))
    summary = evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=3, generation=GEN)
    lines = _lines(out)
    assert [r["id"] for r in lines] == ["q:1", "q:2", "q:3"] and lines[:2] == old  # resumed, the old lines kept
    assert "policy" in lines[2]["config"] and "cost_tokens" in lines[2]  # a new line writes the new keys
    costs = [r["tokens"]["reasoning"] + r["tokens"]["probe"] + r["tokens"]["answer"] + r["tokens"]["overrun"] for r in lines]
    assert summary["mean_cost_tokens"] == sum(costs) / 3
    with pytest.raises(CodestopError, match="policy: file has"):  # the old key is compared as the new one
        evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=3.0), limit=3, generation=GEN)


def test_a_bad_line_inside_the_file_is_named(tmp_path):
    out = tmp_path / "run.jsonl"
    out.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(CodestopError, match=rf"{out}:2: not a valid JSON object"):
        read_jsonl(out)


def test_baseline_comparison_and_concurrency(tiny_engine, questions, tmp_path):
    # long enough reasoning that a stop at the first probe saves more than the probe and the forced answer cost
    gen = GEN.replace(max_reasoning_tokens=96)
    base = tmp_path / "vanilla.jsonl"
    evaluate(tiny_engine, data=questions, out=base, policy=Vanilla(), generation=gen)
    out = tmp_path / "stop.jsonl"
    summary = evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=0.5, r_min=0.0, r_max=0.0),
                       generation=gen, baseline=base, questions_in_flight=3)
    assert sorted(r["id"] for r in _lines(out)) == ["q:1", "q:2", "q:3", "q:4"]
    assert summary["paired_n"] == 4
    base_cost = sum(r["cost_tokens"] for r in _lines(base))
    ours = sum(r["cost_tokens"] for r in _lines(out))
    assert summary["saving"] == pytest.approx(1 - ours / base_cost)
    assert summary["saving"] > 0  # r = 0 stops at the first probe: fewer tokens than vanilla, probes included
    assert all(r["stop_reason"] == "confident" for r in _lines(out))


def test_cli_eval_json_summary(tiny_engine, questions, tmp_path, capsys, monkeypatch):
    import codestop.eval.runner as ev

    monkeypatch.setattr(ev, "_load_engine", lambda spec: tiny_engine)
    out = tmp_path / "cli.jsonl"
    from codestop.cli import main

    code = main(["eval", "--data", str(questions), "--model", "tiny", "--method", "deer", "--threshold", "0.5",
                 "--limit", "2", "--out", str(out), "--json", "--family", "plain", "--max-reasoning-tokens", "12",
                 "--boundaries", " ", "--temperature", "0"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    policy = _lines(out)[0]["config"]["policy"]
    assert policy["method"] == "deer" and policy["threshold"] == 0.5 and policy["confidence"] == "mean"


def test_cli_record_writes_traces_with_the_record_defaults(tiny_engine, questions, tmp_path, capsys, monkeypatch):
    import codestop.eval.runner as ev
    from codestop.cli import main

    monkeypatch.setattr(ev, "_load_engine", lambda spec: tiny_engine)
    out = tmp_path / "t.traces.jsonl"
    code = main(["record", "--data", str(questions), "--model", "tiny", "--limit", "2", "--out", str(out),
                 "--family", "plain", "--max-reasoning-tokens", "12", "--boundaries", " ", "--temperature", "0",
                 "--prompt", "solve-then-check", "--log-samples"])
    assert code == 0
    assert f"\n2 traces in {out}: final accuracy" in capsys.readouterr().out  # after the progress bar
    traces = _lines(out)
    assert [t["id"] for t in traces] == ["q:1", "q:2"] and all(t["schema"] == 1 for t in traces)
    generation = traces[0]["config"]["generation"]
    # a probe at every boundary, and no stopping
    assert generation["probe_interval"] == 1 and generation["always_probe"] is True and generation["max_reasoning_tokens"] == 12
    assert traces[0]["config"]["kind"] == "trace" and traces[0]["config"]["policy"] == {"method": "vanilla"}
    from codestop.eval.prompts import SOLVE_THEN_CHECK

    assert traces[0]["config"]["prompt"] == {"style": "solve-then-check", "instruction": SOLVE_THEN_CHECK, "system": None}
    samples = _lines(samples_path(out))  # t.traces.samples.jsonl: what the model wrote, beside the traces
    assert [x["id"] for x in samples] == ["q:1", "q:2"]
    assert [x["correct"] for x in samples] == [t["final_correct"] for t in traces]


# --------------------------------------------------------------------------------------------
# what a harness user expects
# --------------------------------------------------------------------------------------------


def test_log_samples_beside_the_run(tiny_engine, questions, tmp_path):
    out = tmp_path / "run.jsonl"
    evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=2, generation=GEN, log_samples=True)
    path = samples_path(out)
    assert path == tmp_path / "run.samples.jsonl"
    samples, runs = _lines(path), _lines(out)
    assert [x["id"] for x in samples] == [r["id"] for r in runs] == ["q:1", "q:2"]
    for sample, run in zip(samples, runs):
        assert set(sample) == {"id", "question", "reasoning", "answer_text", "answer", "gold", "correct", "stop_reason"}
        assert sample["question"].startswith("What is") and sample["reasoning"]  # what the model was asked and wrote
        assert (sample["answer"], sample["gold"], sample["correct"]) == (run["answer"], run["gold"], run["correct"])
    # a resume logs only the new questions
    evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=3, generation=GEN, log_samples=True)
    assert [x["id"] for x in _lines(path)] == ["q:1", "q:2", "q:3"]


def test_summary_interval_stop_reasons_and_throughput(tiny_engine, questions, tmp_path, capsys):
    from scipy.stats import binomtest

    out = tmp_path / "run.jsonl"
    summary = evaluate(tiny_engine, data=questions, out=out, policy=CodeStop(tau=2.0), limit=3, generation=GEN)
    lines = _lines(out)
    right = sum(r["correct"] for r in lines)
    ci = binomtest(right, 3).proportion_ci(0.95, method="wilson")
    assert summary["accuracy_ci95"] == pytest.approx((ci.low, ci.high))
    assert summary["stop_reasons"] == {k: sum(r["stop_reason"] == k for r in lines) for k in {r["stop_reason"] for r in lines}}
    assert "wall_time" not in summary  # the sum of overlapping per-question times is no time anyone waited
    assert summary["session_n"] == 3 and summary["elapsed_s"] > 0
    assert summary["questions_per_s"] == pytest.approx(3 / summary["elapsed_s"])
    generated = sum(r["tokens"]["reasoning"] + r["tokens"]["probe"] + r["tokens"]["answer"] for r in lines)
    assert summary["tokens_per_s"] == pytest.approx(generated / summary["elapsed_s"])
    # the 16-question run at --concurrency 8: per-question times sum to 154 s, the run took 22.5 s
    records = [{"id": str(i), "correct": i < 4, "tokens": {"reasoning": 90, "probe": 10, "answer": 0},
                "stop_reason": "confident" if i % 2 else "finished", "wall_time": 154 / 16} for i in range(16)]
    s = summarize(records, session=records, elapsed=22.5)
    assert s["stop_reasons"] == {"confident": 8, "finished": 8}
    assert s["questions_per_s"] == pytest.approx(16 / 22.5) and s["tokens_per_s"] == pytest.approx(1600 / 22.5)
    print_summary(s, "t")
    shown = capsys.readouterr().out
    assert "elapsed: 22.5 s for the 16 questions answered now" in shown and "154" not in shown
    assert "0.71 questions/s, 71 generated tokens/s" in shown
    assert "25.0% [10.2, 49.5]" in shown and "stop reasons: confident 8, finished 8" in shown


def test_resume_says_so_on_stderr(tiny_engine, questions, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    evaluate(tiny_engine, data=questions, out=out, policy=Vanilla(), limit=2, generation=GEN)
    assert "resuming" not in capsys.readouterr().err
    evaluate(tiny_engine, data=questions, out=out, policy=Vanilla(), limit=3, generation=GEN)
    assert f"codestop eval: resuming {out} from its 2 rows; 1 of the 3 questions left to answer" in capsys.readouterr().err


def test_run_config_records_version_prompt_and_model_sha(tiny_engine, questions, tmp_path, monkeypatch, capsys):
    import hashlib

    import codestop
    import codestop.eval.runner as ev
    from codestop import presets
    from codestop.cli import main
    from codestop.eval.prompts import CHAIN_OF_DRAFT

    monkeypatch.setenv("CODESTOP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ev, "_load_engine", lambda spec: tiny_engine)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + b"w" * 1000)
    hashed: list[object] = []
    real = presets.sha256_file
    monkeypatch.setattr(presets, "sha256_file", lambda p, progress=None: hashed.append(p) or real(p, progress))
    args = ["eval", "--data", str(questions), "--model", str(weights), "--method", "vanilla", "--json", "--family", "plain",
            "--max-reasoning-tokens", "6", "--boundaries", " ", "--temperature", "0", "--prompt", "chain-of-draft",
            "--system-prompt", "Be brief."]
    out = tmp_path / "run.jsonl"
    assert main([*args, "--limit", "1", "--out", str(out)]) == 0
    config = _lines(out)[0]["config"]
    assert config["codestop_version"] == codestop.__version__
    assert config["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert config["prompt"] == {"style": "chain-of-draft", "instruction": CHAIN_OF_DRAFT, "system": "Be brief."}
    assert main([*args, "--limit", "2", "--out", str(out)]) == 0  # a resume: same config, the file hashed once only
    assert len(hashed) == 1 and len(_lines(out)) == 2
    # another version of codestop may resume the run; each line keeps its own version
    lines = out.read_text().splitlines()
    old = json.loads(lines[0])
    old["config"]["codestop_version"] = "0.0.1"
    out.write_text(json.dumps(old) + "\n" + lines[1] + "\n")
    assert main([*args, "--limit", "3", "--out", str(out)]) == 0
    assert "rows written by codestop 0.0.1" in capsys.readouterr().err
    assert [r["config"]["codestop_version"] for r in _lines(out)] == ["0.0.1", codestop.__version__, codestop.__version__]


def test_prompt_styles_reach_the_model(tiny_engine, questions, tmp_path, monkeypatch):
    from codestop.eval.prompts import CHAIN_OF_DRAFT
    from codestop.families import STEP_BY_STEP

    seen: list[list[dict[str, str]]] = []
    real = tiny_engine.chat_template

    def spy(messages, **kwargs):
        seen.append(messages)
        return real(messages, **kwargs)

    monkeypatch.setattr(tiny_engine, "chat_template", spy)
    gen = GEN.replace(max_reasoning_tokens=4)
    evaluate(tiny_engine, data=questions, out=tmp_path / "a.jsonl", policy=Vanilla(), limit=1, generation=gen)
    assert seen[-1] == [{"role": "user", "content": f"What is 1 + 1?\n\n{STEP_BY_STEP}"}]  # today's default
    evaluate(tiny_engine, data=questions, out=tmp_path / "b.jsonl", policy=Vanilla(), limit=1, generation=gen,
             prompt="chain-of-draft", system_prompt="Be brief.")
    assert seen[-1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is 1 + 1?\n\n{CHAIN_OF_DRAFT}"}]
    template = tmp_path / "ask.txt"
    template.write_text("Question: {question}\nAnswer in \\boxed{}.\n")
    evaluate(tiny_engine, data=questions, out=tmp_path / "c.jsonl", policy=Vanilla(), limit=1, generation=gen, prompt=str(template))
    assert seen[-1] == [{"role": "user", "content": "Question: What is 1 + 1?\nAnswer in \\boxed{}."}]
    assert _lines(tmp_path / "c.jsonl")[0]["config"]["prompt"] == {
        "style": str(template), "template": "Question: {question}\nAnswer in \\boxed{}.", "system": None}
    # a different prompt is a different run
    with pytest.raises(CodestopError, match="holds a different run \\(prompt"):
        evaluate(tiny_engine, data=questions, out=tmp_path / "a.jsonl", policy=Vanilla(), limit=1, generation=gen,
                 prompt="solve-then-check")
    with pytest.raises(CodestopError, match="neither a style"):
        evaluate(tiny_engine, data=questions, out=tmp_path / "d.jsonl", prompt="terse")
    template.write_text("no slot here")
    with pytest.raises(CodestopError, match="no {question} slot"):
        evaluate(tiny_engine, data=questions, out=tmp_path / "d.jsonl", prompt=str(template))


def test_a_family_keeps_the_system_prompt_it_needs():
    from codestop.eval.prompts import resolve_prompt
    from codestop.families import FAMILIES

    nemotron = resolve_prompt("chain-of-draft", "Be brief.").apply(FAMILIES["nemotron"])
    assert nemotron.messages("Q?")[0] == {"role": "system", "content": "detailed thinking on\nBe brief."}
    assert nemotron.think_end == "</think>"  # only the question changes, never how thinking is closed


def test_regrade_flips_only_verdicts(tmp_path):
    trace = {"schema": 1, "id": "gsm8k:12", "gold": "694", "grading": "integer",
             "probes": [{"position": 9, "confidence": 0.9, "answer": "204 + 160 + 330", "correct": True, "text": "x"},
                        {"position": 20, "confidence": 0.8, "answer": "694", "correct": True}],
             "final_answer": "16-3-4", "final_correct": True, "reasoning_tokens": 30}
    new, flips = regrade(trace)
    assert flips == 2 and [p["correct"] for p in new["probes"]] == [False, True] and new["final_correct"] is False
    assert {k: v for k, v in new.items() if k not in ("probes", "final_correct")} == {
        k: v for k, v in trace.items() if k not in ("probes", "final_correct")}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(trace, ensure_ascii=False) + "\n")
    assert regrade_file(path) == 2 and regrade_file(path) == 0
    assert path.read_text() == json.dumps(new, ensure_ascii=False) + "\n"
