"""MATH scoring: hendrycks `last_boxed_only_string` + `remove_boxed` + `is_equiv` (EVAL.md §11).

Notable:
- Both protocols are the hendrycks/math scorer; lm-eval's "$...$" extraction is not used.
- Extraction finds the last "\\boxed" (else the last "\\fbox") and its balanced braces, then insists on a literal
  "\\boxed{" prefix: "\\fbox{7}" and "\\boxed 7" give None, which scores 0.
- `is_equiv` is string equality after `strip_string`'s fixed rewrites. No numeric or symbolic equivalence:
  "0.75" != "\\frac{3}{4}", "\\frac{2}{4}" != "\\frac{1}{2}", "1,000" != "1000"; only the exact string "0.5"
  becomes "\\frac{1}{2}".
- Where the reference's rewrites raise (two "\\text{ " units, a bare trailing "\\sqrt", a "\\frac" with nothing
  after it) it falls back to comparing the raw strings; so does this.
- A reply (or a gold solution) with no extractable box scores 0. Upstream `is_equiv(None, None)` is True; a
  missing gold is a data error here, not a free point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import check_protocol
from nvlm.eval.metrics.mmmu import group_scores


def last_boxed_only_string(text: str) -> str | None:
    """The last "\\boxed..." (else "\\fbox...") through its matching "}", or None."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx : i + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    """The inside of "\\boxed{...}"; None for anything else (including "\\fbox{...}")."""
    left = "\\boxed{"
    if boxed is None or not boxed.startswith(left) or not boxed.endswith("}"):
        return None
    return boxed[len(left) : -1]


def extract_answer(text: str) -> str | None:
    return remove_boxed(last_boxed_only_string(text))


class _Unfixable(Exception):
    """Raised where the reference's rewrite raises; `is_equiv` then compares the raw strings."""


def _fix_fracs(s: str) -> str:
    pieces = s.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if not piece:
            raise _Unfixable  # the reference indexes piece[0] before its length check
        if piece[0] == "{":
            out += piece
            continue
        if len(piece) < 2:
            return s  # "\frac1": the reference gives up and keeps the whole string
        a, b, rest = piece[0], piece[1], piece[2:]
        out += "{" + a + "}{" + b + "}" + rest if b != "{" else "{" + a + "}" + b + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":  # only canonical integers: "01/2" or " 1/2" stay as they are
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    # In MATH "\text{ " (with the space) only ever introduces a unit on the right.
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _Unfixable
    return parts[0]


def _fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if not piece:
            raise _Unfixable
        out += "\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:]
    return out


def strip_string(s: str) -> str:
    """hendrycks `_strip_string`: the fixed rewrites, in the reference's order."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    halves = s.split("=")
    if len(halves) == 2 and len(halves[0]) <= 2:  # "x=5", "k = 5" -> "5"
        s = halves[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    try:
        return strip_string(a) == strip_string(b)
    except _Unfixable:
        return a == b


def score(record: Mapping, protocol: str = "nvlm") -> float:
    check_protocol(protocol)
    prediction = record.get("prediction")
    if prediction is None:
        return 0.0
    gold = extract_answer(str(record.get("solution", "")))
    pred = extract_answer(str(prediction))
    if gold is None or pred is None:
        return 0.0
    return float(is_equiv(pred, gold))


def aggregate(records: Sequence[Mapping], scores: Sequence[float], protocol: str = "nvlm") -> dict:
    """Accuracy ×100, plus per `type` (subject) and per `level` where records carry them."""
    check_protocol(protocol)
    out: dict = {"score": 100.0 * sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}
    for field in ("type", "level"):
        groups = group_scores((str(r[field]) if r.get(field) else None, s) for r, s in zip(records, scores))
        if groups:
            out[f"by_{field}"] = groups
    return out
