"""Datasets: local copies in the hub's formats, generic question/answer files, GPQA's fixed
shuffle, and one clear message (file and line) for every data error a user can make."""

from __future__ import annotations

import gzip
import json

import pytest

from codestop.cli import main
from codestop.datasets import DATASETS, gpqa_order, load_examples
from codestop.engines.base import CodestopError


def test_local_copies_load_with_ids_and_golds(shared_data):
    gsm = load_examples("gsm8k", shared_data / "gsm8k_test.jsonl")
    assert len(gsm) == 1319
    assert gsm[0].id == "gsm8k:1" and gsm[0].gold == "18" and gsm[0].kind == "integer"
    assert all("," not in e.gold for e in gsm)  # thousands commas removed from "#### 2,125"
    math500 = load_examples("math500", shared_data / "math500_test.jsonl", limit=5)
    assert len(math500) == 5 and math500[0].id == "test/precalculus/807.json"
    assert load_examples("aime24", shared_data / "aime24_test.jsonl")[0].id == "60"
    aime25 = load_examples("aime25", shared_data / "aime25_test.jsonl")
    assert aime25[2].id == "aime25:3" and len(aime25) == 30


def test_gpqa_shuffle_is_fixed_and_grades_a_letter(shared_data):
    first = load_examples("gpqa-diamond", shared_data / "gpqa_diamond.csv.gz")
    again = load_examples("gpqa-diamond", shared_data / "gpqa_diamond.csv.gz")
    assert len(first) == 198
    assert [(e.id, e.question, e.gold) for e in first] == [(e.id, e.question, e.gold) for e in again]
    assert {e.gold for e in first} == set("ABCD")
    assert max(sum(e.gold == x for e in first) for x in "ABCD") < 80  # shuffled, not always "A"
    e = first[0]
    assert e.kind == "choice" and "\nA) " in e.question and "\nD) " in e.question
    order = gpqa_order(e.id)
    assert sorted(order) == [0, 1, 2, 3] and "ABCD"[order.index(0)] == e.gold


def test_generic_jsonl_and_csv_files(tmp_path):
    j = tmp_path / "mine.jsonl"
    j.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"problem": "2+2?", "answer": 4, "id": "q-b"}\n')
    ex = load_examples(data=j)
    assert [(e.id, e.question, e.gold, e.kind) for e in ex] == [("mine:1", "1+1?", "2", "math"), ("q-b", "2+2?", "4", "math")]
    c = tmp_path / "mine.csv"
    c.write_text("question,answer\nWhat is 3?,3\n\"Say 4, please\",4\n")
    ex = load_examples(data=c)
    assert [(e.id, e.gold) for e in ex] == [("mine:1", "3"), ("mine:2", "4")]
    z = tmp_path / "zipped.jsonl.gz"
    z.write_bytes(gzip.compress(b'{"question": "q", "answer": "1"}\n'))
    assert load_examples(data=z)[0].id == "zipped:1"


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n{"question": "c", "answer": "3"}\n')
    with pytest.raises(CodestopError, match=rf"{bad}:2: not valid JSON"):
        load_examples(data=bad)


def test_missing_column_names_file_and_line(tmp_path):
    bad = tmp_path / "gsm.jsonl"
    bad.write_text('{"question": "a", "answer": "x #### 1"}\n{"question": "b"}\n')
    with pytest.raises(CodestopError, match=rf"{bad}:2: missing column 'answer'"):
        load_examples("gsm8k", bad)
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"text": "a", "answer": "1"}\n')
    with pytest.raises(CodestopError, match=rf"{nocol}:1: no question column"):
        load_examples(data=nocol)
    nohash = tmp_path / "nohash.jsonl"
    nohash.write_text('{"question": "a", "answer": "just 5"}\n')
    with pytest.raises(CodestopError, match=rf"{nohash}:1: the GSM8K answer does not end with '#### N'"):
        load_examples("gsm8k", nohash)


def test_unknown_dataset_and_missing_file(tmp_path):
    with pytest.raises(CodestopError, match="unknown dataset 'gsm9k'; choose one of gsm8k"):
        load_examples("gsm9k")
    with pytest.raises(CodestopError, match="is not a file"):
        load_examples("gsm8k", tmp_path / "nope.jsonl")


def test_hub_failure_is_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-codestop-hf-home")
    with pytest.raises(CodestopError, match="could not load aime25 from the Hugging Face hub .*--data PATH"):
        load_examples("aime25")
    with pytest.raises(CodestopError, match="GPQA is gated"):
        load_examples("gpqa-diamond")


def test_cli_data_errors_print_one_line_and_keep_the_run(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    kept = json.dumps({"id": "x", "correct": True}) + "\n"
    out.write_text(kept)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\nnot json\n')
    assert main(["eval", "--data", str(bad), "--model", "unused", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2" in err[0]
    assert main(["eval", "--dataset", "nope", "--model", "unused", "--out", str(out)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert out.read_text() == kept


def test_every_named_dataset_has_a_hub_source():
    for spec in DATASETS.values():
        repo, _, split = spec.hub
        assert "/" in repo and split
