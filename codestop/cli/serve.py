"""``codestop serve``: the OpenAI-compatible proxy that stops each request's reasoning early."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from codestop.cli.options import (
    add_generation_options,
    add_model_options,
    add_policy_options,
    config_from_args,
    engine_options_from_args,
    policy_file_from_args,
    policy_options_from_args,
)
from codestop.engines.base import Engine
from codestop.errors import CodestopError
from codestop.policy_file import PolicyFile
from codestop.serve.defaults import DEFAULT_ANSWER, DEFAULT_MAX_REQUEST_BYTES


def build_engine(args: argparse.Namespace) -> Engine:
    """An upstream completions server (``--base-url``, repeated for replicas of one model;
    ``--model`` picks one of its models) or an in-process engine (``--model`` alone). The server engine does not wait for its upstream: one
    still starting is connected to on first use (``/health`` says 503 until then)."""
    from codestop.models import load_engine

    options = engine_options_from_args(args)
    if args.base_url:
        options.update({k: getattr(args, k) for k in ("concurrency", "timeout", "retries") if getattr(args, k) is not None})
        return load_engine(args.model, engine="server", wait=False, **options)
    return load_engine(args.model, engine=args.engine, **options)


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
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight to the upstream (default 64)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds the upstream may stay silent (between streamed tokens, or for a plain answer) "
                        "before the request fails with 504 (default 60)")
    p.add_argument("--retries", type=int, default=None, help="retries on 429/5xx/connection resets (default 3)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"the largest request body accepted; a larger one is a 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) /v1/models lists and requests may name, as vLLM's; responses carry the "
                        "one asked for, else the first (default: the model's own name: the upstream's, or --model's)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
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
    add_model_options(p)
    add_policy_options(p)
    add_generation_options(p, answer=DEFAULT_ANSWER)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from codestop.serve import create_app

    if not args.base_url and not args.model:
        raise CodestopError("serve: give --base-url URL (an upstream completions server) or --model M (an in-process engine)")
    if not 0 < args.port < 65536:
        raise CodestopError(f"port: {args.port} must be in 1..65535")
    config = config_from_args(args)
    proxy_api_key = args.proxy_api_key or os.environ.get("CODESTOP_PROXY_API_KEY") or None
    server: Any = None

    def engine() -> Engine:  # built once the server listens: /health is 503 until it is there
        try:
            return build_engine(args)
        except BaseException:
            server.should_exit = True  # an engine that cannot be built (a bad model, key, URL) ends the server
            raise

    # the default policy is validated here, once, before the model loads
    policy = policy_file_from_args(args) or PolicyFile(policy_options_from_args(args))  # from flags: uncalibrated
    app = create_app(engine, config=config, policy=policy, proxy_api_key=proxy_api_key,
                     max_request_bytes=args.max_request_bytes, served_model_name=args.served_model_name,
                     shadow=args.shadow, shadow_fraction=args.shadow_fraction, shadow_text=args.shadow_text)
    served = app.state.served
    print(f"codestop serve: policy {served.policy_file.describe()}", file=sys.stderr)
    if served.shadow is not None:
        print(f"codestop serve: {served.shadow.describe()}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if app.state.served.load_error is not None:
        raise CodestopError(app.state.served.load_error)
    return 0
