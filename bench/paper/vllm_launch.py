"""Starting vLLM for the paper run: `vllm serve MODEL` in its own process group, its log in a file,
ready when /health answers; stopped (SIGTERM to the group, SIGKILL after 30 s) when the run ends.

Checked before anything starts, each with one message saying what to do: vLLM is installed (the
`vllm` command, or the one ``--vllm-command`` names), and the machine has a GPU (``nvidia-smi`` or
``rocm-smi`` lists one). ``--base-url`` skips all of it and uses a server already running.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from codestop.errors import CodestopError

# room in the context for the prompt, a probe and the forced answer beyond the reasoning budget
PROMPT_ALLOWANCE = 2048


def serve_command(
    vllm: str, model: str, *, port: int, max_model_len: int, gpu_memory_utilization: float, stream_interval: int,
    extra: str = "",
) -> list[str]:
    """The `vllm serve` command line. Prefix caching: each probe and step resends the question's
    prefix. ``--stream-interval``: several tokens per server-sent event, so the client reads the
    stream with a fraction of the CPU (docs/serving.md). ``max_model_len``: the reasoning budget plus
    :data:`PROMPT_ALLOWANCE`, so a trace is never cut by the context before the budget."""
    return [
        *shlex.split(vllm), "serve", model, "--host", "127.0.0.1", "--port", str(port),
        "--enable-prefix-caching", "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", str(gpu_memory_utilization), "--stream-interval", str(stream_interval),
        *shlex.split(extra),
    ]


def check_vllm(vllm: str) -> None:
    """vLLM must be installed: the command's program found on PATH (or a path that exists)."""
    program = shlex.split(vllm)[0] if vllm.strip() else ""
    if not program or (shutil.which(program) is None and not Path(program).is_file()):
        raise CodestopError(
            f"vllm: {program or vllm!r} not found: vLLM is not installed here. Install it on the GPU machine "
            "(`pip install vllm`), name its command with --vllm-command, or pass --base-url to a vLLM already running"
        )


def gpus() -> list[str]:
    """The GPUs the NVIDIA or AMD tools list (empty when neither is there or both list none)."""
    for tool, args in (("nvidia-smi", ["-L"]), ("rocm-smi", ["--showproductname"])):
        if shutil.which(tool) is None:
            continue
        try:
            done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        found = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith(("GPU", "Card series", "card"))]
        if done.returncode == 0 and found:
            return found
    return []


def check_gpu() -> list[str]:
    found = gpus()
    if not found:
        raise CodestopError(
            "gpu: no GPU found (neither nvidia-smi nor rocm-smi lists one); this run starts vLLM on a GPU. "
            "Run it on a GPU machine, or pass --base-url to a vLLM server running elsewhere"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmProcess:
    """One `vllm serve` started by this run."""

    def __init__(self, command: list[str], port: int, log_path: Path) -> None:
        self.command, self.port, self.log_path = command, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float, say: Callable[[str], None]) -> float:
        """Start it and wait until /health answers 200 (the first start downloads the weights);
        returns the seconds that took."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_NO_USAGE_STATS": os.environ.get("VLLM_NO_USAGE_STATS", "1")}
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        said = t0
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise CodestopError(f"vllm: exited with {code} while starting; the end of its log ({self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - said >= 30:
                said = time.monotonic()
                say(f"vLLM still starting ({said - t0:.0f} s; log: {self.log_path})")
            time.sleep(1.0)
        self.stop()
        raise CodestopError(f"vllm: not ready within {timeout:.0f} s (--start-timeout); the end of its log ({self.log_path}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # start_new_session: the group this server leads
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
