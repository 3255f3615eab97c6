"""Benchmark tasks: read a benchmark's public release files into `Sample`s, and cut replies for scoring.

Notable:
- `load_samples(name, data, limit=)` returns samples whose `prompt` is NVLM's (SPEC §7.3: the Megatron NVLM-1.0
  tag prompts, Megatron HEAD where the tag has no task) and whose `reference` holds exactly the gold fields the
  benchmark's scorer in `nvlm.eval.metrics` reads. Ids are unique within a benchmark (checked), for resume/dedup.
- `postprocess(name, text, protocol)` is the generation-side cut of EVAL.md §1. Under `nvlm`, the benchmarks that
  follow the NVLM-1.0 tag keep only the first paragraph's first line of the stripped reply ("tag"); DocVQA and
  RealWorldQA follow HEAD, which keeps the whole stripped reply ("strip"). `official` strips only. Text benchmarks
  keep the reply as it is under both ("keep": MMLU's scorer applies lm-eval's own first-line filter, and GSM8K/MATH
  need the whole chain of thought); HumanEval takes the code out of the first fenced block ("code").
- Everything after an end-of-turn marker (`<|im_end|>`, `<|endoftext|>`) is dropped first, in every case.
- Loaders are one small module per benchmark family; shared readers and the `Sample` record live in `common.py`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from nvlm.eval.metrics import check_protocol
from nvlm.eval.tasks import (
    ai2d,
    chartqa,
    docvqa,
    gsm8k,
    hendrycks_math,
    humaneval,
    mathvista,
    mmlu,
    mmmu,
    ocrbench,
    realworldqa,
    vqa,
)
from nvlm.eval.tasks.common import DataError, Sample

__all__ = ["TASKS", "DataError", "Sample", "Task", "get_task", "load_samples", "postprocess"]

CUTS = ("tag", "strip", "keep", "code")


@dataclass(frozen=True)
class Task:
    """One benchmark: its loader, how `postprocess` cuts replies under `nvlm`, and the data formats it reads."""

    name: str
    load: Callable[[Path], Iterable[Sample]]
    cut: str
    formats: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("mmmu", mmmu.load, "tag", mmmu.FORMATS),
        Task("mathvista", mathvista.load, "tag", mathvista.FORMATS),
        Task("ocrbench", ocrbench.load, "tag", ocrbench.FORMATS),
        Task("ai2d", ai2d.load, "tag", ai2d.FORMATS),
        Task("chartqa", chartqa.load, "tag", chartqa.FORMATS),
        Task("docvqa", docvqa.load, "strip", docvqa.FORMATS),
        Task("textvqa", vqa.load_textvqa, "tag", vqa.TEXTVQA_FORMATS),
        Task("realworldqa", realworldqa.load, "strip", realworldqa.FORMATS),
        Task("vqav2", vqa.load_vqav2, "tag", vqa.VQAV2_FORMATS),
        Task("mmlu", mmlu.load, "keep", mmlu.FORMATS),
        Task("gsm8k", gsm8k.load, "keep", gsm8k.FORMATS),
        Task("math", hendrycks_math.load, "keep", hendrycks_math.FORMATS),
        Task("humaneval", humaneval.load, "code", humaneval.FORMATS),
    )
}


def get_task(benchmark: str) -> Task:
    if benchmark not in TASKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of: {', '.join(sorted(TASKS))}")
    return TASKS[benchmark]


def load_samples(benchmark: str, data: str | Path, *, limit: int | None = None) -> list[Sample]:
    """The first `limit` (default: all) samples of `benchmark` read from `data`, a file or a directory.

    Raises ValueError for an unknown benchmark or a negative limit, and `DataError` (a ValueError) for data that is
    missing, unreadable or not in the benchmark's format; the message names the file and what was expected.
    """
    task = get_task(benchmark)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(data).expanduser().absolute()  # so image paths in the samples stay valid from any directory
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; expected {task.formats}")
    samples = list(itertools.islice(task.load(path), limit))
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise DataError(f"{path}: duplicate {benchmark} sample id {sample.id!r}")
        seen.add(sample.id)
    if not samples and limit != 0:
        raise DataError(f"{path}: no {benchmark} samples found; expected {task.formats}")
    return samples


_END_MARKERS = ("<|im_end|>", "<|endoftext|>")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The body of the first fenced code block (to the end of the text if it is never closed), else the text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def postprocess(benchmark: str, text: str | None, protocol: str = "nvlm") -> str:
    """A generated reply cut the way the protocol's generation side does before scoring (see module docstring)."""
    cut = get_task(benchmark).cut
    check_protocol(protocol)
    text = text or ""
    for marker in _END_MARKERS:
        text = text.split(marker, 1)[0]
    if cut == "code":
        return extract_code(text)
    if cut == "keep":
        return text
    text = text.strip()
    if cut == "tag" and protocol == "nvlm":
        # Megatron NVLM-1.0 `get_generated`: first paragraph, then its first line; no strip afterwards.
        text = text.split("\n\n")[0].split("\n")[0]
    return text
