"""Starting a local vLLM for a model: ``vllm serve MODEL`` on loopback with prefix caching (each
probe and step resends the question's prefix), in its own process group with its log in a file,
ready when ``/health`` answers; stopped by SIGTERM to the group, SIGKILL after 30 s.

The paper run (bench/paper/run.py) starts its vLLM with it, and the tests theirs (tests/vllm_server.py).
Starting is two halves, ``launch`` (returns at once) and ``wait_ready``, so several servers can come
up at the same time.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from codestop.errors import CodestopError

STOP_GRACE_S = 30.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_serve_command(vllm: str, model: str, *, port: int, max_model_len: int, args: Sequence[str] = ()) -> list[str]:
    """The ``vllm serve`` command line: ``vllm`` is the command that runs vLLM's CLI (``vllm``, or
    ``/path/python -m vllm.entrypoints.cli.main``), ``args`` any further flags."""
    return [
        *shlex.split(vllm), "serve", model, "--host", "127.0.0.1", "--port", str(port),
        "--enable-prefix-caching", "--max-model-len", str(max_model_len), *args,
    ]


class ServerProcess:
    """One server started here, in its own process group (vLLM starts an engine core and workers
    under it), its output appended to ``log_path``; ``env`` is added to this process's environment."""

    def __init__(self, command: Sequence[str], port: int, log_path: Path, env: Mapping[str, str] | None = None,
                 name: str = "vllm") -> None:
        self.command, self.port, self.log_path, self.name = list(command), port, Path(log_path), name
        self.env = {"VLLM_NO_USAGE_STATS": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.launched_at = 0.0

    @property
    def url(self) -> str:
        """Its OpenAI-compatible base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def launch(self) -> None:
        """Start the process and return at once."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.launched_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                         start_new_session=True)

    def wait_ready(self, timeout: float, say: Callable[[str], None] | None = None, every: float = 30.0,
                   timeout_hint: str = "") -> float:
        """Wait until /health answers 200; the seconds since ``launch``. Raises CodestopError with
        the end of its log when it exits or is not ready ``timeout`` seconds after its launch
        (then it is stopped; ``timeout_hint`` says how to give it longer); ``say`` hears how long it
        has taken every ``every`` seconds."""
        proc = self.proc  # this one: ``stop`` from another thread ends the wait as an exit
        if proc is None:
            raise CodestopError(f"{self.name}: not launched")
        said = self.launched_at
        while time.monotonic() - self.launched_at < timeout:
            if proc.poll() is not None:
                code = proc.returncode
                if self.proc is proc:
                    self.proc = None
                raise CodestopError(f"{self.name}: exited with {code} while starting; the end of its log ({self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.launched_at
            except httpx.HTTPError:
                pass
            if say is not None and time.monotonic() - said >= every:
                said = time.monotonic()
                say(f"{self.name} still starting ({said - self.launched_at:.0f} s; log: {self.log_path})")
            time.sleep(0.5)
        self.stop()
        hint = f" ({timeout_hint})" if timeout_hint else ""
        raise CodestopError(f"{self.name}: not ready within {timeout:.0f} s{hint}; the end of its log ({self.log_path}):\n{self.log_tail()}")

    def start(self, timeout: float, say: Callable[[str], None] | None = None, timeout_hint: str = "") -> float:
        """``launch`` and ``wait_ready``: the seconds until it was ready."""
        self.launch()
        return self.wait_ready(timeout, say, timeout_hint=timeout_hint)

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 30 s; nothing when it is not running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: the group this server leads
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
