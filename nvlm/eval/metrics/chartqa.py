"""ChartQA relaxed accuracy (EVAL.md §4).

Notable:
- `nvlm` (Megatron, NVLM-1.0 tag = HEAD): VQA-normalise prediction and GT, strip trailing "%" from both (no /100),
  then if both parse with `float()` accept 0.95*gt <= pred <= 1.05*gt (inclusive), else require string equality.
  The normaliser turns "-10" into "10", so signs are lost; "1,000" = "1000", "five" = "5"; "nan" never matches.
- `official` (the pix2struct rule used by VLMEvalKit and lmms-eval): no normalisation beyond stripping whitespace;
  a trailing "%" divides that side by 100; |pred - gt| / |gt| <= 0.05; a GT of 0 (or a non-number) falls back to a
  case-insensitive string compare, so "0.0" vs "0" is wrong.
- Megatron asserts one GT per question; with several, the item is correct when any GT matches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import as_answer_list, as_text, check_protocol
from nvlm.eval.metrics.vqa import normalize_answer

MAX_RELATIVE_CHANGE = 0.05


def _float_or_none(text: str) -> float | None:
    # Python's float() is the reference's number test: it also takes "nan", "inf", "1e3" and surrounding spaces.
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_match_nvlm(prediction: str, gold: str) -> bool:
    pred = normalize_answer(prediction).rstrip("%")
    gt = normalize_answer(gold).rstrip("%")
    p, g = _float_or_none(pred), _float_or_none(gt)
    if p is not None and g is not None:
        return g * 0.95 <= p <= g * 1.05
    return pred == gt


def _pix2struct_float(text: str) -> float | None:
    if text.endswith("%"):
        value = _float_or_none(text.rstrip("%"))
        return None if value is None else value / 100.0
    return _float_or_none(text)


def relaxed_match_official(prediction: str, gold: str) -> bool:
    pred, gt = prediction.strip(), gold.strip()
    p, g = _pix2struct_float(pred), _pix2struct_float(gt)
    if p is not None and g:  # `g` falsy when 0.0: pix2struct falls back to the string compare then
        return abs(p - g) / abs(g) <= MAX_RELATIVE_CHANGE
    return pred.lower() == gt.lower()


def relaxed_accuracy(prediction, answers: Sequence, protocol: str = "nvlm") -> float:
    check_protocol(protocol)
    match = relaxed_match_nvlm if protocol == "nvlm" else relaxed_match_official
    pred = as_text(prediction)
    return float(any(match(pred, gt) for gt in as_answer_list(answers)))


def score(record: Mapping, protocol: str = "nvlm") -> float:
    return relaxed_accuracy(record.get("prediction"), record.get("answers"), protocol)
