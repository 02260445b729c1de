"""A deterministic in-process engine for testing the session and controller logic exactly.

Its "model" writes a fixed reasoning script token by token and answers every probe or forced
answer with fixed text; the tokenizer and chat template are real (SmolLM2's). Real models are
exercised by the engine tests; this one pins down boundaries, budgets and accounting to the token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codestop.engines.local import LocalBackend, LocalEngine


class ScriptedBackend(LocalBackend):
    def __init__(self, engine: ScriptedEngine, prompt_ids: Sequence[int]) -> None:
        self.engine = engine
        self.history: list[int] = []
        self.prompt_len = len(prompt_ids)
        self.stale = False
        self._logits: np.ndarray | None = None
        self.feed(prompt_ids)

    @property
    def n_tokens(self) -> int:
        return len(self.history)

    def feed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        self.history.extend(ids)
        self.stale = False
        self._logits = self.engine.logits_after(self.history, self.prompt_len)

    def crop(self, n_tokens: int) -> None:
        del self.history[n_tokens:]
        self.stale = True

    def logits(self) -> np.ndarray:
        assert self._logits is not None
        return self._logits

    def set_logits(self, logits: np.ndarray) -> None:
        self._logits = logits
        self.stale = False


class ScriptedEngine(LocalEngine):
    name = "scripted"

    def __init__(self, tokenizer, script: str, answers: Sequence[str] = ("5}",), peak: float = 12.0, window: int | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.model_name = "scripted"
        self.script = tokenizer.encode(script, add_special_tokens=False)
        self.answers = [tokenizer.encode(a, add_special_tokens=False) for a in answers]
        self.peak = peak
        self.context_window = window
        self.probes_seen = 0

    def logits_after(self, history: list[int], prompt_len: int) -> np.ndarray:
        vocab = len(self.tokenizer)
        logits = np.zeros(vocab, dtype=np.float32)
        nxt = self._next(history, prompt_len)
        logits[nxt] = self.peak
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
        answer = self.answers[min(self.probes_seen, len(self.answers) - 1)]
        return answer[written] if written < len(answer) else self.tokenizer.eos_token_id

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


TOY_EOS = 0


class ToyTokenizer:
    """Byte pieces, decoded like a byte-level BPE tokenizer (U+FFFD for a character cut short);
    id 0 is EOS. Shaped like a Hugging Face tokenizer for ``HFTokens``."""

    eos_token_id = TOY_EOS
    chat_template = ""

    def __init__(self) -> None:
        self.pieces: list[bytes] = [b"<eos>"]

    def ids(self, *pieces: str | bytes) -> list[int]:
        out = []
        for p in pieces:
            raw = p.encode() if isinstance(p, str) else p
            if raw not in self.pieces:
                self.pieces.append(raw)
            out.append(self.pieces.index(raw))
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raw, out = text.encode(), []
        while raw:  # longest known piece first, else one byte
            piece = max((p for p in self.pieces[1:] if raw.startswith(p)), key=len, default=raw[:1])
            out += self.ids(piece)
            raw = raw[len(piece) :]
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return len(self.pieces)
