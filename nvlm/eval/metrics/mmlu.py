"""MMLU scoring of generated replies (EVAL.md §9).

Notable:
- `nvlm` is lm-evaluation-harness `mmlu/generative`: keep the reply up to its first newline (a leading newline
  leaves nothing), strip it, then exact-match the gold letter after lower-casing and deleting ASCII punctuation.
  "B.", "(B)", "**B**" and "[B]" are right; "B. Paris" and "The answer is B" are wrong.
- `official`: hendrycks/test compares the log-probabilities of " A".." D", which a reply cannot reproduce, so this
  is the goldens' alt column: MMMU's upstream letter parser (with its content match and its fallback seeded with 42,
  which picks "A" for four choices).
- The gold may be a letter or a 0-based index (HF `cais/mmlu` stores an int).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import check_protocol
from nvlm.eval.metrics.mmmu import choices_of, group_scores, parse_multi_choice

_STRIP_PUNCT = str.maketrans("", "", string.punctuation)


def _normalize(text: str) -> str:
    return text.lower().translate(_STRIP_PUNCT)


def generative_filter(reply: str) -> str:
    """lm-eval's generation stops at "\\n"; the text before it, stripped."""
    return reply.split("\n", 1)[0].strip()


def gold_letter(answer) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return chr(ord("A") + answer)
    return str(answer).strip()


def score(record: Mapping, protocol: str = "nvlm") -> float:
    check_protocol(protocol)
    prediction = record.get("prediction")
    if prediction is None:
        return 0.0
    gold = gold_letter(record.get("answer", ""))
    if not gold:
        return 0.0
    if protocol == "nvlm":
        return float(_normalize(generative_filter(str(prediction))) == _normalize(gold))

    letters, index2ans = choices_of(record)
    letters = letters or ["A", "B", "C", "D"]
    return float(parse_multi_choice(str(prediction), letters, index2ans, variant="upstream") == gold)


def aggregate(records: Sequence[Mapping], scores: Sequence[float], protocol: str = "nvlm") -> dict:
    """Accuracy ×100 over all questions (micro average), plus per `subject` where records carry one."""
    check_protocol(protocol)
    out: dict = {"score": 100.0 * sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}
    by_subject = group_scores((str(r["subject"]) if r.get("subject") else None, s) for r, s in zip(records, scores))
    if by_subject:
        out["by_subject"] = by_subject
    return out
