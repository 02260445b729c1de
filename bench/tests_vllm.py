"""The tests' vLLM (its CPU build in .vllm-venv: tests/install_vllm.sh; SmolLM2-135M-Instruct converted
once) started for a benchmark: one place for the bench scripts that measure against a live vLLM."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_vllm(stack: ExitStack, *extra_args: str) -> str:
    """Start it with ``extra_args`` (stopped when ``stack`` closes); its URL, ending in /v1."""
    sys.path.insert(0, str(REPO / "tests"))
    import vllm_server

    python = vllm_server.vllm_python()
    if python is None:
        raise SystemExit(vllm_server.INSTALL_HINT)
    server = vllm_server.VllmServer(python, vllm_server.model_dir(), extra_args=extra_args)
    server.start()
    stack.callback(server.stop)
    return server.url
