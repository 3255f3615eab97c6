"""The scoring CLI (`nvlm eval score`) and its Python API `score_file`, run on small temporary JSONL files."""

import argparse
import json
import subprocess
import sys
import types

import pytest

from nvlm.eval import metrics
from nvlm.eval.score import ScoreInputError, add_eval_score_parser, main, score_file

TEN_WITH_THREE_TWOS = ["2"] * 3 + ["3"] * 7


def _write_jsonl(path, rows, blank_lines=False):
    lines = []
    for row in rows:
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if blank_lines:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def textvqa_file(tmp_path):
    rows = [
        # nvlm: "two" -> "2", 3 matches -> 1.0; official (GTs differ): k = 3 -> 0.9
        {"question_id": 1, "prediction": "Two", "answers": TEN_WITH_THREE_TWOS},
        # nvlm: 1.0; official: ten identical GTs -> no normalisation -> "Yes" != "yes" -> 0
        {"question_id": 2, "prediction": "Yes", "answers": ["yes"] * 10},
        # empty prediction -> 0 in both
        {"question_id": 3, "prediction": "", "answers": ["yes"] * 10},
    ]
    return _write_jsonl(tmp_path / "preds.jsonl", rows, blank_lines=True)


def _run_json(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_json_aggregate_both_protocols(textvqa_file, capsys):
    agg = _run_json(["textvqa", textvqa_file, "--json"], capsys)
    # (1 + 1 + 0) / 3 * 100
    assert agg == {"benchmark": "textvqa", "protocol": "nvlm", "n": 3, "score": pytest.approx(200 / 3)}
    agg = _run_json(["textvqa", textvqa_file, "--protocol", "official", "--json"], capsys)
    # (0.9 + 0 + 0) / 3 * 100
    assert agg["protocol"] == "official" and agg["n"] == 3
    assert agg["score"] == pytest.approx(30.0)


def test_per_sample_file(textvqa_file, tmp_path, capsys):
    out = tmp_path / "scored.jsonl"
    assert main(["textvqa", textvqa_file, "--per-sample", str(out), "--protocol", "official"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3]
    assert [r["score"] for r in rows] == pytest.approx([0.9, 0.0, 0.0])
    assert rows[0]["answers"] == TEN_WITH_THREE_TWOS and rows[0]["prediction"] == "Two"
    assert {p.name for p in tmp_path.iterdir()} == {"preds.jsonl", "scored.jsonl"}  # no temp file left behind
    # Human-readable table without --json.
    text = capsys.readouterr().out
    assert "official" in text and "30.00" in text


def test_malformed_line(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prediction": "a", "answers": ["a"]}, '{"prediction": "a", '])
    assert main(["vqav2", path, "--json"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "malformed JSON" in err and "Traceback" not in err


def test_missing_field_names_line_and_field(tmp_path, capsys):
    rows = [{"prediction": "a", "answers": ["a"]}, "", {"prediction": "b"}]
    path = _write_jsonl(tmp_path / "missing.jsonl", rows)
    # Blank line 2 is skipped; the third physical line lacks `answers`.
    assert main(["docvqa", path]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "'answers'" in err
    # OCRBench additionally needs dataset_name and type.
    path = _write_jsonl(tmp_path / "ocr.jsonl", [{"prediction": "a", "answers": "a", "type": "Doc-oriented VQA"}])
    with pytest.raises(ScoreInputError, match="line 1: missing required field 'dataset_name'"):
        score_file("ocrbench", path)


def test_non_object_line_and_empty_file(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "list.jsonl", ['["a"]'])
    assert main(["chartqa", path]) == 2
    assert "line 1: expected a JSON object" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ScoreInputError, match="no records"):
        score_file("chartqa", str(empty))
    assert main(["chartqa", str(tmp_path / "absent.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_ocrbench_sum_and_subscores(tmp_path, capsys):
    rows = [
        # two alternatives match: nvlm 2, official 1
        {"prediction": "news agency newsagency", "answers": ["NEWSAGENCY", "NEWS AGENCY"],
         "dataset_name": "IIIT5K", "type": "Regular Text Recognition"},
        {"prediction": "x^{2}", "answers": "x ^ { 2 }", "dataset_name": "HME100k",
         "type": "Handwritten Mathematical Expression Recognition"},
        {"prediction": "no", "answers": ["yes"], "dataset_name": "docVQA", "type": "Doc-oriented VQA"},
    ]  # fmt: skip
    path = _write_jsonl(tmp_path / "ocr.jsonl", rows)
    agg = _run_json(["ocrbench", path, "--json"], capsys)
    assert agg["score"] == 3 and agg["n"] == 3
    assert agg["subscores"] == {"text_recognition": 2, "scene_text_vqa": 0, "doc_vqa": 0, "kie": 0, "hmer": 1}
    agg = score_file("ocrbench", path, protocol="official")
    assert agg["score"] == 2 and agg["subscores"]["text_recognition"] == 1
    assert list(agg)[:4] == ["benchmark", "protocol", "n", "score"]


def test_add_eval_score_parser_wires_a_handler(textvqa_file, capsys):
    parser = argparse.ArgumentParser(prog="nvlm")
    verbs = parser.add_subparsers(dest="verb")
    eval_verbs = verbs.add_parser("eval").add_subparsers(dest="eval_verb")
    add_eval_score_parser(eval_verbs)
    args = parser.parse_args(["eval", "score", "textvqa", textvqa_file, "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(200 / 3)


def test_bad_arguments_exit_2(textvqa_file, capsys):
    for argv in (["textvqa2", textvqa_file], ["textvqa", textvqa_file, "--protocol", "lmms"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    with pytest.raises(ValueError, match="nvlm, official"):
        score_file("textvqa", textvqa_file, protocol="megatron")


def test_batch_scorer_and_scoring_errors(tmp_path, monkeypatch):
    seen = {}

    def score_batch(records, protocol, *, timeout):
        seen["timeout"], seen["n"] = timeout, len(records)
        return [1.0 if r["completion"] == "ok" else 0.0 for r in records]

    def score(record, protocol="nvlm"):
        if record["answer"] == "boom":
            raise KeyError("gold")
        return 1.0

    fake = types.ModuleType("nvlm.eval.metrics._fake")
    fake.score, fake.score_batch = score, score_batch
    monkeypatch.setitem(sys.modules, "nvlm.eval.metrics._fake", fake)
    monkeypatch.setitem(metrics.BENCHMARKS, "fakebatch", ("_fake", "score"))
    monkeypatch.setitem(metrics.REQUIRED_FIELDS, "fakebatch", ("completion|prediction",))
    path = _write_jsonl(tmp_path / "b.jsonl", [{"completion": "ok"}, {"prediction": "x", "completion": "no"}])
    agg = score_file("fakebatch", path, timeout=7.5)
    assert seen == {"timeout": 7.5, "n": 2} and agg["score"] == 50.0

    del fake.score_batch
    monkeypatch.setitem(metrics.REQUIRED_FIELDS, "fakebatch", ("answer",))
    path = _write_jsonl(tmp_path / "c.jsonl", [{"answer": "fine"}, {"answer": "boom"}])
    with pytest.raises(ScoreInputError, match="line 2: cannot score this record"):
        score_file("fakebatch", path)


def test_module_entry_point(textvqa_file):
    proc = subprocess.run(
        [sys.executable, "-m", "nvlm.eval.score", "textvqa", textvqa_file, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["n"] == 3
