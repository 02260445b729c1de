"""Benchmarks as lists of :class:`Example`: from the Hugging Face hub, or from a local file.

Named datasets: ``gsm8k``, ``math500``, ``aime24``, ``aime25``, ``gpqa-diamond``. Each loads from
the hub by default (``datasets.load_dataset``; GPQA is gated: accept its terms on the hub and log in
with ``huggingface-cli login`` or set ``HF_TOKEN``), or from a local copy given with ``data=PATH``
in the hub's own format (JSONL, or CSV for GPQA; ``.gz`` allowed). Any other JSONL/CSV file with a
question column (``question``, ``problem`` or ``prompt``) and an answer column (``answer``,
``gold`` or ``final_answer``) loads as a dataset of its own (graded with math-verify).

Ids: the file's ``id`` / ``unique_id`` / ``Record ID`` when it has one, else ``dataset:line`` (the
1-based line of the JSONL file, the 1-based data row of a CSV, the 1-based row on the hub).

GPQA: the four options are shuffled with a seed derived from the question's id (the same order on
every run and machine) and the gold is the correct option's letter. Its questions are never printed:
error messages name the file and line only.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codestop.errors import CodestopError
from codestop.grading import GradeKind, gold_from_gsm8k


@dataclass(frozen=True)
class Example:
    """One question: ``id``, the ``question`` text the model sees, the ``gold`` answer and how to
    grade it (``kind``: integer, math or choice)."""

    id: str
    question: str
    gold: str
    kind: GradeKind
    dataset: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub: tuple[str, str | None, str]  # (repository, config, split)
    question_field: str
    answer_field: str
    id_field: str | None
    kind: GradeKind


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("gsm8k", ("openai/gsm8k", "main", "test"), "question", "answer", None, "integer"),
    "math500": DatasetSpec("math500", ("HuggingFaceH4/MATH-500", None, "test"), "problem", "answer", "unique_id", "math"),
    "aime24": DatasetSpec("aime24", ("HuggingFaceH4/aime_2024", None, "train"), "problem", "answer", "id", "integer"),
    "aime25": DatasetSpec("aime25", ("math-ai/aime25", None, "test"), "problem", "answer", "id", "integer"),
    "gpqa-diamond": DatasetSpec(
        "gpqa-diamond", ("Idavidrein/gpqa", "gpqa_diamond", "train"), "Question", "Correct Answer", "Record ID", "choice"
    ),
}

QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "gold", "final_answer")
ID_FIELDS = ("id", "unique_id", "Record ID")
GPQA_WRONG = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LETTERS = "ABCD"


def load_examples(dataset: str | None = None, data: str | os.PathLike[str] | None = None, limit: int | None = None,
                  offset: int = 0) -> list[Example]:
    """The first ``limit`` questions (all when None) of ``dataset`` after its first ``offset``, from
    ``data`` when given, else from the hub. With ``data`` and no ``dataset``, the file is read as a
    generic question/answer file named after its stem."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit: {limit!r} must be >= 1")
    if offset < 0:
        raise ValueError(f"offset: {offset!r} must be >= 0")
    if data is None:
        if dataset is None:
            raise CodestopError("dataset: give --dataset (" + ", ".join(DATASETS) + ") or --data PATH")
        spec = _spec(dataset)
        rows: Iterator[tuple[str, dict[str, Any]]] = _hub_rows(spec)
    else:
        path = Path(data).expanduser()
        if not path.is_file():
            raise CodestopError(f"data: {str(path)!r} is not a file; give a JSONL or CSV file")
        if dataset is not None and dataset in DATASETS:
            spec = DATASETS[dataset]
        elif dataset is not None:
            raise CodestopError(_unknown(dataset))
        else:
            spec = _generic_spec(_stem(path), path)
        rows = _file_rows(path)
    out: list[Example] = []
    for i, (where, row) in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        if i >= offset:  # rows skipped are not checked: a bad row outside the selection does not matter
            out.append(_example(spec, where, row))
    return out


def _unknown(name: str) -> str:
    return (
        f"dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
        "or pass --data PATH (a JSONL or CSV file with question and answer columns)"
    )


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise CodestopError(_unknown(name)) from None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".csv"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _generic_spec(name: str, path: Path) -> DatasetSpec:
    first = next(iter(_file_rows(path)), None)
    if first is None:
        raise CodestopError(f"data: {path} has no rows")
    where, row = first
    q = next((f for f in QUESTION_FIELDS if f in row), None)
    a = next((f for f in ANSWER_FIELDS if f in row), None)
    if q is None or a is None:
        missing = "question" if q is None else "answer"
        wanted = QUESTION_FIELDS if q is None else ANSWER_FIELDS
        raise CodestopError(
            f"data: {where}: no {missing} column (looked for {', '.join(wanted)}; the row has {', '.join(map(str, row)) or 'none'})"
        )
    return DatasetSpec(name, ("", None, ""), q, a, None, "math")


