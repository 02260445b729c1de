"""What the test modules share, so that none imports another: free ports, waiting for a condition,
an ASGI app served in a thread, the proxy in process (``InProcessProxy``) and a fixture of one in
front of a server, the chat helpers, and reading Prometheus text (prometheus_client's own parser).

The real servers live beside it: tests/llama_servers.py (llama.cpp), tests/vllm_server.py (vLLM),
tests/scripted.py (scripted engines and replicas)."""

from __future__ import annotations

import inspect
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from codestop.engines.server import ServerEngine
from codestop.engines.server.launch import free_port
from codestop.serve import ServeOptions, create_app

__all__ = ["POEM", "SHORT", "InProcessProxy", "ask", "binary", "chat", "free_port", "metric", "proxy_over", "scrape",
           "serve_in_thread", "wait_for"]

SHORT = 16  # tokens per answer where only the mechanics matter: short answers
POEM = "Write a short poem about the sea, four lines."  # SmolLM2 writes on and on
# five easy word problems, answered in a few lines (probes at every line or word come a few times each)
STEPS = "Answer step by step, one step per line."
ARITHMETIC = [f"Tom has 3 apples and buys 4 more. How many apples does he have? {STEPS}",
              f"What is 6 times 7? {STEPS}",
              f"A box holds 12 eggs. How many eggs are in 2 boxes? {STEPS}",
              f"Sara reads 10 pages a day. How many pages does she read in 5 days? {STEPS}",
              f"What is 100 minus 36? {STEPS}"]


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``condition`` until it is true; an AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def binary(name: str) -> str:
    """A command the test extra installs beside this python (the routers: vllm-router, smg); a
    test failure naming the package when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (the test extra has it)", pytrace=False)
    return found


def serve_in_thread(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    """An ASGI app served by uvicorn on loopback in a daemon thread, once it listens."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread


class InProcessProxy:
    """``create_app`` served by uvicorn in a thread of the test process. ``model``: the name
    requests send (the upstream's first, read when first asked)."""

    def __init__(self, engine: Any, **kwargs: Any) -> None:
        self.app = create_app(engine, ServeOptions(**kwargs))
        self.port = free_port()
        self.server, self.thread = serve_in_thread(self.app, self.port)
        self._model: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.client().models.list().data[0].id
        return self._model

    @model.setter
    def model(self, name: str) -> None:
        self._model = name

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url + "/v1", **kwargs)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def stop(self) -> None:
        """A graceful shutdown (it runs the app's lifespan, which closes the engine)."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=10)


def proxy_over(upstream: str, name: str = "proxy", scope: str = "module", **app_kwargs: Any) -> Any:
    """A fixture named ``name``: an ``InProcessProxy`` in front of the server the fixture
    ``upstream`` yields (its base URL, ending in /v1, or a ``LlamaServer``), for a module's tests:
    ``proxy = proxy_over("vllm_url")``."""

    def proxy(**fixtures: Any) -> Iterator[InProcessProxy]:
        server = fixtures[upstream]
        url = server if isinstance(server, str) else server.url + "/v1"
        p = InProcessProxy(ServerEngine.connect(url, backoff=0.05), **app_kwargs)
        yield p
        p.stop()

    # the upstream named as an argument, so pytest knows the dependency before any test runs (the
    # background start of the vLLM servers and their test count read it from the collected tests)
    proxy.__signature__ = inspect.Signature([inspect.Parameter(upstream, inspect.Parameter.KEYWORD_ONLY)])  # type: ignore[attr-defined]
    return pytest.fixture(scope=scope, name=name)(proxy)  # type: ignore[call-overload]


def ask(client: openai.OpenAI, question: str, **kwargs: Any) -> Any:
    """A chat request of one user message, ``SHORT`` tokens unless told; without ``model`` (the
    proxy answers with its upstream's)."""
    kwargs.setdefault("max_tokens", SHORT)
    kwargs.setdefault("model", openai.omit)
    return client.chat.completions.create(messages=[{"role": "user", "content": question}], **kwargs)


def chat(p: InProcessProxy, messages: list[dict], codestop: dict | None = None, **kwargs: Any) -> Any:
    """A chat request through the proxy for its upstream's model, greedy unless told; ``codestop``:
    the request's own codestop knobs."""
    kwargs.setdefault("temperature", 0)
    extra = {"codestop": codestop} if codestop else None
    return p.client().chat.completions.create(model=p.model, messages=messages, extra_body=extra, **kwargs)


SUFFIXES = ("", "_total", "_count", "_sum", "_bucket", "_created", "_info")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name`` in Prometheus text, summed over those whose labels include
    ``labels`` (0 when the metric is there but no such series is: a labelled counter not yet
    counted). A metric that is not there at all is an AssertionError."""
    total, known = 0.0, False
    for family in text_string_to_metric_families(text):
        if name not in {family.name + s for s in SUFFIXES}:
            continue
        known = True
        total += sum(s.value for s in family.samples if s.name == name and labels.items() <= s.labels.items())
    assert known, f"{name} not in the metrics:\n{text[:2000]}"
    return total


def scrape(url: str, name: str, **labels: str) -> float:
    """``metric`` of the /metrics the server at ``url`` (its root, not /v1) answers now."""
    return metric(httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text, name, **labels)
