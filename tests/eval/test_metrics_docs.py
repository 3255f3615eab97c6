"""DocVQA ANLS, ChartQA relaxed accuracy, OCRBench and AI2D/RealWorldQA: worked examples from EVAL.md §3-5, §8.

Expected values are derived by hand in the comments.
"""

import pytest

from nvlm.eval.metrics import anls, chartqa, choice, get_scorer, ocrbench

# ----------------------------------------------------------------------------------------------- DocVQA (ANLS)


def test_levenshtein():
    assert anls.levenshtein("kitten", "sitting") == 3
    assert anls.levenshtein("", "abc") == 3
    assert anls.levenshtein("abc", "abc") == 0


@pytest.mark.parametrize(
    "pred, answers, nvlm, official",
    [
        # "two" -> "2" under the VQA step; plain: lev("two","2") = 3, max len 3 -> NL 1 -> 0.
        ("two", ["2"], 1.0, 0.0),
        # "U.S." -> "us"; plain: lev("u.s.","us") = 2, max len 4 -> NL exactly 0.5 -> strict "<" fails -> 0.
        ("U.S.", ["US"], 1.0, 0.0),
        # NL exactly 0.5 in both: lev("abcd","abxy") = 2 of 4.
        ("abcd", ["abxy"], 0.0, 0.0),
        # NL 1/4 -> 0.75.
        ("abcd", ["abcx"], 0.75, 0.75),
        # NL 3/7 < 0.5 -> 1 - 3/7 = 4/7.
        ("abcdefg", ["abcdxyz"], 4 / 7, 4 / 7),
        # Max over GTs: "invoice" vs "invoices" -> 1/8 -> 0.875; "receipt" -> 0.
        ("invoice", ["receipt", "invoices"], 0.875, 0.875),
        # Case and whitespace are canonicalised in both.
        ("  Hello   World ", ["hello world"], 1.0, 1.0),
        # "5,000" -> "5000" (VQA step); plain: one deletion of 5 chars -> 0.8.
        ("5,000", ["5000"], 1.0, 0.8),
        # Empty prediction: lev("", "abc") / 3 = 1 -> 0.
        ("", ["abc"], 0.0, 0.0),
        (None, ["abc"], 0.0, 0.0),
        # A GT that the VQA step empties ("the") is matched by an empty prediction: two "" -> NL 0 -> 1.
        ("", ["the"], 1.0, 0.0),
    ],
)
def test_anls(pred, answers, nvlm, official):
    rec = {"prediction": pred, "answers": answers}
    assert anls.score(rec, "nvlm") == pytest.approx(nvlm)
    assert anls.score(rec, "official") == pytest.approx(official)


def test_anls_no_answers_and_protocol():
    assert anls.score({"prediction": "x", "answers": []}) == 0.0
    with pytest.raises(ValueError, match="official"):
        anls.score({"prediction": "x", "answers": ["x"]}, "rrc")


# ---------------------------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize(
    "pred, gold, nvlm, official",
    [
        # Exactly 5% is inclusive. nvlm: 100*1.05 and 100*0.95 round to exactly 105.0 and 95.0 in binary64
        # (the errors of the 1.05/0.95 literals, ~4e-15 after scaling, are below half an ulp at 100, ~7e-15).
        # official: |105-100|/100 = 5/100, the same double as the literal 0.05.
        ("105", "100", 1, 1),
        ("95", "100", 1, 1),
        ("105.1", "100", 0, 0),
        ("94.9", "100", 0, 0),
        # Sign loss: "-10" normalises to "10" in nvlm; official compares |10 - (-10)| / 10 = 2.
        ("10", "-10", 1, 0),
        ("-10", "-10", 1, 1),
        ("10.4", "-10", 1, 0),  # nvlm gt becomes 10: 9.5 <= 10.4 <= 10.5
        # Percent: nvlm strips "%" on both sides (45 vs 45); official divides: 0.45 vs 45.
        ("45%", "45", 1, 0),
        # ... and the other way round: nvlm 0.45 vs 45 (wrong), official 0.45 vs 0.45.
        ("0.45", "45%", 0, 1),
        # Thousands comma, number words, articles: only nvlm normalises.
        ("1,000", "1000", 1, 0),
        ("five", "5", 1, 0),
        ("the USA", "USA", 1, 0),
        ("usa", "USA", 1, 1),  # both are case-insensitive for text
        # "nan" parses as a float and never compares equal.
        ("nan", "nan", 0, 0),
        # GT 0: nvlm 0 <= 0 <= 0; official falls back to the string compare "0.0" != "0".
        ("0.0", "0", 1, 0),
        # Text left next to the number defeats both.
        ("about 45%", "45", 0, 0),
        ("", "45", 0, 0),
        (None, "Yes", 0, 0),
    ],
)
def test_chartqa(pred, gold, nvlm, official):
    rec = {"prediction": pred, "answers": [gold]}
    assert chartqa.score(rec, "nvlm") == nvlm
    assert chartqa.score(rec, "official") == official


