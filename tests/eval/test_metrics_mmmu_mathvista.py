"""MMMU and MathVista scorers: worked examples of every parsing rule and pitfall in EVAL.md §6-7.

Expected values are derived by hand from the rules (each case's comment says how), not by running the scorers.
"""

from __future__ import annotations

import pytest

from nvlm.eval.metrics import mathvista, mmmu

CELL = {"A": "mitochondria", "B": "nucleus", "C": "ribosome", "D": "golgi apparatus"}


def mc(prediction, answer="B", index2ans=CELL):
    return {
        "prediction": prediction,
        "question_type": "multiple-choice",
        "answer": answer,
        "all_choices": list(index2ans),
        "index2ans": dict(index2ans),
    }


def both(record) -> tuple[float, float]:
    return mmmu.score(record, "nvlm"), mmmu.score(record, "official")


# ---------------------------------------------------------------------------------------------------------------
# MMMU multiple choice


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("(B)", (1.0, 1.0)),  # "(B)" is a bracketed candidate
        ("B", (1.0, 1.0)),  # padded to " B ", a bare-letter candidate
        ("B.", (1.0, 1.0)),  # edge "." stripped, then " B "
        ("The answer is (B) nucleus.", (1.0, 1.0)),
        ("Not A but C", (0.0, 0.0)),  # bare " A " and " C ": C occurs last, so C, not the gold B
        # Two bracketed candidates: the one whose "(X)" occurs last wins.
        ("(B) looks tempting, but (C) is right", (0.0, 0.0)),
        # Lower-case letters never match: no candidate, 2 words -> fallback (nvlm: first choice A; official: A).
        ("b", (0.0, 0.0)),
    ],
)
def test_mmmu_letter_parsing(prediction, expected):
    assert both(mc(prediction)) == expected


def test_mmmu_b_dot_text_has_no_candidate():
    # "B. nucleus" -> " B. nucleus ": no "(B)", no "B)", no " B " (B is followed by "."), and only 2 words, so no
    # content match either. nvlm falls back to the first choice, A; official draws random.Random(42).choice over
    # four letters, which is the first one, A.
    assert both(mc("B. nucleus", answer="B")) == (0.0, 0.0)
    assert both(mc("B. nucleus", answer="A")) == (1.0, 1.0)


def test_mmmu_answer_by_content():
    # More than 5 words and no letter candidate: choice texts found in the reply are candidates; the one whose text
    # occurs last wins: "nucleus" (B) and "ribosome" (C) both occur, "ribosome" later -> C.
    reply = "It is not in the nucleus, it is made by the ribosome"
    assert both(mc(reply, answer="C")) == (1.0, 1.0)
    # 5 words exactly: content matching does not apply -> fallback A.
    assert both(mc("it is the ribosome surely", answer="C")) == (0.0, 0.0)


def test_mmmu_head_x_paren_rule_misfires():
    # EVAL.md §6: HEAD also accepts "X)". "figure A)" makes A a bracketed candidate, so the later bare " B " is never
    # looked at. Upstream has no "(X)" here, falls to the bare-letter pass and finds " B ".
    assert both(mc("As figure A) shows, the answer is B")) == (0.0, 1.0)


def test_mmmu_x_paren_candidates_tie_at_minus_one():
    # nvlm: "B)" and "A)" both match the "X)" rule -> candidates [A, B] in choice order; HEAD ranks them by rfind of
    # "(A)" and "(B)", both -1, and argmax takes the first: A, although B was written first.
    assert mmmu.score(mc("B) or maybe A)", answer="A"), "nvlm") == 1.0


def test_mmmu_boxed_and_answer_unwrap_nvlm_only():
    # nvlm unwraps \boxed{C} -> "C" -> " C ". Official sees " Final: \boxed{C} ": "{C}" is neither "(C)" nor " C ",
    # 2 words -> random fallback A.
    assert both(mc("Final: \\boxed{C}", answer="C")) == (1.0, 0.0)
    assert mmmu.score(mc("\\answer{D} because", answer="D"), "nvlm") == 1.0
    # \answer{} wins over \boxed{} even when it comes second.
    assert mmmu.score(mc("\\boxed{A} then \\answer{D}", answer="D"), "nvlm") == 1.0


def test_mmmu_empty_and_missing_predictions():
    # An empty reply takes the protocol's fallback (both give A here); a None prediction scores 0 outright.
    assert both(mc("", answer="A")) == (1.0, 1.0)
    assert both(mc("", answer="B")) == (0.0, 0.0)
    assert both(mc(None, answer="A")) == (0.0, 0.0)


def test_mmmu_official_fallback_is_seeded_and_order_independent():
    # Three choices: random.Random(42).choice(["A", "B", "C"]) is "C" in CPython (a fact of its Mersenne Twister
    # and `_randbelow`). Scoring the same record again, after other fallbacks have drawn, gives the same answer.
    three = {"A": "red", "B": "green", "C": "blue"}
    record = mc("no idea", answer="C", index2ans=three)
    first = mmmu.score(record, "official")
    for _ in range(3):
        mmmu.score(mc("?", answer="A", index2ans=three), "official")
    assert first == mmmu.score(record, "official") == 1.0
    # nvlm falls back to the first choice instead.
    assert mmmu.score(record, "nvlm") == 0.0


