"""`nvlm eval report DIR`: collect `<benchmark>.score.json` files into the model card's two tables.

Notable:
- Layout of the NVLM-D model card: a vision-language table (MMMU, MathVista, OCRBench, AI2D, ChartQA, DocVQA,
  TextVQA, RealWorldQA, VQAv2) and a text-only one (MMLU, GSM8K, MATH, HumanEval). A benchmark with no score file
  shows "–". The card's Megatron numbers (SPEC §7.2) are the first row, for comparison; note that DocVQA and VQAv2
  there are test-server numbers while a local run scores the val split.
- OCRBench is a point total out of 1000 (no decimals); every other score is a percentage with one decimal.
- Writes `DIR/report.md` and `DIR/report.json` (the same numbers, machine-readable), each atomically.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

VISION = (("mmmu", "MMMU"), ("mathvista", "MathVista"), ("ocrbench", "OCRBench"), ("ai2d", "AI2D"),
          ("chartqa", "ChartQA"), ("docvqa", "DocVQA"), ("textvqa", "TextVQA"), ("realworldqa", "RealWorldQA"),
          ("vqav2", "VQAv2"))
TEXT = (("mmlu", "MMLU"), ("gsm8k", "GSM8K"), ("math", "MATH"), ("humaneval", "HumanEval"))
MISSING = "–"

REFERENCE_LABEL = "NVLM-D 1.0 72B (model card, Megatron)"
REFERENCE = {"mmmu": 59.7, "mathvista": 65.2, "ocrbench": 853, "ai2d": 94.2, "chartqa": 86.0, "docvqa": 92.6,
             "textvqa": 82.1, "realworldqa": 69.7, "vqav2": 85.4, "mmlu": 82.0, "gsm8k": 92.9, "math": 73.1,
             "humaneval": 88.4}


def read_scores(out_dir: str | os.PathLike) -> dict[str, dict]:
    """{benchmark: score dict} from every `*.score.json` in `out_dir`; unreadable files raise ValueError."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"{out}: not a directory")
    scores = {}
    for path in sorted(out.glob("*.score.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
        if not isinstance(result, dict) or not isinstance(result.get("score"), (int, float)):
            raise ValueError(f"{path}: not a score file (no numeric 'score')")
        scores[str(result.get("benchmark") or path.name[: -len(".score.json")])] = result
    if not scores:
        raise ValueError(f"{out}: no *.score.json files (run `nvlm eval run` first)")
    return scores


def format_score(benchmark: str, value) -> str:
    if value is None:
        return MISSING
    return f"{value:.0f}" if benchmark == "ocrbench" else f"{value:.1f}"


def _table(columns: Sequence[tuple[str, str]], rows: Sequence[tuple[str, Mapping[str, float | None]]]) -> list[str]:
    lines = ["| Model | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(format_score(b, values.get(b)) for b, _ in columns) + " |")
    return lines


def build_report(out_dir: str | os.PathLike, *, label: str | None = None) -> dict:
    """The report as data: {"model", "scores": {benchmark: {"score", "n", "protocol"}}, "reference", ...}."""
    results = read_scores(out_dir)
    models = Counter(str(r["model"]) for r in results.values() if r.get("model"))
    label = label or (models.most_common(1)[0][0] if models else Path(out_dir).resolve().name)
    scores = {b: {"score": float(r["score"]), "n": r.get("n"), "protocol": r.get("protocol")}
              for b, r in results.items()}
    return {"model": label, "protocols": sorted({str(s["protocol"]) for s in scores.values() if s["protocol"]}),
            "scores": scores, "reference": {"model": REFERENCE_LABEL, "scores": dict(REFERENCE)}}


def format_markdown(report: Mapping) -> str:
    ours = {b: s["score"] for b, s in report["scores"].items()}
    rows = [(report["reference"]["model"], report["reference"]["scores"]), (report["model"], ours)]
    lines = [f"# Evaluation: {report['model']}", ""]
    lines += ["## Vision-language", ""] + _table(VISION, rows) + [""]
    lines += ["## Text-only", ""] + _table(TEXT, rows) + [""]
    lines += ["## Runs", "", "| Benchmark | Score | n | Protocol |", "|---|---:|---:|---|"]
    for bench in sorted(report["scores"]):
        s = report["scores"][bench]
        lines.append(f"| {bench} | {format_score(bench, s['score'])} | {s['n'] if s['n'] is not None else MISSING} "
                     f"| {s['protocol'] or MISSING} |")
    lines += ["", "OCRBench is points out of 1000; every other score is a percentage. The model card's DocVQA "
              "(test) and VQAv2 (test-dev) come from the official servers, not the local val splits."]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_report(out_dir: str | os.PathLike, *, label: str | None = None) -> dict:
    """Build the report and write `report.md` + `report.json` into `out_dir`; returns the report dict (with
    `markdown`: the table text, and `paths`)."""
    out = Path(out_dir)
    report = build_report(out, label=label)
    markdown = format_markdown(report)
    md_path, json_path = out / "report.md", out / "report.json"
    _write_atomic(md_path, markdown)
    _write_atomic(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return {**report, "markdown": markdown, "paths": [str(md_path), str(json_path)]}
