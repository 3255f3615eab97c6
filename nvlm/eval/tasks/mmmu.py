"""MMMU (validation) loader (EVAL.md §6; prompt SPEC §7.3, Megatron NVLM-1.0 tag).

Notable:
- Data: the HF `MMMU/MMMU` parquet release, one `{Subject}/validation-*.parquet` per subject; a directory loads
  every `validation-*.parquet` under it, sorted by path (so subject by subject, alphabetically). Columns used: `id`,
  `question`, `options` (a string holding a Python list), `answer`, `question_type`, `image_1`. The same columns
  as a JSON/JSONL file (with `image_1` a path relative to it) are read too, without pyarrow.
- Prompt (the MMMU repo's llava1.5 config, `task_instructions` empty): multiple-choice
  "{question}\\n" + "(A) opt\\n" lines + "\\nAnswer with the option's letter from the given choices directly." -- the
  option lines end in a newline, so a blank line precedes the instruction, and none follows the question.
  Open: "{question}\\nAnswer the question using a single word or phrase." Then every "<image k>" tag is deleted
  (also inside options) and "<image>\\n" is put in front: single-image mode, `image_1` only, as Megatron does.
- Reference: `question_type`, `answer` (the letter, or the open answer; a list's repr is left for the scorer),
  `all_choices` + `index2ans` for multiple choice, and `subject` for the per-subject breakdown.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import (
    IMAGE,
    LETTER_ANSWER,
    SHORT_ANSWER,
    DataError,
    Sample,
    as_list,
    embedded_image,
    find_files,
    iter_rows,
    lettered_options,
    option_block,
    require,
)

FORMATS = "the HF MMMU/MMMU parquet files ({Subject}/validation-*.parquet), one file or a directory of them"
_COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")
_IMAGE_TAG = re.compile(r"<image \d+>")


def build_prompt(question: str, question_type: str, options: list[str]) -> str:
    if question_type == "multiple-choice":
        text = f"{question}\n{option_block(options, '(A) ')}\n{LETTER_ANSWER}"
    else:
        text = f"{question}\n{SHORT_ANSWER}"
    return f"{IMAGE}\n{_IMAGE_TAG.sub('', text)}"


def _subject(sample_id: str) -> str:
    # "validation_Art_Theory_12" -> "Art_Theory"
    return "_".join(sample_id.split("_")[1:-1])


def load(path: Path) -> Iterator[Sample]:
    files = [path] if path.is_file() else find_files(path, ["**/validation-*.parquet"], "MMMU validation parquet")
    what = f"MMMU columns {', '.join(_COLUMNS)}"
    for file in files:
        for i, row in enumerate(iter_rows(file, FORMATS, _COLUMNS)):
            where = f"{file}, row {i}"
            sample_id = str(require(row, "id", where, what))
            question_type = str(require(row, "question_type", where, what))
            question = str(require(row, "question", where, what))
            answer = require(row, "answer", where, what)
            reference = {"question_type": question_type, "answer": answer if isinstance(answer, list) else str(answer)}
            options: list[str] = []
            if question_type == "multiple-choice":
                options = [str(o) for o in as_list(require(row, "options", where, what), where, "options")]
                if not options:
                    raise DataError(f"{where}: multiple-choice question without options")
                reference["all_choices"], reference["index2ans"] = lettered_options(options)
            elif question_type != "open":
                raise DataError(f"{where}: question_type {question_type!r} is neither 'multiple-choice' nor 'open'")
            reference["subject"] = _subject(sample_id)
            yield Sample(
                id=sample_id,
                prompt=build_prompt(question, question_type, options),
                images=(embedded_image(require(row, "image_1", where, what), file.parent, where, ("images",)),),
                reference=reference,
            )