def test_parse_multi_choice_strips_edge_punctuation_one_char_at_a_time():
    # ",", then ".", then "!", ...: "B.," loses "," then "." -> "B". But "B,." keeps its ",": the "," pass sees a
    # trailing "." and strips nothing; the "." pass then exposes the "," too late -> " B, " has no " B ".
    assert mmmu.parse_multi_choice("B.,", list(CELL), CELL, variant="upstream") == "B"
    assert mmmu.parse_multi_choice("B,.", list(CELL), CELL, variant="megatron") == "A"  # fallback


def test_mmmu_options_field_builds_choices():
    # HF MMMU stores `options` as the repr of a list; letters are assigned A, B, C...
    record = {"prediction": "(C)", "question_type": "multiple-choice", "answer": "C", "options": "['x', 'y', 'z']"}
    assert both(record) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# MMMU open


def open_q(prediction, answer):
    return {"prediction": prediction, "question_type": "open", "answer": answer}


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        # "result " tail "is 1.064", "is " tail "1.064" (shortest); 1.064 -> round 2 -> 1.06 == 1.06.
        ("The result is 1.064", "1.06", 1.0),
        ("The result is 1.07", "1.06", 0.0),
        # No indicator: the whole reply is kept and every number is added: 6.0 and 7.0; gold 6.0 is among them.
        ("There are 6 apples and 7 pears", "6", 1.0),
        # Thousands commas: "1,200" -> 1200.0.
        ("The total is 1,200", "1200", 1.0),
        # String gold: substring of the lower-cased tail "paris, france".
        ("The capital is Paris, France.", "Paris", 1.0),
        # One-character gold becomes " x" / "x ": the tail "x" also becomes " x" / "x " -> match ...
        ("The answer is x", "x", 1.0),
        # ... but not inside a word: "xylophone" contains neither " x" nor "x ".
        ("The answer is xylophone", "x", 0.0),
        # "=" counts in the last sentence: tail "5".
        ("x = 5", "5", 1.0),
        # Scientific notation: 1.5e3 -> 1500.0.
        ("so it is 1.5e3 joules", "1500", 1.0),
        # HF's multi-answer gold is the repr of a list; any element may match.
        ("It is 25", "['24', '25']", 1.0),
        ("It is 26", ["24", "25"], 0.0),
        ("", "5", 0.0),
    ],
)
def test_mmmu_open(prediction, answer, expected):
    assert mmmu.score(open_q(prediction, answer), "nvlm") == expected
    assert mmmu.score(open_q(prediction, answer), "official") == expected


def test_mmmu_open_parser_shortest_tail_and_newline_split():
    # Sentences split on newlines only (the capital-letter lookahead runs on lower-cased text). First line: "so "
    # tail "the mass is 4 kg", "is " tail "4 kg" (shortest). Second line: "answer " tail "8". Numbers 4 and 8.
    preds = mmmu.parse_open("So the mass is 4 kg\nFinal answer 8")
    # "8" is a number, so it is kept as 8.0 only.
    assert set(preds) == {"4 kg", 4.0, 8.0}


def test_mmmu_aggregate_per_subject_and_discipline():
    records = [{"id": "validation_Art_1"}, {"id": "validation_Art_Theory_2"}, {"id": "validation_Math_3"}]
    out = mmmu.aggregate(records, [1.0, 0.0, 1.0], "nvlm")
    assert out["n"] == 3 and out["score"] == pytest.approx(200 / 3)
    assert out["by_subject"] == {
        "Art": {"score": 100.0, "n": 1},
        "Art_Theory": {"score": 0.0, "n": 1},
        "Math": {"score": 100.0, "n": 1},
    }
    assert out["by_discipline"] == {"Art and Design": {"score": 50.0, "n": 2}, "Science": {"score": 100.0, "n": 1}}


def test_unknown_protocol_raises():
    for module, record in ((mmmu, mc("B")), (mathvista, {"prediction": "1", "question_type": "free_form"})):
        with pytest.raises(ValueError, match="nvlm"):
            module.score(record, "megatron")
        with pytest.raises(ValueError, match="official"):
            module.aggregate([record], [1.0], "lmms-eval")


# ---------------------------------------------------------------------------------------------------------------
# MathVista free-form


def ff(prediction, answer, answer_type="integer", precision=None):
    return {
        "prediction": prediction,
        "question_type": "free_form",
        "answer": answer,
        "answer_type": answer_type,
        "precision": precision,
    }


def mv(record) -> tuple[float, float]:
    return mathvista.score(record, "nvlm"), mathvista.score(record, "official")


