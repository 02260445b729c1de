"""A native fault never kills codestop silently: the llama.cpp engine checks its fast path (extra
buffer types) in a child process before using it, falls back where the child dies (the fault is
injected here: this host's CPU runs the fast path), remembers the verdict, and a pytest run that dies
by a signal is named by tests/crash_report.py for .ci/run."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from crash_report import describe

from codestop.api import generate
from codestop.engines import native_check
from codestop.engines.local import log_softmax
from codestop.errors import CodestopError
from codestop.families import FAMILIES
from codestop.policies import Vanilla

pytestmark = pytest.mark.slow

QUESTION = "What is 2 + 3?"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh verdict store and no override or fault from the caller's environment."""
    monkeypatch.setenv("CODESTOP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native_check.ENV, raising=False)
    monkeypatch.delenv(native_check.FAULT_ENV, raising=False)
    native_check._announced.clear()
    return tmp_path / "cache"


def _load(path):
    from codestop.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine.load(str(path), model_name="smollm2-135m", threads=2)


def _first_probs(engine) -> np.ndarray:
    backend = engine.new_backend(engine.tokenize(FAMILIES["plain"].build_prompt(engine, QUESTION)))
    try:
        return np.exp(log_softmax(backend.logits()))
    finally:
        backend.close()


def _stored(cache) -> list[dict]:
    return list(json.loads((cache / "llamacpp-native-check.json").read_text()).values())


@functools.cache
def _fast_path_runs_here(path) -> bool:
    """What a check's child says of the fast path on this host, asked directly (on a host whose AMX
    tiles fault, the fast path must not run in pytest's own process)."""
    return native_check.run_child(native_check.FAST, str(path), 2) == "ok"


def test_the_fast_path_is_kept_where_it_runs_and_remembered(smollm2_path, cache, monkeypatch, capfd):
    runs = _fast_path_runs_here(smollm2_path)
    capfd.readouterr()
    engine = _load(smollm2_path)
    try:
        assert engine.native.name == ("fast" if runs else "no-extra-bufts")
        assert engine.native.extra_bufts is runs
        assert engine.n_ubatch == 512
    finally:
        engine.close()
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("codestop:")]
    assert len(said) == (0 if runs else 1)  # nothing to say on a host where it runs
    [entry] = _stored(cache)
    assert entry["setting"] == engine.native.name and bool(entry["failed"]) is not runs
    # remembered: with every decode now made to fail, a new check would raise; the verdict loads
    monkeypatch.setenv(native_check.FAULT_ENV, "SIGILL:all")
    engine = _load(smollm2_path)
    try:
        assert engine.native.name == ("fast" if runs else "no-extra-bufts")
    finally:
        engine.close()


def test_a_fast_path_that_dies_falls_back_says_so_once_and_answers(smollm2_path, cache, monkeypatch, capfd):
    monkeypatch.setenv(native_check.FAULT_ENV, "SIGILL")
    engine = _load(smollm2_path)
    try:
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("codestop:")]
        assert len(lines) == 1, err
        assert "failed a test decode of SmolLM2-135M-Instruct.Q4_1.gguf (fast: signal 4 (SIGILL); checked" in lines[0]
        assert "running without it: prompts are read slower" in lines[0]
        assert f"{native_check.ENV}=1 forces the fast path" in lines[0]
        assert engine.native.name == "no-extra-bufts" and engine.native.extra_bufts is False
        assert "without the fast path (no-extra-bufts)" in engine.build_info
        # a real answer from the fallback
        result = generate(engine, QUESTION, Vanilla(), max_reasoning_tokens=16, temperature=0.0)
        assert result.tokens["reasoning"] == 16 and result.stop_reason == "max_reasoning_tokens"
        assert "\\boxed{" in result.answer_text and result.engine == "llamacpp"
        fallback = _first_probs(engine)
        # a second engine in the same process: the remembered verdict, no second line
        again = _load(smollm2_path)
        assert again.native.name == "no-extra-bufts"
        again.close()
        assert "codestop:" not in capfd.readouterr().err
    finally:
        engine.close()
    [entry] = _stored(cache)
    assert entry["setting"] == "no-extra-bufts" and entry["failed"] == "fast: signal 4 (SIGILL)"
    # remembered: without the fault a new check would keep the fast path; the verdict still falls back
    monkeypatch.delenv(native_check.FAULT_ENV)
    engine = _load(smollm2_path)
    try:
        assert engine.native.name == "no-extra-bufts"
    finally:
        engine.close()
    # the fallback computes the same model: the first token's distribution matches the fast path's
    # up to the kernels' rounding (repacked and plain weights sum in different orders)
    if not _fast_path_runs_here(smollm2_path):
        return  # a host whose fast path dies: nothing to compare with
    monkeypatch.setenv(native_check.ENV, "1")
    fast = _load(smollm2_path)
    try:
        assert fast.native.name == "fast"
        assert np.max(np.abs(_first_probs(fast) - fallback)) < 1e-2
    finally:
        fast.close()


