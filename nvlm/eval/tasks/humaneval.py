"""HumanEval loader (EVAL.md §12; the prompt is a project decision).

Notable:
- Data: `HumanEval.jsonl` or `HumanEval.jsonl.gz` (164 rows {task_id, prompt, canonical_solution, test,
  entry_point}), or a directory holding one. Ids are the task ids ("HumanEval/0").
- Prompt: NVLM-D is a chat model, so instead of raw continuation it is asked for the whole function in a code
  block: "Complete the following Python function. Reply with the complete function in a single Python code
  block.\\n\\n```python\\n{prompt}\\n```". `postprocess` takes the code out of the reply's first fenced block; the
  scorer appends it to the prompt, where a restated `def` simply rebinds the name (EVAL.md §12).
- Reference: `task_id`, `prompt`, `test`, `entry_point` (the scorer reads `prediction` as the completion).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nvlm.eval.tasks.common import Sample, find_file, iter_jsonl, require

FORMATS = "HumanEval.jsonl or HumanEval.jsonl.gz ({task_id, prompt, test, entry_point})"
INSTRUCTION = "Complete the following Python function. Reply with the complete function in a single Python code block."
MAX_NEW_TOKENS = 1024


def build_prompt(code: str) -> str:
    return f"{INSTRUCTION}\n\n```python\n{code.strip()}\n```"


def load(path: Path) -> Iterator[Sample]:
    file = path if path.is_file() else find_file(path, ["HumanEval.jsonl", "HumanEval.jsonl.gz", "*.jsonl*"],
                                                 "HumanEval")
    what = "HumanEval rows {task_id, prompt, test, entry_point}"
    for i, row in enumerate(iter_jsonl(file)):
        where = f"{file}, item {i}"
        reference = {key: str(require(row, key, where, what)) for key in ("task_id", "prompt", "test", "entry_point")}
        yield Sample(
            id=reference["task_id"],
            prompt=build_prompt(reference["prompt"]),
            reference=reference,
            max_new_tokens=MAX_NEW_TOKENS,
        )
