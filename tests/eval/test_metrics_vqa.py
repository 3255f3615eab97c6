"""VQA normaliser and TextVQA/VQAv2 accuracy: worked examples from EVAL.md §2, values derived by hand."""

import pytest

from nvlm.eval.metrics import BENCHMARKS, get_scorer
from nvlm.eval.metrics.vqa import (
    normalize_answer,
    process_digit_article,
    process_punctuation,
    score_textvqa,
    score_vqav2,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # Period typo: the regex removes a period after a digit too, when no digit follows.
        ("5.", "5"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("U.S.", "us"),
        # Number words, "none" included, then articles dropped.
        ("Two", "2"),
        ("none", "0"),
        ("ten apples", "10 apples"),
        ("eleven", "eleven"),  # only none/zero..ten are mapped
        ("the cat", "cat"),
        ("A", ""),  # the article rule empties a bare "A"
        ("An apple", "apple"),
        # Punctuation: no adjacent space -> replaced by a space; "a,b" -> "a b" -> article "a" dropped -> "b".
        ("a,b", "b"),
        ("yes!", "yes"),
        ("(B)", "b"),
        # "-" next to a space -> deleted (not spaced): "hello  world" -> re-joined with one space.
        ("hello - world", "hello world"),
        # No space near "-": replaced by a space, so the sign of a number is lost.
        ("-10", "10"),
        # A digit-comma-digit anywhere deletes every mark: "3,5 km-long" -> "35 kmlong".
        ("3,5 km-long", "35 kmlong"),
        ("1,000", "1000"),
        # Not in the set: % $ : ' * #
        ("45%", "45%"),
        ("$5", "$5"),
        ("Answer: B", "answer: b"),
        ("**B**", "**b**"),
        # Whitespace (newline, tab) collapses.
        ("  big\n\tdog ", "big dog"),
        # Contractions: lower-cased token looked up; "Im"/"Ive" keys are capitalised and never match.
        ("dont", "don't"),
        ("Im", "im"),
        ("Ive", "ive"),
        ("somebody'd", "somebodyd"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_period_cap_is_32():
    # re.UNICODE (32) lands in sub()'s count slot: 32 periods go, the rest stay.
    assert process_punctuation("x" + "." * 32) == "x"
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8
    # Periods before a digit are not matched, so they do not use up the cap.
    assert process_punctuation("1.2 " + "." * 33) == "1.2 " + "."


def test_punctuation_test_reads_original_string():
    # "a-b c-" : "c-" has no space next to "-"... but "- " never occurs; " -" never occurs -> both "-" become spaces.
    assert process_punctuation("a-b c-") == "a b c "
    # "a-b -c": " -" occurs once, so *every* "-" is deleted, including the one in "a-b".
    assert process_punctuation("a-b -c") == "ab c"


def test_digit_article_order():
    # Number words are mapped before the article check; contractions after it.
    assert process_digit_article("The one THAT dont") == "1 that don't"


def _ten(*pairs):
    answers = []
    for text, count in pairs:
        answers += [text] * count
    assert len(answers) == 10
    return answers


@pytest.mark.parametrize(
    "k, nvlm, official",
    [
        # Megatron: min(1, k/3). Official: 10 leave-one-out subsets:
        # k matching GTs see k-1 matches, 10-k others see k -> (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10.
        (0, 0.0, 0.0),
        (1, 1 / 3, 0.3),  # (1*0 + 9*(1/3)) / 10 = 0.3
        (2, 2 / 3, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = 6/10
        (3, 1.0, 0.9),  # (3*(2/3) + 7*1) / 10 = 9/10
        (4, 1.0, 1.0),  # (4*1 + 6*1) / 10
        # All ten GTs identical: official skips normalisation, and "Red" != "red".
        (10, 1.0, 0.0),
    ],
)
def test_leave_one_out_values(k, nvlm, official):
    answers = _ten(("red", k), ("blue", 10 - k)) if k < 10 else ["red"] * 10
    rec = {"prediction": "Red", "answers": answers}
    assert score_textvqa(rec, "nvlm") == pytest.approx(nvlm)
    assert score_textvqa(rec, "official") == pytest.approx(official)


def test_official_skips_normalisation_when_all_gts_agree():
    ten_yes = ["yes"] * 10
    # All identical: only newline/tab -> space and strip; "Yes" != "yes" -> every subset 0.
    assert vqa_accuracy("Yes", ten_yes, "official") == 0.0
    assert vqa_accuracy("yes.", ten_yes, "official") == 0.0
    assert vqa_accuracy(" yes\n", ten_yes, "official") == 1.0
    # Megatron always normalises: "Yes" -> "yes", 10 matches -> 1.
    assert vqa_accuracy("Yes", ten_yes, "nvlm") == 1.0
    # One differing GT switches normalisation on: "Yes" -> "yes" matches 9 -> every subset has >= 8 -> 1.0.
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["yeah"], "official") == 1.0


def test_official_identity_check_after_whitespace_cleanup():
    # "yes\n" and "yes" become the same after strip, so the GTs count as identical and "Yes" is not lower-cased.
    assert vqa_accuracy("Yes", ["yes\n"] * 5 + ["yes"] * 5, "official") == 0.0


def test_number_words_and_articles_score():
    answers = _ten(("2", 3), ("two dogs", 7))
    # nvlm: "Two" -> "2" matches 3 GTs; "two dogs" GTs become "2 dogs" -> 3 matches -> 1.0.
    assert vqa_accuracy("Two", answers, "nvlm") == 1.0
    # official (GTs differ -> normalised): k=3 -> 0.9.
    assert vqa_accuracy("Two", answers, "official") == pytest.approx(0.9)
    # "the 2 dogs" -> "2 dogs" matches the 7 others -> 1.0 in both.
    assert vqa_accuracy("the two dogs", answers, "official") == 1.0


def test_period_typo_scores():
    # "5." -> "5" (typo regex) matches three "5": nvlm 1.0, official 0.9 (GTs differ, so normalised).
    answers = _ten(("5", 3), ("6", 7))
    assert vqa_accuracy("5.", answers, "nvlm") == 1.0
    assert vqa_accuracy("5.", answers, "official") == pytest.approx(0.9)


def test_empty_and_none_predictions_score_zero():
    answers = _ten(("cat", 5), ("dog", 5))
    for pred in ("", None, "   ", "\n"):
        for protocol in ("nvlm", "official"):
            assert vqa_accuracy(pred, answers, protocol) == 0.0
    assert score_vqav2({"prediction": None, "answers": answers}) == 0.0
    assert vqa_accuracy("cat", [], "nvlm") == 0.0


def test_protocol_validation():
    with pytest.raises(ValueError, match="nvlm, official"):
        vqa_accuracy("x", ["x"], "lmms")
    with pytest.raises(ValueError, match="nvlm"):
        score_textvqa({"prediction": "x", "answers": ["x"]}, protocol="megatron")


def test_registry():
    assert set(BENCHMARKS) == {
        "mmmu", "mathvista", "ocrbench", "ai2d", "chartqa", "docvqa", "textvqa",
        "realworldqa", "vqav2", "mmlu", "gsm8k", "math", "humaneval",
    }  # fmt: skip
    scorer = get_scorer("vqav2")
    assert scorer({"prediction": "two", "answers": ["2", "2", "2"]}) == 1.0
    assert scorer.aggregate([{}, {}], [1.0, 0.5], "nvlm") == {"score": 75.0, "n": 2}
    assert scorer.score_batch is None
    with pytest.raises(ValueError, match="textvqa"):
        get_scorer("textvqa2")
