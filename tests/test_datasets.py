"""Datasets: local copies in the hub's formats (made-up rows in tests/fixtures), generic
question/answer files, GPQA's fixed shuffle, and one clear message (file and line) for every data
error a user can make."""

from __future__ import annotations

import gzip
import json

import pytest

from codestop.cli import main
from codestop.errors import CodestopError
from codestop.eval.datasets import DATASETS, gpqa_order, load_examples
from codestop.grading import grade


def test_local_copies_load_with_ids_and_golds(fixture_data):
    gsm = load_examples("gsm8k", fixture_data / "gsm8k_test.jsonl")
    assert [(e.id, e.gold) for e in gsm] == [("gsm8k:1", "14"), ("gsm8k:2", "1250"), ("gsm8k:3", "68"), ("gsm8k:4", "30")]
    assert all(e.kind == "integer" and e.dataset == "gsm8k" for e in gsm)  # "#### 1,250": the comma removed
    assert gsm[0].question.startswith("Mira bakes") and "####" not in gsm[0].question
    assert [e.id for e in load_examples("gsm8k", fixture_data / "gsm8k_test.jsonl", limit=2)] == ["gsm8k:1", "gsm8k:2"]
    math500 = load_examples("math500", fixture_data / "math500_test.jsonl", limit=3)
    assert [e.id for e in math500] == ["test/prealgebra/9001.json", "test/precalculus/9002.json", "test/algebra/9003.json"]
    assert math500[1].gold == "\\left( 2, \\frac{\\pi}{2} \\right)" and math500[1].kind == "math"
    aime24 = load_examples("aime24", fixture_data / "aime24_test.jsonl")
    assert [(e.id, e.gold, e.kind) for e in aime24] == [("901", "025", "integer"), ("902", "401", "integer"), ("903", "400", "integer")]
    aime25 = load_examples("aime25", fixture_data / "aime25_test.jsonl")
    assert len(aime25) == 3 and aime25[2].id == "aime25:3" and aime25[2].gold == "144^\\circ"


def test_gpqa_shuffle_is_fixed_and_grades_a_letter(fixture_data):
    first = load_examples("gpqa-diamond", fixture_data / "gpqa_diamond.csv.gz")
    again = load_examples("gpqa-diamond", fixture_data / "gpqa_diamond.csv.gz")
    assert [(e.id, e.question, e.gold) for e in first] == [(e.id, e.question, e.gold) for e in again]
    # pinned: the order derives from the id alone, the same on every run, machine and Python
    assert [(e.id, e.gold) for e in first] == [("recFAKE0001", "C"), ("recFAKE0003", "B"), ("recFAKE0005", "D")]
    assert load_examples("gpqa-diamond", fixture_data / "gpqa_diamond.csv.gz", limit=1)[0].id == "recFAKE0001"
    correct = ["1/8", "-2", "1,600"]
    for e, right in zip(first, correct):
        assert e.kind == "choice" and e.dataset == "gpqa-diamond"
        assert "\nA) " in e.question and "\nD) " in e.question
        assert f"\n{e.gold}) {right}\n" in e.question  # the gold letter labels the correct option
        order = gpqa_order(e.id)
        assert sorted(order) == [0, 1, 2, 3] and "ABCD"[order.index(0)] == e.gold
        assert grade(e.gold, e.gold, e.kind) and grade(f"({e.gold})", e.gold, e.kind)
        assert not any(grade(x, e.gold, e.kind) for x in "ABCD" if x != e.gold)
        assert not grade(right, e.gold, e.kind)  # the option's text is not its letter


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


def test_offset_skips_questions_without_checking_them(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(6)]
    rows[1] = {"question": "no answer field"}  # a bad row outside the selection does not matter
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_examples(data=path, offset=2, limit=3)
    assert [e.gold for e in got] == ["2", "3", "4"]
    assert [e.gold for e in load_examples(data=path, offset=4)] == ["4", "5"]
    assert load_examples(data=path, offset=10) == []
    with pytest.raises(ValueError, match="offset"):
        load_examples(data=path, offset=-1)


def test_record_names_its_split_and_offset(tiny_engine, tmp_path):
    from codestop.config import GenerationConfig
    from codestop.eval.runner import record

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    out = tmp_path / "t.jsonl"
    gen = GenerationConfig(family="plain", max_reasoning_tokens=6, temperature=0.0)
    traces = record(tiny_engine, data=data, out=out, generation=gen, offset=2, limit=1, split="held-out")
    assert [t["gold"] for t in traces] == ["4"]
    assert traces[0]["config"]["split"] == "held-out" and traces[0]["config"]["offset"] == 2
