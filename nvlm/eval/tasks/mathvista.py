"""MathVista (testmini) loader (EVAL.md §7; prompt SPEC §7.3, Megatron NVLM-1.0 tag).

Notable:
- Data: the HF `AI4Math/MathVista` parquet (`testmini-*.parquet`; a directory loads every one under it), images
  from `decoded_image` (bytes); or the release's `annot_testmini.json` / `testmini.json` (an object keyed by pid,
  or a list) whose `image` ("images/1.jpg") is resolved beside the JSON.
- Prompt, as Megatron: multiple choice "{question}\\n" + "A. choice\\n" lines + "Answer with the option's letter
  from the given choices directly."; free-form: the dataset's `query` with the literal "Hint: " removed.
- Reference: `question_type`, `answer` (the gold *letter* for multiple choice, as Megatron; the choice text when
  the answer is not among the choices), `answer_type`, `precision` (NaN -> None), `unit`, `all_choices` +
  `index2ans` (multiple choice), and `task` from `metadata` for the per-task breakdown.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from nvlm.eval.tasks.common import (
    IMAGE,
    LETTER_ANSWER,
    DataError,
    Sample,
    as_list,
    clean_number,
    embedded_image,
    find_files,
    iter_parquet,
    lettered_options,
    option_block,
    read_json,
    require,
)

FORMATS = "the HF AI4Math/MathVista testmini parquet, or annot_testmini.json (+ images/)"
_COLUMNS = ("pid", "question", "image", "decoded_image", "choices", "unit", "precision", "answer", "question_type",
            "answer_type", "metadata", "query")  # fmt: skip


def _rows(path: Path) -> Iterator[tuple[Path, int, Mapping]]:
    if path.is_dir():
        files = find_files(path, ["**/testmini-*.parquet", "annot_testmini.json", "testmini.json"], "MathVista")
    else:
        files = [path]
    for file in files:
        if file.name.endswith(".parquet"):
            for i, row in enumerate(iter_parquet(file, _COLUMNS)):
                yield file, i, row
        elif file.name.endswith(".json"):
            data = read_json(file)
            items = list(data.values()) if isinstance(data, Mapping) else data
            if not isinstance(items, list):
                raise DataError(f"{file}: expected MathVista items (an object keyed by pid, or a list)")
            for i, row in enumerate(items):
                yield file, i, row
        else:
            raise DataError(f"{file}: unsupported file type; expected {FORMATS}")


def load(path: Path) -> Iterator[Sample]:
    what = "MathVista fields pid, question, query, question_type, answer, answer_type, choices, image"
    for file, i, row in _rows(path):
        where = f"{file}, item {i}"
        question_type = str(require(row, "question_type", where, what))
        answer = str(require(row, "answer", where, what))
        metadata = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
        reference = {
            "question_type": question_type,
            "answer": answer,
            "answer_type": row.get("answer_type"),
            "precision": clean_number(row.get("precision")),
            "unit": row.get("unit"),
        }
        if question_type == "multi_choice":
            choices = [str(c) for c in as_list(require(row, "choices", where, what), where, "choices")]
            all_choices, index2ans = lettered_options(choices)
            if answer in choices:
                reference["answer"] = all_choices[choices.index(answer)]
            reference.update(all_choices=all_choices, index2ans=index2ans)
            prompt = f"{require(row, 'question', where, what)}\n{option_block(choices)}{LETTER_ANSWER}"
        else:
            prompt = str(require(row, "query", where, what)).replace("Hint: ", "")
        if metadata.get("task"):
            reference["task"] = str(metadata["task"])
        image = row.get("decoded_image") or row.get("image")
        yield Sample(
            id=str(require(row, "pid", where, what)),
            prompt=f"{IMAGE}\n{prompt}",
            images=(embedded_image(image, file.parent, where),),
            reference=reference,
        )
