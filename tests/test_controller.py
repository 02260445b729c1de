"""The session logic and the controller, pinned to the token on a scripted engine."""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing

import pytest
from scripted import ScriptedEngine

from codestop import CodeStop, Deer, GenerationConfig, Result, Sampling, TokenBudget, Vanilla, astream, generate
from codestop.errors import ContextTooLong
from codestop.families import FAMILIES
from codestop.steps import StepRules, decode_text

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
    result = generate(engine, "Q?", Vanilla(), family="plain", probe_interval=1, always_probe=True)
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
    result = generate(engine, "Q?", Vanilla(), family="plain", probe_interval=10, always_probe=True)
    positions = [p.position for p in result.probes]
    assert all(b - a >= 10 for a, b in zip([0, *positions], positions))
    assert len(positions) < 5


def test_probe_leaves_the_session_unchanged(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)

    async def go():
        session = await engine.start(tokenizer.encode("prompt"), Sampling(temperature=0.0))
        async for _ in session.extend(100, GenerationConfig().step_rules()):
            pass
        before = (list(session.backend.history), session.backend.logits().copy())
        out = await session.probe(engine.tokenize("\n**Final Answer**\n\nThe final answer is \\boxed{"))
        after = (list(session.backend.history), session.backend.logits())
        return before, after, out

    before, after, out = asyncio.run(go())
    assert before[0] == after[0]
    assert (before[1] == after[1]).all()
    assert decode_text(engine.detokenize, out.token_ids) == "5}" and len(out.logprobs) == len(out.token_ids)


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
    result = generate(engine, "Q?", CodeStop(), family="plain", max_reasoning_tokens=9)
    assert result.tokens["reasoning"] == 9 and result.stop_reason == "max_reasoning_tokens"


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
    result = generate(engine, "Q?", Vanilla(), family="plain", always_probe=True, probe_interval=1, on_event=events.append)
    assert "".join(e.text for e in events if e.kind == "reasoning") == result.reasoning_text


def test_a_prompt_longer_than_the_window_is_a_clear_error(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT, window=40)
    with pytest.raises(ContextTooLong, match="window"):
        generate(engine, "a long question " * 50, Vanilla(), family="plain")


def test_the_window_bounds_the_reasoning(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT * 20, window=200)
    result = generate(engine, "Q?", Vanilla(), family="plain")
    assert result.stop_reason == "max_reasoning_tokens"
    assert result.tokens["prompt"] + result.tokens["reasoning"] + result.tokens["answer"] < 200


def test_result_serialises(tokenizer):
    import json

    engine = ScriptedEngine(tokenizer, SCRIPT)
    result = generate(engine, "Q?", CodeStop(tau=3), family="plain", probe_interval=1)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["policy"]["method"] == "codestop" and data["policy"]["tau"] == 3
    assert set(data["tokens"]) == {"prompt", "reasoning", "probe", "probe_prompt", "answer", "overrun"}
    assert data["cost_tokens"] == result.cost and data["engine"] == "scripted"


