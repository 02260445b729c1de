"""Does llama.cpp's fast CPU path run on this host? Asked once, in a child process, and remembered.

A natively built llama.cpp (pip compiles llama-cpp-python for the CPU it builds on) loads a model's
weights into *extra buffer types* where the CPU has kernels for them: AMX tiles, or weights repacked
for AVX-512/AVX2. On some virtual machines the CPU reports AMX, the kernel grants the tile state,
and the tile instructions still fault: the first decode of more than one token ends the process
with SIGILL, no Python exception, no message. Nothing in-process can catch that, so before the
llama.cpp engine loads a model it runs a short batched decode of that model in a child process
(one batch of 16 tokens then two single tokens: a few seconds). If the child dies by a signal,
the engine loads the model without extra buffer types (``llama_model_params.use_extra_bufts =
False``), which that child has also checked, and prints one line saying so; where the fast path
works it is kept.

The verdict is remembered in ``llamacpp-native-check.json`` in codestop's cache directory
(``$CODESTOP_CACHE``, else ``~/.cache/codestop``), keyed by the llama.cpp build (llama-cpp-python's
version and the size and modification time of its shared libraries), the CPU's flags, and the model
file (path, size, modification time): which kernels run depends on the model's weight types, so a
build that runs one model's kernels may fault on another's.

Settings (environment):

- ``CODESTOP_LLAMACPP_EXTRA_BUFTS``: ``1`` uses the fast path without the check, ``0`` turns it off
  without the check, ``auto`` (or unset) checks as above.
- ``CODESTOP_NATIVE_CHECK_FAULT=SIGILL`` (or another signal's name): for tests; the child kills
  itself with that signal before a decode that uses extra buffer types, as an AMX host's fault would
  (``SIGILL:all``: before every decode, whatever the setting).

Where the installed llama-cpp-python is too old to have ``use_extra_bufts``, the fallback is the
other setting known to avoid the tile kernels: micro-batches of one token (``n_ubatch = 1``), also
checked in a child first; it reads prompts at about the speed it generates. If every setting dies,
loading stops with a message rather than crashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError

ENV = "CODESTOP_LLAMACPP_EXTRA_BUFTS"
FAULT_ENV = "CODESTOP_NATIVE_CHECK_FAULT"
CHILD_TIMEOUT_S = 180.0  # a 0.5B model loads and decodes 18 tokens in ~2 s; generous for busy hosts
CHECK_TOKENS = 16


@dataclass(frozen=True)
class Setting:
    """How the engine loads the model and sizes its micro-batches."""

    name: str
    extra_bufts: bool | None  # None: leave llama.cpp's default (the field does not exist)
    n_ubatch: int | None  # None: the engine's own batch size


FAST = Setting("fast", True, None)
NO_EXTRA = Setting("no-extra-bufts", False, None)
DEFAULT_OLD = Setting("fast", None, None)  # llama-cpp-python without use_extra_bufts
UBATCH_1 = Setting("ubatch-1", None, 1)
COST = {  # what the user is told each fallback costs (measured: docs/native.md)
    "no-extra-bufts": "running without it: prompts are read slower, generation about as fast (docs/native.md)",
    "ubatch-1": "running with one-token micro-batches (this llama-cpp-python cannot turn extra buffer types off): "
    "prompts are read several times slower",
}

_announced: set[str] = set()  # one line per process and verdict


def has_extra_bufts_field(lib: Any) -> bool:
    return any(name == "use_extra_bufts" for name, *_ in lib.llama_model_params._fields_)


def ladder(lib: Any) -> list[Setting]:
    """The settings to try, fastest first."""
    return [FAST, NO_EXTRA] if has_extra_bufts_field(lib) else [DEFAULT_OLD, UBATCH_1]


def choose(lib: Any, model_path: str, threads: int) -> Setting:
    """The setting the engine loads ``model_path`` with: the user's override, the remembered
    verdict, or a fresh check in a child process."""
    steps = ladder(lib)
    override = os.environ.get(ENV, "auto").strip().lower()
    if override in ("1", "true", "yes", "on"):
        return steps[0]
    if override in ("0", "false", "no", "off"):
        return steps[1]
    if override not in ("", "auto"):
        raise CodestopError(f"{ENV}: {os.environ[ENV]!r} is not one of 1, 0 or auto")
    key, described = _key(lib, model_path)
    store = _read_store()
    entry = store.get(key)
    names = {s.name: s for s in steps}
    if isinstance(entry, dict) and entry.get("setting") in names:
        setting = names[str(entry["setting"])]
        _announce(setting, str(entry.get("failed", "")), model_path, cached=True)
        return setting
    setting, failed, final = _run_ladder(steps, model_path, threads)
    if final:
        store = _read_store()  # another codestop may have written meanwhile
        store[key] = {**described, "setting": setting.name, "failed": failed, "checked": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_store(store)
    _announce(setting, failed, model_path, cached=False)
    return setting


def _run_ladder(steps: list[Setting], model_path: str, threads: int) -> tuple[Setting, str, bool]:
    """The first setting whose child decodes; what the faster ones died of; whether the verdict
    may be remembered (not after a timeout, which a busy host can cause)."""
    failures: list[str] = []
    for setting in steps:
        outcome = run_child(setting, model_path, threads)
        if outcome == "ok":
            return setting, "; ".join(failures), True
        if outcome.startswith("error"):
            # a failure that is not a crash (an unreadable model, ...): the engine's own load
            # reports it properly, and nothing is remembered
            return setting, "; ".join(failures), False
        failures.append(f"{setting.name}: {outcome}")
        if outcome.startswith("timeout"):
            nxt = steps.index(setting) + 1
            return (steps[nxt] if nxt < len(steps) else setting), "; ".join(failures), False
    raise CodestopError(
        f"llama.cpp dies on this host whatever codestop tries ({'; '.join(failures)}), checked in a child "
        f"process on {Path(model_path).name}; this llama-cpp-python build does not run here: rebuild it for any "
        "x86-64 CPU (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall --no-cache-dir llama-cpp-python), "
        "or use --engine transformers, and report this line"
    )


def run_child(setting: Setting, model_path: str, threads: int) -> str:
    """``ok``, ``signal N (NAME)``, ``timeout``, or ``error: ...`` for a child that decodes a batch
    of ``model_path`` with ``setting``."""
    job = {"model": model_path, "threads": threads, "extra_bufts": setting.extra_bufts, "n_ubatch": setting.n_ubatch}
    cmd = [sys.executable, "-m", "codestop.engines.native_check", json.dumps(job)]
    # the child imports this codestop, wherever the parent found it
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return f"timeout (no answer in {CHILD_TIMEOUT_S:.0f} s)"
    if proc.returncode < 0:
        return f"signal {-proc.returncode} ({signal.Signals(-proc.returncode).name})"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return f"error: {last}"
    return "ok"


def _announce(setting: Setting, failed: str, model_path: str, *, cached: bool) -> None:
    if setting.name not in COST or setting.name + model_path in _announced:
        return
    _announced.add(setting.name + model_path)
    when = "remembered from an earlier check in a child process" if cached else "checked in a child process just now"
    print(
        f"codestop: llama.cpp's fast CPU path (extra buffer types: AMX, repacked weights) failed a test decode "
        f"of {Path(model_path).name} ({failed}; {when}); {COST[setting.name]}. {ENV}=1 forces the fast path, "
        f"=0 skips the check",
        file=sys.stderr,
    )


# -- the verdict store --------------------------------------------------------------------------


def store_path() -> Path:
    from codestop.engines.transformers import cache_dir

    return cache_dir() / "llamacpp-native-check.json"


def _read_store() -> dict[str, Any]:
    try:
        data = json.loads(store_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a cache, the check runs again
    return data if isinstance(data, dict) else {}


def _write_store(store: dict[str, Any]) -> None:
    path = store_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(store, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)  # whole or not at all, even with two codestops at once


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _key(lib: Any, model_path: str) -> tuple[str, dict[str, str]]:
    lib_dir = Path(lib.__file__).parent
    libs = sorted(p for p in lib_dir.rglob("*") if p.is_file() and not p.is_symlink() and (p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name))
    described = {
        "llama_cpp": f"{getattr(lib, '__version__', '?')} at {lib_dir}",
        "libraries": hashlib.sha256("|".join(_stamp(p) for p in libs).encode()).hexdigest()[:16],
        "cpu_flags": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16],
        "model": _stamp(Path(model_path)),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24], described


# -- the child ----------------------------------------------------------------------------------


def _child(job: dict[str, Any]) -> int:
    """Load the model as ``job`` says and decode a batch, then single tokens; 0 when all ran."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == 3 and text:  # errors only: the last one explains a failure
            print(text.decode("utf-8", errors="replace").rstrip(), file=sys.stderr)

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    if job["extra_bufts"] is not None:
        mparams.use_extra_bufts = bool(job["extra_bufts"])
    model = llama_cpp.llama_model_load_from_file(str(job["model"]).encode("utf-8"), mparams)
    if not model:
        print("llama.cpp could not load the model", file=sys.stderr)
        return 2
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 64
    cparams.n_batch = CHECK_TOKENS
    cparams.n_ubatch = min(job["n_ubatch"] or CHECK_TOKENS, CHECK_TOKENS)
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = max(1, int(job["threads"]))
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        print("llama.cpp could not create a context", file=sys.stderr)
        return 2
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    fault, _, scope = os.environ.get(FAULT_ENV, "").strip().upper().partition(":")
    fast = bool(mparams.use_extra_bufts) if has_extra_bufts_field(llama_cpp) else cparams.n_ubatch > 1
    if fault and (fast or scope == "ALL"):
        # a test's stand-in for the AMX fault: the fast path's first batched decode dies
        os.kill(os.getpid(), signal.Signals[fault if fault.startswith("SIG") else f"SIG{fault}"])
    batch = llama_cpp.llama_batch_init(CHECK_TOKENS, 0, 1)
    pos = 0
    for n in (CHECK_TOKENS, 1, 1):  # a batch (prompt reading) then single tokens (generation)
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = (pos + i) * 7 % n_vocab
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            print(f"llama_decode returned {rc}", file=sys.stderr)
            return 2
        pos += n
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
