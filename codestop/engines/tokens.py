"""A Hugging Face tokenizer behind the small interface engines use: the transformers engine's own,
and the server engine's when it is given one (``--tokenizer``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from codestop.errors import CodestopError


class Tokens(Protocol):
    """What an engine asks of a tokenizer: text to ids (special tokens parsed, no BOS) and back."""

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


class HFTokens:
    """A Hugging Face tokenizer: ids without added special tokens, text with special tokens kept."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def load(cls, name: str) -> HFTokens:
        """The tokenizer of a hub id, a local directory or a .gguf file (the server model's)."""
        from transformers import AutoTokenizer

        path = Path(name).expanduser()
        try:
            if path.suffix == ".gguf" and path.is_file():
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            else:
                tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CodestopError(
                f"tokenizer: could not load {name!r} ({first}); give the server model's Hugging Face "
                "tokenizer (a hub id reachable from here, a local directory or its .gguf file), or omit "
                "--tokenizer to use the server's own /tokenize"
            ) from None
        return cls(tok, name)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def eos_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return {eos} if isinstance(eos, int) else set()

    def chat_template_text(self) -> str:
        return getattr(self.tokenizer, "chat_template", "") or ""

    def render(self, messages: list[dict[str, str]], **kwargs: Any) -> str | None:
        """The chat template rendered with the generation prompt; None for a model without one."""
        if not self.chat_template_text():
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
