"""AI2D (test) loader (EVAL.md §8; prompt SPEC §7.3, Megatron NVLM-1.0 tag).

Notable:
- Megatron's format: a JSONL of {question_id, question, answer, image} whose `question` already holds the options
  and the instruction (the InternVL/VLMEvalKit-style `test_vlmevalkit.jsonl`); the prompt is "<image>\\n{question}"
  unchanged. `image` is resolved beside the JSONL, under `images/`, `abc_images/`, `AI2D_TEST/`,
  `AI2D_TEST_NO_MASK_IMAGES/`, or with its leading folders dropped.
- VLMEvalKit's TSV (`AI2D_TEST.tsv`, or `AI2D_TEST_NO_MASK.tsv` for the no-mask setting NVLM's 94.2 reportedly
  used) is accepted too: base64 images (a short all-digit cell points at another row's image, as VLMEvalKit
  de-duplicates them), option columns A, B, C, ... Its prompt is built in the Megatron multiple-choice style:
  "{question}\\nA. {A}\\nB. {B}\\n...\\nAnswer with the option's letter from the given choices directly."
  (a project decision: neither source fixes a TSV prompt for NVLM).
- A directory must hold exactly one of these files; mask and no-mask are different settings, so no silent pick.
- Reference: `answers` = [letter] and `choices` (option texts, parsed from "A. x" lines where the question embeds
  them) for the `official` protocol's option-text matching.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import (
    IMAGE,
    LETTER_ANSWER,
    DataError,
    Sample,
    decode_base64_image,
    iter_jsonl,
    letters,
    option_block,
    parse_option_lines,
    read_tsv,
    require,
    resolve_image,
)

FORMATS = "test_vlmevalkit.jsonl ({question_id, question, answer, image}) + images, or VLMEvalKit's AI2D_TEST*.tsv"
_IMAGE_DIRS = ("images", "abc_images", "AI2D_TEST", "AI2D_TEST_NO_MASK_IMAGES")


def _reference(answer, options: list[str]) -> dict:
    reference = {"answers": [str(answer).strip()]}
    if options:
        reference["choices"] = options
    return reference


def _load_jsonl(file: Path) -> Iterator[Sample]:
    what = "AI2D items {question_id, question, answer, image}"
    for i, item in enumerate(iter_jsonl(file)):
        where = f"{file}, item {i}"
        question = str(require(item, "question", where, what))
        yield Sample(
            id=str(require(item, "question_id", where, what)),
            prompt=f"{IMAGE}\n{question}",
            images=(resolve_image(file.parent, str(require(item, "image", where, what)), where, _IMAGE_DIRS),),
            reference=_reference(require(item, "answer", where, what), parse_option_lines(question)),
        )


def _load_tsv(file: Path) -> Iterator[Sample]:
    what = "VLMEvalKit columns index, image, question, A, B, ..., answer"
    rows = read_tsv(file)
    by_index = {row.get("index"): row for row in rows}
    for i, row in enumerate(rows):
        where = f"{file}, data row {i + 1}"
        image = str(require(row, "image", where, what))
        if len(image) <= 64 and image.isdigit():  # VLMEvalKit stores a repeated image once and points at it
            image = str(by_index.get(image, {}).get("image") or "")
            if not image:
                raise DataError(f"{where}: image refers to index {row['image']}, which has no image")
        options = []
        for letter in letters(26):
            text = row.get(letter)
            if text is None or text.strip() in ("", "nan"):
                break
            options.append(text)
        if not options:
            raise DataError(f"{where}: no option columns (expected {what})")
        question = str(require(row, "question", where, what))
        yield Sample(
            id=str(require(row, "index", where, what)),
            prompt=f"{IMAGE}\n{question}\n{option_block(options)}{LETTER_ANSWER}",
            images=(decode_base64_image(image, where),),
            reference=_reference(require(row, "answer", where, what), options),
        )


def load(path: Path) -> Iterator[Sample]:
    file = path
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".tsv")))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise DataError(f"{path}: expected exactly one AI2D .jsonl or .tsv file (found: {names}); pass the file")
        file = found[0]
    if file.name.endswith(".tsv"):
        yield from _load_tsv(file)
    elif file.name.endswith(".jsonl"):
        yield from _load_jsonl(file)
    else:
        raise DataError(f"{file}: unsupported file type; expected {FORMATS}")
