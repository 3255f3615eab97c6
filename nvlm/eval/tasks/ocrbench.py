"""OCRBench loader (EVAL.md §5; prompt SPEC §7.3, Megatron NVLM-1.0 tag).

Notable:
- Data: `OCRBench.json` (1000 items {dataset_name, id, image_path, question, answers, type}) or a directory holding
  it (also as `OCRBench/OCRBench.json`). `image_path` ("IIIT5K/test/918_1.png") is resolved under
  `OCRBench_Images/` beside the JSON or one level up (the repo's layout: `OCRBench/OCRBench.json` next to
  `OCRBench_Images/`), under `images/`, or beside the JSON.
- The file's `id` repeats across source datasets, so the sample id is the item's position ("0".."999"), as
  Megatron's sample_id.
- Prompt: "<image>\\n{question}", the question unchanged. `answers` stays a string or a list, as in the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import IMAGE, Sample, find_file, json_items, require, resolve_image

FORMATS = "OCRBench.json ([{dataset_name, id, image_path, question, answers, type}]) + OCRBench_Images/"
_IMAGE_DIRS = ("OCRBench_Images", "../OCRBench_Images", "images")


def load(path: Path) -> Iterator[Sample]:
    file = path if path.is_file() else find_file(path, ["OCRBench.json", "*/OCRBench.json"], "OCRBench.json")
    what = "OCRBench items {dataset_name, image_path, question, answers, type}"
    for i, item in enumerate(json_items(file, what)):
        where = f"{file}, item {i}"
        answers = require(item, "answers", where, what)
        yield Sample(
            id=str(i),
            prompt=f"{IMAGE}\n{require(item, 'question', where, what)}",
            images=(resolve_image(file.parent, str(require(item, "image_path", where, what)), where, _IMAGE_DIRS),),
            reference={
                "answers": [str(a) for a in answers] if isinstance(answers, list) else str(answers),
                "dataset_name": str(require(item, "dataset_name", where, what)),
                "type": str(require(item, "type", where, what)),
            },
        )
