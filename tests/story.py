"""A scripted engine whose probe answer depends on how far its reasoning got: the guard's tests
(tests/test_guard.py) need stops that change the answer, continued from the prompt plus the
reasoning up to the stop (a new session that must pick the script up where it was)."""

from __future__ import annotations

from collections.abc import Callable

from scripted import ScriptedEngine

ASSISTANT = "<|im_start|>assistant\n"


def story_engine(tokenizer, script: str, answer: Callable[[str], str]) -> ScriptedEngine:
    """``script`` written after the chat prompt, wherever a session starts in it (the text after the
    last assistant turn decides); a probe (after "\\boxed{") answers ``answer(reasoning so far)`` and
    a closing brace. Mutable: set ``engine.answer_of`` to shift the traffic."""
    engine = ScriptedEngine(tokenizer, script)
    engine.answer_of = answer  # type: ignore[attr-defined]
    eos = tokenizer.eos_token_id

    def next_token(history: list[int], prompt_len: int) -> int:
        text = tokenizer.decode(history)
        written = text[text.rfind(ASSISTANT) + len(ASSISTANT):] if ASSISTANT in text else text
        at = written.rfind("\\boxed{")
        if at == -1:
            if script.startswith(written) and len(written) < len(script):
                return tokenizer.encode(script[len(written):])[0]
            return eos
        said = engine.answer_of(written[:at]) + "}"  # type: ignore[attr-defined]
        so_far = written[at + len("\\boxed{"):]
        return tokenizer.encode(said[len(so_far):])[0] if len(so_far) < len(said) and said.startswith(so_far) else eos

    engine.next_token = next_token
    return engine
