"""MMMU (validation) scoring: multiple-choice letter parsing and open-answer matching (EVAL.md §6).

Notable:
- `nvlm` is Megatron-LM HEAD: MC replies first have `\\answer{..}` / `\\boxed{..}` unwrapped, "X)" counts as a
  bracketed letter, and a reply with no candidate falls back to the *first* choice.
- `official` is the MMMU repo: no unwrap, no "X)" rule, and the fallback is `random.choice` from a generator seeded
  with 42 afresh for every reply. That is the first draw upstream makes after `random.seed(42)`, but it does not
  depend on the order records are scored in (upstream's later draws do).
- An empty reply is not special-cased: it takes the protocol's fallback, as both references do. Only a missing
  (None) prediction scores 0 outright.
- Odd upstream rules are kept on purpose: the edge punctuation is stripped one character at a time; "B. text" has
  no candidate; lower-case letters never match; several candidates go to the right-most last occurrence, ties to
  the earlier choice; a candidate found only through "X)" ranks by its "(X)" position, i.e. -1.
- Open answers (both protocols) use MMMU's parser: indicator tails + every number, numbers rounded to 2 decimals,
  string golds matched as substrings.
- `parse_multi_choice` is shared with the MathVista and MMLU scorers.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import check_protocol

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
_SUBJECT_TO_DISCIPLINE = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}

_EDGE_PUNCT = (",", ".", "!", "?", ";", ":", "'")
_FALLBACK_SEED = 42


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice


def unwrap_answer(text: str) -> str:
    """Megatron HEAD's pre-parse step: the first `\\answer{..}`, else the first `\\boxed{..}`, up to the first "}"."""
    for macro in ("answer", "boxed"):
        m = re.search(r"\\" + macro + r"\{(.*?)\}", text)
        if m:
            return m.group(1)
    return text.replace("Answer:", "Answer: ")


def parse_multi_choice(
    response: str,
    all_choices: Sequence[str],
    index2ans: Mapping[str, str],
    *,
    variant: str = "megatron",
) -> str:
    """MMMU's `parse_multi_choice_response`: the predicted letter. variant: "megatron" (HEAD) or "upstream"."""
    if variant not in ("megatron", "upstream"):
        raise ValueError(f"unknown variant {variant!r}; expected 'megatron' or 'upstream'")
    all_choices = list(all_choices)
    if not all_choices:
        return ""
    # One character at a time, in this order: ",.x" keeps its "," because "." was only exposed after the "," pass.
    for ch in _EDGE_PUNCT:
        response = response.strip(ch)
    response = f" {response} "  # so " A " also matches at either end

    candidates: list[str] = []
    bracketed = False
    by_content = False
    for c in all_choices:
        if f"({c})" in response or (variant == "megatron" and f"{c})" in response):
            candidates.append(c)
            bracketed = True
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        lowered = response.lower()
        candidates = [c for c, text in index2ans.items() if str(text).lower() in lowered]
        by_content = bool(candidates)

    if not candidates:
        if variant == "megatron":
            return all_choices[0]
        return random.Random(_FALLBACK_SEED).choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]

    if by_content:
        lowered = response.lower()
        positions = [lowered.rfind(str(index2ans[c]).lower()) for c in candidates]
    elif bracketed:
        # HEAD searches "(X)" even for a candidate that only matched "X)", which then ranks at -1.
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]  # argmax: ties go to the earlier candidate


# ----------------------------------------------------------------------------------------------------------------
# Open questions

_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_TAILS = {":", ",", ".", "!", "?", ";", "'"}
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
    """Every number in `text`: with thousands commas, then scientific, then plain (a number may appear twice)."""
    return _NUM_COMMAS.findall(text) + _NUM_SCIENTIFIC.findall(text) + _NUM_SIMPLE.findall(text)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[float | str]:
    """A number becomes [float rounded to 2 places]; a string is lower-cased, and one character becomes [" x", "x "]."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]  # so a one-letter gold cannot match inside any word
    return [text]


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The split's capital-letter lookahead runs on lower-cased text, so in effect only newlines split.
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys: list[str] = []
    for i, sentence in enumerate(sentences):
        indicators = _INDICATORS + (("=",) if i == len(sentences) - 1 else ())
        shortest: str | None = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                # An empty tail is falsy upstream, so the next indicator replaces it whatever its length.
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_TAILS:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list[float | str]:
    """MMMU's `parse_open_response`: the normalised candidate answers (floats and lower-case strings)."""
    keys = _key_subresponses(response)
    items: list[str] = list(keys)
    for key in keys:
        items.extend(extract_numbers(key))
    preds: list[float | str] = []
    for item in items:
        for norm in normalize_str(item):
            if norm not in preds:
                preds.append(norm)
    return preds