# --------------------------------------------------------------------------------------------
# Reading rows: (where, row) pairs, where = "file:line" for messages and ids
# --------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")  # type: ignore[return-value]


def _file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    is_csv = ".csv" in path.suffixes or path.suffix == ".csv"
    try:
        with _open_text(path) as fh:
            if is_csv:
                reader = csv.DictReader(fh)
                for n, row in enumerate(reader, start=1):
                    yield f"{path}:{n}", dict(row)
                return
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CodestopError(f"data: {path}:{n}: not valid JSON ({err.msg} at column {err.colno}); fix or remove that line") from None
                if not isinstance(row, dict):
                    raise CodestopError(f"data: {path}:{n}: expected a JSON object with question and answer fields")
                yield f"{path}:{n}", row
    except OSError as err:
        raise CodestopError(f"data: cannot read {str(path)!r} ({err.strerror})") from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error) as err:
        raise CodestopError(f"data: cannot read {str(path)!r} as JSONL or CSV text ({err})") from None


def _hub_rows(spec: DatasetSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    repo, config, split = spec.hub
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, config, split=split)
    except Exception as err:  # noqa: BLE001 - network, auth and hub errors all mean the same to a user
        gated = " (GPQA is gated: accept its terms on huggingface.co and run `huggingface-cli login` or set HF_TOKEN)" if spec.kind == "choice" else ""
        raise CodestopError(
            f"dataset: could not load {spec.name} from the Hugging Face hub ({repo}){gated}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; or pass --data PATH to a local copy"
        ) from None
    for n, row in enumerate(ds, start=1):
        yield f"{repo}:{n}", dict(row)


# --------------------------------------------------------------------------------------------
# Rows to examples
# --------------------------------------------------------------------------------------------


def _field(row: dict[str, Any], name: str, where: str) -> str:
    if name not in row or row[name] is None:
        raise CodestopError(f"data: {where}: missing column {name!r} (the row has {', '.join(map(str, row)) or 'none'})")
    value = row[name]
    return value if isinstance(value, str) else str(value)


def _example(spec: DatasetSpec, where: str, row: dict[str, Any]) -> Example:
    line = where.rsplit(":", 1)[1]
    fields = (spec.id_field,) if spec.id_field else ID_FIELDS
    given = next((row[f] for f in fields if row.get(f) not in (None, "")), None)
    ident = str(given) if given is not None else f"{spec.name}:{line}"
    if spec.kind == "choice":
        return _gpqa_example(spec, where, row, ident)
    question = _field(row, spec.question_field, where)
    answer = _field(row, spec.answer_field, where)
    if spec.name == "gsm8k":
        try:
            answer = gold_from_gsm8k(answer)
        except ValueError:
            raise CodestopError(f"data: {where}: the GSM8K answer does not end with '#### N'") from None
    if not question.strip() or not answer.strip():
        raise CodestopError(f"data: {where}: empty question or answer")
    return Example(ident, question.strip(), answer.strip(), spec.kind, spec.name)


def gpqa_order(ident: str) -> list[int]:
    """The option order for one GPQA question: a permutation of 0..3 (0 = the correct answer),
    seeded by the question's id so that every run sees the same order."""
    seed = int.from_bytes(hashlib.sha256(f"codestop-gpqa:{ident}".encode()).digest()[:8], "big")
    order = [0, 1, 2, 3]
    random.Random(seed).shuffle(order)
    return order


def _gpqa_example(spec: DatasetSpec, where: str, row: dict[str, Any], ident: str) -> Example:
    question = _field(row, spec.question_field, where).strip()
    options = [_field(row, spec.answer_field, where).strip()] + [_field(row, f, where).strip() for f in GPQA_WRONG]
    order = gpqa_order(ident)
    lines = [f"{LETTERS[i]}) {options[o]}" for i, o in enumerate(order)]
    text = question + "\n\n" + "\n".join(lines) + "\n\nAnswer with the letter of the correct option."
    gold = LETTERS[order.index(0)]
    return Example(ident, text, gold, "choice", spec.name)
