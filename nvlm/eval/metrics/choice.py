"""AI2D and RealWorldQA: option-letter exact match (EVAL.md §8).

Notable:
- `nvlm` (Megatron-LM HEAD): VQA-normalise prediction and gold, then exact equality. "(B)", "B.", "[B]", "b" are
  right; "Answer: B", "B. root", "**B**" are wrong; a gold "A" normalises to "", so an empty prediction, "a",
  "the" or "an" all count as correct for it.
- `official`: neither benchmark has an official scorer, so this follows VLMEvalKit's rule-based `can_infer`
  (no LLM judge): replace ". ( ) [ ] , : ; ! * # { }" with spaces; exactly one option letter among the tokens wins
  (upper case only); otherwise exactly one option text contained in the lower-cased reply wins; otherwise wrong.
- `choices` (optional) is a list of option texts in letter order, or a {letter: text} dict. It sets the letters
  `official` looks for (A-D plus the gold's letter without it) and the texts it matches; in both protocols a gold
  that equals an option's text (not a letter) is turned into that option's letter, as Megatron turns RealWorldQA's
  `correct_choice_index` into the letter the prompt asks for.
- Golds that are neither a letter nor an option text (RealWorldQA open questions) use the `nvlm` rule under both
  protocols, so "three" matches "3".
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import as_answer_list, as_text, check_protocol
from nvlm.eval.metrics.vqa import normalize_answer

_LETTERS = string.ascii_uppercase
_OPTION_PUNCTUATION = ".()[],:;!*#{}"


def options_of(choices) -> dict[str, str]:
    """`choices` as {letter: text}: a list is lettered A, B, C, ...; a dict keeps its keys."""
    if not choices:
        return {}
    if isinstance(choices, Mapping):
        return {as_text(k).strip(): as_text(v) for k, v in choices.items()}
    if isinstance(choices, str):  # a bare string is one option, not a list of characters
        choices = [choices]
    return {letter: as_text(text) for letter, text in zip(_LETTERS, choices)}


def gold_letter(gold: str, options: Mapping[str, str]) -> str | None:
    """The option letter a gold answer stands for, or None for an open (free-text) gold."""
    g = gold.strip()
    if len(g) == 1 and g in _LETTERS:
        return g
    for letter, text in options.items():
        if text.strip() == g:
            return letter
    return None


def infer_option(prediction: str, options: Mapping[str, str | None]) -> str | None:
    """VLMEvalKit-style letter inference: a unique option letter token, else a unique option text, else None."""
    text = prediction
    for mark in _OPTION_PUNCTUATION:
        text = text.replace(mark, " ")
    tokens = set(text.split())
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1:
        return letters[0]
    lowered = prediction.lower()
    # An empty option text would be "contained" in every reply; it is skipped rather than matched.
    found = [letter for letter, option in options.items() if option and option.lower() in lowered]
    return found[0] if len(found) == 1 else None


def _letters_without_choices(letter: str) -> dict[str, None]:
    last = max(_LETTERS.index(letter), _LETTERS.index("D"))
    return {c: None for c in _LETTERS[: last + 1]}


def choice_accuracy(prediction, answers: Sequence, choices=None, protocol: str = "nvlm") -> float:
    """1.0 when the prediction matches any gold answer under `protocol`, else 0.0."""
    check_protocol(protocol)
    pred = as_text(prediction)
    options = options_of(choices)
    for gold in as_answer_list(answers):
        letter = gold_letter(gold, options)
        if letter is None or protocol == "nvlm":
            if normalize_answer(pred) == normalize_answer(gold if letter is None else letter):
                return 1.0
        elif infer_option(pred, options or _letters_without_choices(letter)) == letter:
            return 1.0
    return 0.0


def score_ai2d(record: Mapping, protocol: str = "nvlm") -> float:
    return choice_accuracy(record.get("prediction"), record.get("answers"), record.get("choices"), protocol)


def score_realworldqa(record: Mapping, protocol: str = "nvlm") -> float:
    return choice_accuracy(record.get("prediction"), record.get("answers"), record.get("choices"), protocol)
