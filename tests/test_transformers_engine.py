"""The transformers engine on tiny random-weight models with a real tokenizer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import build_tiny_model

import codestop
from codestop import CodeStop, Deer, TokenBudget, generate
from codestop.engines.transformers import TransformersEngine
from codestop.errors import CodestopError
from codestop.families import PROBE_PROMPT
from codestop.sampling import Sampling
from codestop.steps import StepRules


def _prompt(engine):
    return engine.tokenize(engine.chat_template([{"role": "user", "content": "What is 2 + 3?"}]))


async def _session_after(engine, n_tokens, sampling=Sampling(temperature=0.0)):
    session = await engine.start(_prompt(engine), sampling)
    async for _ in session.extend(n_tokens, StepRules()):
        pass
    return session


@pytest.mark.parametrize("sliding", [False, True], ids=["crop", "deepcopy"])
def test_probe_then_rollback_leaves_the_logits_untouched(tokenizer, sliding):
    overrides = dict(use_sliding_window=True, sliding_window=8, max_window_layers=0, layer_types=["sliding_attention"] * 2) if sliding else {}
    engine = TransformersEngine(build_tiny_model(tokenizer, seed=1, **overrides), tokenizer, "tiny")

    async def go():
        probed = await _session_after(engine, 12)
        untouched = await _session_after(engine, 12)
        assert probed.backend.can_crop is (not sliding)
        out = await probed.probe(engine.tokenize(PROBE_PROMPT), 20)
        assert len(out.token_ids) >= 1 and probed.n_tokens == untouched.n_tokens
        same_now = np.max(np.abs(probed.backend.logits() - untouched.backend.logits()))
        # the next token after the rollback comes from the restored context, not the probe's
        nxt = engine.tokenize(" five")
        await probed.append(nxt)
        await untouched.append(nxt)
        same_next = np.max(np.abs(probed.backend.logits() - untouched.backend.logits()))
        return same_now, same_next

    same_now, same_next = asyncio.run(go())
    assert same_now <= 1e-5 and same_next <= 1e-5


def test_probe_logprobs_are_the_models(tiny_engine):
    """A probe's log-probabilities equal a from-scratch forward pass over context + probe."""
    import torch

    probe_prompt = tiny_engine.tokenize(PROBE_PROMPT)
    session = asyncio.run(_session_after(tiny_engine, 6))
    out = asyncio.run(session.probe(probe_prompt, 5))
    prompt = _prompt(tiny_engine)
    context = prompt + _greedy_ids(tiny_engine, prompt, 6)
    assert len(context) == session.n_tokens
    with torch.inference_mode():
        logits = tiny_engine.model(input_ids=torch.tensor([context + probe_prompt + out.token_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    start = len(context) + len(probe_prompt) - 1
    expected = [lp[start + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.token_ids == [int(torch.argmax(logits[start + i])) for i in range(len(out.token_ids))]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def _greedy_ids(engine, prompt, n):
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def test_seeded_sampling_is_reproducible(tiny_engine):
    a = generate(tiny_engine, "Hi", TokenBudget(budget=15), family="plain", temperature=1.0, top_k=50, seed=7)
    b = generate(tiny_engine, "Hi", TokenBudget(budget=15), family="plain", temperature=1.0, top_k=50, seed=7)
    c = generate(tiny_engine, "Hi", TokenBudget(budget=15), family="plain", temperature=1.0, top_k=50, seed=8)
    assert a.reasoning_text == b.reasoning_text
    assert a.reasoning_text != c.reasoning_text


def test_controller_on_a_real_model_stops_and_answers(tiny_engine):
    # random weights never write "\n\n", so probe at a frequent word instead
    result = generate(
        tiny_engine, "What is 2 + 3?", Deer(threshold=0.0), family="plain", boundaries=["\n\n", " the", ","],
        probe_interval=1, max_reasoning_tokens=300, temperature=1.0, seed=0,
    )
    assert result.stop_reason in ("threshold", "finished", "max_reasoning_tokens")
    assert result.tokens["reasoning"] <= 300
    if result.stop_reason == "threshold":
        assert len(result.probes) == 1 and result.tokens["answer"] >= 1
        assert "The final answer is \\boxed{" in result.answer_text


def test_budget_on_a_real_model(tiny_engine):
    result = generate(tiny_engine, "What is 2 + 3?", CodeStop(), family="qwen3", max_reasoning_tokens=25, temperature=1.0, seed=1)
    assert result.tokens["reasoning"] <= 25
    assert result.family == "qwen3"


def test_default_sampling_follows_the_generation_config(tokenizer):
    model = build_tiny_model(tokenizer)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.95
    model.generation_config.top_k = 20
    engine = TransformersEngine(model, tokenizer, "tiny")
    assert engine.default_sampling() == Sampling(temperature=0.6, top_p=0.95, top_k=20)
    model.generation_config.do_sample = False
    assert engine.default_sampling().temperature == 0.0


def test_qwen3_template_switch(tokenizer):
    from codestop.families import get_family

    engine = TransformersEngine(build_tiny_model(tokenizer), tokenizer, "Qwen/Qwen3-0.6B")
    assert get_family(None, engine).name == "qwen3"
    off = get_family(None, engine, enable_thinking=False)
    assert not off.thinks and off.template_kwargs == {"enable_thinking": False}


def test_a_bad_model_path_is_one_clear_error(tmp_path):
    from codestop.errors import CodestopError
    from codestop.models import load_engine

    with pytest.raises(CodestopError, match="does not exist"):
        load_engine(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodestopError, match="could not load"):
        load_engine(str(tmp_path / "empty"), engine="transformers")


@pytest.mark.parametrize("engine,option,hint", [
    ("transformers", {"threads": 2}, "it takes dtype, device, trust_remote_code"),
    ("transformers", {"dtpye": "float16"}, "(did you mean dtype?)"),
    ("llamacpp", {"dtype": "float16"}, "it takes threads, n_ctx"),
    ("llamacpp", {"thread": 2}, "(did you mean threads?)"),
])
def test_an_option_the_in_process_engine_does_not_take_is_an_error_naming_it(smollm2_path, engine, option, hint):
    [name] = option
    with pytest.raises(CodestopError, match=rf"^{name}: unknown option of the {engine} engine") as caught:
        codestop.load(str(smollm2_path), engine=engine, **option)
    assert hint in str(caught.value)
