"""Answer extraction and grading.

* :func:`extract_answer`: the answer a model wrote (the last ``\\boxed{}``
  after its thinking, :func:`codestop.steps.extract_boxed`, else what follows "the answer is").
* :func:`grade`: is a predicted answer right? Three kinds of gold:

  - ``integer`` (GSM8K, AIME): the prediction must be one number (see :func:`normalize_integer`:
    thousands commas, leading zeros, a leading ``$``, a trailing ``.0``, period or unit are allowed)
    and equal the gold. An expression (``16-3-4``, ``204 + 160 + 330``, ``400 + 60 = 460``) is wrong
    even when it evaluates to the gold: the model was asked for the answer, not for a sum to finish.
    This is lm-evaluation-harness's GSM8K **strict-match** rule (its filter takes the number right
    after ``"#### "``, our marker being the box, and compares it exactly), not its flexible-extract
    (the last number anywhere in the text, which would score ``400 + 60 = 460`` right). Where the two
    differ: lm-eval would read ``#### 204 + 160`` as 204, we reject it as not one number; lm-eval
    compares strings, so ``18.0`` is wrong there and right here. Only a gold that is not an integer
    itself falls back to math-verify;
  - ``math`` (MATH-500, your own files): math-verify, the gold wrapped in ``$...$`` (51 MATH-500
    golds do not parse without it) and the prediction in ``\\boxed{}``;
  - ``choice`` (GPQA): the option letter.

math-verify guards its time with ``signal.alarm``, which only works in the main thread, and sympy
can hang on adversarial input. So it runs in a small worker process (started on first use, reused,
killed and restarted when one verification exceeds its time bound): safe from any thread, and a
hang costs ``timeout`` seconds and a ``False``, never the run.
"""

from __future__ import annotations

import atexit
import json
import queue
import re
import subprocess
import sys
import threading
from functools import lru_cache
from typing import IO, Literal

from codestop.families import FAMILIES
from codestop.steps import extract_boxed

GradeKind = Literal["integer", "math", "choice"]
GRADE_KINDS = ("integer", "math", "choice")
VERIFY_TIMEOUT_S = 5.0

# what ends a family's thinking ("</think>", gpt-oss's "<|end|>"): the answer part comes after it
_THINK_ENDS = tuple(dict.fromkeys(f.think_end for f in FAMILIES.values() if f.think_end))


_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is\s*:?|:)\s*\$?([^\n$]+?)\$?\s*(?:\.|$)", re.IGNORECASE | re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The answer written after the thinking: its last boxed answer, else what follows "the answer
    is" / "final answer:". Text before a closing ``</think>`` is ignored when the answer part has
    either; otherwise the whole text is searched (a plain model's answer is its whole output)."""
    after = text
    for end in _THINK_ENDS:
        at = text.rfind(end)
        if at != -1:
            after = text[at + len(end) :]
            break
    for part in (after, text) if after is not text else (text,):
        boxed = extract_boxed(part)
        if boxed is not None:
            return boxed
        matches = _ANSWER_IS.findall(part)
        if matches:
            return matches[-1].strip()
    return None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
# one number, then at most a unit: words, "%", "/" between letters ("km/h"), no digit, no operator
_UNITS_AFTER_NUMBER = re.compile(r"^(-?[\d.,]+)\s*(?:[a-zA-Z%$][a-zA-Z%$ ]*(?:/[a-zA-Z]+)?)?$")


def _strip_latex_noise(text: str) -> str:
    s = text.strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", " ").replace("\\$", "$")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\%", "%")
    for _ in range(3):
        s = _TEXT_WRAP.sub(r"\1", s)
    s = _DEGREES.sub("", s)
    s = s.strip().strip("$").strip()
    if s.endswith("."):
        s = s[:-1]
    return s.strip()


def normalize_integer(text: str | None) -> int | None:
    """The integer ``text`` states when it is one number, or None: ``"2,125"``, ``"025"``, ``"$18"``,
    ``"18."``, ``"18.0"``, ``"336^\\circ"``, ``"\\text{18 dollars}"``, ``"60 km/h"`` all normalise;
    ``"18.5"``, ``"x=3"``, ``"1/2"``, ``"16-3-4"``, ``"204 + 160 + 330"`` do not."""
    if text is None:
        return None
    s = _strip_latex_noise(text)
    m = _UNITS_AFTER_NUMBER.match(s)
    if not m:
        return None
    num = m.group(1)
    if "," in num:
        # thousands separators only: 1,234 or 12,345,678 (a comma list such as "1,2" is a tuple)
        if not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.0+)?", num):
            return None
        num = num.replace(",", "")
    if re.fullmatch(r"-?\d+", num):
        return int(num)
    if re.fullmatch(r"-?\d+\.0*", num):
        return int(num.split(".")[0])
    return None


