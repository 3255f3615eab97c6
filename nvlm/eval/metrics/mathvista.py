"""MathVista (testmini) scoring without an LLM judge (EVAL.md §7).

Notable:
- `nvlm` is Megatron-LM HEAD. Multiple choice: MMMU's letter parser in Megatron's variant ("X)" rule, first-choice
  fallback), then exact letter match. Free-form, on the reply and the gold: VQA normalisation (so minus signs are
  lost), a digits.digits string *truncated* to 2 decimals (all-zero decimals dropped), "%" removed and one trailing
  "." dropped; then, for the reply only, "answer is <number>" inside text is cut down to the number. Exact string
  equality, so "0.50" != "0.5" and "3.146" -> "3.14".
- Megatron raises IndexError when either side normalises to "" (an empty reply, ".", "a", "the"); here that is 0.
- `official` is lupantech/MathVista's rules: extraction takes an empty reply, a reply equal to a choice text, an
  int/float-parsable reply, or `The answer is "X".`; where the reference would ask GPT-4, the reply itself is taken
  as the extraction (an identity extractor). Normalisation: MC maps "(X)" or a bare letter to its choice text,
  anything else to the nearest choice by Levenshtein distance (first on ties); integers via int(float(x)); floats
  via round(x, precision); lists via str() (stripped). Exact equality with the gold text.
- The reference crashes on a free-form `answer_type` it does not know ("text"); here the stripped extraction is
  compared with the gold as a string.
- The record's `answer` may be the gold letter (Megatron's layout) or the choice text (HF's); a value that is one of
  `all_choices` is read as a letter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import check_protocol
from nvlm.eval.metrics.anls import levenshtein
from nvlm.eval.metrics.mmmu import choices_of, group_scores, parse_multi_choice
from nvlm.eval.metrics.vqa import normalize_answer

# ----------------------------------------------------------------------------------------------------------------
# nvlm (Megatron)

_DECIMAL = re.compile(r"^\d+\.\d+$")
_ANSWER_IS = re.compile(r"answer is -*\d+\.*\d*")
_NUMBER = re.compile(r"-*\d+\.*\d*")


def megatron_postprocess(text: str) -> str | None:
    """VQA normalisation + Megatron's `extra_processing`; None where Megatron would raise (empty result)."""
    text = normalize_answer(text)
    if _DECIMAL.match(text):
        whole, frac = text.split(".")
        text = whole if not any(int(d) for d in frac) else text[: len(whole) + 3]  # truncation, not rounding
    text = text.replace("%", "")
    if not text:
        return None
    return text[:-1] if text.endswith(".") else text


def megatron_extract(text: str) -> str:
    """Prediction only: in a reply with letters (and no "e+"), "answer is N" -> "N"."""
    if re.search(r"[a-zA-Z]", text) and "e+" not in text:
        m = _ANSWER_IS.search(text)
        if m:
            n = _NUMBER.search(m.group(0))
            if n:
                return n.group(0)
    return text


def _score_nvlm(record: Mapping, prediction: str) -> float:
    answer = record.get("answer", "")
    if record.get("question_type") == "multi_choice":
        all_choices, index2ans = choices_of(record)
        gold = _gold_letter(answer, all_choices, index2ans)
        letter = parse_multi_choice(prediction, all_choices, index2ans, variant="megatron")
        return float(gold is not None and letter == gold)
    if isinstance(answer, (list, tuple)):
        if len(answer) != 1:  # Megatron asserts a single free-form gold
            return 0.0
        answer = answer[0]
    pred = megatron_postprocess(prediction)
    gold = megatron_postprocess(str(answer))
    if pred is None or gold is None:
        return 0.0
    return float(megatron_extract(pred) == gold)


# ----------------------------------------------------------------------------------------------------------------
# official (lupantech/MathVista, rule-based part)

_QUICK = re.compile(r'The answer is "(.*)"\.')
_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")


def official_extract(response: str, question_type: str, answer_type: str, choices: Sequence[str]) -> str:
    """MathVista's `extract_answer` with `quick_extract`; the reply itself where it would call GPT-4."""
    if response == "":
        return ""
    if question_type == "multi_choice" and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    m = _QUICK.search(response)
    if m:
        return m.group(1)
    return response


def official_normalize(
    extraction: str, choices: Sequence[str], question_type: str, answer_type: str, precision
) -> str | None:
    """MathVista's `normalize_extracted_answer` (ignore_empty_extractions=False)."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        letters = _PAREN_LETTER.findall(extraction)
        if letters:
            extraction = letters[0].upper()
        sequential = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in sequential:
            return choices[sequential.index(extraction)]
        distances = [levenshtein(extraction, c) for c in choices]
        return choices[distances.index(min(distances))] if choices else None
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
    except (ValueError, TypeError, OverflowError):
        return None
    return str(extraction).strip()  # "list" is str(); an unknown type raises upstream


def _score_official(record: Mapping, prediction: str) -> float:
    question_type = str(record.get("question_type", ""))
    answer_type = str(record.get("answer_type", ""))
    answer = record.get("answer", "")
    choices: list[str] = []
    if question_type == "multi_choice":
        all_choices, index2ans = choices_of(record)
        choices = [index2ans.get(c, "") for c in all_choices]
        letter = _gold_letter(answer, all_choices, index2ans)
        answer = index2ans[letter] if letter is not None and letter in index2ans else answer
    extraction = official_extract(prediction, question_type, answer_type, choices)
    normalized = official_normalize(extraction, choices, question_type, answer_type, record.get("precision"))
    return float(normalized is not None and normalized == str(answer))


# ----------------------------------------------------------------------------------------------------------------
# Records


def _gold_letter(answer, all_choices: Sequence[str], index2ans: Mapping[str, str]) -> str | None:
    answer = str(answer)
    if answer in all_choices:
        return answer
    for letter, text in index2ans.items():
        if text == answer:
            return letter
    return None


def score(record: Mapping, protocol: str = "nvlm") -> float:
    check_protocol(protocol)
    prediction = record.get("prediction")
    if prediction is None:
        return 0.0
    if protocol == "nvlm":
        return _score_nvlm(record, str(prediction))
    return _score_official(record, str(prediction))


def _task_of(record: Mapping) -> str | None:
    metadata = record.get("metadata")
    task = record.get("task") or (metadata.get("task") if isinstance(metadata, Mapping) else None)
    return str(task) if task else None


def aggregate(records: Sequence[Mapping], scores: Sequence[float], protocol: str = "nvlm") -> dict:
    """Accuracy ×100, plus per question_type, answer_type and task (FQA, GPS, MWP, TQA, VQA) where present."""
    check_protocol(protocol)
    out: dict = {"score": 100.0 * sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}
    keys = {
        "by_question_type": lambda r: str(r["question_type"]) if r.get("question_type") else None,
        "by_answer_type": lambda r: str(r["answer_type"]) if r.get("answer_type") else None,
        "by_task": _task_of,
    }
    for name, key in keys.items():
        groups = group_scores((key(r), s) for r, s in zip(records, scores))
        if groups:
            out[name] = groups
    return out
