"""GSM8K (test) loader, zero-shot chain of thought (EVAL.md §10; the prompt is a project decision).

Notable:
- Data: grade-school-math's `test.jsonl` ({question, answer: worked solution ending "#### N"}), a directory
  holding it, or the HF `openai/gsm8k` parquet (`main/test-*.parquet`). Ids are line positions ("0", "1", ...).
- Prompt (EVAL.md leaves it open): "{question}\\nPlease reason step by step, and put your final answer within
  \\boxed{}." -- Qwen2's usual math instruction. The `nvlm` scorer (lm-eval flexible-extract) takes the last number
  in the reply, which is the boxed one when the model follows the instruction.
- Reference: `answer`, the whole worked solution (the scorer takes what follows "#### ").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import DataError, Sample, find_file, iter_rows, require

FORMATS = "test.jsonl ({question, answer}), or the HF openai/gsm8k test parquet"
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MAX_NEW_TOKENS = 512


def load(path: Path) -> Iterator[Sample]:
    file = path
    if path.is_dir():
        patterns = ["test.jsonl", "**/test.jsonl", "main/test-*.parquet", "**/test-*.parquet"]
        file = find_file(path, patterns, "GSM8K test")
    what = "GSM8K rows {question, answer}"
    for i, row in enumerate(iter_rows(file, FORMATS, ["question", "answer"])):
        where = f"{file}, item {i}"
        answer = str(require(row, "answer", where, what))
        if "####" not in answer:
            raise DataError(f"{where}: answer has no '#### N' final line")
        yield Sample(
            id=str(i),
            prompt=f"{require(row, 'question', where, what)}\n{COT_INSTRUCTION}",
            reference={"answer": answer},
            max_new_tokens=MAX_NEW_TOKENS,
        )
