"""Where a reasoning step ends: the one set of rules, fed one token at a time.

Every engine feeds the tokens it gets (sampled in-process, or streamed by a server) to a
:class:`StepScanner`, so the rules below are written once:

* an end-of-sequence token ends the step and is not kept (``eos``);
* with ``close_box`` (the forced answer, whose context ends inside ``\\boxed{``), the "}" that
  closes the box ends the step, kept (``stop_text``);
* a stop text the model writes (e.g. ``</think>``) ends the step, kept (``stop_text``);
* a client's stop string (OpenAI's ``stop``) ends the step; its tokens are kept (they were
  generated) but the text ends before it (``stop``);
* a boundary word (e.g. "Wait") ends the step just before the word: at a word start, and only once
  the character after it is known and is not a letter ("Waiting" is no boundary). The tokens that
  carry the word (from the one where it starts) are held back and start the next step, so a probe's
  context ends just before the word (``boundary``);
* a separator (e.g. a blank line) ends the step just after the token that completes it
  (``boundary``);
* ``max_tokens`` tokens in the step, held-back ones included, end it (``length``).

Text is decoded incrementally (:class:`IncrementalDecoder`), safe for characters split across
tokens. What the scanner hands out to show live (:meth:`StepScanner.take_text`) is exactly the text
of the tokens the step keeps: text that a boundary word may still carry into the next step is
held back until it is known, so a live stream and the final reasoning text never differ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Decode = Callable[[Sequence[int]], str]
EndKind = Literal["boundary", "stop_text", "stop", "eos", "length"]


def closing_brace_index(text: str) -> int | None:
    """Index of the "}" that closes a box opened just before ``text`` (depth starts at 1)."""
    depth = 1
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


BOX_OPENERS = ("\\boxed{", "\\fbox{", "\\boxed {")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces respected), or None."""
    at, opener = max((text.rfind(o), o) for o in BOX_OPENERS)
    if at == -1:
        return None
    start = at + len(opener)
    end = closing_brace_index(text[start:])
    if end is None:
        return None
    return text[start : start + end].strip() or None


class IncrementalDecoder:
    """Token ids to text in O(1) per token: each new token is decoded with a few tokens before it
    and only the difference is appended (as vLLM's incremental detokenizer does), so characters
    split across tokens come out whole. ``ends[i]`` is the text length after token i."""

    WINDOW = 6

    def __init__(self, decode: Decode, ids: Iterable[int] = ()) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.ends: list[int] = []
        self._final = 0  # tokens whose text is complete
        for i in ids:
            self.add(i)

    def add(self, token_id: int) -> str:
        """Append a token; returns the text it completed ("" while a character is still split)."""
        self.ids.append(token_id)
        start = max(self._final - self.WINDOW, 0)
        prefix = self.decode(self.ids[start : self._final]) if self._final > start else ""
        full = self.decode(self.ids[start:])
        if full.endswith("\ufffd"):  # an incomplete character: wait for the token that ends it
            self.ends.append(len(self.text))
            return ""
        added = full[len(prefix) :]
        self.text += added
        self._final = len(self.ids)
        self.ends.append(len(self.text))
        return added

    def tokens_before(self, at: int) -> int:
        """How many leading tokens end at or before text index ``at``."""
        keep = 0
        while keep < len(self.ends) and self.ends[keep] <= at:
            keep += 1
        return keep

    def text_of(self, n: int) -> str:
        """The text of the first ``n`` tokens."""
        return self.text[: self.ends[n - 1]] if n > 0 else ""


def decode_text(decode: Decode, ids: Sequence[int]) -> str:
    """The text of ``ids``, decoded as a stream would decode them."""
    return IncrementalDecoder(decode, ids).text


@dataclass(frozen=True)
class StepRules:
    """What ends a step: ``separators`` (after), ``words`` (before), ``stop_texts`` (kept),
    ``stops`` (a client's stop strings: the text ends before them) and ``close_box`` for a forced
    answer. ``greedy`` decodes without sampling (answers)."""

    separators: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    stop_texts: tuple[str, ...] = ()
    close_box: bool = False
    greedy: bool = False
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepEnd:
    """How a step ended: ``keep`` leading tokens of the step go into the context; ``carry`` (the
    tokens of a boundary word) start the next step."""

    kind: EndKind
    keep: int
    carry: tuple[int, ...] = ()


