"""RealWorldQA loader (EVAL.md §8).

Notable:
- The NVLM-1.0 tag has no RealWorldQA task; prompt and system message follow Megatron-LM HEAD (EVAL.md §1, §14):
  system "Follow the user's instruction and answer questions.".
- Megatron HEAD's JSON list [{image ("N.webp"), question, question_type, choices, correct_choice_index, answer}]:
  "multi-choice" items get "A. choice" lines + "Answer with the option's letter from the given choices directly."
  and the gold letter; others get "\\nAnswer the question using a single word or phrase." and `answer`. The id is
  the image's stem, as Megatron's question_id. Images beside the JSON or under `images/`.
- The public HF release (`xai-org/RealworldQA`, parquet with `image`, `question`, `answer`) already has options and
  instruction inside `question`, so the prompt is "<image>\\n{question}" unchanged; ids are row positions across the
  sorted parquet files. Option texts are parsed from its "A. x" lines into `choices` for the `official` protocol.
- A directory is read as the Megatron list when it holds exactly one .json file, else as the parquet release.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import (
    IMAGE,
    LETTER_ANSWER,
    SHORT_ANSWER,
    SYSTEM_HEAD,
    DataError,
    Sample,
    as_list,
    embedded_image,
    find_files,
    iter_parquet,
    json_items,
    letters,
    option_block,
    parse_option_lines,
    require,
    resolve_image,
)

FORMATS = (
    "Megatron's RealWorldQA JSON list [{image, question, question_type, choices, correct_choice_index, answer}] "
    "+ images, or the HF xai-org/RealworldQA parquet files (image, question, answer)"
)


def _load_megatron(file: Path) -> Iterator[Sample]:
    what = "RealWorldQA items {image, question, question_type, choices, correct_choice_index, answer}"
    for i, item in enumerate(json_items(file, what)):
        where = f"{file}, item {i}"
        image = str(require(item, "image", where, what))
        question = str(require(item, "question", where, what))
        if item.get("question_type") == "multi-choice":
            choices = [str(c) for c in as_list(require(item, "choices", where, what), where, "choices")]
            index = require(item, "correct_choice_index", where, what)
            if not isinstance(index, int) or not 0 <= index < len(choices):
                raise DataError(f"{where}: correct_choice_index {index!r} is not an index into the choices")
            prompt = f"{IMAGE}\n{question}\n{option_block(choices)}{LETTER_ANSWER}"
            reference = {"answers": [letters(len(choices))[index]], "choices": choices}
        else:
            prompt = f"{IMAGE}\n{question}\n{SHORT_ANSWER}"
            reference = {"answers": [str(require(item, "answer", where, what))]}
        yield Sample(
            id=Path(image).stem,
            prompt=prompt,
            images=(resolve_image(file.parent, image, where, ("images",)),),
            reference=reference,
            system=SYSTEM_HEAD,
        )


def _load_parquet(files: list[Path]) -> Iterator[Sample]:
    what = "RealWorldQA rows (image, question, answer)"
    n = 0
    for file in files:
        for i, row in enumerate(iter_parquet(file, ["image", "question", "answer"])):
            where = f"{file}, row {i}"
            question = str(require(row, "question", where, what))
            reference = {"answers": [str(require(row, "answer", where, what)).strip()]}
            options = parse_option_lines(question)
            if options:
                reference["choices"] = options
            yield Sample(
                id=str(n),
                prompt=f"{IMAGE}\n{question}",
                images=(embedded_image(require(row, "image", where, what), file.parent, where, ("images",)),),
                reference=reference,
                system=SYSTEM_HEAD,
            )
            n += 1


def load(path: Path) -> Iterator[Sample]:
    if path.is_dir():
        jsons = sorted(path.glob("*.json"))
        if len(jsons) == 1:
            yield from _load_megatron(jsons[0])
        else:
            yield from _load_parquet(find_files(path, ["*.parquet", "**/*.parquet"], "RealWorldQA .json or parquet"))
    elif path.name.endswith(".parquet"):
        yield from _load_parquet([path])
    elif path.name.endswith(".json"):
        yield from _load_megatron(path)
    else:
        raise DataError(f"{path}: unsupported file type; expected {FORMATS}")