def open_correct(gold: str | Sequence[str], preds: Sequence[float | str]) -> bool:
    """A float pred must equal a normalised gold float; a string pred must contain a normalised gold string."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm_golds = [n for g in golds for n in normalize_str(str(g))]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in norm_golds):
                return True
        elif any(isinstance(g, float) and g == pred for g in norm_golds):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Records


def choices_of(record: Mapping) -> tuple[list[str], dict[str, str]]:
    """(all_choices, index2ans) from `all_choices`/`index2ans`, else lettered from `options` (MMMU: a list or its
    repr) or `choices` (MathVista, MMLU)."""
    index2ans = {str(k): str(v) for k, v in (record.get("index2ans") or {}).items()}
    all_choices = [str(c) for c in (record.get("all_choices") or index2ans)]
    options = record.get("options") or record.get("choices")
    if not all_choices and options:
        if isinstance(options, str):
            try:
                options = ast.literal_eval(options)
            except (ValueError, SyntaxError):
                options = []
        all_choices = [chr(ord("A") + i) for i in range(len(options))]
        index2ans = dict(zip(all_choices, map(str, options)))
    return all_choices, index2ans


def _gold(answer) -> str | list[str]:
    # HF MMMU stores the 3 multi-answer open golds as the repr of a list of strings.
    if isinstance(answer, str) and answer.startswith("[") and answer.endswith("]"):
        try:
            parsed = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(parsed, list) and parsed and all(isinstance(x, str) for x in parsed):
            return parsed
        return answer
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    return str(answer)


def score(record: Mapping, protocol: str = "nvlm") -> float:
    check_protocol(protocol)
    prediction = record.get("prediction")
    if prediction is None:
        return 0.0
    prediction = str(prediction)
    gold = _gold(record.get("answer", ""))

    if record.get("question_type") == "multiple-choice":
        all_choices, index2ans = choices_of(record)
        if protocol == "nvlm":
            letter = parse_multi_choice(unwrap_answer(prediction), all_choices, index2ans, variant="megatron")
        else:
            letter = parse_multi_choice(prediction, all_choices, index2ans, variant="upstream")
        golds = [gold] if isinstance(gold, str) else gold
        return float(bool(letter) and letter in golds)
    return float(open_correct(gold, parse_open(prediction)))


def subject_of(record: Mapping) -> str | None:
    """`subject`, else the middle of an MMMU id ("validation_Art_Theory_12" -> "Art_Theory")."""
    if record.get("subject"):
        return str(record["subject"])
    parts = str(record.get("id", "")).split("_")
    return "_".join(parts[1:-1]) or None


def group_scores(pairs) -> dict[str, dict[str, float]]:
    """{key: {"score": mean ×100, "n": count}} from (key, score) pairs; a None key is skipped."""
    groups: dict[str, list[float]] = {}
    for key, s in pairs:
        if key is not None:
            groups.setdefault(key, []).append(s)
    return {k: {"score": 100.0 * sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def aggregate(records: Sequence[Mapping], scores: Sequence[float], protocol: str = "nvlm") -> dict:
    """Instance-level accuracy ×100 (MMMU's "Overall"), plus per subject and per discipline."""
    check_protocol(protocol)
    subjects = [subject_of(r) for r in records]
    out: dict = {"score": 100.0 * sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}
    by_subject = group_scores(zip(subjects, scores))
    if by_subject:
        out["by_subject"] = by_subject
        out["by_discipline"] = group_scores((_SUBJECT_TO_DISCIPLINE.get(s or ""), x) for s, x in zip(subjects, scores))
    return out
