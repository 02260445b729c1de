"""The session logic and the controller, pinned to the token on a scripted engine and the toy tokenizer."""

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
THINK = FAMILIES["think"]


def ntok(tok, text, script=SCRIPT):
    """Tokens the scripted model writes before ``text`` is out (the script's own tokenization)."""
    ids = tok.encode(script, add_special_tokens=False)
    for n in range(len(ids) + 1):
        if tok.decode(ids[:n]) == text:
            return n
    raise AssertionError(f"{text!r} does not end on a token of the script")


def boundaries(tok) -> list[int]:
    """Where SCRIPT's steps end: after each blank line, and before each "Wait" / "But wait"."""
    return [
        ntok(tok, "Step one.\n\n"),
        ntok(tok, "Step one.\n\nStep two, 3 apples."),
        ntok(tok, "Step one.\n\nStep two, 3 apples. Wait, maybe 4.\n\n"),
        ntok(tok, "Step one.\n\nStep two, 3 apples. Wait, maybe 4.\n\nSo 4 plus 1."),
        ntok(tok, "Step one.\n\nStep two, 3 apples. Wait, maybe 4.\n\nSo 4 plus 1. But wait, it is 5.\n\n"),
    ]


def test_probes_sit_after_blank_lines_and_before_boundary_words(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    result = generate(engine, "Q?", Vanilla(), family="plain", probe_interval=1, always_probe=True)
    assert [p.position for p in result.probes] == boundaries(toy_tokenizer)
    assert result.reasoning_text == SCRIPT  # the held-back words are not lost
    assert result.tokens["reasoning"] == ntok(toy_tokenizer, SCRIPT)
    assert result.stop_reason == "finished" and result.answer == "5"
    assert all(p.answer == "5" for p in result.probes)


def test_probe_interval_skips_close_boundaries(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    result = generate(engine, "Q?", Vanilla(), family="plain", probe_interval=10, always_probe=True)
    expected: list[int] = []
    for at in boundaries(toy_tokenizer):  # a boundary 10 tokens or more past the last probe (or the start)
        if at - (expected[-1] if expected else 0) >= 10:
            expected.append(at)
    assert len(expected) < len(boundaries(toy_tokenizer))  # (the script has boundaries closer than 10)
    assert [p.position for p in result.probes] == expected


def test_probe_leaves_the_session_unchanged(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)

    async def go():
        session = await engine.start(toy_tokenizer.encode("prompt"), Sampling(temperature=0.0))
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


def test_a_stop_forces_the_answer(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT, answer="42}")
    result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1)
    assert result.stop_reason == "threshold"
    assert result.tokens["reasoning"] == ntok(toy_tokenizer, "Step one.\n\n")
    assert result.answer == "42"
    assert result.answer_text.endswith("The final answer is \\boxed{42}")
    assert result.tokens["answer"] == 3 and result.tokens["probe"] == 3  # "4", "2", "}"
    assert result.cost_tokens == result.tokens["reasoning"] + result.tokens["probe"] + result.tokens["answer"]


def test_a_stop_before_a_word_drops_the_word(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, "Step two, 3 apples. Wait, maybe 4.\n\nDone.")
    result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1)
    assert result.reasoning_text == "Step two, 3 apples."
    assert "Wait" not in result.answer_text


