"""``codestop serve``: the OpenAI-compatible proxy that stops each request's reasoning early."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from codestop.cli.options import (
    add_generation_options,
    add_model_options,
    add_policy_options,
    config_from_args,
    engine_options_from_args,
    policy_file_from_args,
)
from codestop.engines.base import Engine
from codestop.errors import CodestopError
from codestop.serve.defaults import (
    DEFAULT_ANSWER,
    DEFAULT_AUTO_AUDIT_FRACTION,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_SEGMENTS,
)

if TYPE_CHECKING:
    from codestop.serve.options import ServeOptions


def engine_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The engine the flags ask for, as :func:`codestop.models.load_engine`'s arguments (JSON: each
    worker builds its own from it): an upstream completions server (``--base-url``, repeated for
    replicas of one model; ``--model`` picks one of its models) or an in-process engine
    (``--model`` alone). The server engine does not wait for its upstream: one still starting is
    connected to on first use (``/health`` says 503 until then)."""
    options = engine_options_from_args(args)
    if args.base_url:
        options.update({k: getattr(args, k) for k in ("concurrency", "timeout", "queue_timeout", "retries")
                        if getattr(args, k) is not None})
        return {"model": args.model, "engine": "server", "options": {**options, "wait": False}}
    return {"model": args.model, "engine": args.engine, "options": options}


