"""`codestop demo`: the built-in problems, the numeric grading, and a reduced run of the real demo."""

from __future__ import annotations

import json

import pytest

from codestop.cli import main
from codestop.demo import demo, load_problems, parse_methods
from codestop.grading import grade, normalize_integer


def test_builtin_problems_are_well_formed():
    problems = load_problems()
    assert len(problems) >= 20
    assert len({p.question for p in problems}) == len(problems)
    for p in problems:
        assert p.question.strip().endswith("?")
        assert normalize_integer(p.answer) == int(p.answer)  # graded as integers, strictly
    assert len(load_problems(3)) == 3
    with pytest.raises(ValueError, match="problems"):
        load_problems(0)
    with pytest.raises(ValueError, match="the demo has"):
        load_problems(len(problems) + 1)


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("29", "29", True),
        ("\\$18", "18", True),
        ("18 dollars", "18", True),
        ("\\text{65 minutes}", "65", True),
        ("1,080", "1080", True),
        ("18.0", "18", True),
        ("17", "18", False),
        ("", "18", False),
        (None, "18", False),
        ("x", "18", False),
        ("-3", "3", False),
    ],
)
def test_answers_are_graded_as_integers(prediction, gold, expected):
    # the demo grades with the eval grader: the answers a small model writes still count
    assert grade(prediction, gold, "integer") is expected


def test_methods_are_checked():
    assert parse_methods("vanilla, codestop") == ["vanilla", "codestop"]
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        parse_methods("vanilla,fast")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("deer,deer")
    with pytest.raises(ValueError, match="at least one"):
        parse_methods(" , ")


def test_cli_rejects_nonsense_in_one_line(capsys):
    assert main(["demo", "--methods", "vanilla,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codestop: error: methods: unknown method 'nope'") and err.count("\n") == 1


@pytest.mark.slow
def test_reduced_demo_runs_and_prints_its_table(tmp_path, capsys):
    """The demo as a user runs it (default model), on one problem and a cap of 160 reasoning tokens:
    every method's row, the table and the JSON report (three methods on three problems took 160-200 s
    of the suite, one problem at the default cap of 500 took 65-80 s, for no more checks)."""
    report_path = tmp_path / "demo.json"
    assert main(["demo", "--problems", "1", "--max-reasoning-tokens", "160", "--out", str(report_path)]) == 0
    out = capsys.readouterr().out
    for heading in ("method", "accuracy", "reasoning", "saving", "overhead", "wall"):
        assert heading in out
    for method in ("vanilla", "deer", "codestop"):
        assert method in out
    report = json.loads(report_path.read_text())
    assert [m["method"] for m in report["methods"]] == ["vanilla", "deer", "codestop"]
    for m in report["methods"]:
        assert m["problems"] == 1 and 0 <= m["accuracy"] <= 1
        assert m["reasoning_tokens"] > 0
    vanilla = report["methods"][0]
    assert vanilla["probe_count"] == vanilla["probes"] == 0 and vanilla["probe_tokens"] == 0
    assert all(r["stop_reason"] in ("finished", "max_reasoning_tokens") for r in report["results"]["vanilla"])
    # greedy decoding and probes that leave the session unchanged: an early stop cuts vanilla's
    # own reasoning short, it never changes it
    vanilla_text = {r["question"]: r["reasoning_text"] for r in report["results"]["vanilla"]}
    for method in ("deer", "codestop"):
        for row in report["results"][method]:
            assert vanilla_text[row["question"]].startswith(row["reasoning_text"])


@pytest.mark.slow
def test_demo_function_on_a_chosen_model(smollm2_path):
    report = demo(str(smollm2_path), problems=1, methods=["vanilla", "codestop"], max_reasoning_tokens=160, show=False)
    assert [s.method for s in report.summaries] == ["vanilla", "codestop"]
    assert report.engine == "llamacpp"
    # the build is named, since greedy answers depend on its CPU kernels
    assert report.engine_build.startswith("llama-cpp-python ") and "CPU kernels: " in report.engine_build
    assert report.to_dict()["engine_build"] == report.engine_build
    saved = report.saving(report.summaries[1])
    assert saved is not None and saved <= 1


def test_the_table_shows_stop_reasons_and_says_when_deer_and_codestop_stop_alike():
    from codestop.demo import DemoReport, MethodSummary

    def rows(*stops):
        return [{"stop_reason": reason, "tokens": {"reasoning": n}} for reason, n in stops]

    summaries = [MethodSummary("deer", 2, 2, 10, 12, 2, 1, 0.1, 1, {"threshold": 2}),
                 MethodSummary("codestop", 2, 2, 10, 12, 2, 1, 0.1, 1, {"confident": 1, "degenerate": 1})]
    alike = DemoReport("m", "e", summaries, {"deer": rows(("threshold", 10), ("threshold", 20)),
                                              "codestop": rows(("confident", 10), ("degenerate", 20))}, 0, 1)
    apart = DemoReport("m", "e", summaries, {"deer": rows(("threshold", 10), ("threshold", 20)),
                                              "codestop": rows(("confident", 10), ("degenerate", 15))}, 0, 1)
    assert "same probe on every problem" in alike.table().caption
    assert "same probe" not in apart.table().caption
    assert alike.table().columns[5].header == "stops"


def test_demo_json_prints_as_every_other_json_does_and_the_old_file_form_still_writes(tmp_path, capsys):
    """Issue 27: ``demo --json FILE`` wrote a file where every other verb's ``--json`` prints. Now
    ``--json`` prints, ``--out FILE`` writes, and ``--json FILE`` still writes, with one line saying so."""
    from codestop.cli.demo import emit, report_file
    from codestop.cli.main import build_parser
    from codestop.demo import DemoReport, MethodSummary

    report = DemoReport("m", "e", [MethodSummary("vanilla", 1, 1, 10, 10, 0, 0, 0.0, 1)], {"vanilla": []}, 0, 1)

    def run(*flags: str) -> tuple[str, str]:
        args = build_parser().parse_args(["demo", *flags])
        emit(report, args.json is True, report_file(args))
        out = capsys.readouterr()
        return out.out, out.err

    out, err = run("--json")
    assert json.loads(out)["methods"][0]["method"] == "vanilla" and err == ""
    out, err = run("--out", str(tmp_path / "new.json"))
    assert out == err == "" and json.loads((tmp_path / "new.json").read_text())["model"] == "m"
    out, err = run("--json", str(tmp_path / "old.json"))
    assert out == "" and err == f"codestop: demo --json FILE is deprecated; use --out {tmp_path / 'old.json'} (--json alone prints the report)\n"
    assert json.loads((tmp_path / "old.json").read_text()) == json.loads((tmp_path / "new.json").read_text())
    assert main(["demo", "--json", str(tmp_path / "x.json"), "--out", str(tmp_path / "y.json")]) == 2  # which one: unclear