_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?(?:[\s.):]|$)")


def normalize_choice(text: str | None) -> str | None:
    """The option letter in ``"C"``, ``"(C)"``, ``"C) 4.2 eV"``, ``"\\text{C}"``, ``"\\textbf{(B)}"``."""
    if text is None:
        return None
    s = _strip_latex_noise(text)
    m = _LETTER.match(s)
    return m.group(1).upper() if m else None


def gold_from_gsm8k(solution: str) -> str:
    """GSM8K's gold: the number after ``####`` in the worked solution, thousands commas removed."""
    if "####" not in solution:
        raise ValueError("answer: a GSM8K answer must end with '#### N'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


# --------------------------------------------------------------------------------------------
# math-verify in a worker process
# --------------------------------------------------------------------------------------------


class _VerifyWorker:
    """One long-lived ``python`` child that runs math-verify; restarted after a timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        atexit.register(self.stop)

    def _start(self) -> None:
        self._lines = queue.Queue()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from codestop.grading import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True).start()
        ready = self._lines.get(timeout=120)  # importing sympy and math-verify takes a few seconds
        if ready != "ready":
            raise RuntimeError("grading: the math-verify worker failed to start; is math-verify installed?")

    def stop(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._proc = None

    def verify(self, gold: str, prediction: str, timeout: float) -> bool | None:
        """True / False, or None when it ran out of time."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"gold": gold, "prediction": prediction}) + "\n")
            self._proc.stdin.flush()
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                return None
            if line is None:  # the worker died (e.g. out of memory on a monster expression)
                self.stop()
                return None
            return bool(json.loads(line)["ok"])


def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    assert stream is not None
    for line in stream:
        lines.put(line.strip())
    lines.put(None)


def _serve() -> None:
    """The worker's loop: one JSON request per stdin line, one ``{"ok": bool}`` per stdout line."""
    import logging

    from math_verify import parse, verify

    # it warns on every call that we disabled its signal-based timeout: we bound time from outside
    logging.disable(logging.WARNING)
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            gold = parse("$" + req["gold"] + "$", parsing_timeout=None)  # type: ignore[arg-type]
            pred = parse(req["prediction"], parsing_timeout=None)  # type: ignore[arg-type]
            ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
        except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer
            ok = False
        print(json.dumps({"ok": ok}), flush=True)


_WORKER = _VerifyWorker()


@lru_cache(maxsize=65536)
def math_equal(prediction: str, gold: str, timeout: float = VERIFY_TIMEOUT_S) -> bool:
    """math-verify's judgement of ``\\boxed{prediction}`` against ``$gold$``, within ``timeout``
    seconds (False when it takes longer)."""
    if _strip_latex_noise(prediction).replace(" ", "") == _strip_latex_noise(gold).replace(" ", ""):
        return True
    result = _WORKER.verify(gold, "\\boxed{" + prediction + "}", timeout)
    return bool(result)


def grade(prediction: str | None, gold: str, kind: GradeKind = "math") -> bool:
    """Whether ``prediction`` (an extracted answer, e.g. a box's content) matches ``gold``."""
    if kind not in GRADE_KINDS:
        raise ValueError(f"kind: {kind!r} must be one of {', '.join(GRADE_KINDS)}")
    if prediction is None or not prediction.strip():
        return False
    if kind == "choice":
        letter = normalize_choice(prediction)
        return letter is not None and letter == normalize_choice(gold)
    if kind == "integer":
        want = normalize_integer(gold)
        if want is not None:  # strict: one number equal to the gold, never an expression to evaluate
            return normalize_integer(prediction) == want
    return math_equal(prediction.strip(), gold.strip())


def same_answer(a: str | None, b: str | None, grading: str | None = None) -> bool:
    """Whether two answers say the same thing, compared as the grader compares a prediction with its
    gold for ``grading`` (``integer``: the same number; ``choice``: the same letter; ``math``:
    math-verify). Two missing or empty answers are the same; one missing is not. Without a grading,
    answers that both state one integer compare as numbers, others as text without spaces."""
    a = (a or "").strip()
    b = (b or "").strip()
    if not a or not b:
        return not a and not b
    if grading == "choice":
        la, lb = normalize_choice(a), normalize_choice(b)
        if la is not None and lb is not None:
            return la == lb
    elif grading in ("integer", None):
        na, nb = normalize_integer(a), normalize_integer(b)
        if na is not None and nb is not None:
            return na == nb
    elif grading == "math":
        return math_equal(a, b)
    return _strip_latex_noise(a).replace(" ", "") == _strip_latex_noise(b).replace(" ", "")