def test_a_host_where_every_setting_dies_gets_a_message(smollm2_path, cache, monkeypatch):
    monkeypatch.setenv(native_check.FAULT_ENV, "SIGSEGV:all")
    with pytest.raises(CodestopError, match=r"llama.cpp dies on this host whatever codestop tries \(fast: signal 11 "
                       r"\(SIGSEGV\); no-extra-bufts: signal 11 \(SIGSEGV\)\).*GGML_NATIVE=OFF"):
        _load(smollm2_path)
    assert not (cache / "llamacpp-native-check.json").exists()


def test_the_override_decides_without_a_check(smollm2_path, cache, monkeypatch, capfd):
    monkeypatch.setenv(native_check.FAULT_ENV, "SIGILL")  # a check would see it
    monkeypatch.setenv(native_check.ENV, "0")
    engine = _load(smollm2_path)
    assert engine.native.name == "no-extra-bufts"
    engine.close()
    monkeypatch.setenv(native_check.ENV, "1")
    engine = _load(smollm2_path)
    assert engine.native.name == "fast"
    engine.close()
    assert not (cache / "llamacpp-native-check.json").exists()
    assert capfd.readouterr().err == ""
    monkeypatch.setenv(native_check.ENV, "maybe")
    with pytest.raises(CodestopError, match="CODESTOP_LLAMACPP_EXTRA_BUFTS: 'maybe' is not one of 1, 0 or auto"):
        _load(smollm2_path)


def test_a_crashed_pytest_is_named(tmp_path):
    test_file = tmp_path / "test_boom.py"
    test_file.write_text(
        "import os, signal\n\n\ndef test_fine():\n    pass\n\n\n"
        "def test_dies():\n    os.kill(os.getpid(), signal.SIGILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == -signal.SIGILL
    log = proc.stdout + proc.stderr
    assert describe(log, proc.returncode) == "pytest died by signal 4 (SIGILL) in test_boom.py::test_dies (line 9)"
    # as .ci/run sees it: a shell's exit status 128 + N
    assert describe(log, 128 + 4) == "pytest died by signal 4 (SIGILL) in test_boom.py::test_dies (line 9)"
    assert describe("== 3 passed in 1.0s ==\n", 0) is None
    assert describe("== 1 failed in 1.0s ==\n", 1) is None


def test_the_cli_says_where_native_code_died(tmp_path):
    # what `codestop` does first, then a native fault; and a child interpreter (serve's workers) inherits it
    script = (
        "import os, signal, subprocess, sys\n"
        "from codestop.cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "child = subprocess.run([sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGSEGV)'],"
        " capture_output=True, text=True)\n"
        "print(child.returncode, child.stderr.splitlines()[0], file=sys.stderr)\n"
        "os.kill(os.getpid(), signal.SIGILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == -signal.SIGILL
    assert "-11 Fatal Python error: Segmentation fault" in proc.stderr
    assert "Fatal Python error: Illegal instruction" in proc.stderr
    assert 'File "<string>", line 9 in <module>' in proc.stderr
