"""ChartQA (test) loader (EVAL.md §4; prompt SPEC §7.3, Megatron NVLM-1.0 tag).

Notable:
- Data: `test_human.json` / `test_augmented.json` (lists of {imgname, query, label}) with the charts in `png/`
  (or `images/`, or beside the JSON). A directory loads both splits, human first: NVLM reports the average over the
  two, and with 1250 questions each the mean over all items is that average.
- ChartQA has no question ids; Megatron numbers the items of one file. Ids here are "{split}/{index}"
  ("test_human/0"), unique across the two splits; the reference also carries `split`.
- Prompt: "<image>\\n{query}\\nAnswer the question using a single word or phrase."
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import DataError, Sample, find_files, json_items, require, resolve_image
from nvlm.eval.tasks.vqa import vqa_prompt

FORMATS = "test_human.json and/or test_augmented.json ([{imgname, query, label}]) + png/, or a directory holding them"


def load(path: Path) -> Iterator[Sample]:
    files = [path] if path.is_file() else find_files(path, ["test_*.json", "*.json"], "ChartQA")
    files.sort(key=lambda f: f.name == "test_augmented.json")  # human first, as NVLM lists the splits
    what = "ChartQA items {imgname, query, label}"
    for file in files:
        for i, item in enumerate(json_items(file, what)):
            where = f"{file}, item {i}"
            label = require(item, "label", where, what)
            if isinstance(label, list):  # a few ChartQA exports wrap the single label in a list
                if len(label) != 1:
                    raise DataError(f"{where}: expected one label, got {len(label)}")
                label = label[0]
            yield Sample(
                id=f"{file.stem}/{i}",
                prompt=vqa_prompt(str(require(item, "query", where, what))),
                images=(resolve_image(file.parent, str(require(item, "imgname", where, what)), where,
                                      ("png", "images")),),
                reference={"answers": [str(label)], "split": file.stem},
            )
