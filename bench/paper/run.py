"""A first run for GPU users: the paper's Table 1 on your own GPU, in one command.

    python bench/paper/run.py --model Qwen/Qwen3-4B --data-dir DIR

1. starts vLLM (`vllm serve MODEL`, prefix caching, a context that fits the budget; or uses the
   server ``--base-url`` names);
2. records full-length traces (`codestop record` through the server engine: no stopping, a probe
   at every step boundary) on GSM8K, MATH-500, AIME 2024, AIME 2025 and GPQA-Diamond with the
   paper's sampling (Qwen3's defaults: temperature 0.6, top-p 0.95, top-k 20), reasoning budget
   (32,768 tokens), step boundary ("Wait") and rollouts per question (GSM8K 1, MATH-500 2, AIME 15,
   GPQA 5; rollout r samples with seed ``--seed`` + r), one trace file per benchmark and rollout;
3. replays vanilla, DEER (threshold 0.95) and CoDE-Stop (tau 7.1, delta 0.55, r_min 0.9, r_max
   0.95, ramp 2 steps; the reference variant, the code behind the paper's numbers, and the paper
   variant beside it) on the traces: no second generation;
4. prints the paper's Table 1 beside its own figures and writes them to ``--out`` (table.md,
   results.json; the traces under traces/, vLLM's log as vllm.log).

Re-running the same command resumes: questions already recorded are skipped (a half-written last
line is redone), and the tables are rebuilt from every trace. Progress goes to stderr, the table to
stdout (``$CODESTOP_PAPER_PROGRESS_S``: seconds between progress lines, default 30). ``--data-dir``
holds the benchmark files under their usual names (see DATA_FILES); without it they load from the
Hugging Face hub (GPQA is gated there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from paper_table import BENCHMARK_LABELS, BENCHMARKS, MEAN_GROUPS, METHODS, markdown, paper_model
from vllm_launch import PROMPT_ALLOWANCE, check_gpu, check_vllm, serve_command

from codestop.cli.options import parse_boundaries
from codestop.config import GenerationConfig
from codestop.engines.base import Engine
from codestop.engines.server.launch import ServerProcess, free_port
from codestop.errors import CodestopError
from codestop.eval.datasets import load_examples
from codestop.eval.runner import record
from codestop.jsonl import read_jsonl
from codestop.models import load_engine
from codestop.policies import Policy, make_policy
from codestop.replay import replay_trace, summarize_replay
from codestop.traces import Trace, load_traces

DATA_FILES = {
    "gsm8k": "gsm8k_test.jsonl",
    "math500": "math500_test.jsonl",
    "aime24": "aime24_test.jsonl",
    "aime25": "aime25_test.jsonl",
    "gpqa-diamond": "gpqa_diamond.csv.gz",
}
# the paper's rollouts per question (method notes: AIME24/25 15, MATH500 2, GSM8K 1, GPQA-Diamond 5)
PAPER_ROLLOUTS = {"gsm8k": 1, "math500": 2, "aime24": 15, "aime25": 15, "gpqa-diamond": 5}
PAPER_TAU = 7.1  # the paper's one published setting (Qwen3-4B on AIME); its per-benchmark rule is not in what we read
PAPER_BUDGET = 32768
DEFAULT_MODEL = "Qwen/Qwen3-4B"
PROGRESS_EVERY_S = float(os.environ.get("CODESTOP_PAPER_PROGRESS_S", "30"))


def say(message: str) -> None:
    print(f"[paper] {message}", file=sys.stderr, flush=True)


def per_benchmark(text: str, flag: str, cast: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """``"7.1"`` (every benchmark) or ``"7.1,gsm8k=5"`` / ``"aime24=3"`` (one benchmark) over
    ``defaults``."""
    out = dict(defaults)
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.rpartition("=")
        try:
            parsed = cast(value)
        except ValueError:
            raise CodestopError(f"{flag}: {item!r} is not a number (give N, or BENCHMARK=N)") from None
        if name and name not in BENCHMARKS:
            raise CodestopError(f"{flag}: unknown benchmark {name!r} in {item!r}; choose from {', '.join(BENCHMARKS)}")
        for key in ([name] if name in out else []) if name else list(out):
            out[key] = parsed
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/paper/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"hub id or local directory vLLM serves (default {DEFAULT_MODEL}; with "
                   "--base-url: the server's first model)")
    p.add_argument("--base-url", default=None, help="use this running vLLM (…/v1) instead of starting one")
    p.add_argument("--data-dir", default=None, help="folder with the benchmark files (" + ", ".join(DATA_FILES.values()) +
                   "); default: the Hugging Face hub")
    p.add_argument("--out", default=None, help="output folder (default codestop-paper/<model>)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated, from: " + ", ".join(BENCHMARKS))
    p.add_argument("--limit", type=int, default=None, help="first N questions of each benchmark (default all)")
    p.add_argument("--rollouts", default="", help="rollouts per question: N for every benchmark, or BENCHMARK=N "
                   "(default the paper's: " + ", ".join(f"{k} {v}" for k, v in PAPER_ROLLOUTS.items()) + ")")
    p.add_argument("--max-reasoning-tokens", type=int, default=PAPER_BUDGET, help=f"reasoning budget (default the paper's {PAPER_BUDGET})")
    p.add_argument("--temperature", type=float, default=0.6, help="the paper's sampling is the model's defaults; Qwen3's: 0.6")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="rollout r samples with seed + r")
    p.add_argument("--boundaries", type=parse_boundaries, default=("Wait",),
                   help='step boundaries, comma-separated (default "Wait", the reference code\'s)')
    p.add_argument("--tau", default=str(PAPER_TAU), help=f"CoDE-Stop's tau: T for every benchmark, or BENCHMARK=T (default {PAPER_TAU})")
    p.add_argument("--deer-threshold", type=float, default=0.95)
    p.add_argument("--questions-in-flight", "--concurrency", dest="questions_in_flight", type=int, default=64, help="questions in flight at once (default 64)")
    g = p.add_argument_group("starting vLLM (ignored with --base-url)")
    g.add_argument("--vllm-command", default="vllm", help="the vllm program (default: vllm on PATH)")
    g.add_argument("--max-model-len", type=int, default=None, help=f"default: the budget + {PROMPT_ALLOWANCE}")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--stream-interval", type=int, default=8, help="tokens per server-sent event (default 8: less client CPU)")
    g.add_argument("--vllm-args", default="", help='more flags for vllm serve, e.g. "--tensor-parallel-size 2"')
    g.add_argument("--start-timeout", type=float, default=3600.0, help="seconds to wait for vLLM (the first start downloads the weights)")
    return p.parse_args(argv)


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").rsplit("/", 1)[-1]) or "model"


def data_files(data_dir: str | None, benchmarks: Sequence[str]) -> dict[str, str | None]:
    """Each benchmark's file under ``data_dir`` (every one must be there, checked before anything
    starts), or None for all: the hub."""
    if data_dir is None:
        return {b: None for b in benchmarks}
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise CodestopError(f"data-dir: {str(root)!r} is not a folder")
    missing = [DATA_FILES[b] for b in benchmarks if not (root / DATA_FILES[b]).is_file()]
    if missing:
        raise CodestopError(
            f"data-dir: {root} has no {', '.join(missing)}; the benchmark files are named "
            + ", ".join(f"{DATA_FILES[b]} ({BENCHMARK_LABELS[b]})" for b in benchmarks)
            + "; leave out --data-dir to load them from the Hugging Face hub, or drop the benchmark from --benchmarks"
        )
    return {b: str(root / DATA_FILES[b]) for b in benchmarks}


def count_questions(files: dict[str, str | None], limit: int | None) -> dict[str, int]:
    """Every benchmark's questions, read now (from the files or the hub), so that a file that does
    not parse or a hub that cannot be reached fails before vLLM starts, not hours later."""
    counts: dict[str, int] = {}
    for bench, data in files.items():
        try:
            counts[bench] = len(load_examples(bench, data, limit))
        except CodestopError as err:
            raise CodestopError(str(err).replace("--data PATH", "--data-dir DIR")) from None
    return counts


def policies(tau: float, deer_threshold: float) -> dict[str, Policy]:
    """The paper's settings: DEER's exit threshold; CoDE-Stop's delta 0.55, r_max 0.95 and the
    reference code's tuned ramp (r_min 0.9, 2 steps), which are codestop's defaults."""
    return {
        "vanilla": make_policy("vanilla"),
        "deer": make_policy("deer", threshold=deer_threshold),
        "codestop": make_policy("codestop", tau=tau, variant="reference"),
        "codestop-paper": make_policy("codestop", tau=tau, variant="paper"),
    }


def trace_path(out: Path, bench: str, rollout: int) -> Path:
    return out / "traces" / f"{bench}.r{rollout}.jsonl"


def generated(rec: dict[str, Any]) -> int:
    tokens = rec.get("tokens") or {}
    return int(sum(tokens.get(k, 0) for k in ("reasoning", "probe", "answer", "overrun")))


def count_lines(paths: Sequence[Path]) -> int:
    n = 0
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            n += sum(1 for line in fh if line.strip())
    return n


def record_benchmark(engine: Engine, args: argparse.Namespace, bench: str, data: str | None, paths: Sequence[Path],
                     generation: GenerationConfig, questions: int) -> list[list[dict[str, Any]]]:
    """Record the rollouts of one benchmark at once, each in its own thread (each ``record`` runs
    its own event loop), sharing ``--questions-in-flight`` between them: one rollout of AIME's 30 questions
    alone would leave most of a GPU's batch empty. Progress: the trace files' lines, every 30 s."""
    share = max(1, -(-args.questions_in_flight // len(paths)))
    total = len(paths) * questions
    done = threading.Event()

    def watch() -> None:
        last = -1
        while not done.wait(PROGRESS_EVERY_S):
            n = count_lines(paths)
            if n != last:
                say(f"{BENCHMARK_LABELS[bench]}: {n}/{total} traces recorded")
                last = n

    def one(r: int) -> list[dict[str, Any]]:
        return record(engine, bench, data=data, out=paths[r], limit=args.limit, questions_in_flight=share,
                      generation=generation.replace(seed=args.seed + r))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    pool = ThreadPoolExecutor(max_workers=len(paths))
    try:
        return list(pool.map(one, range(len(paths))))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: do not wait for the rollouts in flight
        raise
    finally:
        done.set()
        pool.shutdown(wait=False)


def record_all(engine: Engine, args: argparse.Namespace, out: Path, files: dict[str, str | None],
               rollouts: dict[str, int], generation: GenerationConfig, questions: dict[str, int]) -> dict[str, Any]:
    """Record every benchmark's rollouts (resuming what is there). What recording took is summed
    over every invocation in ``recording.json`` (the wall seconds of the ones that recorded, and the
    traces and tokens they generated; a killed invocation's are lost, its traces kept), so the
    tokens/s it reports is measured on this machine; returns that, per benchmark."""
    log_path = out / "recording.json"
    totals: dict[str, Any] = {}
    if log_path.exists():
        try:
            totals = json.loads(log_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            say(f"{log_path} unreadable ({err}); the recording times start again from here")
    for bench, data in files.items():
        paths = [trace_path(out, bench, r) for r in range(rollouts[bench])]
        before = {(r, str(rec.get("id"))) for r, path in enumerate(paths) if path.exists() for rec in read_jsonl(path, repair=True)}
        say(f"{BENCHMARK_LABELS[bench]}: {len(paths)} rollout(s) -> {paths[0].parent}/{bench}.r*.jsonl"
            + (f" (resuming: {len(before)} traces there)" if before else ""))
        t0 = time.perf_counter()
        recorded = record_benchmark(engine, args, bench, data, paths, generation, questions[bench])
        seconds = time.perf_counter() - t0
        fresh = [t for r, traces in enumerate(recorded) for t in traces if (r, str(t.get("id"))) not in before]
        tokens = sum(generated(t) for t in fresh)
        say(f"{BENCHMARK_LABELS[bench]}: {sum(map(len, recorded))} traces; {len(fresh)} recorded now in {seconds:.0f} s"
            + (f", {tokens / seconds:,.0f} generated tokens/s" if fresh and seconds > 0 else ""))
        if fresh:
            total = totals.setdefault(bench, {"traces": 0, "generated_tokens": 0, "seconds": 0.0})
            total["traces"] += len(fresh)
            total["generated_tokens"] += tokens
            total["seconds"] = round(total["seconds"] + seconds, 1)
            total["tokens_per_second"] = round(total["generated_tokens"] / total["seconds"], 1) if total["seconds"] else None
            log_path.write_text(json.dumps(totals, indent=2) + "\n", encoding="utf-8")
    return totals


def replay_benchmark(traces: Sequence[Trace], chosen: dict[str, Policy]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, policy in chosen.items():
        rows = [replay_trace(t, policy) for t in traces]
        summary = summarize_replay(rows)
        summary["stop_reasons"] = dict(Counter(r.stop_reason or "none" for r in rows))
        figures[name] = summary
    base = figures["vanilla"]["mean_cost_tokens"]
    for fig in figures.values():
        fig["saving"] = 1 - fig["mean_cost_tokens"] / base if base else None
    return figures


def mean_row(benchmarks: dict[str, Any]) -> dict[str, Any] | None:
    """The benchmarks' figures averaged, AIME's two years pooled first (the paper's four benchmarks)."""
    groups: list[dict[str, Any]] = []
    for members in MEAN_GROUPS.values():
        present = [benchmarks[b] for b in members if b in benchmarks]
        if not present:
            continue
        n = sum(b["traces"] for b in present)
        pooled: dict[str, Any] = {}
        for m in METHODS:
            pooled[m] = {k: sum(b["methods"][m][k] * b["traces"] for b in present) / n
                         for k in ("accuracy", "mean_reasoning_tokens", "mean_cost_tokens")}
        groups.append(pooled)
    if not groups:
        return None
    methods = {m: {k: sum(g[m][k] for g in groups) / len(groups) for k in ("accuracy", "mean_reasoning_tokens", "mean_cost_tokens")}
               for m in METHODS}
    base = methods["vanilla"]["mean_cost_tokens"]
    for fig in methods.values():
        fig["saving"] = 1 - fig["mean_cost_tokens"] / base if base else None
    complete = len(groups) == len(MEAN_GROUPS)
    label = "mean of the 4 benchmarks" if complete else f"mean of the {len(groups)} benchmark groups run"
    return {"label": label, "complete": complete, "traces": sum(b["traces"] for b in benchmarks.values()), "methods": methods}


def vllm_command(args: argparse.Namespace, model: str, port: int) -> list[str]:
    """The `vllm serve` command this run starts: a context of the budget plus room for the prompt."""
    return serve_command(args.vllm_command, model, port=port,
                         max_model_len=args.max_model_len or args.max_reasoning_tokens + PROMPT_ALLOWANCE,
                         gpu_memory_utilization=args.gpu_memory_utilization, stream_interval=args.stream_interval,
                         extra=args.vllm_args)


def run(args: argparse.Namespace) -> int:
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown or not benchmarks:
        raise CodestopError(f"benchmarks: unknown {', '.join(unknown) or 'none given'}; choose from {', '.join(BENCHMARKS)}")
    rollouts = per_benchmark(args.rollouts, "rollouts", int, {b: PAPER_ROLLOUTS[b] for b in benchmarks})
    taus = per_benchmark(args.tau, "tau", float, {b: PAPER_TAU for b in benchmarks})
    if any(v < 1 for v in rollouts.values()):
        raise CodestopError(f"rollouts: every count must be >= 1 (got {rollouts})")
    for tau in set(taus.values()):
        policies(tau, args.deer_threshold)  # a bad setting fails now, not after hours of recording
    generation = GenerationConfig(max_reasoning_tokens=args.max_reasoning_tokens, probe_interval=1, boundaries=tuple(args.boundaries),
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    files = data_files(args.data_dir, benchmarks)
    questions = count_questions(files, args.limit)
    model = args.model or (None if args.base_url else DEFAULT_MODEL)
    out = Path(args.out or Path("codestop-paper") / slug(model or "server")).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    server: ServerProcess | None = None
    try:
        if args.base_url:
            url = args.base_url
            say(f"using the vLLM at {url}")
        else:
            assert model is not None
            check_vllm(args.vllm_command)
            found = check_gpu()
            port = free_port()
            command = vllm_command(args, model, port)
            server = ServerProcess(command, port, out / "vllm.log")
            say(f"starting vLLM on {found[0]}{f' (+{len(found) - 1} more)' if len(found) > 1 else ''}: {' '.join(command)}")
            say(f"ready in {server.start(args.start_timeout, say, timeout_hint='--start-timeout'):.0f} s")
            url = server.url
        engine = load_engine(model or "", engine="server", base_url=url)
        say(f"model {engine.model_name}; benchmarks {', '.join(benchmarks)}; rollouts "
            + ", ".join(f"{b} {rollouts[b]}" for b in benchmarks))
        timing = record_all(engine, args, out, files, rollouts, generation, questions)
    finally:
        if server is not None:
            say("stopping vLLM")
            server.stop()

    results = build_results(args, engine.model_name, getattr(engine, "name", "server"), out, benchmarks, rollouts, taus, generation, timing)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = markdown(results)
    (out / "table.md").write_text(table, encoding="utf-8")
    print(table)
    say(f"wrote {out / 'table.md'} and {out / 'results.json'}")
    return 0


def build_results(args: argparse.Namespace, model: str, engine_name: str, out: Path, benchmarks: Sequence[str],
                  rollouts: dict[str, int], taus: dict[str, float], generation: GenerationConfig,
                  timing: dict[str, Any]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for bench in benchmarks:
        traces = [t for r in range(rollouts[bench]) for t in load_traces(trace_path(out, bench, r))]
        figures = replay_benchmark(traces, policies(taus[bench], args.deer_threshold))
        per[bench] = {"traces": len(traces), "rollouts": rollouts[bench], "questions": len({t.id for t in traces}),
                      "tau": taus[bench], "files": [str(trace_path(out, bench, r)) for r in range(rollouts[bench])],
                      "recording": timing.get(bench), "methods": figures}
    sampling = f"temperature {generation.temperature}, top-p {generation.top_p}, top-k {generation.top_k}, seed {generation.seed} + rollout"
    tau_text = ", ".join(sorted({f"{v:g}" for v in taus.values()}))
    caveats = []
    if not paper_model(model):
        caveats.append(f"{model} is not one of the paper's models: compare the shape of the trade-off, not the digits.")
    return {
        "model": model,
        "paper_model": paper_model(model),
        "engine": f"the {engine_name} engine",
        "settings": {
            "max_reasoning_tokens": generation.max_reasoning_tokens,
            "boundaries": list(generation.boundaries),
            "temperature": generation.temperature, "top_p": generation.top_p, "top_k": generation.top_k, "seed": generation.seed,
            "sampling_text": sampling,
            "rollouts": {b: rollouts[b] for b in benchmarks},
            "limit": args.limit,
            "deer_threshold": args.deer_threshold,
            "tau": {b: taus[b] for b in benchmarks},
            "codestop_text": f"tau {tau_text}, delta 0.55, r_min 0.9, r_max 0.95, ramp 2 steps; the reference code's variant, "
                             "and the paper's description as 'paper variant'",
        },
        "benchmarks": per,
        "mean": mean_row(per),
        "caveats": caveats,
    }


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the vLLM this run started is stopped on the way out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run(args)
    except (CodestopError, ValueError) as err:
        if os.environ.get("CODESTOP_DEBUG"):
            raise
        print(f"paper: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every finished trace is on disk; the recording threads cannot be interrupted, so leave now
        print("paper: interrupted; run the same command again to resume", file=sys.stderr, flush=True)
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
