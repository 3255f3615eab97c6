"""Text-benchmark scorers (MMLU, GSM8K, MATH, HumanEval): worked examples of the rules in EVAL.md §9-12.

Expected values are derived by hand from the rules (each case's comment says how), not by running the scorers.
HumanEval cases execute real subprocesses; the slowest is a 2 s timeout.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import pytest

from nvlm.eval.metrics import gsm8k, humaneval, math_equiv, mmlu

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# ---------------------------------------------------------------------------------------------------------------
# MMLU


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", 1.0),
        ("B.", 1.0),  # punctuation deleted -> "b"
        ("(B)", 1.0),
        ("**B**", 1.0),
        ("[B]", 1.0),
        ("  b  ", 1.0),  # stripped and lower-cased
        ("B\nBecause Paris is the capital.", 1.0),  # only the text before the first newline
        ("\nB", 0.0),  # a leading newline leaves an empty first line
        ("B. Paris", 0.0),  # -> "b paris"
        ("The answer is B", 0.0),
        ("Answer: B", 0.0),  # -> "answer b"
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_mmlu_generative_filter(prediction, expected):
    record = {"prediction": prediction, "answer": "B", "choices": ["Rome", "Paris", "Oslo", "Bern"]}
    assert mmlu.score(record) == expected


def test_mmlu_gold_index_and_official_parser():
    record = {"answer": 1, "choices": ["Rome", "Paris", "Oslo", "Bern"]}  # HF stores the index: 1 -> "B"
    assert mmlu.score({**record, "prediction": "B"}, "nvlm") == 1.0
    # Official (MMMU-style) parser: " B " is a bare-letter candidate inside the sentence.
    assert mmlu.score({**record, "prediction": "The answer is B"}, "official") == 1.0
    # More than 5 words, no letter: the choice text "Paris" is found -> B.
    assert mmlu.score({**record, "prediction": "I am fairly sure it is Paris"}, "official") == 1.0
    # Empty reply: no candidate -> random.Random(42).choice over four letters, which is the first: "A".
    assert mmlu.score({**record, "prediction": ""}, "official") == 0.0
    assert mmlu.score({**record, "answer": 0, "prediction": ""}, "official") == 1.0


def test_mmlu_aggregate_per_subject():
    records = [{"subject": "anatomy"}, {"subject": "anatomy"}, {"subject": "virology"}]
    out = mmlu.aggregate(records, [1.0, 0.0, 0.0], "nvlm")
    assert out["score"] == pytest.approx(100 / 3) and out["n"] == 3
    assert out["by_subject"] == {"anatomy": {"score": 50.0, "n": 2}, "virology": {"score": 0.0, "n": 1}}


# ---------------------------------------------------------------------------------------------------------------
# GSM8K

SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    "prediction, answer, nvlm, official",
    [
        # Last number "72." -> trailing "." dropped -> "72". Official needs "#### ".
        ("So she sold 72 clips in total. The answer is 72.", SOLUTION, 1.0, 0.0),
        ("#### 72", SOLUTION, 1.0, 1.0),
        ("72.00", "72", 0.0, 0.0),  # "72.00" != "72"
        ("072", "72", 0.0, 0.0),
        ("It costs $1,234 in total", "1,234", 1.0, 0.0),  # "," and "$" deleted on both sides
        ("#### 1,234", "#### 1,234", 1.0, 1.0),  # openai removes commas too
        ("The price is $18.50.", "18.5", 0.0, 0.0),  # "$18.50." -> "18.50" != "18.5"
        # A number written after the answer (a check step) wins in flexible-extract.
        ("She has 72 clips. Check: 72 - 24 = 48", "72", 0.0, 0.0),
        ("\\boxed{72}", "72", 1.0, 0.0),  # last-number rule reads inside the box
        ("-5 degrees", "-5", 1.0, 0.0),
        ("7", "7", 1.0, 0.0),  # one digit: the second alternative of the regex
        # Official takes the *first* "#### N" and does no trailing-"." cleanup.
        ("#### 5\n#### 72", "72", 1.0, 0.0),
        ("#### 72.", "72", 1.0, 0.0),
        ("#### $72", "72", 1.0, 0.0),  # openai's regex needs a digit, "-", "." or "," after "#### "
        ("no numbers here", "72", 0.0, 0.0),
        ("", "72", 0.0, 0.0),
        (None, "72", 0.0, 0.0),
    ],
)
def test_gsm8k(prediction, answer, nvlm, official):
    record = {"prediction": prediction, "answer": answer}
    assert gsm8k.score(record, "nvlm") == nvlm
    assert gsm8k.score(record, "official") == official


def test_gsm8k_flexible_extract_and_gold():
    assert gsm8k.flexible_extract("first 3, then 1,000 and $5.") == "$5."
    assert gsm8k.flexible_extract("nothing") is None
    assert gsm8k.gold_answer(SOLUTION) == "72"


# ---------------------------------------------------------------------------------------------------------------
# MATH


def test_math_extraction():
    text = "First \\boxed{1}, finally $\\boxed{\\frac{1}{2}}$."
    assert math_equiv.last_boxed_only_string(text) == "\\boxed{\\frac{1}{2}}"  # last box, balanced braces
    assert math_equiv.extract_answer(text) == "\\frac{1}{2}"
    # "\fbox" is found, but remove_boxed needs the literal "\boxed{" prefix -> None.
    assert math_equiv.last_boxed_only_string("so \\fbox{7}") == "\\fbox{7}"
    assert math_equiv.extract_answer("so \\fbox{7}") is None
    # "\boxed 7" has no brace to match -> None.
    assert math_equiv.extract_answer("so \\boxed 7") is None
    assert math_equiv.extract_answer("\\boxed{unclosed") is None
    assert math_equiv.extract_answer("no box at all") is None


@pytest.mark.parametrize(
    "a, b, equal",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),  # dfrac -> frac
        ("\\tfrac12", "\\frac{1}{2}", True),  # tfrac -> frac, then \frac12 -> \frac{1}{2}
        ("0.5", "\\frac{1}{2}", True),  # the one hard-coded decimal
        ("0.50", "\\frac{1}{2}", False),
        (".5", "\\frac{1}{2}", True),  # leading "." -> "0.5" -> \frac{1}{2}
        ("0.75", "\\frac{3}{4}", False),  # no numeric equivalence
        ("\\frac{2}{4}", "\\frac{1}{2}", False),
        ("1/2", "\\frac{1}{2}", True),  # integer a/b -> \frac{a}{b}
        ("\\sqrt3", "\\sqrt{3}", True),
        ("10\\text{ cm}", "10", True),  # "\text{ " unit on the right removed
        ("10\\mbox{ cm}", "10", False),  # \mbox is not
        ("1,000", "1000", False),
        ("x=5", "5", True),  # "x=" prefix (<= 2 characters) dropped
        ("k = 5", "5", True),  # "k " is 2 characters; spaces removed later
        ("abc=5", "5", False),
        ("\\left( 1, 2 \\right)", "(1,2)", True),  # \left/\right and spaces removed
        ("50\\%", "50", True),
        ("90^\\circ", "90", True),
        ("\\$5", "5", True),
        # Rewrites that raise in the reference fall back to comparing the raw strings.
        ("\\sqrt", "\\sqrt", True),
        ("1\\text{ m}\\text{ s}", "1", False),
        (None, "1", False),
    ],
)
def test_math_is_equiv(a, b, equal):
    assert math_equiv.is_equiv(a, b) is equal


def test_math_score():
    solution = "Half of the pie is left, so the answer is $\\boxed{\\frac{1}{2}}$."
    for protocol in ("nvlm", "official"):
        assert math_equiv.score({"prediction": "Thus \\boxed{0.5}", "solution": solution}, protocol) == 1.0
        assert math_equiv.score({"prediction": "Thus \\fbox{0.5}", "solution": solution}, protocol) == 0.0
        assert math_equiv.score({"prediction": "0.5", "solution": solution}, protocol) == 0.0  # no box
        assert math_equiv.score({"prediction": None, "solution": solution}, protocol) == 0.0
    # No box on either side: upstream's is_equiv(None, None) is True; here a missing gold never scores.
    assert math_equiv.score({"prediction": "7", "solution": "7"}) == 0.0


def test_text_metrics_unknown_protocol():
    for module, record in ((mmlu, {"answer": "A"}), (gsm8k, {"answer": "1"}), (math_equiv, {"solution": ""})):
        with pytest.raises(ValueError, match="nvlm"):
            module.score({**record, "prediction": "1"}, "lm-eval")


# ---------------------------------------------------------------------------------------------------------------
# HumanEval


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    lines = (FIXTURES / "humaneval-sample.jsonl").read_text().splitlines()
    return {p["task_id"]: p for p in map(json.loads, lines)}


def with_completion(problem: dict, completion: str) -> dict:
    return {**problem, "completion": completion}


def test_humaneval_correct_and_wrong(problems):
    records = [with_completion(p, p["canonical_solution"]) for p in problems.values()]
    records.append(with_completion(problems["HumanEval/0"], "    return False\n"))  # first assert expects True
    records.append(with_completion(problems["HumanEval/23"], "    return len(string) + 1\n"))
    records.append(with_completion(problems["HumanEval/23"], ""))  # docstring-only body returns None
    assert humaneval.score_batch(records, workers=2) == [1.0] * len(problems) + [0.0, 0.0, 0.0]


def test_humaneval_full_function_completion(problems):
    # A completion that restates the whole function is appended after the prompt and rebinds the name.
    full = "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert humaneval.score(with_completion(problems["HumanEval/2"], full)) == 1.0
    # `prediction` is read when there is no `completion`.
    record = {**problems["HumanEval/2"], "prediction": "    return number % 1.0\n"}
    assert humaneval.score(record) == 1.0


def test_humaneval_failures(problems):
    strlen = problems["HumanEval/23"]
    failing = {
        "syntax": "    return len(string\n",
        "exit": "    import sys\n    sys.exit(0)\n",  # stopping before the tests ran is not a pass
        "stdin": "    return len(input())\n",  # stdin is closed -> EOFError
        "network": "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return len(string)\n",
        # 3 GiB at once is over the 2 GiB address-space limit -> MemoryError without touching the memory.
        "memory": "    blob = bytearray(3 * 1024 ** 3)\n    return len(string)\n",
    }
    scores = humaneval.score_batch([with_completion(strlen, c) for c in failing.values()], workers=2)
    assert dict(zip(failing, scores)) == dict.fromkeys(failing, 0.0)


def test_humaneval_sandbox_verdicts():
    assert humaneval.run_program("x = 1") == "passed"
    assert humaneval.run_program("raise ValueError('boom')") == "failed: ValueError: boom"
    assert humaneval.run_program("import socket; socket.socket()").startswith("failed: PermissionError")
    assert humaneval.run_program("import os; os.system('true')").startswith("failed: PermissionError")
    # A growing hog under a 256 MiB cap fails quickly with MemoryError.
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 ** 2))"
    assert humaneval.run_program(hog, memory_limit=256 * 1024**2) == "failed: MemoryError:"
    # Printing the verdict protocol's words does not fake a pass.
    assert humaneval.run_program("import os; print('passed'); os._exit(0)").startswith("failed")


def test_humaneval_timeout(problems):
    loop = with_completion(problems["HumanEval/13"], "    while True:\n        pass\n")
    start = time.monotonic()
    assert humaneval.score(loop, timeout=2.0) == 0.0
    assert time.monotonic() - start < 6.0  # killed at ~2 s, not left running
    assert humaneval.run_program("while True: pass", timeout=0.5) == "timed out"


def test_humaneval_temp_dir_removed(monkeypatch, tmp_path, problems):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    p = problems["HumanEval/23"]
    assert humaneval.score(with_completion(p, p["canonical_solution"])) == 1.0
    assert humaneval.run_program("while True: pass", timeout=0.5) == "timed out"
    assert list(tmp_path.iterdir()) == []


def test_humaneval_missing_completion(problems):
    assert humaneval.score({**problems["HumanEval/23"], "completion": None}) == 0.0


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 3, 1, 0.3),  # 1 - C(7,1)/C(10,1) = 1 - 7/10
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (5, 0, 1, 0.0),
        (5, 5, 1, 1.0),
        (10, 8, 3, 1.0),  # n - c = 2 < k = 3
        (200, 1, 100, 0.5),  # C(199,100)/C(200,100) = 100/200; the product form avoids 60-digit binomials
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert math.isclose(humaneval.pass_at_k(n, c, k), expected, rel_tol=1e-12, abs_tol=1e-15)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in ((5, 6, 1), (5, 1, 6), (5, 1, 0), (5, -1, 1)):
        with pytest.raises(ValueError):
            humaneval.pass_at_k(n, c, k)


def test_humaneval_aggregate():
    # Task 0: 2 samples, 1 passes -> pass@1 0.5. Task 1: 2 samples, none pass -> 0. Mean 0.25 -> 25.0.
    records = [{"task_id": "T/0"}, {"task_id": "T/0"}, {"task_id": "T/1"}, {"task_id": "T/1"}]
    out = humaneval.aggregate(records, [1.0, 0.0, 0.0, 0.0], "nvlm")
    assert out == {"score": 25.0, "n": 4, "tasks": 2, "pass@1": 25.0}
    with pytest.raises(ValueError, match="official"):
        humaneval.score_batch(records, "human-eval")
