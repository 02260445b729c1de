"""The step rules, table-driven, with no engine: a toy byte vocabulary stands in for a tokenizer."""

from __future__ import annotations

import pytest
from scripted import ToyTokenizer

from codestop.steps import IncrementalDecoder, StepRules, StepScanner, closing_brace_index, decode_text, probe_answer

EOS = 0


class Vocab(ToyTokenizer):
    """The toy byte tokenizer, counting its decode calls."""

    decodes = 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        self.decodes += 1
        return super().decode(ids)


SNOWMAN = "\u2603".encode()  # 3 bytes
WORDS = StepRules(separators=("\n\n",), words=("Wait", "But wait", "Alternatively"), stop_texts=("</think>",))

# (name, rules, pieces fed, held pieces, max_tokens, expected end kind, kept text, carried pieces, tokens fed before the end)
CASES = [
    ("separator ends after it", WORDS, ["So x", " = 5.", "\n\n", "Next"], [], 99, "boundary", "So x = 5.\n\n", [], 3),
    ("separator inside a token", WORDS, ["a", ".\n\n"], [], 99, "boundary", "a.\n\n", [], 2),
    ("word ends before it, once the next character is known", WORDS, ["x = 5.", " Wait", ",", " no"], [], 99, "boundary", "x = 5.", [" Wait", ","], 3),
    ("a word split over two tokens", WORDS, ["x = 5. ", "Wa", "it", " no"], [], 99, "boundary", "x = 5. ", ["Wa", "it", " no"], 4),
    ("Waiting is no boundary", WORDS, ["I am", " Wait", "ing", " here", "\n\n"], [], 99, "boundary", "I am Waiting here\n\n", [], 5),
    ("a word inside a word is no boundary", WORDS, ["xWait", "ed", " it", "\n\n"], [], 99, "boundary", "xWaited it\n\n", [], 4),
    ("two-word boundary", WORDS, ["ok.", " But wait", " what"], [], 99, "boundary", "ok.", [" But wait", " what"], 3),
    ("held word is never matched again", WORDS, [",", " so", "\n\n"], [" Wait"], 99, "boundary", " Wait, so\n\n", [], 3),
    ("stop text kept", WORDS, ["done", "</th", "ink>", "more"], [], 99, "stop_text", "done</think>", [], 3),
    ("eos not kept", WORDS, ["x", "<eos>"], [], 99, "eos", "x", [], 2),
    ("length counts held tokens", WORDS, ["b", "c", "d"], [" Wait"], 3, "length", " Waitbc", [], 2),
    (
        "multi-byte character split over tokens",
        WORDS, [b"snow " + SNOWMAN[:2], SNOWMAN[2:] + b" man", "\n\n"], [], 99, "boundary", "snow \u2603 man\n\n", [], 3,
    ),
    ("no words: only separators", StepRules(separators=("\n\n",)), ["Wait", ",", "\n\n"], [], 99, "boundary", "Wait,\n\n", [], 3),
    ("a client stop string cuts the text", StepRules(stops=("###",)), ["The answer", " is 5", "#", "## more"], [], 99, "stop", "The answer is 5", [], 4),
    ("close box at the closing brace", StepRules(close_box=True), ["\\frac{1", "}{2", "}", "}", " and"], [], 99, "stop_text", "\\frac{1}{2}}", [], 4),
]


@pytest.mark.parametrize("name,rules,pieces,held,max_tokens,kind,kept,carried,fed", CASES, ids=[c[0] for c in CASES])
def test_scanner(name, rules, pieces, held, max_tokens, kind, kept, carried, fed):
    v = Vocab()
    ids = [EOS if p == "<eos>" else v.ids(p)[0] for p in pieces]
    held_ids = v.ids(*held) if held else []
    scanner = StepScanner(v.decode, rules, {EOS}, max_tokens, held_ids)
    shown = ""
    end = None
    n = 0
    for tok in ids:
        n += 1
        end = scanner.feed(tok)
        shown += scanner.take_text()
        if end is not None:
            break
    assert end is not None, f"{name}: the step did not end"
    assert (end.kind, n) == (kind, fed)
    assert scanner.kept_text() == kept
    assert list(end.carry) == (v.ids(*carried) if carried else [])
    assert scanner.ids[: end.keep] + list(end.carry) == held_ids + [t for t in ids[:fed] if t != EOS]
    # what was shown live is exactly the kept text
    assert shown + scanner.take_text() == kept


def test_live_text_never_shows_a_word_that_is_carried():
    v = Vocab()
    scanner = StepScanner(v.decode, WORDS, {EOS}, 99)
    shown = []
    for tok in v.ids("The answer", " is 5.", " Wa", "it", ","):
        scanner.feed(tok)
        shown.append(scanner.take_text())
    assert "".join(shown) == "The answer is 5."
    assert "Wa" not in "".join(shown)


def test_live_text_never_shows_part_of_a_stop_string():
    v = Vocab()
    scanner = StepScanner(v.decode, StepRules(stops=("</answer>",)), {EOS}, 99)
    shown = []
    for tok in v.ids("It is 5", "</ans", "wer", ">"):
        scanner.feed(tok)
        shown.append(scanner.take_text())
    assert "".join(shown) + scanner.take_text() == "It is 5"


def test_feeding_after_the_end_is_an_error():
    v = Vocab()
    scanner = StepScanner(v.decode, WORDS, {EOS}, 99)
    scanner.feed(EOS)
    with pytest.raises(RuntimeError):
        scanner.feed(v.ids("x")[0])


def test_incremental_decoder_is_linear_and_whole():
    v = Vocab()
    ids = v.ids(*(["ab"] * 500), SNOWMAN[:1], SNOWMAN[1:])
    dec = IncrementalDecoder(v.decode)
    v.decodes = 0
    for i in ids:
        dec.add(i)
    assert dec.text == "ab" * 500 + "\u2603"
    assert v.decodes <= 2 * len(ids)  # a bounded window per token, never the whole prefix
    assert "\ufffd" not in dec.text
    assert dec.ends[-2] == dec.ends[-3]  # the half character added no text yet


def test_probe_answer_counts_answer_tokens():
    v = Vocab()
    cases = [
        (["4", "2", "}"], "42", 2),
        (["42}"], "42", 1),
        (["\\frac{", "1}{2", "}}"], "\\frac{1}{2}", 3),
        (["7", " }", " more"], "7", 1),
        (["unfinished"], "unfinished", 1),
        ([b"x" + SNOWMAN[:1], SNOWMAN[1:] + b"}"], "x\u2603", 2),
    ]
    for pieces, answer, n in cases:
        dec = IncrementalDecoder(v.decode, v.ids(*pieces))
        assert probe_answer(dec) == (answer, n), pieces


def test_closing_brace_and_decode_text():
    assert closing_brace_index("1}{") == 1
    assert closing_brace_index("{1}") is None
    v = Vocab()
    assert decode_text(v.decode, v.ids(b"a" + SNOWMAN[:1], SNOWMAN[1:])) == "a\u2603"
