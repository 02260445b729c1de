"""The tests' vLLM (its CPU build in .vllm-venv: tests/install_vllm.sh; SmolLM2-135M-Instruct converted
once) started for a benchmark: one place for the bench scripts that measure against a live vLLM."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def tests_vllm_server() -> ModuleType:
    """The tests' module (its launcher, model conversion and install hint), imported when first needed."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import vllm_server

    return vllm_server


@dataclass(frozen=True)
class Started:
    url: str  # ending in /v1
    seconds: float  # to healthy


def launch_vllm(stack: ExitStack, *extra_args: str) -> Started:
    """Start it with ``extra_args`` (stopped when ``stack`` closes)."""
    vllm_server = tests_vllm_server()
    python = vllm_server.vllm_python()
    if python is None:
        raise SystemExit(vllm_server.INSTALL_HINT)
    server = vllm_server.VllmServer(python, vllm_server.model_dir(), extra_args=extra_args)
    stack.callback(server.stop)
    seconds = server.start()
    return Started(server.url, seconds)


def start_vllm(stack: ExitStack, *extra_args: str) -> str:
    """Start it with ``extra_args`` (stopped when ``stack`` closes); its URL, ending in /v1."""
    return launch_vllm(stack, *extra_args).url


def model_dir() -> Path:
    """The converted SmolLM2 directory it serves (its tokenizer, for a client that tokenizes locally)."""
    return Path(tests_vllm_server().model_dir())
