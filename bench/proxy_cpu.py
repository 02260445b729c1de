"""Benchmark: the proxy's own CPU time per reasoning token (issue 20).

``codestop serve`` runs as the real verb in its own process (``--workers N``: N worker processes),
in front of bench/upstream_replay.py, which answers with recorded real vLLM responses as fast as
the proxy reads them: the upstream is never the bottleneck, and waiting on it costs the proxy no
CPU. The proxy's CPU is its process tree's (psutil: user + system), from just before the load to
just after, over the reasoning tokens its answers report (``usage.codestop.reasoning_tokens``).

Modes: vanilla (no probes), and CoDE-Stop set never to stop (r_min = r_max = 1, tau = 1e9) with a
probe at each line boundary ``--probe-interval`` tokens apart, probe_mode overlapped and
sequential; each at ``--concurrency`` 1, 16 and 64, chat requests streamed (``--plain``: not).
Throughput (reasoning tokens per wall second) is the ceiling the proxy reaches on this machine.

The recordings were made by running this workload once through the recorder (``--record``), in
front of the real servers serving SmolLM2-135M-Instruct, which is not a reasoning model, asked for
a numbered list (a long reply with a boundary at each line): bench/recordings/vllm.jsonl from the
tests' vLLM (``--record --modes vanilla --record-streams stream``, then ``--modes
overlapped,sequential --record-streams plain`` at ``--max-reasoning-tokens`` 96 and 384: streamed
requests that were not recorded are answered from the recorded stream they continue);
bench/recordings/llamacpp.jsonl from a llama-server through xllamacpp (tests/llama_servers.py;
``--record --upstream URL --recording bench/recordings/llamacpp.jsonl --max-reasoning-tokens 256``).

Live mode (``--live URL``, or ``--live-stream-interval N`` to start the tests' vLLM CPU server,
tests/vllm_server.py, with ``--stream-interval N``): the same proxy in front of a real vLLM instead
of the replay, so the upstream paces the events as it generates them and live probes run beside the
stream; by default 16 streamed requests at concurrency 8, CoDE-Stop set never to stop (overlapped),
a probe every 32 tokens, over the four prompts.

Usage:
  python bench/proxy_cpu.py --live-stream-interval 1 --label "live: vLLM --stream-interval 1" [--before-repo /tmp/main]
  python bench/proxy_cpu.py [--label after] [--workers 1,2] [--concurrency 1,16,64] [--modes vanilla,overlapped,sequential]
  python bench/proxy_cpu.py --record --upstream http://127.0.0.1:8311    # remake the recording
  python bench/proxy_cpu.py --repo /tmp/main-before --label before        # another checkout's proxy
Writes bench/results/proxy_cpu.{json,md} (results kept by label).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from tests_vllm import start_vllm

REPO = Path(__file__).resolve().parents[1]
RECORDING = REPO / "bench" / "recordings" / "vllm.jsonl"
RESULTS = REPO / "bench" / "results"
PROMPTS = [f"Write a numbered list of 100 {what}, one per line." for what in ("animals", "countries", "fruits", "first names")]
NEVER_STOP = {"method": "codestop", "r_min": 1.0, "r_max": 1.0, "tau": 1e9}
MODES: dict[str, dict[str, Any]] = {
    "vanilla": {"method": "vanilla"},
    "overlapped": {**NEVER_STOP, "probe_mode": "overlapped"},
    "sequential": {**NEVER_STOP, "probe_mode": "sequential"},
}
CAVEAT = ("SmolLM2-135M-Instruct (replayed) is NOT a reasoning model: its whole reply counts as reasoning here; "
          "only the proxy's plumbing is measured.")


def say(message: str) -> None:
    print(f"[proxy_cpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_up(url: str, proc: subprocess.Popen[bytes], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up in {seconds:g} s")


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    log = open(os.environ["PROXY_CPU_LOG"], "ab") if os.environ.get("PROXY_CPU_LOG") else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=log, start_new_session=True)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def body(prompt: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    # answer "none": the output ends at the reasoning cap (no answer phase to measure)
    options = {**MODES[mode], "max_reasoning_tokens": args.max_reasoning_tokens, "probe_interval": args.probe_interval,
               "answer": "none"}
    return {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "stream": not args.plain,
            **({} if args.plain else {"stream_options": {"include_usage": True}}), "codestop": options}


async def ask(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> int:
    """One chat request; the reasoning tokens its usage reports."""
    if not payload["stream"]:
        r = await client.post(url, json=payload)
        r.raise_for_status()
        return int(r.json()["usage"]["codestop"]["reasoning_tokens"])
    usage = None
    async with client.stream("POST", url, json=payload) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]
            elif line.startswith("data: {") and '"error"' in line:
                raise RuntimeError(line)
    if usage is None:
        raise RuntimeError("a stream ended without its usage chunk")
    return int(usage["codestop"]["reasoning_tokens"])


async def load(url: str, payloads: list[dict[str, Any]], concurrency: int) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(p: dict[str, Any]) -> int:
            async with limit:
                return await ask(client, url, p)

        return await asyncio.gather(*(one(p) for p in payloads))


def proxy_command(repo: Path, upstream: str, port: int, workers: int, inherit_path: bool = True) -> tuple[list[str], dict[str, str]]:
    """``inherit_path``: this process's PYTHONPATH follows the checkout's (e.g. packages to try)."""
    args = [sys.executable, "-m", "codestop.cli", "serve", "--base-url", upstream, "--port", str(port),
            "--log-level", "warning", "--concurrency", "1024"]
    if workers > 1:
        args += ["--workers", str(workers)]
    path = [str(repo), os.environ.get("PYTHONPATH", "") if inherit_path else ""]
    return args, {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def measure(args: argparse.Namespace, upstream: str, workers: int, port: int, repo: Path | None = None) -> list[dict[str, Any]]:
    rows = []
    repo = repo or args.repo
    cmd, env = proxy_command(repo, upstream, port, workers, inherit_path=repo == args.repo)
    with process(cmd, env, cwd=repo) as proxy:  # python -m reads the working directory first
        wait_up(f"http://127.0.0.1:{port}/health", proxy, "the proxy")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for mode in args.modes:
            # warm: every prompt once (connections, the tokenizer's caches, the template), per worker
            prompts = PROMPTS[: args.prompts]
            asyncio.run(load(url, [body(p, mode, args) for p in prompts] * workers, len(prompts) * workers))
            for c in args.concurrency:
                n = max(args.requests, c * 2)
                payloads = [body(prompts[i % len(prompts)], mode, args) for i in range(n)]
                cpu0, t0 = tree_cpu(proxy.pid), time.perf_counter()
                tokens = sum(asyncio.run(load(url, payloads, c)))
                cpu, wall = tree_cpu(proxy.pid) - cpu0, time.perf_counter() - t0
                row = {"mode": mode, "workers": workers, "concurrency": c, "requests": n, "reasoning_tokens": tokens,
                       "proxy_cpu_s": round(cpu, 3), "us_per_token": round(1e6 * cpu / tokens, 1),
                       "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall)}
                say(json.dumps(row))
                rows.append(row)
    return rows


def record(args: argparse.Namespace) -> None:
    """Run the workload once (each prompt in each mode, concurrency 1) through the recorder."""
    rec_port, port = args.port + 10, args.port
    with process([sys.executable, str(REPO / "bench" / "upstream_replay.py"), "record", "--upstream", args.upstream,
                  "--out", str(args.recording), "--port", str(rec_port)]) as recorder:
        wait_up(f"http://127.0.0.1:{rec_port}/v1/models", recorder, "the recorder")
        cmd, env = proxy_command(args.repo, f"http://127.0.0.1:{rec_port}/v1", port, 1)
        with process(cmd, env, cwd=args.repo) as proxy:
            wait_up(f"http://127.0.0.1:{port}/health", proxy, "the proxy")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for mode in args.modes:
                for stream in args.record_streams:
                    args.plain = not stream
                    tokens = asyncio.run(load(url, [body(p, mode, args) for p in PROMPTS[: args.prompts]], 1))
                    say(f"recorded {mode} stream={stream}: {tokens} reasoning tokens")
    say(f"wrote {args.recording} ({args.recording.stat().st_size} bytes)")


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| mode | workers | concurrency | requests | reasoning tokens | proxy CPU (s) | µs per token | tokens/s (wall) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['workers']} | {r['concurrency']} | {r['requests']} | {r['reasoning_tokens']} | "
                   f"{r['proxy_cpu_s']:.2f} | {r['us_per_token']:.0f} | {r['tokens_per_s']} |")
    return "\n".join(out)


def summary(runs: dict[str, Any]) -> str:
    """Before against after for every setting measured both ways ("before: X" and "after: X"), and
    one worker against two where the after run has both."""
    out = []
    for label, run in runs.items():
        if not label.startswith("after: ") or (before := runs.get("before: " + label[7:])) is None:
            continue
        old = {(r["mode"], r["concurrency"]): r for r in before["rows"] if r["workers"] == 1}
        out += [f"**{label[7:]}**\n", "| mode | concurrency | µs per token, before | after | tokens/s (wall), before | after |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in run["rows"]:
            if r["workers"] == 1 and (b := old.get((r["mode"], r["concurrency"]))) is not None:
                out.append(f"| {r['mode']} | {r['concurrency']} | {b['us_per_token']:.0f} | {r['us_per_token']:.0f} | "
                           f"{b['tokens_per_s']} | {r['tokens_per_s']} |")
        out.append("")
        two = {(r["mode"], r["concurrency"]): r for r in run["rows"] if r["workers"] == 2}
        if two:
            out += [f"**{label[7:]}, one worker against two (after)**\n",
                    "| mode | concurrency | tokens/s (wall), 1 worker | 2 workers | µs per token, 1 worker | 2 workers |",
                    "|---|---:|---:|---:|---:|---:|"]
            for r in run["rows"]:
                if r["workers"] == 1 and (w := two.get((r["mode"], r["concurrency"]))) is not None:
                    out.append(f"| {r['mode']} | {r['concurrency']} | {r['tokens_per_s']} | {w['tokens_per_s']} | "
                               f"{r['us_per_token']:.0f} | {w['us_per_token']:.0f} |")
            out.append("")
    return "\n".join(out)


def pace(ms: float, per_write: int) -> str:
    return f"{per_write} per write, writes {ms:g} ms apart" if ms > 0 else "as fast as read"


def write(label: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    path = RESULTS / "proxy_cpu.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    runs[label] = {"rows": rows, "streamed": not args.plain, "pace_ms": args.pace_ms, "events_per_write": args.events_per_write,
                   "upstream": args.upstream_said,
                   "probe_interval": args.probe_interval, "max_reasoning_tokens": args.max_reasoning_tokens,
                   "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path.write_text(json.dumps({"caveat": CAVEAT, "runs": runs}, indent=1) + "\n")
    write_md(runs)


def write_md(runs: dict[str, Any]) -> None:
    md = [f"# Proxy CPU per reasoning token (bench/proxy_cpu.py)\n\n{CAVEAT}\n", summary(runs)]
    for name, run in runs.items():
        upstream = run.get("upstream") or pace(run.get("pace_ms", 0.0), run.get("events_per_write", 1))
        md.append(f"## {name} ({run['when']}; {'streamed' if run['streamed'] else 'plain'} chat requests, "
                  f"probe every {run['probe_interval']} tokens at line boundaries, {run['max_reasoning_tokens']} "
                  f"reasoning tokens at most, upstream events {upstream}, {run['cpus']} CPUs)\n\n{table(run['rows'])}\n")
    (RESULTS / "proxy_cpu.md").write_text("\n".join(md))


LIVE_DEFAULTS = {"modes": ["overlapped"], "concurrency": [8], "prompts": len(PROMPTS)}


def live(args: argparse.Namespace) -> int:
    """The proxy in front of a real vLLM (see the module's docstring)."""
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
    for key, value in LIVE_DEFAULTS.items():
        if key not in given:
            setattr(args, key, value)
    with ExitStack() as stack:
        url = args.live
        if url is None:
            say(f"starting vLLM with --stream-interval {args.live_stream_interval}")
            url = start_vllm(stack, "--stream-interval", str(args.live_stream_interval))
        version = httpx.get(url.removesuffix("/v1") + "/version", timeout=5).json().get("version", "?")
        interval = f"--stream-interval {args.live_stream_interval}" if args.live_stream_interval else "as started"
        args.upstream_said = f"live vLLM {version} (CPU, SmolLM2-135M-Instruct, {interval})"
        before = measure(args, url, 1, args.port, args.before_repo) if args.before_repo else []
        rows = measure(args, url, 1, args.port)
    if before:
        print(table(before))
    print(table(rows))
    if not args.no_write:
        if before:
            write("before: " + args.label, before, args)
        write(("after: " if before else "") + args.label, rows, args)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="after", help="the name these results are kept under")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose proxy is measured")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    ap.add_argument("--requests", type=int, default=16, help="requests per run (at least twice the concurrency)")
    ap.add_argument("--max-reasoning-tokens", type=int, default=384)
    ap.add_argument("--probe-interval", type=int, default=32)
    ap.add_argument("--plain", action="store_true", help="plain (not streamed) chat requests")
    ap.add_argument("--port", type=int, default=8720)
    ap.add_argument("--record", action="store_true", help="record the workload from --upstream instead")
    ap.add_argument("--upstream", default="http://127.0.0.1:8311")
    ap.add_argument("--recording", type=Path, default=RECORDING,
                    help="the recording replayed (or made, with --record); default bench/recordings/vllm.jsonl")
    ap.add_argument("--prompts", type=int, default=1, help="how many of the prompts (recorded ones only)")
    ap.add_argument("--record-streams", type=lambda s: [x == "stream" for x in s.split(",")], default=[True, False],
                    help="record streamed and/or plain requests (stream,plain)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--summary", action="store_true", help="print before against after from the results file (and rewrite its .md), and exit")
    ap.add_argument("--events-per-write", type=int, default=1, help="with --pace-ms: events the replay sends together")
    ap.add_argument("--pace-ms", type=float, default=0.0,
                    help="the replay sends a stream's events this far apart (one token each; default 0: as fast as read)")
    ap.add_argument("--live", metavar="URL", help="measure in front of this running vLLM (its /v1 URL) instead of the replay")
    ap.add_argument("--live-stream-interval", type=int, metavar="N",
                    help="start the tests' vLLM CPU server with --stream-interval N and measure in front of it")
    ap.add_argument("--before-repo", type=Path, help="live: measure this checkout's proxy too, first, on the same upstream "
                    "(kept as 'before: LABEL', this one's as 'after: LABEL'; it gets no inherited PYTHONPATH)")
    args = ap.parse_args()
    args.upstream_said = ""
    if args.live or args.live_stream_interval:
        return live(args)
    if args.record:
        record(args)
        return 0
    if args.summary:
        runs = json.loads((RESULTS / "proxy_cpu.json").read_text())["runs"]
        print(summary(runs))
        write_md(runs)
        return 0
    rows: list[dict[str, Any]] = []
    replay_port = args.port + 20
    with ExitStack() as stack:
        replay = stack.enter_context(process([sys.executable, str(REPO / "bench" / "upstream_replay.py"), "serve",
                                              "--recording", str(args.recording), "--port", str(replay_port),
                                              "--pace-ms", str(args.pace_ms), "--events-per-write", str(args.events_per_write)]))
        wait_up(f"http://127.0.0.1:{replay_port}/v1/models", replay, "the replay upstream")
        for workers in args.workers:
            rows += measure(args, f"http://127.0.0.1:{replay_port}/v1", workers, args.port)
        stats = httpx.get(f"http://127.0.0.1:{replay_port}/replay/stats").json()
    say(f"replay: {stats}")
    print(table(rows))
    if not args.no_write:
        write(args.label, rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
