"""DocVQA (SP-DocVQA) loader (EVAL.md §3).

Notable:
- The NVLM-1.0 tag has no DocVQA task, so the prompt follows Megatron-LM HEAD (EVAL.md §1, §14): system "Follow the
  user's instruction and answer questions." and "<image>\\n{question}\\nAnswer the question using a single word,
  phrase, or number."
- Data: `val_v1.0.json` (`data[].{questionId, question, image, answers, ...}`) or a directory holding it. `image`
  ("documents/xxx.png") is resolved beside the JSON, then under `images/`, then with leading folders dropped.
- The test split (`test_v1.0.json`, no answers; scored by the RRC server) loads with `answers: []`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import IMAGE, SYSTEM_HEAD, DataError, Sample, find_file, json_items, read_json, require
from nvlm.eval.tasks.common import resolve_image

FORMATS = "val_v1.0.json (data[].{questionId, question, image, answers}) + documents/, or a directory holding them"
SUFFIX = "Answer the question using a single word, phrase, or number."


def load(path: Path) -> Iterator[Sample]:
    file = path if path.is_file() else find_file(path, ["val_v1.0.json", "*_v1.0.json"], "DocVQA")
    what = "DocVQA items {questionId, question, image, answers}"
    header = read_json(file)
    is_test = isinstance(header, dict) and str(header.get("dataset_split", "")).startswith("test")
    for i, item in enumerate(json_items(file, what, header)):
        where = f"{file}, item {i}"
        require(item, "question", where, what)  # also rejects a non-object item
        answers = item.get("answers")
        if answers is None and not (is_test or str(item.get("data_split", "")).startswith("test")):
            raise DataError(f"{where}: missing field 'answers' (expected {what})")
        yield Sample(
            id=str(require(item, "questionId", where, what)),
            prompt=f"{IMAGE}\n{require(item, 'question', where, what)}\n{SUFFIX}",
            images=(resolve_image(file.parent, str(require(item, "image", where, what)), where, ("images",)),),
            reference={"answers": [str(a) for a in answers or []]},
            system=SYSTEM_HEAD,
        )
