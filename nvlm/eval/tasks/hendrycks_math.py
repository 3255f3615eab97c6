"""MATH (hendrycks, test) loader, zero-shot chain of thought (EVAL.md §11; the prompt is a project decision).

Notable:
- Data: the release's directory of per-problem JSON files (`MATH/test/{type}/{n}.json` with problem, level, type,
  solution); given `MATH/`, only its `test/` is read. Files are ordered by folder, then number. Ids are the path
  below the split without ".json" ("algebra/1"). A JSONL/JSON list of the same fields (MATH-500 style) works too;
  its ids are `unique_id` when present, else row positions.
- Prompt: "{problem}\\nPlease reason step by step, and put your final answer within \\boxed{}." -- the scorer takes
  the reply's last \\boxed{}.
- Reference: `solution` (the gold is its last \\boxed{}), `type`, `level`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import DataError, Sample, find_files, iter_rows, read_json, require
from nvlm.eval.tasks.gsm8k import COT_INSTRUCTION

FORMATS = "the MATH release's test/{type}/{n}.json files (problem, level, type, solution), or a JSONL of them"
MAX_NEW_TOKENS = 1024


def _sort_key(root: Path, file: Path):
    rel = file.relative_to(root)
    stem = rel.stem
    return (str(rel.parent), int(stem) if stem.isdigit() else 0, stem)


def _items(path: Path) -> Iterator[tuple[str, str, dict]]:
    if path.is_dir():
        root = path / "test" if (path / "test").is_dir() else path
        files = sorted(find_files(root, ["**/*.json"], "MATH problem"), key=lambda f: _sort_key(root, f))
        for file in files:
            row = read_json(file)
            yield str(file), file.relative_to(root).with_suffix("").as_posix(), row
    else:
        for i, row in enumerate(iter_rows(path, FORMATS)):
            yield f"{path}, item {i}", str(row.get("unique_id") or i), row


def load(path: Path) -> Iterator[Sample]:
    what = "MATH fields problem, solution"
    for where, sample_id, row in _items(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with {what}")
        reference = {"solution": str(require(row, "solution", where, what))}
        for key in ("type", "level"):
            if row.get(key) is not None:
                reference[key] = str(row[key])
        if "type" not in reference and row.get("subject"):  # MATH-500 calls the type "subject"
            reference["type"] = str(row["subject"])
        yield Sample(
            id=sample_id,
            prompt=f"{require(row, 'problem', where, what)}\n{COT_INSTRUCTION}",
            reference=reference,
            max_new_tokens=MAX_NEW_TOKENS,
        )
