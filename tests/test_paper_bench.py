"""bench/paper/run.py, the first run for GPU users, end to end on the real vLLM CPU server.

SmolLM2-135M-Instruct (not a reasoning model) on two questions of each benchmark's fixture, a
32-token budget and a probe at every line end, so the run is quick: what is asserted is the
mechanics (trace files, rollouts and their seeds, the replayed tables, the resume, the errors), never
the model's accuracy. The run goes through the script's own command line in a subprocess, as a user
runs it; the tables are checked against the trace files it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from codestop.eval.datasets import load_examples
from codestop.jsonl import read_jsonl
from codestop.policies import make_policy
from codestop.replay import replay
from codestop.traces import load_traces

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "paper" / "run.py"
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(SCRIPT.parent))

from paper_table import BENCHMARK_LABELS, METHOD_LABELS, METHODS, markdown, paper_model  # noqa: E402

BENCHMARKS = ("gsm8k", "math500", "aime24", "aime25", "gpqa-diamond")
ROLLOUTS = {"gsm8k": 1, "math500": 1, "aime24": 1, "aime25": 2, "gpqa-diamond": 1}  # --rollouts 1,aime25=2
BUDGET = 32
DATA = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "aime24": "aime24_test.jsonl",
        "aime25": "aime25_test.jsonl", "gpqa-diamond": "gpqa_diamond.csv.gz"}


def paper(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CODESTOP_PAPER_PROGRESS_S": "5"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_args(url: str, out: Path) -> list[str]:
    return ["--base-url", url, "--data-dir", str(FIXTURES), "--out", str(out), "--limit", "2", "--rollouts", "1,aime25=2",
            "--max-reasoning-tokens", str(BUDGET), "--boundaries", "\\n", "--concurrency", "4"]


def trace_files(out: Path) -> dict[str, list[Path]]:
    return {b: [out / "traces" / f"{b}.r{r}.jsonl" for r in range(ROLLOUTS[b])] for b in BENCHMARKS}


@pytest.fixture(scope="module")
def first_run(vllm_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "run"
    done = paper(*run_args(vllm_url, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_records_every_benchmark_and_rollout(first_run):
    out, _ = first_run
    for bench, paths in trace_files(out).items():
        wanted = [e.id for e in load_examples(bench, FIXTURES / DATA[bench], limit=2)]
        for r, path in enumerate(paths):
            lines = read_jsonl(path)
            assert sorted(str(t["id"]) for t in lines) == sorted(wanted), path
            for t in lines:
                gen = t["config"]["generation"]
                assert t["config"]["kind"] == "trace" and t["config"]["model"] == "smollm2"
                assert (gen["seed"], gen["temperature"], gen["top_p"], gen["top_k"]) == (r, 0.6, 0.95, 20)  # rollout r: seed 0 + r
                assert gen["boundaries"] == ["\n"] and gen["max_reasoning_tokens"] == BUDGET and gen["probe_interval"] == 1
                assert 1 <= t["reasoning_tokens"] <= BUDGET
                assert all(p["position"] <= t["reasoning_tokens"] for p in t["probes"])
        assert not (out / "traces" / f"{bench}.r{len(paths)}.jsonl").exists()


def test_results_are_the_replays_of_the_traces(first_run):
    out, _ = first_run
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "smollm2" and results["paper_model"] is None
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    settings = {
        "vanilla": make_policy("vanilla"),
        "deer": make_policy("deer", threshold=0.95),
        "codestop": make_policy("codestop", tau=7.1, variant="reference"),
        "codestop-paper": make_policy("codestop", tau=7.1, variant="paper"),
    }
    for bench, paths in trace_files(out).items():
        got = results["benchmarks"][bench]
        traces = [t for p in paths for t in load_traces(p)]
        assert got["traces"] == 2 * ROLLOUTS[bench] == len(traces) and got["questions"] == 2
        raw = [t for p in paths for t in read_jsonl(p)]
        vanilla = got["methods"]["vanilla"]
        assert vanilla["accuracy"] == sum(bool(t["final_correct"]) for t in raw) / len(raw)
        assert vanilla["mean_reasoning_tokens"] == vanilla["mean_cost_tokens"] == sum(t["reasoning_tokens"] for t in raw) / len(raw)
        assert vanilla["saving"] == 0
        for name, policy in settings.items():
            expected = replay(traces, policy)["summary"]
            fig = got["methods"][name]
            assert (fig["n"], fig["accuracy"], fig["mean_reasoning_tokens"], fig["mean_cost_tokens"]) == (
                expected["n"], expected["accuracy"], expected["mean_reasoning_tokens"], expected["mean_cost_tokens"])
            assert fig["mean_reasoning_tokens"] <= vanilla["mean_reasoning_tokens"]
            assert fig["saving"] == pytest.approx(1 - fig["mean_cost_tokens"] / vanilla["mean_cost_tokens"])
            assert sum(fig["stop_reasons"].values()) == got["traces"]
    # the mean over the paper's four benchmarks: AIME's two years pooled (trace-weighted), then averaged
    b = results["benchmarks"]
    mean = results["mean"]
    assert mean["complete"] and mean["traces"] == sum(2 * n for n in ROLLOUTS.values())
    for m in METHODS:
        aime = (b["aime24"]["methods"][m]["accuracy"] * 2 + b["aime25"]["methods"][m]["accuracy"] * 4) / 6
        groups = [b["gsm8k"]["methods"][m]["accuracy"], b["math500"]["methods"][m]["accuracy"], aime, b["gpqa-diamond"]["methods"][m]["accuracy"]]
        assert mean["methods"][m]["accuracy"] == pytest.approx(sum(groups) / 4)


def test_table_sets_its_figures_beside_the_papers(first_run):
    out, done = first_run
    table = (out / "table.md").read_text()
    assert done.stdout.strip() == table.strip()  # the table alone on stdout
    results = json.loads((out / "results.json").read_text())
    for bench, got in results["benchmarks"].items():
        for m in METHODS:
            f = got["methods"][m]
            row = (f"| {BENCHMARK_LABELS[bench]} | {got['traces']} | {METHOD_LABELS[m]} | {100 * f['accuracy']:.1f} | "
                   f"{f['mean_reasoning_tokens']:,.0f} | {f['mean_cost_tokens']:,.0f} | {100 * f['saving']:.1f}% |")
            assert row in table
    assert "| mean of the 4 benchmarks | 12 | CoDE-Stop |" in table
    # the paper's Table 1, and no paper figure beside a model the paper did not run
    assert "| Qwen3-4B | 78.4 / 8,344 | 77.4 / 6,176 | 76.9 / 5,865 (cost 5,960) |" in table
    assert "| Llama-3.1-Nemotron-Nano-8B | 73.2 / 5,729 | 72.0 / 4,736 | 71.3 / 4,531 |" in table
    assert "The paper reports no figures for smollm2" in table
    timed = json.loads((out / "recording.json").read_text())
    assert {b: t["traces"] for b, t in timed.items()} == {b: 2 * n for b, n in ROLLOUTS.items()}
    assert all(t["generated_tokens"] >= t["traces"] for t in timed.values())
    assert f"GSM8K 2 traces in {timed['gsm8k']['seconds']:,.0f} s" in table
    # progress on stderr, no traceback
    assert "[paper] GSM8K: 2 traces; 2 recorded now" in done.stderr
    assert "[paper] AIME 2025: 4 traces; 4 recorded now" in done.stderr
    assert "Traceback" not in done.stderr


def row(label: str, traces: int, method: str, fig: dict) -> str:
    return (f"| {label} | {traces} | {METHOD_LABELS[method]} | {100 * fig['accuracy']:.1f} | {fig['mean_reasoning_tokens']:,.0f} | "
            f"{fig['mean_cost_tokens']:,.0f} | {100 * fig['saving']:.1f}% |")


def test_the_papers_figures_stand_beside_a_model_it_ran(first_run):
    """The same figures, as they would print for one of the paper's models: the paper's own figure
    in the last column where it quotes one, blank where it does not."""
    assert paper_model("Qwen/Qwen3-4B") == "Qwen3-4B" and paper_model("/models/qwen3-14b/") == "Qwen3-14B"
    assert paper_model("nvidia/Llama-3.1-Nemotron-Nano-8B-v1") == "Llama-3.1-Nemotron-Nano-8B"
    assert paper_model("Qwen/Qwen3-4B-Instruct-2507") is None and paper_model("smollm2") is None
    out, _ = first_run
    results = {**json.loads((out / "results.json").read_text()), "model": "Qwen/Qwen3-4B", "paper_model": "Qwen3-4B"}
    table = markdown(results)
    b = results["benchmarks"]
    assert row("GSM8K", 2, "vanilla", b["gsm8k"]["methods"]["vanilla"]) + " 94.8 / 2,306 |" in table
    assert row("GSM8K", 2, "codestop", b["gsm8k"]["methods"]["codestop"]) + " 94.6 / 1,233 |" in table
    assert row("GSM8K", 2, "deer", b["gsm8k"]["methods"]["deer"]) + "  |" in table
    mean = results["mean"]["methods"]
    assert row("mean of the 4 benchmarks", 12, "codestop", mean["codestop"]) + " 76.9 / 5,865 |" in table
    assert row("mean of the 4 benchmarks", 12, "vanilla", mean["vanilla"]) + " 78.4 / 8,344 |" in table
    assert "paper (Qwen3-4B): accuracy % / tokens" in table and "about 13,400 tokens for DEER" in table
    # a mean over fewer than the paper's four benchmarks is not set beside the paper's mean
    partial = {**results, "mean": {**results["mean"], "complete": False, "label": "mean of the 3 benchmark groups run"}}
    assert row("mean of the 3 benchmark groups run", 12, "vanilla", mean["vanilla"]) + "  |" in markdown(partial)


def test_resumes_what_is_recorded(first_run, vllm_url, tmp_path):
    first, _ = first_run
    out = tmp_path / "run"
    shutil.copytree(first, out)
    files = trace_files(out)
    before = {p: p.read_bytes() for paths in files.values() for p in paths}
    # all recorded: nothing is asked again, the tables are rebuilt the same
    again = paper(*run_args(vllm_url, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_bytes() for p in before} == before
    assert "[paper] MATH-500: 2 traces; 0 recorded now" in again.stderr and "resuming: 2 traces there" in again.stderr
    figures = {b: v["methods"] for b, v in json.loads((out / "results.json").read_text())["benchmarks"].items()}
    assert figures == {b: v["methods"] for b, v in json.loads((first / "results.json").read_text())["benchmarks"].items()}
    # a run killed while writing its second GSM8K trace: the first kept byte for byte, the second redone
    gsm8k = files["gsm8k"][0]
    first_line = before[gsm8k].splitlines(keepends=True)[0]
    gsm8k.write_bytes(first_line + b'{"schema": 1, "id": "gsm8k:')
    resumed = paper(*run_args(vllm_url, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = gsm8k.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and lines[0] == first_line
    assert {json.loads(x)["id"] for x in lines} == {json.loads(x)["id"] for x in before[gsm8k].splitlines()}
    assert "[paper] GSM8K: 2 traces; 1 recorded now" in resumed.stderr
    assert {p: p.read_bytes() for p in before if p != gsm8k} == {p: b for p, b in before.items() if p != gsm8k}
    assert json.loads((out / "results.json").read_text())["benchmarks"]["gsm8k"]["traces"] == 2
    # what recording took is summed over the invocations that recorded: 2 traces, then 1
    timed = json.loads((out / "recording.json").read_text())["gsm8k"]
    assert timed["traces"] == 3 and timed["seconds"] > 0


def test_a_missing_data_file_is_named_before_anything_starts(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "gsm8k_test.jsonl", data)
    done = paper("--data-dir", str(data), "--out", str(tmp_path / "out"), "--vllm-command", "no-such-vllm")
    assert done.returncode == 2
    assert done.stderr.startswith("paper: error: data-dir: ") and "math500_test.jsonl" in done.stderr.splitlines()[0]
    assert "gsm8k_test.jsonl," not in done.stderr.split(";")[0]  # the file that is there is not called missing
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_no_vllm_installed(tmp_path):
    done = paper("--data-dir", str(FIXTURES), "--out", str(tmp_path / "out"), "--vllm-command", str(tmp_path / "bin" / "vllm"))
    assert done.returncode == 2
    assert "vLLM is not installed here" in done.stderr and "--base-url" in done.stderr and "Traceback" not in done.stderr


def test_no_gpu(tmp_path):
    from vllm_launch import gpus
    from vllm_server import INSTALL_HINT, vllm_python

    if gpus():
        pytest.skip("this machine has a GPU: the no-GPU message cannot show here")
    python = vllm_python()
    if python is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    done = paper("--data-dir", str(FIXTURES), "--out", str(tmp_path / "out"), "--vllm-command", str(python.parent / "vllm"))
    assert done.returncode == 2
    assert done.stderr.startswith("paper: error: gpu: no GPU found") and "Traceback" not in done.stderr


PARSE_SERVE = """
import json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
ServeSubcommand().subparser_init(parser.add_subparsers(dest="subcommand"))
args = parser.parse_args(sys.argv[1:])
print(json.dumps({k: getattr(args, k) for k in ("model_tag", "host", "port", "enable_prefix_caching", "max_model_len",
                                                "gpu_memory_utilization", "stream_interval", "tensor_parallel_size")}))
"""


def test_vllm_accepts_the_serve_command():
    """The `vllm serve` command the run would start, read by vLLM's own serve parser (the tests'
    vLLM 0.32): every flag is one vLLM knows, with the value meant (the context: budget + 2048)."""
    from run import parse_args, vllm_command
    from vllm_server import INSTALL_HINT, vllm_python

    python = vllm_python()
    if python is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    args = parse_args(["--vllm-args", "--tensor-parallel-size 2"])
    command = vllm_command(args, "Qwen/Qwen3-4B", 8123)
    assert command[:3] == ["vllm", "serve", "Qwen/Qwen3-4B"]
    done = subprocess.run([str(python), "-c", PARSE_SERVE, *command[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed == {"model_tag": "Qwen/Qwen3-4B", "host": "127.0.0.1", "port": 8123, "enable_prefix_caching": True,
                      "max_model_len": 32768 + 2048, "gpu_memory_utilization": 0.9, "stream_interval": 8, "tensor_parallel_size": 2}
