"""MMLU (test) loader, zero-shot and generative (EVAL.md §9; the prompt is a project decision).

Notable:
- Data: the HF `cais/mmlu` parquet (`all/test-*.parquet`, or any `test-*.parquet`), the same rows as JSON/JSONL
  ({question, subject, choices, answer: 0-3}), or hendrycks' CSVs (`data/test/{subject}_test.csv`: question, A, B,
  C, D, answer letter; no header). A directory is searched in that order (`all/` first, so HF's per-subject copies
  are not read twice).
- Prompt (EVAL.md leaves it open): lm-eval `mmlu/generative`'s layout with NVLM's own multiple-choice
  instruction in place of the bare "Answer:", so a chat model replies with the letter alone:
  "The following is a multiple choice question about {subject, "_" -> " "}.\\n\\n{question}\\nA. ..\\nB. ..\\nC. ..\\n
  D. ..\\nAnswer with the option's letter from the given choices directly." The scorer keeps the reply's first line.
- Ids are "{subject}/{k}", k counting within the subject. Reference: `answer` (letter), `choices`, `subject`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import (
    LETTER_ANSWER,
    DataError,
    Sample,
    as_list,
    iter_rows,
    letters,
    option_block,
    require,
)

FORMATS = "HF cais/mmlu parquet (all/test-*.parquet) or JSON/JSONL rows, or hendrycks' test/{subject}_test.csv files"
MAX_NEW_TOKENS = 128


def _csv_rows(file: Path) -> Iterator[dict]:
    subject = file.stem.removesuffix("_test")
    try:
        with open(file, encoding="utf-8", newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if len(row) != 6:
                    raise DataError(f"{file}, line {lineno}: expected 6 columns (question, A, B, C, D, answer)")
                yield {"question": row[0], "choices": row[1:5], "answer": row[5].strip(), "subject": subject}
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise DataError(f"cannot read {file}: {exc.strerror or exc}") from None


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for pattern in ("all/test-*.parquet", "test-*.parquet", "test/*_test.csv", "*_test.csv", "*.jsonl", "*.json"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise DataError(f"{path}: no MMLU test files found; expected {FORMATS}")


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    for file in _files(path):
        rows = _csv_rows(file) if file.name.endswith(".csv") else iter_rows(file, FORMATS)
        for i, row in enumerate(rows):
            yield f"{file}, item {i}", row


def build_prompt(subject: str, question: str, choices: list[str]) -> str:
    topic = subject.replace("_", " ")
    intro = f"The following is a multiple choice question about {topic}.\n\n" if topic else ""
    return f"{intro}{question.strip()}\n{option_block(choices)}{LETTER_ANSWER}"


def load(path: Path) -> Iterator[Sample]:
    what = "MMLU fields question, subject, choices, answer"
    counts: dict[str, int] = {}
    for where, row in _rows(path):
        choices = [str(c) for c in as_list(require(row, "choices", where, what), where, "choices")]
        answer = require(row, "answer", where, what)
        valid = letters(len(choices))
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            answer = valid[answer]
        elif str(answer).strip() in valid:
            answer = str(answer).strip()
        else:
            raise DataError(f"{where}: answer {answer!r} is neither a choice index nor a letter {valid[0]}-{valid[-1]}")
        subject = str(row.get("subject") or "")
        k = counts[subject] = counts.get(subject, -1) + 1
        yield Sample(
            id=f"{subject or 'mmlu'}/{k}",
            prompt=build_prompt(subject, str(require(row, "question", where, what)), choices),
            reference={"answer": answer, "choices": choices, "subject": subject},
            max_new_tokens=MAX_NEW_TOKENS,
        )