def build_engine(spec: Mapping[str, Any]) -> Engine:
    """The engine :func:`engine_spec` describes."""
    from codestop.models import load_engine

    return load_engine(spec["model"], engine=spec["engine"], **spec["options"])


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server that stops each request's reasoning early",
        description=(
            "Serve /v1/chat/completions and /v1/completions (streaming or not) under a stopping policy, "
            "in front of an upstream completions server (--base-url, e.g. vLLM with --enable-prefix-caching; "
            "repeat it for replicas of one model, each question staying on one) "
            "or an in-process engine (--model). A request picks its own policy with "
            '{"codestop": {"method": "codestop", "tau": 7}}; the flags below set the default. The upstream\'s '
            "key (--api-key) defaults to $CODESTOP_UPSTREAM_API_KEY, else $OPENAI_API_KEY. The server starts "
            "at once: /health answers 503 until the model is loaded or the upstream answers. --answer is a chat "
            "answer's mode after a stop (default free: the model answers in its own words); a raw completion "
            "just ends there."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--proxy-api-key",
        default=None,
        help="a key clients must send (Authorization: Bearer KEY); default $CODESTOP_PROXY_API_KEY, else none",
    )
    p.add_argument("--concurrency", type=int, default=None,
                   help="most requests in flight to the upstream; a session already answering goes before new ones "
                        "(default 64)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds the upstream may stay silent (nothing on any request, no answer to a ping) before "
                        "a request fails with 504; queueing behind its busy slots, a long prefill and a long "
                        "generation are not silence (default 60)")
    p.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds one request may wait for a place in --concurrency or for a byte of its own while "
                        "the upstream answers others, before it fails with 503 and Retry-After (default 600)")
    p.add_argument("--retries", type=int, default=None, help="retries on 429/5xx/connection resets (default 3)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"the largest request body accepted; a larger one is a 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) /v1/models lists and requests may name, as vLLM's; responses carry the "
                        "one asked for, else the first (default: the model's own name: the upstream's, or --model's)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes behind the one port (uvicorn's workers), each with its own upstream "
                        "clients; a request (its session) stays on the worker that took it, /metrics sums them "
                        "(default 1)")
    g = p.add_argument_group("shadow mode")
    g.add_argument("--shadow", default=None, metavar="FILE",
                   help="answer requests as the upstream alone would (no stop, nothing appended) while probing beside "
                        "the stream, and append one trace per request to FILE (the format `codestop record` writes, "
                        "unlabelled) for `codestop calibrate`; /metrics says where the policy would have stopped")
    g.add_argument("--shadow-fraction", type=float, default=1.0, metavar="F",
                   help="the share of requests shadowed, drawn at random (seeded) per request; the rest run the policy "
                        "(default 1: all)")
    g.add_argument("--shadow-text", action="store_true",
                   help="also write the prompt, the reasoning, the answer and the probes' texts (default: none, only "
                        "ids, positions, confidences, probe answers, token counts)")
    g = p.add_argument_group("guard: audits, the watch, auto mode (docs/serving.md)")
    g.add_argument("--audit-fraction", type=float, default=None, metavar="F",
                   help="audit this share of the requests served under the policy (seeded draw): after the client has its "
                        "answer, a stopped one is continued to its end and whether the stop changed the answer is fed to "
                        "an anytime-valid watch of the policy file's guarantee; on an alarm stopping is switched off "
                        f"(default: none; {DEFAULT_AUTO_AUDIT_FRACTION:g} with --auto)")
    g.add_argument("--watch-alpha", type=float, default=None, metavar="A",
                   help="the watch's error level: the chance it ever alarms while the risk is within its level "
                        "(default: the guarantee's alpha, else --alpha)")
    g.add_argument("--auto", action="store_true",
                   help="auto mode: shadow first, collect traces per segment, calibrate them (changed <= --max-risk at "
                        "--alpha for the whole run) as they grow, serve the certified setting under audit, back to "
                        "shadow on an alarm; needs --state-dir")
    g.add_argument("--max-risk", type=float, default=None, metavar="R",
                   help="the risk level: auto mode certifies changed <= R; the watch's level for a policy file without "
                        "a guarantee")
    g.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="the error level: auto mode's for the whole run; the watch's for a policy file without a guarantee")
    g.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the guard keeps its state (SQLite: traces, policies, watches), shared by --workers and "
                        "resumed after a restart (default: in memory; required with --auto)")
    g.add_argument("--max-segments", type=int, default=DEFAULT_MAX_SEGMENTS, metavar="N",
                   help="segment tags (X-Codestop-Segment, metadata.codestop_segment) with a state and metric label of "
                        f"their own; later tags share MODEL/other (default {DEFAULT_MAX_SEGMENTS})")
    g = p.add_argument_group("behind a router (docs/serving.md)")
    g.add_argument("--router", default=None, metavar="ROUTER",
                   help="the router between codestop and the upstream's replicas: vllm-router, sglang, llm-d, dynamo or "
                        "production-stack; every upstream request of one client request (its stream or steps, probes, "
                        "answer, audits) then carries that router's session header with one key, so the router keeps "
                        "them on the replica that holds the question's prefix (default: none)")
    g.add_argument("--routing-key-header", action="append", default=[], metavar="NAME",
                   help="a header that carries that key (repeatable; production-stack's is its --session-key). A client "
                        "that sends its own value of one of these headers, or `user`, keeps it as the key, so its "
                        "conversation's turns stay on one replica")
    add_model_options(p)
    add_policy_options(p)
    add_generation_options(p, answer=DEFAULT_ANSWER)
    p.set_defaults(func=cmd_serve)