class StepScanner:
    """The rules of the module docstring over one step's tokens. ``held``: tokens carried from the
    previous step (already in the step, never matched as a boundary again)."""

    def __init__(
        self,
        decode: Decode,
        rules: StepRules,
        eos_ids: Iterable[int],
        max_tokens: int,
        held: Sequence[int] = (),
    ) -> None:
        self.rules = rules
        self.eos_ids = frozenset(eos_ids)
        self.max_tokens = max_tokens
        self.decoder = IncrementalDecoder(decode, held)
        self.search_from = max(1, len(self.decoder.text))  # a word must start after the held text
        self.longest_word = max((len(w) for w in rules.words), default=0)
        self.longest_stop = max((len(s) for s in rules.stops), default=0)
        self.cut_at: int | None = None  # where a client's stop string starts: the text ends there
        self._word_re = re.compile("|".join(re.escape(w) for w in sorted(rules.words, key=len, reverse=True))) if rules.words else None
        self.shown = 0
        self.end: StepEnd | None = None
        if len(held) >= max_tokens:
            self.end = StepEnd("length", len(held))

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids

    @property
    def text(self) -> str:
        return self.decoder.text

    def feed(self, token_id: int) -> StepEnd | None:
        """One generated token; returns how the step ended when this token ends it."""
        if self.end is not None:
            raise RuntimeError("feed: the step has already ended")
        if token_id in self.eos_ids:
            self.end = StepEnd("eos", len(self.ids))
            return self.end
        before = len(self.decoder.text)
        added = self.decoder.add(token_id)
        text = self.decoder.text
        n = len(self.ids)
        if added:
            if self.rules.close_box and closing_brace_index(text) is not None:
                self.end = StepEnd("stop_text", n)
            elif any(text.find(s, max(0, before - len(s) + 1)) != -1 for s in self.rules.stop_texts):
                self.end = StepEnd("stop_text", n)
            elif (cut := self._stop_at(before)) is not None:
                self.cut_at = cut
                self.end = StepEnd("stop", n)
            elif (at := self._word_at(before)) is not None:
                keep = self.decoder.tokens_before(at)
                self.end = StepEnd("boundary", keep, tuple(self.ids[keep:]))
            elif any(sep in text[max(0, before - len(sep) + 1) :] for sep in self.rules.separators):
                self.end = StepEnd("boundary", n)
        if self.end is None and n >= self.max_tokens:
            self.end = StepEnd("length", n)
        return self.end

    def _word_at(self, before: int) -> int | None:
        """Start of the first boundary word decided by the text added after index ``before``: at a
        word start, with a known next character that is not a letter."""
        if self._word_re is None:
            return None
        text = self.decoder.text
        lo = max(self.search_from, before - self.longest_word)
        for m in self._word_re.finditer(text, lo):
            start, end = m.start(), m.end()
            if end >= len(text):  # the next character is not known yet
                return None
            if start > 0 and text[start - 1].isalnum():
                continue
            if text[end].isalpha():
                continue
            return start
        return None

    def _stop_at(self, before: int) -> int | None:
        """Start of the first client stop string completed by the text added after ``before``."""
        text = self.decoder.text
        found = [i for s in self.rules.stops if (i := text.find(s, max(0, before - len(s) + 1))) != -1]
        return min(found) if found else None

    def take_text(self) -> str:
        """Text that is now certain to be kept and was not handed out yet (to show live). After
        the end, the rest of the kept text."""
        if self.end is not None:
            limit = len(self.kept_text())
        elif self._word_re is None:
            limit = len(self.decoder.text)
        else:
            # a boundary word ending later starts within the last ``longest_word`` characters, and
            # carries the whole token it starts in: hold back from that token's start
            limit = 0
            cut = len(self.decoder.text) - self.longest_word
            for e in reversed(self.decoder.ends):
                if e <= cut:
                    limit = e
                    break
        if self.end is None and self.longest_stop:  # a stop string may still be completing
            limit = min(limit, len(self.decoder.text) - self.longest_stop + 1)
        if limit <= self.shown:
            return ""
        piece = self.decoder.text[self.shown : limit]
        self.shown = limit
        return piece

    def kept_text(self) -> str:
        """The text of the tokens the ended step keeps."""
        assert self.end is not None
        text = self.decoder.text_of(self.end.keep)
        return text[: self.cut_at] if self.cut_at is not None else text


def probe_answer(decoder: IncrementalDecoder) -> tuple[str, int]:
    """For a probe continuation after ``\\boxed{``: the answer (the text before the closing brace,
    stripped) and how many leading tokens are answer tokens. The token that holds the closing brace
    counts only when it also carries answer text before the brace (e.g. "5}")."""
    text = decoder.text
    idx = closing_brace_index(text)
    if idx is None:
        return text.strip(), len(decoder.ids)
    n = decoder.tokens_before(idx)
    if n < len(decoder.ids):
        start = decoder.ends[n - 1] if n > 0 else 0
        if text[start:idx].strip():
            n += 1
    return text[:idx].strip(), n