def test_chartqa_any_gold_and_no_gold():
    assert chartqa.score({"prediction": "7", "answers": ["3", "7"]}) == 1.0
    assert chartqa.score({"prediction": "7", "answers": []}) == 0.0


# ---------------------------------------------------------------------------------------------- OCRBench


def _ocr(pred, answers, kind="Regular Text Recognition", dataset="IIIT5K"):
    return {"prediction": pred, "answers": answers, "type": kind, "dataset_name": dataset}


@pytest.mark.parametrize(
    "record, nvlm, official",
    [
        # Both list alternatives are substrings of the lower-cased prediction: Megatron counts 2, official 1.
        (_ocr("news agency newsagency", ["NEWSAGENCY", "NEWS AGENCY"]), 2, 1),
        (_ocr("NEWS AGENCY", ["NEWSAGENCY", "NEWS AGENCY"]), 1, 1),
        # A string answer is a single test in both protocols.
        (_ocr("HELLO there", "hello"), 1, 1),
        # Lenient substring: "10" contains "1".
        (_ocr("10", ["1"]), 1, 1),
        (_ocr("", ["1"]), 0, 0),
        (_ocr(None, "abc"), 0, 0),
        # Newlines become spaces: "big\ncat" -> "big cat".
        (_ocr("big\ncat", "big cat"), 1, 1),
        # HME100k: spaces removed on both sides, case-sensitive.
        (_ocr("x ^ { 2 }\n+ 1", "x^{2}+1", "Handwritten Mathematical Expression Recognition", "HME100k"), 1, 1),
        (_ocr("X^{2}+1", "x^{2}+1", "Handwritten Mathematical Expression Recognition", "HME100k"), 0, 0),
        # Not HME100k: the same spaced prediction does not contain the unspaced GT.
        (_ocr("x ^ { 2 } + 1", "x^{2}+1", "Key Information Extraction", "FUNSD"), 0, 0),
    ],
)
def test_ocrbench_item(record, nvlm, official):
    assert ocrbench.score(record, "nvlm") == nvlm
    assert ocrbench.score(record, "official") == official


def test_ocrbench_aggregate():
    records = [
        _ocr("news agency newsagency", ["NEWSAGENCY", "NEWS AGENCY"]),  # nvlm 2, official 1
        _ocr("cat", "cat", "Handwriting Recognition"),  # 1
        _ocr("a stop sign", "stop", "Scene Text-centric VQA"),  # 1
        _ocr("nothing", "total", "Doc-oriented VQA"),  # 0
        _ocr("ACME inc", "acme", "Key Information Extraction"),  # 1
        _ocr("a+b", "a + b", "Handwritten Mathematical Expression Recognition", "HME100k"),  # 1
    ]
    for protocol, total, recognition in (("nvlm", 6, 3), ("official", 5, 2)):
        scores = [ocrbench.score(r, protocol) for r in records]
        agg = ocrbench.aggregate(records, scores, protocol)
        assert agg["score"] == total and agg["n"] == 6
        assert agg["subscores"] == {
            "text_recognition": recognition, "scene_text_vqa": 1, "doc_vqa": 0, "kie": 1, "hmer": 1,
        }  # fmt: skip
        assert agg["categories"]["Regular Text Recognition"] == recognition - 1
        assert agg["categories"]["Artistic Text Recognition"] == 0
        assert len(agg["categories"]) == 10


