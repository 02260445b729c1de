"""The session logic and the controller, pinned to the token on a scripted engine."""

from __future__ import annotations

import asyncio

import pytest

from codestop import CodeStop, Deer, TokenBudget, Vanilla, generate
from codestop.engines.base import Boundaries, ContextTooLong, Sampling, answer_span, find_word_boundary
from codestop.families import FAMILIES

from scripted import ScriptedEngine

SCRIPT = "Step one.\n\nStep two, 3 apples. Wait, maybe 4.\n\nSo 4 plus 1. But wait, it is 5.\n\nThe answer is \\boxed{5}."
PLAIN = FAMILIES["plain"]


def ntok(tokenizer, text, script=SCRIPT):
    """Tokens the scripted model writes before ``text`` is out (the script's own tokenization)."""
    ids = tokenizer.encode(script, add_special_tokens=False)
    for n in range(len(ids) + 1):
        if tokenizer.decode(ids[:n]) == text:
            return n
    raise AssertionError(f"{text!r} does not end on a token of the script")


def test_probes_sit_after_blank_lines_and_before_boundary_words(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    result = generate(engine, "Q?", Vanilla(), family="plain", probe_interval=1, probe_every_boundary=True)
    expected = [
        ntok(tokenizer, "Step one.\n\n"),
        ntok(tokenizer, "Step one.\n\nStep two, 3 apples."),
        ntok(tokenizer, "Step one.\n\nStep two, 3 apples. Wait, maybe 4.\n\n"),
        ntok(tokenizer, "Step one.\n\nStep two, 3 apples. Wait, maybe 4.\n\nSo 4 plus 1."),
        ntok(tokenizer, "Step one.\n\nStep two, 3 apples. Wait, maybe 4.\n\nSo 4 plus 1. But wait, it is 5.\n\n"),
    ]
    assert [p.position for p in result.probes] == expected
    assert result.reasoning_text == SCRIPT  # the held-back words are not lost
    assert result.tokens["reasoning"] == ntok(tokenizer, SCRIPT)
    assert result.stop_reason == "finished" and result.answer == "5"
    assert all(p.answer == "5" for p in result.probes)


def test_probe_interval_skips_close_boundaries(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    result = generate(engine, "Q?", Vanilla(), family="plain", probe_interval=10, probe_every_boundary=True)
    positions = [p.position for p in result.probes]
    assert all(b - a >= 10 for a, b in zip([0, *positions], positions))
    assert len(positions) < 5


def test_probe_leaves_the_session_unchanged(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)

    async def go():
        session = await engine.start(tokenizer.encode("prompt"), Sampling(temperature=0.0))
        await session.extend(100, Boundaries())
        before = (list(session.backend.history), session.backend.logits().copy())
        out = await session.probe(engine.tokenize("\n**Final Answer**\n\nThe final answer is \\boxed{"))
        after = (list(session.backend.history), session.backend.logits())
        return before, after, out

    before, after, out = asyncio.run(go())
    assert before[0] == after[0]
    assert (before[1] == after[1]).all()
    assert out.text == "5}" and len(out.logprobs) == len(out.token_ids)


def test_a_stop_forces_the_answer(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT, answers=("42}",))
    result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1)
    assert result.stop_reason == "threshold"
    assert result.stop_position == ntok(tokenizer, "Step one.\n\n")
    assert result.answer == "42"
    assert result.answer_text.endswith("The final answer is \\boxed{42}")
    assert result.tokens["answer"] == 3 and result.tokens["probe"] == 3  # "4", "2", "}"
    assert result.cost == result.tokens["reasoning"] + result.tokens["probe"] + result.tokens["answer"]


def test_a_stop_before_a_word_drops_the_word(tokenizer):
    engine = ScriptedEngine(tokenizer, "Step two, 3 apples. Wait, maybe 4.\n\nDone.")
    result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1)
    assert result.reasoning_text == "Step two, 3 apples."
    assert "Wait" not in result.answer_text


