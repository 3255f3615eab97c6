"""OCRBench substring scoring, the 10 categories and the 5 reported sub-totals (EVAL.md §5).

Notable:
- HME100k items: strip, newlines -> spaces, remove every space, then a case-sensitive "GT in prediction" test.
  Every other item: lower-case, strip, newlines -> spaces, then the same substring test ("10" contains "1").
- `nvlm` (Megatron NVLM-1.0 tag) adds a point for *every* matching alternative of a list answer, so an item can
  earn 2 and a category can exceed its maximum; `official` (MultimodalOCR example.py) is binary per item.
- The reported number is the sum of points (NVLM: 853 of 1000), not a mean. Items whose `type` is none of the ten
  categories still count towards the total and are listed under their own name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import as_answer_list, as_text, check_protocol

RECOGNITION = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
CATEGORIES = RECOGNITION + (
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
# Sub-total key -> the categories it sums (Text Recognition is out of 300; the others 200, 200, 200, 100).
SUBTOTALS = {
    "text_recognition": RECOGNITION,
    "scene_text_vqa": ("Scene Text-centric VQA",),
    "doc_vqa": ("Doc-oriented VQA",),
    "kie": ("Key Information Extraction",),
    "hmer": ("Handwritten Mathematical Expression Recognition",),
}


def _normalize_hme(text: str) -> str:
    return text.strip().replace("\n", " ").replace(" ", "")


def _normalize(text: str) -> str:
    return text.lower().strip().replace("\n", " ")


def score(record: Mapping, protocol: str = "nvlm") -> float:
    """Points for one item: the number of matching GT alternatives (`nvlm`) or 0/1 (`official`)."""
    check_protocol(protocol)
    norm = _normalize_hme if record.get("dataset_name") == "HME100k" else _normalize
    pred = norm(as_text(record.get("prediction")))
    hits = sum(norm(gt) in pred for gt in as_answer_list(record.get("answers")))
    return float(hits) if protocol == "nvlm" else float(hits > 0)


def _points(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def aggregate(records: Sequence[Mapping], scores: Sequence[float], protocol: str = "nvlm") -> dict:
    """{"score": total points, "n", "subscores": the 5 reported sub-totals, "categories": points per type}."""
    check_protocol(protocol)
    categories: dict[str, float] = {name: 0.0 for name in CATEGORIES}
    for record, points in zip(records, scores):
        kind = as_text(record.get("type"))
        categories[kind] = categories.get(kind, 0.0) + points
    subscores = {key: _points(sum(categories[c] for c in members)) for key, members in SUBTOTALS.items()}
    return {
        "score": _points(sum(scores)),
        "n": len(scores),
        "subscores": subscores,
        "categories": {name: _points(value) for name, value in categories.items()},
    }