# ----------------------------------------------------------------------------------- AI2D and RealWorldQA

CHOICES = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    "pred, nvlm, official",
    [
        # VQA-normalised exact match: brackets/periods vanish, case folds.
        ("(B)", 1, 1),
        ("B.", 1, 1),
        ("[B]", 1, 1),
        (" B\n", 1, 1),
        # Lower-case: "b" == "b" after normalisation; official needs an upper-case letter (and no text matches).
        ("b", 1, 0),
        # Wrong in Megatron, a unique letter token in the official rule (":", ".", "*" become spaces).
        ("Answer: B", 0, 1),
        ("B. root", 0, 1),
        ("**B**", 0, 1),
        ("The answer is B", 0, 1),
        # "'" is in neither punctuation set.
        ("'B'", 0, 0),
        # Official text fallback: no letter token, one option text ("dog") in the reply.
        ("It is a dog.", 0, 1),
        ("cat or dog", 0, 0),  # two option texts -> undecided
        ("A or B", 0, 0),  # two letters, no option text -> undecided
        ("B or C", 0, 0),  # two letters, even when one is the gold
        ("C", 0, 0),
        ("", 0, 0),
    ],
)
def test_choice_gold_b(pred, nvlm, official):
    rec = {"prediction": pred, "answers": ["B"], "choices": CHOICES}
    assert choice.score_ai2d(rec, "nvlm") == nvlm
    assert choice.score_ai2d(rec, "official") == official


@pytest.mark.parametrize(
    "pred, nvlm, official",
    [
        # Gold "A" normalises to "": the empty prediction and bare articles are "correct" in Megatron.
        ("", 1, 0),
        ("a", 1, 0),
        ("the", 1, 0),
        ("an", 1, 0),
        (None, 1, 0),
        ("A", 1, 1),
        ("B", 0, 0),
    ],
)
def test_choice_gold_a(pred, nvlm, official):
    rec = {"prediction": pred, "answers": ["A"], "choices": CHOICES}
    assert choice.score_realworldqa(rec, "nvlm") == nvlm
    assert choice.score_realworldqa(rec, "official") == official


def test_choice_without_choices():
    # No `choices`: official looks for the letters A-D (extended to the gold's letter).
    assert choice.score_ai2d({"prediction": "B. root", "answers": ["B"]}, "official") == 1.0
    assert choice.score_ai2d({"prediction": "F", "answers": ["F"]}, "official") == 1.0
    assert choice.score_ai2d({"prediction": "E or F", "answers": ["F"]}, "official") == 0.0


def test_choice_gold_text_becomes_letter():
    # RealWorldQA-style: the gold is the option text; the prompt asked for the letter (B).
    rec = {"answers": ["right"], "choices": ["left", "right"]}
    assert choice.score_realworldqa({**rec, "prediction": "B"}, "nvlm") == 1.0
    assert choice.score_realworldqa({**rec, "prediction": "right"}, "nvlm") == 0.0
    # Official: "left" is not in "right", "right" is -> B.
    assert choice.score_realworldqa({**rec, "prediction": "right"}, "official") == 1.0
    # A {letter: text} dict works the same way.
    rec = {"answers": ["right"], "choices": {"A": "left", "B": "right"}, "prediction": "(B)"}
    assert choice.score_realworldqa(rec, "nvlm") == 1.0


def test_choice_open_answers_use_number_words():
    rec = {"prediction": "three", "answers": ["3"]}
    assert choice.score_realworldqa(rec, "nvlm") == 1.0
    assert choice.score_realworldqa(rec, "official") == 1.0
    assert choice.score_realworldqa({"prediction": "four", "answers": ["3"]}, "nvlm") == 0.0


def test_registry_names_for_doc_benchmarks():
    assert get_scorer("docvqa").module is anls
    assert get_scorer("ai2d").score is choice.score_ai2d
    assert get_scorer("ocrbench").aggregate is ocrbench.aggregate
    with pytest.raises(ValueError, match="nvlm, official"):
        choice.score_ai2d({"prediction": "A", "answers": ["A"]}, "vlmevalkit")
    with pytest.raises(ValueError):
        ocrbench.score(_ocr("a", "a"), "")