def test_budget_is_respected(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    result = generate(engine, "Q?", TokenBudget(budget=7), family="plain")
    assert result.tokens["reasoning"] == 7 and result.stop_reason == "budget"
    assert result.probes == [] and result.tokens["probe"] == 0
    assert result.answer == "5"
    result = generate(engine, "Q?", CodeStop(), family="plain", max_new_tokens=9)
    assert result.tokens["reasoning"] == 9 and result.stop_reason == "budget"


def test_vanilla_spends_no_probes_and_reads_the_models_box(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    result = generate(engine, "Q?", Vanilla(), family="plain")
    assert result.probes == [] and result.tokens["probe"] == 0 and result.tokens["answer"] == 0
    assert result.stop_reason == "finished" and result.answer == "5"


def test_a_plain_model_without_a_box_is_asked_for_one(tokenizer):
    engine = ScriptedEngine(tokenizer, "It is seven.", answers=("7}",))
    result = generate(engine, "Q?", Vanilla(), family="plain")
    assert result.stop_reason == "finished" and result.answer == "7" and result.tokens["answer"] > 0


def test_a_thinking_model_that_closes_its_thinking_answers_freely(tokenizer):
    engine = ScriptedEngine(tokenizer, "Think a bit.\n\nDone.</think>\n\nThe answer is \\boxed{9}.")
    result = generate(engine, "Q?", CodeStop(), family="think", probe_interval=1)
    assert result.stop_reason == "finished"
    assert result.reasoning_text.endswith("</think>")
    assert result.answer == "9" and "\\boxed{9}" in result.answer_text


def test_a_stopped_thinking_model_closes_its_thinking(tokenizer):
    engine = ScriptedEngine(tokenizer, "Think a bit.\n\nMore.\n\nDone.</think>", answers=("3}",))
    result = generate(engine, "Q?", Deer(threshold=0.5), family="think", probe_interval=1)
    assert result.stop_reason == "threshold"
    assert result.answer_text.startswith("\n</think>\n\n**Final Answer**")
    assert result.answer == "3"


def test_events_stream_in_order(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    events = []
    generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1, on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds.index("probe") < kinds.index("stop") < kinds.index("answer")
    assert "".join(e.text for e in events if e.kind == "reasoning") == "Step one.\n\n"


def test_streamed_reasoning_equals_the_reasoning_text(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    events = []
    result = generate(engine, "Q?", Vanilla(), family="plain", probe_every_boundary=True, probe_interval=1, on_event=events.append)
    assert "".join(e.text for e in events if e.kind == "reasoning") == result.reasoning_text


def test_a_prompt_longer_than_the_window_is_a_clear_error(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT, window=40)
    with pytest.raises(ContextTooLong, match="window"):
        generate(engine, "a long question " * 50, Vanilla(), family="plain")


def test_the_window_bounds_the_reasoning(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT * 20, window=200)
    result = generate(engine, "Q?", Vanilla(), family="plain")
    assert result.stop_reason == "budget"
    assert result.tokens["prompt"] + result.tokens["reasoning"] + result.tokens["answer"] < 200


def test_result_serialises(tokenizer):
    import json

    engine = ScriptedEngine(tokenizer, SCRIPT)
    result = generate(engine, "Q?", CodeStop(tau=3), family="plain", probe_interval=1)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["method"]["method"] == "codestop" and data["method"]["tau"] == 3
    assert set(data["tokens"]) == {"prompt", "reasoning", "probe", "probe_prompt", "answer"}
    assert data["cost"] == result.cost and data["engine"] == "scripted"


def test_text_helpers():
    assert find_word_boundary("so 3. Wait, no", ["Wait"], 1) == 6
    assert find_word_boundary("Waiting for it", ["Wait"], 0) is None
    assert find_word_boundary("Await", ["Wait"], 0) is None
    assert answer_span(["1", "2", "}"]) == ("12", 2)
    assert answer_span(["\\frac{1", "}{2", "}}"]) == ("\\frac{1}{2}", 3)
    assert answer_span(["7", "}."]) == ("7", 1)
    assert answer_span(["abc"]) == ("abc", 1)
    with pytest.raises(ValueError, match="boundaries"):
        Boundaries.parse([])
    assert Boundaries.parse(["\n\n", "Wait"]) == Boundaries(("\n\n",), ("Wait",))
