"""`codestop run` end to end, as a user runs it (a subprocess), on a tiny model and on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import build_tiny_model

from codestop import Probe, make_policy


def codestop(*args, stdin=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "codestop.cli", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_run_json_prints_one_result_object(tiny_dir):
    proc = codestop("run", "What is 2 + 3?", "--model", str(tiny_dir), "--json", "--method", "budget", "--budget", "12", "--seed", "0", "--temperature", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # nothing else on stdout
    assert result["stop_reason"] == "budget" and result["tokens"]["reasoning"] == 12
    assert result["policy"] == {"method": "budget", "budget": 12}
    assert result["engine"] == "transformers"


def test_run_reads_stdin_and_files(tiny_dir, tmp_path):
    proc = codestop("run", "-", "--model", str(tiny_dir), "--json", "--max-reasoning-tokens", "5", stdin="What is 1 + 1?")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["question"] == "What is 1 + 1?"
    question = tmp_path / "q.txt"
    question.write_text("What is 4 + 4?")
    proc = codestop("run", "--file", str(question), "--model", str(tiny_dir), "--json", "--max-reasoning-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["question"] == "What is 4 + 4?"


def test_run_streams_and_summarises(tiny_dir):
    proc = codestop(
        "run", "What is 2 + 3?", "--model", str(tiny_dir), "--method", "deer", "--threshold", "0",
        "--boundaries", "\\n\\n, the,.", "--probe-interval", "1", "--max-reasoning-tokens", "60", "--seed", "0", "--temperature", "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "reasoning +" in proc.stdout and "stop:" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--model", "{tiny}", "--tau", "-1"], "tau: -1.0 must be a number >= 0"),
        (["--model", "{tiny}", "--method", "deer", "--tau", "3"], "tau: 3.0 is not an option of method 'deer'"),
        (["--model", "{tiny}", "--method", "fastest"], "method: 'fastest' is not a method"),
        (["--model", "{tiny}", "--ramp-steps", "0"], "ramp_steps: 0 must be an integer >= 1"),
        (["--model", "{tiny}", "--file", "/no/such/file"], "file: cannot read"),
    ],
)
def test_user_errors_are_one_line(tiny_dir, args, message):
    args = [a.replace("{tiny}", str(tiny_dir)) for a in args]
    proc = codestop("run", "What?", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_run_end_to_end_on_smollm2(smollm2_path):
    """The real SmolLM2-135M (a plumbing model, not a reasoning one) through the transformers engine."""
    proc = codestop(
        "run", "Tom has 3 apples and buys 2 more. How many apples does he have?", "--model", str(smollm2_path),
        "--engine", "transformers", "--max-reasoning-tokens", "64", "--probe-interval", "8", "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["family"] == "plain" and result["engine"] == "transformers"
    # greedy SmolLM2 rambles past 120 tokens on this question, and its probes (confidence about
    # 0.4-0.5, never near r_min = 0.9) do not stop CoDE-Stop: the cap (64) ends the reasoning, exactly there
    assert (result["stop_reason"], result["stop_position"], result["tokens"]["reasoning"]) == ("max_reasoning_tokens", 64, 64)
    tracker = make_policy(**result["policy"]).start()  # the policy the run used, replayed on its own probes
    decisions = [tracker.update(Probe(**{k: p[k] for k in ("position", "confidence", "answer")})) for p in result["probes"]]
    assert result["probes"] and not any(d.stop for d in decisions)
    assert [p["position"] for p in result["probes"]] == sorted({p["position"] for p in result["probes"]})
    assert 0 < result["probes"][-1]["position"] <= 64 and all(0.0 <= p["confidence"] <= 1.0 for p in result["probes"])
    assert result["answer_text"].startswith("\n\n**Final Answer**\n\nThe final answer is \\boxed{")  # forced at the cap
    assert result["answer"] and result["answer_text"].endswith(result["answer"] + "}")


def test_python_dash_m_codestop_is_the_command_line():
    """Issue 27: only ``python -m codestop.cli`` worked."""
    proc = subprocess.run([sys.executable, "-m", "codestop", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: codestop ") and "serve" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "codestop", "run", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "codestop: error: question: the question is empty\n"  # one line, as the CLI's


def test_evals_questions_in_flight_has_its_own_name_and_the_old_flag_still_works(capsys):
    """Issue 27: ``--concurrency`` counted questions in eval and upstream requests in serve."""
    from codestop.cli.main import build_parser

    parser = build_parser()
    for verb in ("eval", "record"):
        base = [verb, "--dataset", "gsm8k", "--out", "x.jsonl"]
        assert parser.parse_args(base).questions_in_flight == 1
        assert parser.parse_args([*base, "--questions-in-flight", "4"]).questions_in_flight == 4
        assert capsys.readouterr().err == ""
        assert parser.parse_args([*base, "--concurrency", "3"]).questions_in_flight == 3
        assert capsys.readouterr().err == "codestop: --concurrency is deprecated; use --questions-in-flight (eval's --concurrency " \
                                          "counted questions, serve's counts upstream requests)\n"
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--help"])
        assert "--questions-in-flight N" in (shown := capsys.readouterr().out) and "--concurrency" not in shown
