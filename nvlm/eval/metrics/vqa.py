"""VQA accuracy (TextVQA, VQAv2) and the VQA answer normaliser that the other Megatron scorers reuse (EVAL.md §2).

Notable:
- `normalize_answer` reproduces the VQA evaluation normaliser including its quirks: the punctuation decision looks
  at the *original* string; the period regex's typo means "5." becomes "5"; at most 32 periods are removed per
  string; "a"/"an"/"the" vanish, so "A" normalises to ""; the contraction table's "Im"/"Ive"/"Id've" keys have
  capitals and never match a lower-cased token.
- `nvlm` (Megatron NVLM-1.0 tag): normalise prediction and every GT unconditionally, min(1, matches / 3).
- `official` (GT-Vision-Lab vqaEval.py, EvalAI): newline/tab -> space and strip; the full normalisation only when
  the GT answers are not all identical; then the mean over leave-one-out subsets of min(1, matches / 3). With 10 GTs
  and k matches that is 0.3 / 0.6 / 0.9 / 1.0 for k = 1..4 (Megatron: 1/3, 2/3, 1, 1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import as_answer_list, as_text, check_protocol

_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The reference pattern is `(?!<=\d)(\.)(?!\d)`: the first group was meant as a lookbehind but is a lookahead for
# the literal "<=" + digit, which can never start at a ".", so it never vetoes. Hence a period is removed whenever
# no digit follows it, including after a digit ("5." -> "5"). The reference also passes `re.UNICODE` (== 32) in
# the *count* slot of `sub`, which caps the removals at 32 per string.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_CAP = 32

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# The VQA evaluation's fixed contraction table, as (token, expansion) pairs, reproduced as data including its
# oddities: capitalised keys that can never match a lower-cased token, and "somebody'd" mapping to "somebodyd".
_CONTRACTIONS = dict(
    pair.split(" ")
    for pair in """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at
'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's
wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all
yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd
youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
""".replace("\n", "|").split("|")
    if pair
)


def process_punctuation(text: str) -> str:
    """Step 1-2 of the normaliser: punctuation marks deleted or spaced out, then periods not before a digit."""
    # Both tests read the input string, not the partly rewritten one: that is what the reference does.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_CAP)


def process_digit_article(text: str) -> str:
    """Steps 3-6: lower-case, split on whitespace, number words -> digits, drop articles, expand contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The full VQA normalisation (Megatron applies it to predictions and GTs of TextVQA/VQAv2/ChartQA/AI2D/...)."""
    return process_digit_article(process_punctuation(as_text(text)))


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction, answers: Sequence, protocol: str = "nvlm") -> float:
    """One question's VQA accuracy in [0, 1] under `protocol`; no GT answers scores 0."""
    check_protocol(protocol)
    gts = as_answer_list(answers)
    if not gts:
        return 0.0
    pred = as_text(prediction)
    if protocol == "nvlm":
        pred = normalize_answer(pred)
        return min(1.0, sum(normalize_answer(gt) == pred for gt in gts) / 3.0)

    gts = [_clean_whitespace(gt) for gt in gts]
    pred = _clean_whitespace(pred)
    if len(set(gts)) > 1:  # all GTs identical -> no normalisation at all, so "Yes" misses ten "yes"
        gts = [normalize_answer(gt) for gt in gts]
        pred = normalize_answer(pred)
    # Leave each GT out in turn and score against the rest, in GT order, as the reference does.
    accs = []
    for left_out in range(len(gts)):
        matches = sum(gt == pred for i, gt in enumerate(gts) if i != left_out)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def score_textvqa(record: Mapping, protocol: str = "nvlm") -> float:
    return vqa_accuracy(record.get("prediction"), record.get("answers"), protocol)


def score_vqav2(record: Mapping, protocol: str = "nvlm") -> float:
    return vqa_accuracy(record.get("prediction"), record.get("answers"), protocol)