class ClosingEngine(ScriptedEngine):
    """Counts sessions closed, and the threads events were seen on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed = 0

    def new_backend(self, prompt_ids):
        backend = super().new_backend(prompt_ids)
        engine = self

        def close():
            engine.closed += 1

        backend.close = close
        return backend


def test_closing_the_stream_early_closes_the_session(tokenizer):
    engine = ClosingEngine(tokenizer, SCRIPT * 10)

    async def go():
        seen = 0
        async with aclosing(astream(engine, "Q?", Vanilla(), GenerationConfig(family="plain"))) as stream:
            async for event in stream:
                seen += event.kind == "reasoning"
                if seen == 2:
                    break  # the client went away
        return seen

    assert asyncio.run(go()) == 2
    assert engine.closed == 1


def test_a_cancelled_generation_stops_between_chunks_and_frees_the_engine(tokenizer):
    engine = ClosingEngine(tokenizer, SCRIPT * 50)

    async def go():
        async def consume():
            async with aclosing(astream(engine, "Q?", Vanilla(), GenerationConfig(family="plain"))) as stream:
                async for _ in stream:
                    await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the engine's lock is free again: another question runs to its end
        other = await asyncio.wait_for(_result(engine), timeout=30)
        return other

    other = asyncio.run(go())
    assert other.stop_reason == "max_reasoning_tokens" or other.stop_reason == "finished"
    assert engine.closed == 2


async def _result(engine):
    async with aclosing(astream(engine, "Q?", Vanilla(), GenerationConfig(family="plain", max_reasoning_tokens=5))) as stream:
        async for item in stream:
            if isinstance(item, Result):
                return item


def test_events_come_on_the_event_loops_thread(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    threads = set()
    generate(engine, "Q?", Vanilla(), family="plain", always_probe=True, probe_interval=1,
             on_event=lambda e: threads.add(threading.get_ident()))
    assert threads == {threading.get_ident()}


def test_greedy_answer_steps_keep_the_seed():
    assert Sampling(temperature=0.7, seed=3).greedy() == Sampling(temperature=0.0, seed=3)


def test_unknown_generation_options_fail_before_loading(tokenizer):
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        generate("no-such-model-anywhere", "Q?", max_reasoning_tokens=0)
    with pytest.raises(ValueError, match="probe_intervl"):
        generate("no-such-model-anywhere", "Q?", probe_intervl=3)


def test_step_rules_from_the_config():
    config = GenerationConfig(boundaries=("\n\n", "Wait"))
    assert config.step_rules(("</think>",)) == StepRules(("\n\n",), ("Wait",), ("</think>",))
    assert config.step_rules(probing=False) == StepRules()


def test_free_answers_close_the_thinking_without_forcing_a_box(tokenizer):
    engine = ScriptedEngine(tokenizer, "Think a bit.\n\nMore.\n\nDone.</think>", answers=("3}",))
    result = generate(engine, "Q?", Deer(threshold=0.5), family="think", probe_interval=1, answer="free")
    assert result.stop_reason == "threshold"
    assert result.answer_text.startswith("\n</think>\n\n")
    assert "Final Answer" not in result.answer_text and "boxed" not in result.answer_text


def test_answer_none_ends_the_output_at_the_stop(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1, answer="none")
    assert result.stop_reason == "threshold"
    assert result.answer_text == "" and result.tokens["answer"] == 0 and result.answer is None


@pytest.mark.parametrize("mode", ["boxed", "free"])
def test_max_tokens_caps_reasoning_and_answer_together(tokenizer, mode):
    engine = ScriptedEngine(tokenizer, SCRIPT, answers=("12345}",))
    stop_at = ntok(tokenizer, "Step one.\n\n")
    for cap in (5, stop_at + 2):
        result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1, max_tokens=cap, answer=mode)
        assert result.tokens["reasoning"] + result.tokens["answer"] <= cap
    assert result.tokens["answer"] == 2 if mode == "boxed" else result.tokens["answer"] <= 2


def test_a_client_stop_string_ends_a_plain_models_output(tokenizer):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    events = []
    result = generate(engine, "Q?", Vanilla(), family="plain", stop=["apples"], answer="free", on_event=events.append)
    assert result.reasoning_text == "Step one.\n\nStep two, 3 "
    assert result.stop_reason == "finished" and result.answer_text == ""
    assert "".join(e.text for e in events if e.kind == "reasoning") == result.reasoning_text


def test_answer_from_best_rolls_back_to_the_most_confident_probe(tokenizer):
    from codestop import Consistency

    engine = ScriptedEngine(tokenizer, SCRIPT, answers=("5}",))
    stop = generate(engine, "Q?", Consistency(window=3), family="plain", probe_interval=1)
    best = generate(engine, "Q?", Consistency(window=3, answer_from="best"), family="plain", probe_interval=1)
    assert stop.stop_reason == best.stop_reason == "consistent"
    assert stop.answer_position == stop.stop_position
    # equal confidences: the earliest probe is the best; the cost still counts to the stop
    assert best.answer_position == best.probes[0].position < best.stop_position
    assert best.tokens["reasoning"] == stop.tokens["reasoning"] == best.stop_position
    assert best.answer == "5" and best.answer_text.startswith("**Final Answer**")