def test_budget_is_respected(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    result = generate(engine, "Q?", TokenBudget(budget=7), family="plain")
    assert result.tokens["reasoning"] == 7 and result.stop_reason == "budget"
    assert result.probes == [] and result.tokens["probe"] == 0
    assert result.answer == "5"
    result = generate(engine, "Q?", CodeStop(), family="plain", max_reasoning_tokens=9)
    assert result.tokens["reasoning"] == 9 and result.stop_reason == "max_reasoning_tokens"


def test_vanilla_spends_no_probes_and_reads_the_models_box(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    result = generate(engine, "Q?", Vanilla(), family="plain")
    assert result.probes == [] and result.tokens["probe"] == 0 and result.tokens["answer"] == 0
    assert result.stop_reason == "finished" and result.answer == "5"


def test_a_plain_model_without_a_box_is_asked_for_one(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, "It is seven.", answer="7}")
    result = generate(engine, "Q?", Vanilla(), family="plain")
    assert result.stop_reason == "finished" and result.answer == "7" and result.tokens["answer"] == 2  # "7", "}"
    assert result.answer_text == "\n\n**Final Answer**\n\nThe final answer is \\boxed{7}"


def test_a_thinking_model_that_closes_its_thinking_answers_freely(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, "Think a bit.\n\nDone.</think>\n\nThe answer is \\boxed{9}.")
    result = generate(engine, "Q?", CodeStop(), family="think", probe_interval=1)
    assert result.stop_reason == "finished"
    assert result.reasoning_text.endswith("</think>")
    assert result.answer == "9" and "\\boxed{9}" in result.answer_text


def test_a_stopped_thinking_model_closes_its_thinking(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, "Think a bit.\n\nMore.\n\nDone.</think>", answer="3}")
    result = generate(engine, "Q?", Deer(threshold=0.5), family="think", probe_interval=1)
    assert result.stop_reason == "threshold"
    assert result.answer_text.startswith("\n</think>\n\n**Final Answer**")
    assert result.answer == "3"


def test_events_stream_in_order(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    events = []
    generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1, on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds.index("probe") < kinds.index("stop") < kinds.index("answer")
    assert "".join(e.text for e in events if e.kind == "reasoning") == "Step one.\n\n"


def test_streamed_reasoning_equals_the_reasoning_text(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    events = []
    result = generate(engine, "Q?", Vanilla(), family="plain", always_probe=True, probe_interval=1, on_event=events.append)
    assert "".join(e.text for e in events if e.kind == "reasoning") == result.reasoning_text


def test_a_prompt_longer_than_the_window_is_a_clear_error(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT, window=40)
    with pytest.raises(ContextTooLong, match="window"):
        generate(engine, "a long question " * 50, Vanilla(), family="plain")


def test_a_prompt_and_max_tokens_over_the_window_are_refused_not_cut(toy_tokenizer):
    """Issue 27: as vLLM and OpenAI, a prompt plus max_tokens the window cannot hold is an error
    (it ran and was cut at the window); what fits is honoured, and its cap names max_tokens."""
    engine = ScriptedEngine(toy_tokenizer, "word " * 300, window=200)
    prompt = len(engine.tokenize(FAMILIES["plain"].build_prompt(engine, "Q?")))
    with pytest.raises(ContextTooLong, match=f"the prompt is {prompt} tokens and max_tokens asks for {200 - prompt + 1} more"):
        generate(engine, "Q?", Vanilla(), family="plain", max_tokens=200 - prompt + 1)
    fits = generate(engine, "Q?", Vanilla(), family="plain", max_tokens=20)
    assert (fits.stop_reason, fits.tokens["reasoning"] + fits.tokens["answer"]) == ("max_tokens", 20)


def test_the_window_bounds_the_reasoning(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT * 20, window=200)
    result = generate(engine, "Q?", Vanilla(), family="plain")
    assert result.stop_reason == "max_reasoning_tokens"
    assert result.tokens["prompt"] + result.tokens["reasoning"] + result.tokens["answer"] < 200


def test_result_serialises(toy_tokenizer):
    import json

    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    result = generate(engine, "Q?", CodeStop(tau=3), family="plain", probe_interval=1)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["policy"]["method"] == "codestop" and data["policy"]["tau"] == 3
    assert set(data["tokens"]) == {"prompt", "reasoning", "probe", "probe_prompt", "answer", "overrun"}
    assert data["cost_tokens"] == result.cost_tokens and data["engine"] == "scripted"
    # one name per quantity; the old names still answer, for one release (docs/vocabulary.md)
    assert "stop_position" not in result.__dataclass_fields__ and data["stop_position"] == data["tokens"]["reasoning"]
    with pytest.deprecated_call():
        assert result.stop_position == result.tokens["reasoning"]
    with pytest.deprecated_call():
        assert result.cost == result.cost_tokens


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


def test_closing_the_stream_early_closes_the_session(toy_tokenizer):
    engine = ClosingEngine(toy_tokenizer, SCRIPT * 10)

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


def test_a_cancelled_generation_stops_between_chunks_and_frees_the_engine(toy_tokenizer):
    engine = ClosingEngine(toy_tokenizer, SCRIPT * 50)

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
    assert other.stop_reason == "max_reasoning_tokens" and other.tokens["reasoning"] == 5  # SCRIPT * 50 runs on
    assert engine.closed == 2


async def _result(engine):
    async with aclosing(astream(engine, "Q?", Vanilla(), GenerationConfig(family="plain", max_reasoning_tokens=5))) as stream:
        async for item in stream:
            if isinstance(item, Result):
                return item


def test_events_come_on_the_event_loops_thread(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    threads = set()
    generate(engine, "Q?", Vanilla(), family="plain", always_probe=True, probe_interval=1,
             on_event=lambda e: threads.add(threading.get_ident()))
    assert threads == {threading.get_ident()}


def test_greedy_answer_steps_keep_the_seed():
    assert Sampling(temperature=0.7, seed=3).greedy() == Sampling(temperature=0.0, seed=3)


def test_unknown_generation_options_fail_before_loading(toy_tokenizer):
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        generate("no-such-model-anywhere", "Q?", max_reasoning_tokens=0)
    with pytest.raises(ValueError, match="probe_intervl"):
        generate("no-such-model-anywhere", "Q?", probe_intervl=3)


def test_step_rules_from_the_config():
    config = GenerationConfig(boundaries=("\n\n", "Wait"))
    assert config.step_rules(("</think>",)) == StepRules(("\n\n",), ("Wait",), ("</think>",))
    assert config.step_rules(probing=False) == StepRules()


def test_free_answers_close_the_thinking_without_forcing_a_box(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, "Think a bit.\n\nMore.\n\nDone.</think>", answer="3}")
    result = generate(engine, "Q?", Deer(threshold=0.5), family="think", probe_interval=1, answer="free")
    assert result.stop_reason == "threshold"
    assert result.answer_text.startswith("\n</think>\n\n")
    assert "Final Answer" not in result.answer_text and "boxed" not in result.answer_text


@pytest.mark.parametrize("mode", ["boxed", "free"])
def test_the_answer_marker_after_a_stop_follows_one_blank_line(toy_tokenizer, mode):
    """Issue 27: a step ends at a blank line, and the plain family's marker opens with one: the
    answer came after four newlines. One blank line, whatever the reasoning ends with."""
    for script in (SCRIPT, "Step one.\nStep two.\n\nMore.", "Step one. Wait, two.", "Step one.\nWait, two."):
        engine = ScriptedEngine(toy_tokenizer, script, answer="5}")
        result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1, answer=mode)
        assert result.stop_reason == "threshold", script
        whole = result.reasoning_text + result.answer_text
        assert "\n\n\n" not in whole and "\n\n**Final Answer**\n\n" in whole, whole


def test_answer_none_ends_the_output_at_the_stop(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1, answer="none")
    assert result.stop_reason == "threshold"
    assert result.answer_text == "" and result.tokens["answer"] == 0 and result.answer is None


@pytest.mark.parametrize("mode", ["boxed", "free"])
def test_max_tokens_caps_reasoning_and_answer_together(toy_tokenizer, mode):
    script, one = toy_tokenizer.encode(SCRIPT), toy_tokenizer.encode("1")

    def rambling(ids: list[int], prompt_len: int) -> int:
        """SCRIPT, then (asked for an answer, boxed or free) "1" for ever: only a cap ends it."""
        gen = ids[prompt_len:]
        return script[len(gen)] if gen == script[: len(gen)] and len(gen) < len(script) else one[0]

    engine = ScriptedEngine(toy_tokenizer, next_token=rambling)
    stop_at = ntok(toy_tokenizer, "Step one.\n\n")  # Deer stops at the first probe
    for cap in (stop_at - 1, stop_at + 2):
        result = generate(engine, "Q?", Deer(threshold=0.5), family="plain", probe_interval=1, max_tokens=cap, answer=mode)
        if cap < stop_at:  # the cap comes first: no probe, no answer
            assert (result.stop_reason, result.tokens["reasoning"], result.tokens["answer"]) == ("max_tokens", cap, 0)
        else:
            assert (result.stop_reason, result.tokens["reasoning"], result.tokens["answer"]) == ("threshold", stop_at, 2)
            assert result.answer_text.endswith("\\boxed{11" if mode == "boxed" else "**Final Answer**\n\n11")


def test_a_client_stop_string_ends_a_plain_models_output(toy_tokenizer):
    engine = ScriptedEngine(toy_tokenizer, SCRIPT)
    events = []
    result = generate(engine, "Q?", Vanilla(), family="plain", stop=["apples"], answer="free", on_event=events.append)
    assert result.reasoning_text == "Step one.\n\nStep two, 3 "
    assert result.stop_reason == "finished" and result.answer_text == ""
    assert "".join(e.text for e in events if e.kind == "reasoning") == result.reasoning_text


def test_answer_from_best_rolls_back_to_the_most_confident_probe(toy_tokenizer):
    from codestop import Consistency

    engine = ScriptedEngine(toy_tokenizer, SCRIPT, answer="5}")
    stop = generate(engine, "Q?", Consistency(window=3), family="plain", probe_interval=1)
    best = generate(engine, "Q?", Consistency(window=3, answer_from="best"), family="plain", probe_interval=1)
    assert stop.stop_reason == best.stop_reason == "consistent"
    assert stop.answer_position == stop.tokens["reasoning"]
    # equal confidences: the earliest probe is the best; the cost still counts to the stop
    assert best.answer_position == best.probes[0].position < best.tokens["reasoning"]
    assert best.tokens["reasoning"] == stop.tokens["reasoning"]
    assert best.answer == "5" and best.answer_text.startswith("**Final Answer**")


UNCLOSED = "Think a bit.\n\nMore."  # a thinking model's turn that ends (EOS) without </think>


def unclosed_engine(tok, seen: list[list[int]]) -> ScriptedEngine:
    """Writes UNCLOSED then EOS, and probes' boxes "5}"; once its thinking is closed for it, answers
    "It is 7." (free) or, after the forced box, "7}". ``seen`` collects the context of every
    answer token (what the model was given after its turn ended)."""
    script = tok.encode(UNCLOSED)
    close, forced = tok.encode(THINK.close_thinking), tok.encode(THINK.forced_answer_text())
    own, boxed = tok.encode("It is 7."), tok.encode("7}")

    def model(ids: list[int], prompt_len: int) -> int:
        gen = ids[prompt_len:]
        if "</think>" not in tok.decode(gen):  # the script, then EOS; a probe inside the thinking
            return engine._next(ids, prompt_len)
        seen.append(list(gen))
        after, written = (forced, boxed) if gen[len(script) :][: len(forced)] == forced else (close, own)
        n = len(gen) - len(script) - len(after)
        return written[n] if n < len(written) else tok.eos_token_id

    engine = ScriptedEngine(tok, UNCLOSED, answer="5}", next_token=model)
    return engine


@pytest.mark.parametrize("mode", ["boxed", "free"])
def test_a_thinking_model_that_ends_its_turn_inside_its_thinking_still_answers(toy_tokenizer, mode):
    seen: list[list[int]] = []
    engine = unclosed_engine(toy_tokenizer, seen)
    for policy in (Vanilla(), CodeStop()):  # CoDE-Stop probes but, at confidence 0.75, never stops here
        seen.clear()
        result = generate(engine, "Q?", policy, family="think", probe_interval=1, answer=mode)
        assert result.stop_reason == "unclosed_thinking", policy
        assert result.reasoning_text == UNCLOSED and result.tokens["reasoning"] == len(toy_tokenizer.encode(UNCLOSED))
        assert result.answer_text.startswith("\n</think>\n\n")  # closed for it, as after a stop
        # the EOS that ended the turn is not in the context the answer follows
        closed = toy_tokenizer.encode(UNCLOSED + "\n</think>\n\n")
        assert seen and all(ctx[: len(closed)] == closed and toy_tokenizer.eos_token_id not in ctx for ctx in seen)
        if mode == "boxed":
            assert result.answer == "7" and result.answer_text == "\n</think>\n\n**Final Answer**\n\nThe final answer is \\boxed{7}"
            assert result.tokens["answer"] == 2  # "7", "}"
        else:
            assert result.answer_text == "\n</think>\n\nIt is 7." and result.answer is None
            assert result.tokens["answer"] == len(toy_tokenizer.encode("It is 7."))


def test_an_unclosed_thinking_gets_no_answer_when_max_tokens_is_used_up(toy_tokenizer):
    engine = unclosed_engine(toy_tokenizer, [])
    n = len(toy_tokenizer.encode(UNCLOSED))
    for mode in ("boxed", "free"):
        # the cap ends the reasoning before the EOS: nothing is left for an answer
        capped = generate(engine, "Q?", Vanilla(), family="think", max_tokens=n, answer=mode)
        assert (capped.stop_reason, capped.tokens["reasoning"], capped.tokens["answer"], capped.answer_text) == (
            "max_tokens", n, 0, "")
        # one token left after the EOS: the thinking is closed and the answer gets that one token
        one = generate(engine, "Q?", Vanilla(), family="think", max_tokens=n + 1, answer=mode)
        assert (one.stop_reason, one.tokens["reasoning"], one.tokens["answer"]) == ("unclosed_thinking", n, 1)
    none = generate(engine, "Q?", Vanilla(), family="think", answer="none")  # asked for no answer: none
    assert (none.stop_reason, none.answer_text, none.tokens["answer"]) == ("unclosed_thinking", "", 0)


def test_a_raw_completion_or_a_plain_model_that_ends_is_finished(toy_tokenizer):
    engine = unclosed_engine(toy_tokenizer, [])

    async def raw() -> Result:
        async with aclosing(astream(engine, "Q?", Vanilla(), GenerationConfig(family="think", answer="none"),
                                    stop_in_reasoning=True)) as stream:
            return [item async for item in stream if isinstance(item, Result)][0]

    assert asyncio.run(raw()).stop_reason == "finished"  # its text is the reasoning: it just ends
    assert generate(engine, "Q?", Vanilla(), family="plain", answer="free").stop_reason == "finished"


def test_an_unclosed_thinking_is_the_full_reasoning_for_the_reference_probe_and_best(toy_tokenizer):
    engine = unclosed_engine(toy_tokenizer, [])
    recorded = generate(engine, "Q?", Vanilla(), family="think", probe_interval=1, always_probe=True)
    assert recorded.stop_reason == "unclosed_thinking" and recorded.answer == "7"
    assert recorded.reference is not None and recorded.reference.position == recorded.tokens["reasoning"]
    best = generate(engine, "Q?", CodeStop(answer_from="best"), family="think", probe_interval=1)
    assert best.stop_reason == "unclosed_thinking" and best.probes
    assert best.answer_position == best.tokens["reasoning"]  # the model ended it: no rollback to a probe
