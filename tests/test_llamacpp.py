"""The llama.cpp engine on the real SmolLM2-135M GGUF: probes leave the session unchanged, the
controller stops and answers within its budgets, bad input gets one clear message, sessions do not
see each other, and probe confidences agree with the transformers engine on the same file."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from codestop.api import agenerate_question, generate
from codestop.engines.base import StepOutput
from codestop.engines.local import log_softmax
from codestop.errors import CodestopError, ContextTooLong
from codestop.families import FAMILIES, PROBE_PROMPT
from codestop.policies import CodeStop, Deer, TokenBudget, Vanilla
from codestop.sampling import Sampling
from codestop.steps import StepRules, decode_text

pytestmark = pytest.mark.slow

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
REASONING = "1. First, we need to find the total number of apples Tom has.\n2. We know that Tom has"  # SmolLM2's own


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from codestop.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine.load(str(smollm2_path), model_name="smollm2-135m", threads=2)
    yield eng
    eng.close()


def _prompt(engine) -> list[int]:
    return engine.tokenize(FAMILIES["plain"].build_prompt(engine, QUESTION))


def _probs(backend) -> np.ndarray:
    return np.exp(log_softmax(backend.logits()))


def _session_after_reasoning(engine, n_tokens: int = 24):
    """A greedy session 24 reasoning tokens in, and those tokens."""

    async def run():
        session = await engine.start(_prompt(engine), Sampling(temperature=0.0))
        async for step in session.extend(n_tokens, StepRules()):  # noqa: B007 - the last step is read after the loop
            pass
        assert isinstance(step, StepOutput)
        return session, step.token_ids

    return asyncio.run(run())


@pytest.mark.parametrize("force_state_copy", [False, True], ids=["kv-rollback", "state-copy"])
def test_probe_leaves_the_session_unchanged(engine, force_state_copy, monkeypatch):
    if force_state_copy:
        # the path recurrent models take: copy the sequence state and restore it
        monkeypatch.setattr(engine, "can_crop", False)
    session, committed = _session_after_reasoning(engine)
    before_n = session.n_tokens
    before = _probs(session.backend).copy()
    probe = asyncio.run(session.probe(engine.tokenize(PROBE_PROMPT), 20))
    assert probe.token_ids and len(probe.logprobs) == len(probe.token_ids)
    assert session.n_tokens == before_n
    assert np.max(np.abs(_probs(session.backend) - before)) < 1e-4
    # and the KV cache itself is back: the next token's distribution matches a fresh context fed
    # the same tokens (not the probe's)
    nxt = int(np.argmax(before))
    session.backend.feed([nxt])
    after_probe = _probs(session.backend)
    fresh = engine.new_backend(_prompt(engine))
    try:
        fresh.feed(committed + [nxt])
        assert np.max(np.abs(_probs(fresh) - after_probe)) < 1e-3
    finally:
        fresh.close()
    asyncio.run(session.close())


def test_probe_is_greedy_and_stops_at_the_closing_brace(engine):
    """The probe is the model's greedy continuation cut at the token that closes the box, though
    the model goes on past it (here "12}" and then "\n\nStep 1: ..."); the session itself samples."""
    context = _prompt(engine) + engine.tokenize(REASONING)
    probe_ids = engine.tokenize(PROBE_PROMPT)
    greedy, written = engine.new_backend(context + probe_ids), []
    try:
        for _ in range(20):
            written.append(int(np.argmax(greedy.logits())))
            greedy.feed(written[-1:])
    finally:
        greedy.close()
    cut = next(n for n in range(1, 21) if "}" in decode_text(engine.detokenize, written[:n]))
    assert cut < 20 and written[cut] not in engine.eos_token_ids  # the model would go on

    async def probe():
        session = await engine.start(context, Sampling(temperature=1.0, seed=1))
        try:
            return await session.probe(probe_ids, 20)
        finally:
            await session.close()

    out = asyncio.run(probe())
    assert out.token_ids == written[:cut] and decode_text(engine.detokenize, out.token_ids).endswith("}")
    assert len(out.logprobs) == cut


def test_controller_stops_and_answers_within_budgets(engine):
    # SmolLM2 writes one numbered line per step: a line break is its step boundary
    result = generate(
        engine, QUESTION, CodeStop(), max_reasoning_tokens=60, probe_interval=8, boundaries=["\n"], temperature=0.0
    )
    # its probes (confidence about 0.2, far under r_min = 0.9) never stop CoDE-Stop: the cap does
    assert (result.stop_reason, result.tokens["reasoning"]) == ("max_reasoning_tokens", 60)
    assert result.answer_text and result.engine == "llamacpp"
    assert result.probes, "CoDE-Stop probes at the step boundaries"
    budget = generate(engine, QUESTION, TokenBudget(budget=12), temperature=0.0)
    assert budget.tokens["reasoning"] <= 12 and budget.stop_reason == "budget"
    assert "\\boxed{" in budget.answer_text  # a forced answer
    capped = generate(engine, QUESTION, Vanilla(), max_reasoning_tokens=10, temperature=0.0)
    assert capped.tokens["reasoning"] == 10 and capped.stop_reason == "max_reasoning_tokens"
    assert capped.tokens["probe"] == 0


def test_greedy_matches_across_sessions_and_concurrency(engine):
    questions = [QUESTION, "A box holds 6 eggs. How many eggs are in 5 boxes?"]

    async def one(q):
        return await agenerate_question(
            engine, q, Deer(threshold=0.99), max_reasoning_tokens=40, probe_interval=8, boundaries=["\n"], temperature=0.0
        )

    async def together():
        return await asyncio.gather(*(one(q) for q in questions))

    alone = [asyncio.run(one(q)) for q in questions]
    both = asyncio.run(together())
    for a, b in zip(alone, both):
        assert a.reasoning_text == b.reasoning_text
        assert [p.confidence for p in a.probes] == pytest.approx([p.confidence for p in b.probes], abs=1e-4)
    assert engine.live_sessions == 0  # every context went back to the pool


def test_a_thinking_model_that_never_closes_is_stopped_cleanly(engine):
    result = generate(engine, QUESTION, Vanilla(), family="think", max_reasoning_tokens=30, temperature=0.0)
    assert (result.stop_reason, result.tokens["reasoning"]) == ("max_reasoning_tokens", 30)
    assert result.answer_text.startswith("\n</think>\n\n**Final Answer**")  # codestop closed the thinking itself


def test_a_thinking_model_that_ends_its_turn_unclosed_is_answered(engine):
    """Issue 26: SmolLM2 never writes </think>; under the think family its turn ends (EOS) inside the
    thinking. The thinking is closed for it (no EOS left in the context) and the answer phase runs:
    the forced box, or its own answer; none when max_tokens was used up."""
    fruits = "List three fruits, one per line."
    for policy in (Vanilla(), CodeStop()):  # CoDE-Stop's probes (confidence far under r_min) never stop it here
        boxed = generate(engine, fruits, policy, family="think", answer="boxed", temperature=0.0)
        assert boxed.stop_reason == "unclosed_thinking" and boxed.tokens["answer"] >= 1, boxed.stop_reason
        assert boxed.answer_text.startswith("\n</think>\n\n**Final Answer**\n\nThe final answer is \\boxed{")
        assert boxed.answer and "<|im_end|>" not in boxed.reasoning_text + boxed.answer_text
        free = generate(engine, fruits, policy, family="think", answer="free", temperature=0.0)
        assert (free.stop_reason, free.reasoning_text) == ("unclosed_thinking", boxed.reasoning_text)  # greedy: the same turn
        assert free.answer_text.startswith("\n</think>\n\n") and free.answer_text[len("\n</think>\n\n"):].strip()
        assert free.tokens["answer"] >= 1 and "Final Answer**" not in free.answer_text
    n = boxed.tokens["reasoning"]
    used_up = generate(engine, fruits, Vanilla(), family="think", answer="free", max_tokens=n, temperature=0.0)
    assert (used_up.stop_reason, used_up.tokens["reasoning"], used_up.tokens["answer"], used_up.answer_text) == (
        "max_tokens", n, 0, "")
    assert used_up.reasoning_text == boxed.reasoning_text  # the whole turn, to the token before its EOS


def test_context_window_is_enforced(smollm2_path):
    from codestop.engines.llamacpp import LlamaCppEngine

    small = LlamaCppEngine.load(str(smollm2_path), n_ctx=256, threads=2)
    try:
        with pytest.raises(ContextTooLong, match="window"):
            generate(small, "How many? " * 200, Vanilla(), temperature=0.0)
        # reasoning that reaches the window is a clean budget stop with an answer, not a crash
        result = generate(small, QUESTION, Vanilla(), family="think", max_reasoning_tokens=1000, temperature=0.0)
        assert result.stop_reason == "max_reasoning_tokens" and result.tokens["reasoning"] < 256 - result.tokens["prompt"]
        assert result.tokens["prompt"] + result.tokens["reasoning"] + result.tokens["answer"] <= 256
    finally:
        small.close()


def test_bad_gguf_files_get_one_message(tmp_path, smollm2_path):
    from codestop.engines.llamacpp import LlamaCppEngine

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"\x00" * 4096)
    with pytest.raises(CodestopError, match="not a GGUF"):
        LlamaCppEngine.load(str(not_gguf))
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    with pytest.raises(CodestopError, match="could not load"):
        LlamaCppEngine.load(str(truncated))
    with pytest.raises(CodestopError, match="not a file"):
        LlamaCppEngine.load(str(tmp_path / "absent.gguf"))


def test_tokenizer_and_template_match_transformers(engine, tokenizer):
    text = "Maya has 3 boxes of 12 crayons.\n\nShe gives 7 away: 36 - 7 = 29. Ünïcode ✓"
    assert engine.tokenize(text) == tokenizer.encode(text, add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert engine.detokenize(ids) == tokenizer.decode(ids)
    messages = [{"role": "user", "content": QUESTION}]
    assert engine.chat_template(messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert engine.model_info()["model_type"] == "llama"
    assert tokenizer.eos_token_id in engine.eos_token_ids


def test_parity_with_transformers_on_the_same_gguf(engine, smollm2_path):
    """The same GGUF on both engines: probe confidences within 0.05 at fixed prefixes."""
    from codestop.controller import score
    from codestop.engines.transformers import TransformersEngine

    hf = TransformersEngine.load(str(smollm2_path))
    prefixes = [
        "Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples.",
        "Each box holds 6 eggs and there are 5 boxes. 6 * 5 = 30.",
        "The train travels 60 miles per hour for 2 hours, which is 120 miles.\n\nSo the answer",
    ]
    probe_ids_cache = {}

    async def confidences(eng):
        out = []
        probe_ids = probe_ids_cache.setdefault(eng.name, eng.tokenize(PROBE_PROMPT))
        for prefix in prefixes:
            prompt = eng.tokenize(FAMILIES["plain"].build_prompt(eng, QUESTION) + prefix)
            session = await eng.start(prompt, Sampling(temperature=0.0))
            probe = score(await session.probe(probe_ids, 20), 1, "geometric", eng)
            out.append((probe.answer, probe.confidence))
            await session.close()
        return out

    fast = asyncio.run(confidences(engine))
    slow = asyncio.run(confidences(hf))
    for (a_fast, c_fast), (a_slow, c_slow) in zip(fast, slow):
        assert a_fast == a_slow
        assert abs(c_fast - c_slow) < 0.05, (fast, slow)
