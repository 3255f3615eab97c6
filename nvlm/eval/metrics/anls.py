"""DocVQA (SP-DocVQA) ANLS (EVAL.md §3).

Notable:
- Per GT: lower-case, strip, collapse whitespace, NL = Levenshtein / max length; similarity = 1 - NL when
  NL < 0.5 (strictly: NL exactly 0.5 scores 0), else 0. The item score is the maximum over GTs.
- `nvlm` (Megatron-LM HEAD SPDocVQA) first applies the full VQA normalisation to prediction and GTs, so "two"
  matches "2" and "U.S." matches "US". `official` is the RRC definition on the same lower/strip/collapse strings,
  without the VQA step.
- Two empty strings have NL 0 and similarity 1 (a GT that normalises to "" is matched by an empty prediction).
- lmms-eval/VLMEvalKit's raw-length denominator and >= 0.5 threshold are not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import as_answer_list, as_text, check_protocol
from nvlm.eval.metrics.vqa import normalize_answer

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit insert/delete/substitute costs (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _canonical(text: str) -> str:
    return " ".join(text.strip().lower().split())


def similarity(prediction: str, gold: str, threshold: float = THRESHOLD) -> float:
    """1 - NL if NL < threshold else 0, on lower-cased, stripped, whitespace-collapsed strings."""
    p, g = _canonical(prediction), _canonical(gold)
    length = max(len(p), len(g))
    nl = levenshtein(p, g) / length if length else 0.0
    return 1.0 - nl if nl < threshold else 0.0


def anls(prediction, answers: Sequence, protocol: str = "nvlm") -> float:
    """One question's ANLS in [0, 1]: the best similarity over the GT answers (0 without GTs)."""
    check_protocol(protocol)
    gts = as_answer_list(answers)
    if not gts:
        return 0.0
    pred = as_text(prediction)
    if protocol == "nvlm":
        pred = normalize_answer(pred)
        gts = [normalize_answer(gt) for gt in gts]
    return max(similarity(pred, gt) for gt in gts)


def score(record: Mapping, protocol: str = "nvlm") -> float:
    return anls(record.get("prediction"), record.get("answers"), protocol)