@pytest.mark.parametrize(
    "record, expected",
    [
        # nvlm truncates "3.146" to "3.14"; official rounds to 2 places -> "3.15".
        (ff("3.146", "3.14", "float", 2), (1.0, 0.0)),
        (ff("3.146", "3.15", "float", 2), (0.0, 1.0)),
        # nvlm compares decimal strings: "0.50" stays "0.50" != "0.5"; official round(0.5, 1) -> "0.5".
        (ff("0.50", "0.5", "float", 1), (0.0, 1.0)),
        # All-zero decimals are dropped in nvlm: "2.00" -> "2"; official int(float("2.00")) -> "2".
        (ff("2.00", "2"), (1.0, 1.0)),
        # Sign loss in nvlm: "-" with no adjacent space becomes a space -> "3"; official keeps "-3".
        (ff("-3", "3"), (1.0, 0.0)),
        # "%" removed in nvlm; official int("45%") fails -> the reply itself -> int(float("45%")) fails -> wrong.
        (ff("45%", "45"), (1.0, 0.0)),
        # nvlm: "." dropped, "the" dropped -> "answer is 7" -> letters present -> "7". Official needs an LLM here.
        (ff("The answer is 7.", "7"), (1.0, 0.0)),
        # Official quick extraction: The answer is "7". -> "7". nvlm: '"' next to a space is deleted -> "7".
        (ff('The answer is "7".', "7"), (1.0, 1.0)),
        # Extraction happens after truncation: "answer is 3.146" is not all digits, so nvlm keeps "3.146".
        (ff("The answer is 3.146", "3.14", "float", 2), (0.0, 0.0)),
        # Text without "answer is" is kept whole in nvlm: "12 apples" != "12".
        (ff("12 apples", "12"), (0.0, 0.0)),
        # Megatron would raise IndexError on an empty string; here 0. Official: int(float("")) fails -> None.
        (ff("", "7"), (0.0, 0.0)),
        (ff(".", "7"), (0.0, 0.0)),
        (ff(None, "7"), (0.0, 0.0)),
        # nvlm: "a" normalises to "" (an article), where Megatron raises -> 0. Official does not know answer_type
        # "text" for free-form (it raises); here it compares the stripped strings.
        (ff("a", "a", "text"), (0.0, 1.0)),
    ],
)
def test_mathvista_free_form(record, expected):
    assert mv(record) == expected


def test_mathvista_megatron_postprocess():
    assert mathvista.megatron_postprocess("1,000") == "1000"  # digit-comma-digit: every comma deleted
    assert mathvista.megatron_postprocess("12.5%") == "12.5"
    assert mathvista.megatron_postprocess("7.999") == "7.99"  # truncation, not rounding
    assert mathvista.megatron_postprocess("the") is None


# ---------------------------------------------------------------------------------------------------------------
# MathVista multiple choice

FRACS = {"A": "3/11", "B": "8/11", "C": "6/11", "D": "3/5"}


def mvc(prediction, answer="B"):
    return {
        "prediction": prediction,
        "question_type": "multi_choice",
        "answer": answer,
        "answer_type": "text",
        "precision": None,
        "all_choices": list(FRACS),
        "index2ans": dict(FRACS),
    }


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("(B) 8/11", (1.0, 1.0)),  # nvlm: "(B)"; official: "(B)" -> "B" -> "8/11"
        ("B", (1.0, 1.0)),
        # nvlm: no letter, one word -> first choice A. Official: the reply equals a choice text.
        ("8/11", (0.0, 1.0)),
        # Official: Levenshtein to "3/11" 2, "8/11" 1, "6/11" 2, "3/5" 3 -> "8/11".
        ("8/12", (0.0, 1.0)),
        # Official: "(b)" -> upper-cased "B". nvlm: "(b)" is not "(B)"; " (b) " has no " B " -> fallback A.
        ("(b)", (0.0, 1.0)),
    ],
)
def test_mathvista_multi_choice(prediction, expected):
    assert mv(mvc(prediction)) == expected
    # The gold may also be given as the choice text.
    assert mv(mvc(prediction, answer="8/11")) == expected


def test_mathvista_multi_choice_empty_reply():
    # nvlm: first choice, A. Official: extraction "" -> nearest choice to "" is the shortest, "3/5" (D).
    assert mv(mvc("", answer="A")) == (1.0, 0.0)
    assert mv(mvc("", answer="D")) == (0.0, 1.0)


def test_mathvista_aggregate():
    records = [
        {"question_type": "multi_choice", "answer_type": "text", "metadata": {"task": "figure question answering"}},
        {"question_type": "free_form", "answer_type": "integer", "metadata": {"task": "math word problem"}},
        {"question_type": "free_form", "answer_type": "float", "metadata": {"task": "math word problem"}},
    ]
    out = mathvista.aggregate(records, [1.0, 1.0, 0.0], "official")
    assert out["score"] == pytest.approx(200 / 3) and out["n"] == 3
    assert out["by_question_type"] == {"free_form": {"score": 50.0, "n": 2}, "multi_choice": {"score": 100.0, "n": 1}}
    assert out["by_answer_type"]["float"] == {"score": 0.0, "n": 1}
    assert out["by_task"]["math word problem"] == {"score": 50.0, "n": 2}