WORKER_SPEC = "CODESTOP_SERVE_WORKER"  # what each worker's app factory builds: {"engine": spec, "options": ServeOptions.to_dict()}, as JSON


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not args.base_url and not args.model:
        raise CodestopError("serve: give --base-url URL (an upstream completions server) or --model M (an in-process engine)")
    if not 0 < args.port < 65536:
        raise CodestopError(f"port: {args.port} must be in 1..65535")
    if args.workers < 1:
        raise CodestopError(f"workers: {args.workers} must be an integer >= 1")
    if args.workers > 1:
        return serve_workers(args)
    server: Any = None

    def stop_server() -> None:  # an engine that cannot be built (a bad model, key, URL) ends the server
        server.should_exit = True

    app = make_app(args, stop_server)
    say_what_it_serves(app)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if app.state.served.load_error is not None:
        raise CodestopError(app.state.served.load_error)
    return 0


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The serve flags as :class:`~codestop.serve.options.ServeOptions`, checked (the default
    policy is built here, once, before any model loads)."""
    from codestop.serve.options import ServeOptions

    return ServeOptions(
        config=config_from_args(args), policy=policy_file_from_args(args),
        proxy_api_key=args.proxy_api_key or os.environ.get("CODESTOP_PROXY_API_KEY") or None,
        max_request_bytes=args.max_request_bytes, served_model_name=args.served_model_name,
        shadow=args.shadow, shadow_fraction=args.shadow_fraction, shadow_text=args.shadow_text,
        audit_fraction=args.audit_fraction, watch_alpha=args.watch_alpha, auto=args.auto, max_risk=args.max_risk,
        alpha=args.alpha, state_dir=args.state_dir, max_segments=args.max_segments,
        routing_key_header=tuple(args.routing_key_header), router=args.router)


def make_app(args: argparse.Namespace, on_engine_error: Callable[[], None] | None = None) -> Any:
    """The proxy's app for the serve flags ``args``."""
    return app_for(engine_spec(args), serve_options(args), on_engine_error)


def app_for(spec: Mapping[str, Any], options: ServeOptions, on_engine_error: Callable[[], None] | None = None) -> Any:
    """The proxy's app for the engine ``spec`` (:func:`engine_spec`) and ``options``; the engine is
    built once the server listens (/health is 503 until it is there), ``on_engine_error`` called
    if it cannot be."""
    from codestop.serve import create_app

    def engine() -> Engine:
        try:
            return build_engine(spec)
        except BaseException:
            if on_engine_error is not None:
                on_engine_error()
            raise

    return create_app(engine, options)


def say_what_it_serves(app: Any) -> None:
    """The start-up lines: the policy and its guarantee (or that it has none), and the shadow file."""
    served = app.state.served
    print(f"codestop serve: policy {served.options.policy_file.describe()}", file=sys.stderr)
    if served.shadow is not None:
        print(f"codestop serve: {served.shadow.describe()}", file=sys.stderr)
    if served.guard is not None:
        print(f"codestop serve: {served.guard.describe_line()}", file=sys.stderr)


def serve_workers(args: argparse.Namespace) -> int:
    """``--workers N``: uvicorn starts N processes on the one socket, each building its app (and
    its engine, with its own upstream clients) from the engine spec and the ServeOptions passed in
    the environment as JSON; their metrics are shared through ``$PROMETHEUS_MULTIPROC_DIR`` (a
    temporary directory unless set), where a worker that dies has its live gauges (requests in
    flight) removed."""
    import uvicorn

    from codestop.serve.metrics import ForgetDeadWorkers

    spec, options = engine_spec(args), serve_options(args)
    own_state = options.guarded and options.state_dir is None  # the workers share one state: a directory of its own
    if own_state:
        options = replace(options, state_dir=tempfile.mkdtemp(prefix="codestop-state-"))
    say_what_it_serves(app_for(spec, options))  # a bad option fails here, once, not in every worker
    own_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    shared = tempfile.mkdtemp(prefix="codestop-metrics-") if own_dir else os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.environ.update({WORKER_SPEC: json.dumps({"engine": spec, "options": options.to_dict()}),
                       "PROMETHEUS_MULTIPROC_DIR": shared})
    try:
        with ForgetDeadWorkers(shared):
            uvicorn.run("codestop.cli.serve:worker_app", factory=True, workers=args.workers, host=args.host,
                        port=args.port, log_level=args.log_level)
    finally:
        if own_dir:
            shutil.rmtree(shared, ignore_errors=True)
        if own_state:
            shutil.rmtree(str(options.state_dir), ignore_errors=True)
    return 0


def worker_app() -> Any:
    """One worker's app (uvicorn's factory), from what ``serve_workers`` passed."""
    from codestop.serve.options import ServeOptions

    given = json.loads(os.environ[WORKER_SPEC])
    return app_for(given["engine"], ServeOptions.from_dict(given["options"]))
