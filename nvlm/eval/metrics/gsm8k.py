"""GSM8K scoring (EVAL.md §10).

Notable:
- `nvlm` is lm-evaluation-harness `gsm8k` "flexible-extract": the *last* match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` in
  the reply, then exact match (case-insensitive) after deleting ",", "$", everything up to "#### " and one trailing
  "." from both sides. So "72.00" != "72", "$18.50." != "18.5", a number written after the answer wins, and
  "\\boxed{72}" works.
- `official` is openai/grade-school-math `is_correct`: the reply must contain "#### N" (the first one counts), only
  commas are removed, no "$" or trailing-"." cleanup.
- The gold may be the worked solution ending "#### N" or the bare number.
- No `aggregate`: the registry's default (mean ×100, n) is all GSM8K reports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from nvlm.eval.metrics import check_protocol

_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
_OPENAI_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def flexible_extract(reply: str) -> str | None:
    """The last number-like run in the reply (lm-eval regex filter, group_select=-1), or None."""
    matches = _FLEXIBLE.findall(reply)
    if not matches:
        return None
    return next(g for g in matches[-1] if g).strip()


def _lm_eval_normalize(text: str) -> str:
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def openai_extract(text: str) -> str | None:
    """grade-school-math `extract_answer`: the number after the first "#### ", commas removed, or None."""
    m = _OPENAI_ANSWER.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def gold_answer(answer) -> str:
    """The text after the last "####" (or the whole field when there is none), stripped."""
    return str(answer).split("####")[-1].strip()


def score(record: Mapping, protocol: str = "nvlm") -> float:
    check_protocol(protocol)
    prediction = record.get("prediction")
    gold = gold_answer(record.get("answer", ""))
    if prediction is None or not gold:
        return 0.0
    if protocol == "nvlm":
        extracted = flexible_extract(str(prediction))
        if extracted is None:  # lm-eval's "[invalid]" can never equal a number
            return 0.0
        return float(_lm_eval_normalize(extracted) == _lm_eval_normalize(gold))
    extracted = openai_extract(str(prediction))
    return float(extracted is not None and extracted == gold.replace(",", ""))

