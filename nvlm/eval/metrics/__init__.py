"""Registry of benchmark scorers: benchmark name -> (module in this package, score function).

Notable:
- Modules are imported lazily by `get_scorer`, so one missing or broken metric module does not break the others.
- Every module follows one contract: `score(record, protocol="nvlm") -> float` per item (a module serving two
  benchmarks exposes `score_<name>` instead), an optional `aggregate(records, scores, protocol) -> dict`
  (default: {"score": mean x 100, "n": count}) and, where scoring is slow, `score_batch(records, protocol, *,
  timeout)`. An empty or None prediction never raises; an unknown protocol raises ValueError.
- `REQUIRED_FIELDS` lists the record keys the scoring CLI checks before scoring ("a|b" means either key).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

PROTOCOLS = ("nvlm", "official")

BENCHMARKS: dict[str, tuple[str, str]] = {
    "mmmu": ("mmmu", "score"),
    "mathvista": ("mathvista", "score"),
    "ocrbench": ("ocrbench", "score"),
    "ai2d": ("choice", "score_ai2d"),
    "chartqa": ("chartqa", "score"),
    "docvqa": ("anls", "score"),
    "textvqa": ("vqa", "score_textvqa"),
    "realworldqa": ("choice", "score_realworldqa"),
    "vqav2": ("vqa", "score_vqav2"),
    "mmlu": ("mmlu", "score"),
    "gsm8k": ("gsm8k", "score"),
    "math": ("math_equiv", "score"),
    "humaneval": ("humaneval", "score"),
}

_VQA_STYLE = ("prediction", "answers")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "textvqa": _VQA_STYLE,
    "vqav2": _VQA_STYLE,
    "docvqa": _VQA_STYLE,
    "chartqa": _VQA_STYLE,
    "ai2d": _VQA_STYLE,
    "realworldqa": _VQA_STYLE,
    "ocrbench": ("prediction", "answers", "dataset_name", "type"),
    "mmmu": ("prediction", "question_type", "answer"),
    "mathvista": ("prediction", "question_type", "answer"),
    "mmlu": ("prediction", "answer"),
    "gsm8k": ("prediction", "answer"),
    "math": ("prediction", "solution"),
    "humaneval": ("task_id", "completion|prediction", "prompt", "test", "entry_point"),
}


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of: {', '.join(PROTOCOLS)}")


def as_text(value) -> str:
    """A prediction or answer as a string: None -> "", non-strings through str()."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def as_answer_list(value) -> list[str]:
    """`answers` as a list of strings: a bare string (OCRBench's single answers) becomes a one-item list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [as_text(v) for v in value]
    return [as_text(value)]


def mean_aggregate(records: Sequence[Mapping], scores: Sequence[float], protocol: str = "nvlm") -> dict:
    """The default aggregate: mean x 100 and the count."""
    check_protocol(protocol)
    return {"score": 100.0 * sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}


@dataclass(frozen=True)
class Scorer:
    """One benchmark's scoring functions; calling it scores one record."""

    name: str
    module: ModuleType
    score: Callable[..., float]

    def __call__(self, record: Mapping, protocol: str = "nvlm") -> float:
        return self.score(record, protocol)

    @property
    def aggregate(self) -> Callable[..., dict]:
        fn = getattr(self.module, f"aggregate_{self.name}", None) or getattr(self.module, "aggregate", None)
        return fn or mean_aggregate

    @property
    def score_batch(self) -> Callable[..., list[float]] | None:
        """The module's batch scorer (execution-based benchmarks), or None when it scores item by item."""
        return getattr(self.module, f"score_batch_{self.name}", None) or getattr(self.module, "score_batch", None)


def get_scorer(name: str) -> Scorer:
    """Import the metric module for `name` and return its `Scorer`; unknown names raise ValueError."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of: {', '.join(sorted(BENCHMARKS))}")
    module_name, fn_name = BENCHMARKS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return Scorer(name=name, module=module, score=getattr(module, fn_name))
