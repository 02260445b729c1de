"""A toy tokenizer and the one scripted in-process engine the tests use.

``ToyTokenizer`` is a byte-level tokenizer small enough to read: id 0 is EOS, then special tokens,
then byte pieces matched longest first, decoded like a byte-level BPE tokenizer (U+FFFD for a
character cut short). ``toy_tokenizer()`` is the one model-free tests use in place of a real model's
(SmolLM2's takes seconds to load): ChatML special tokens, ``<think>``/``</think>``, every byte, and
whole words, with a Jinja chat template rendered as Hugging Face renders one.

``ScriptedEngine`` is a deterministic ``LocalEngine`` whose "model" writes a fixed reasoning script
token by token and answers every probe or forced answer (after "\\boxed{") with fixed text, or
follows any ``next_token`` function given. Real models are exercised by the engine tests; this one
pins down boundaries, budgets and accounting to the token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from codestop.engines.local import LocalBackend, LocalEngine

TOY_EOS = 0

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# whole-word pieces of the toy vocabulary (a leading space belongs to the word, as in GPT-2's BPE);
# anything else is spelled in bytes, so the vocabulary never grows while a model runs
WORDS = (
    "Step one two three four So plus But wait Wait Alternatively maybe it is the a answer apples bit More Done Think "
    "Please reason step by and put your final within Final Answer The boxed"
)


class ToyTokenizer:
    """Byte pieces, longest known piece first; id 0 is EOS. Shaped like a Hugging Face tokenizer
    (``encode``, ``decode``, ``eos_token_id``, ``len``, ``chat_template``, ``apply_chat_template``).
    ``ids`` adds the pieces a test chooses (a word over two tokens, a character cut in two)."""

    eos_token_id = TOY_EOS

    def __init__(self, eos: str = "<eos>", special: Iterable[str] = (), pieces: Iterable[bytes] = (), chat_template: str = "") -> None:
        self.pieces: list[bytes] = []
        self.index: dict[bytes, int] = {}
        self.special = set(self.ids(eos, *special))
        self.ids(*pieces)
        self.chat_template = chat_template

    def ids(self, *pieces: str | bytes) -> list[int]:
        out = []
        for p in pieces:
            raw = p.encode() if isinstance(p, str) else p
            if raw not in self.index:
                self.index[raw] = len(self.pieces)
                self.pieces.append(raw)
            out.append(self.index[raw])
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raw, out = text.encode(), []
        longest = max(map(len, self.pieces))
        while raw:  # longest known piece first (special tokens included, as HF parses them), else one byte
            n = next((n for n in range(min(longest, len(raw)), 1, -1) if raw[:n] in self.index), 1)
            out += self.ids(raw[:n])
            raw = raw[n:]
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        kept = (i for i in ids if not (skip_special_tokens and i in self.special))
        return b"".join(self.pieces[i] for i in kept).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(chat_template or self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=self.pieces[0].decode(), **kwargs
        )
        return self.encode(text) if tokenize else text

    def __len__(self) -> int:
        return len(self.pieces)


def toy_tokenizer() -> ToyTokenizer:
    """The fixed toy vocabulary: EOS <|im_end|>, <|im_start|>, <think>, </think>, 256 bytes, the
    words of ``WORDS`` (each alone and after a space), a blank line, and a ChatML template."""
    words = [w.encode() for word in WORDS.split() for w in (word, " " + word)]
    return ToyTokenizer("<|im_end|>", ("<|im_start|>", "<think>", "</think>"), [bytes([b]) for b in range(256)] + words + [b"\n\n"], CHATML)


class ScriptedBackend(LocalBackend):
    def __init__(self, engine: ScriptedEngine, prompt_ids: Sequence[int]) -> None:
        self.engine = engine
        self.history: list[int] = []
        self.prompt_len = len(prompt_ids)
        self._logits: np.ndarray | None = None
        self.feed(prompt_ids)

    @property
    def n_tokens(self) -> int:
        return len(self.history)

    def feed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        self.history.extend(ids)
        self._logits = self.engine.logits_after(self.history, self.prompt_len)

    def crop(self, n_tokens: int) -> None:
        del self.history[n_tokens:]

    def logits(self) -> np.ndarray:
        assert self._logits is not None
        return self._logits

    def set_logits(self, logits: np.ndarray) -> None:
        self._logits = logits


class ScriptedEngine(LocalEngine):
    """Writes ``script`` after any prompt, then EOS; after the last "\\boxed{" opened off the
    script (a probe, the forced answer) writes ``answer``, then EOS. ``next_token(context,
    prompt_len)`` replaces that model. Whatever the vocabulary's size, the one next token has
    probability ``confidence`` (so a probe's confidence is ``confidence``), the rest share what is left."""

    name = "scripted"

    def __init__(self, tokenizer, script: str = "", answer: str = "5}", confidence: float = 0.75, window: int | None = None,
                 next_token: Callable[[list[int], int], int] | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.model_name = "scripted"
        self.script = tokenizer.encode(script, add_special_tokens=False)
        self.answer = tokenizer.encode(answer, add_special_tokens=False)
        self.confidence = confidence
        self.context_window = window
        self.next_token = next_token or self._next

    def logits_after(self, history: list[int], prompt_len: int) -> np.ndarray:
        vocab = len(self.tokenizer)
        logits = np.full(vocab, np.log((1 - self.confidence) / (vocab - 1)))
        logits[self.next_token(history, prompt_len)] = np.log(self.confidence)
        return logits

    def _next(self, history: list[int], prompt_len: int) -> int:
        gen = history[prompt_len:]
        if gen == self.script[: len(gen)]:  # still on the script
            return self.script[len(gen)] if len(gen) < len(self.script) else self.tokenizer.eos_token_id
        # asked for an answer (a probe or a forced answer): write it after the last "\\boxed{"
        text = self.tokenizer.decode(gen)
        at = text.rfind("\\boxed{")
        if at == -1:
            return self.tokenizer.eos_token_id
        j = len(gen)
        while j > 0 and self.tokenizer.decode(gen[: j - 1]).rfind("\\boxed{") == at:
            j -= 1
        written = len(gen) - j
        return self.answer[written] if written < len(self.answer) else self.tokenizer.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({self.tokenizer.eos_token_id})

    def chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def new_backend(self, prompt_ids: Sequence[int]) -> ScriptedBackend:
        return ScriptedBackend(self, prompt_ids)
