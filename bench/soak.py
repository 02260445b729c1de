"""Soak: the proxy (``codestop serve``, defaults: overlapped probing, CoDE-Stop) in front of a real
upstream under mixed load for some minutes, sampling what would grow if something leaked.

Clients run concurrently: plain and streamed chats, early stops (a policy confident at its first
probe), streams the client leaves after the first chunk, plain requests it gives up on, and bad
requests. Every ``--sample`` seconds the proxy's requests in flight, its upstream connections in use
and idle (/metrics), its open file descriptors and its sockets to the upstream are read (psutil).
At the end, with the load stopped, they must be back where they started: flat.

    python bench/soak.py --base-url http://127.0.0.1:8000/v1 --minutes 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import psutil

POEM = [{"role": "user", "content": "Write a short poem about the sea, four lines."}]
SAY_HI = [{"role": "user", "content": "Say hi."}]
FIRST_PROBE = {"method": "codestop", "r_min": 0.0, "r_max": 0.0, "probe_interval": 4, "boundaries": ["\n", " "]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gauge(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def sample(url: str, proc: psutil.Process, upstream_port: int) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    socks = [c for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr.port == upstream_port]
    return {"in_flight": gauge(text, "codestop_requests_in_flight"),
            "in_use": gauge(text, 'codestop_upstream_connections{state="in_use"}'),
            "idle": gauge(text, 'codestop_upstream_connections{state="idle"}'),
            "fds": proc.num_fds(), "upstream_sockets": len(socks),
            "close_wait": sum(c.status == "CLOSE_WAIT" for c in socks)}


async def client_loop(url: str, stop_at: float, seen: Counter[str], rng: random.Random) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < stop_at:
            kind = rng.choice(["plain", "stream", "early_stop", "leave_stream", "give_up", "bad"])
            try:
                if kind == "plain":
                    r = await client.post("/v1/chat/completions", json={"messages": SAY_HI, "max_tokens": 12})
                elif kind == "early_stop":
                    r = await client.post("/v1/chat/completions", json={"messages": POEM, "max_tokens": 24, "codestop": FIRST_PROBE})
                elif kind == "bad":
                    r = await client.post("/v1/chat/completions", json={"messages": SAY_HI, "temperature": -1})
                elif kind == "give_up":
                    r = await client.post("/v1/chat/completions", json={"messages": POEM, "max_tokens": 64}, timeout=0.3)
                else:
                    body = {"messages": POEM, "max_tokens": 24, "stream": True}
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if kind == "leave_stream" and line.startswith("data: "):
                                break
                seen[f"{kind}:{r.status_code}"] += 1
            except httpx.TimeoutException:
                seen[f"{kind}:client_timeout"] += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True, help="the upstream (ending in /v1)")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=6, help="concurrent clients")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    port = free_port()
    upstream_port = httpx.URL(args.base_url).port or 80
    proc = subprocess.Popen([sys.executable, "-m", "codestop.cli", "serve", "--base-url", args.base_url, "--port", str(port),
                             "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        p = psutil.Process(proc.pid)
        httpx.post(url + "/v1/chat/completions", json={"messages": SAY_HI, "max_tokens": 4}, timeout=60)  # warm: clients made
        start = sample(url, p, upstream_port)
        samples: list[tuple[float, dict[str, float]]] = [(0.0, start)]
        seen: Counter[str] = Counter()
        stop_at = time.monotonic() + args.minutes * 60
        t0 = time.monotonic()

        async def run() -> None:
            rng = random.Random(args.seed)
            load = asyncio.gather(*(client_loop(url, stop_at, seen, random.Random(rng.random())) for _ in range(args.clients)))
            while not load.done():
                await asyncio.wait([load], timeout=args.sample)
                samples.append((time.monotonic() - t0, await asyncio.to_thread(sample, url, p, upstream_port)))
            await load

        asyncio.run(run())
        time.sleep(3)  # the clients that left: the proxy notices at its next disconnect poll
        end = sample(url, p, upstream_port)
        samples.append((time.monotonic() - t0, end))
        print("t_s  " + "  ".join(f"{k:>16}" for k in start))
        for t, s in samples:
            print(f"{t:5.0f}" + "  ".join(f"{v:>16g}" for v in s.values()))
        print("requests:", json.dumps(dict(sorted(seen.items()))), "total", sum(seen.values()))
        peak = {k: max(s[k] for _, s in samples) for k in start}
        print("start", start, "\nend  ", end, "\npeak ", peak)
        # flat: nothing in flight or checked out, no socket outside the pools, and the descriptors
        # other than kept-alive upstream connections where they started
        flat = (end["in_flight"] == 0 and end["in_use"] == 0 and end["close_wait"] <= end["idle"]
                and end["fds"] - end["upstream_sockets"] <= start["fds"] - start["upstream_sockets"] + 2)
        print("FLAT" if flat else "NOT FLAT: something grew")
        return 0 if flat else 1
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
