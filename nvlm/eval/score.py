"""`nvlm eval score BENCHMARK PREDICTIONS.jsonl`: score a predictions file under one protocol.

Notable:
- Input is JSONL, one record per line: `prediction` plus the benchmark's gold fields (see
  `nvlm.eval.metrics.REQUIRED_FIELDS`). Blank lines are skipped. A malformed line, a line that is not an object,
  or a missing field stops the run with the file and line number (`ScoreInputError`; exit code 2, no traceback).
- The aggregate is {"benchmark", "protocol", "n", "score", ...}: `score` is mean x 100, or the point total for
  OCRBench; modules add sub-scores (OCRBench sub-totals, MMMU per subject, ...).
- `--per-sample OUT.jsonl` writes each input record with a `score` field, atomically (temp file + os.replace).
- Modules with a `score_batch` (execution-based HumanEval) are scored in one batch with `--timeout` seconds per
  program; everything else item by item.
- Records are scored as given: de-duplicating `sample_id`s and the tag's first-line truncation belong to generation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence

from nvlm.eval.metrics import BENCHMARKS, PROTOCOLS, REQUIRED_FIELDS, check_protocol, get_scorer

DEFAULT_TIMEOUT_S = 3.0


class ScoreInputError(ValueError):
    """A predictions file that cannot be scored: unreadable, malformed JSON, or a missing field."""


def read_records(path: str, required: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; `required` entries may be "a|b" (either key)."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ScoreInputError(f"{path}, line {lineno}: malformed JSON ({exc.msg}, column {exc.colno})")
                if not isinstance(record, dict):
                    raise ScoreInputError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
                for field in required:
                    if not any(key in record for key in field.split("|")):
                        names = " or ".join(repr(k) for k in field.split("|"))
                        raise ScoreInputError(f"{path}, line {lineno}: missing required field {names}")
                records.append((lineno, record))
    except UnicodeDecodeError as exc:
        raise ScoreInputError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ScoreInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return records


def write_per_sample(path: str, records: Sequence[Mapping], scores: Sequence[float]) -> None:
    """One JSON line per record (the record plus `score`), written to a temp file and moved into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".per-sample.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record, value in zip(records, scores):
                f.write(json.dumps({**record, "score": float(value)}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def score_records(benchmark: str, records: Sequence[Mapping], protocol: str = "nvlm",
                  *, timeout: float = DEFAULT_TIMEOUT_S, linenos: Sequence[int] | None = None) -> list[float]:
    """Per-record scores; a scorer failing on one record is reported with that record's line number."""
    scorer = get_scorer(benchmark)
    check_protocol(protocol)
    if scorer.score_batch is not None:
        return [float(s) for s in scorer.score_batch(list(records), protocol, timeout=timeout)]
    scores = []
    for i, record in enumerate(records):
        try:
            scores.append(float(scorer(record, protocol)))
        except Exception as exc:  # noqa: BLE001 - a bad gold field should name its line, not crash the run
            where = f"line {linenos[i]}" if linenos else f"record {i + 1}"
            raise ScoreInputError(f"{where}: cannot score this record ({type(exc).__name__}: {exc})") from exc
    return scores


def score_file(benchmark: str, path: str, protocol: str = "nvlm", per_sample: str | None = None,
               *, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Score a predictions JSONL file; returns {"benchmark", "protocol", "n", "score", ...sub-scores}."""
    scorer = get_scorer(benchmark)
    check_protocol(protocol)
    numbered = read_records(path, REQUIRED_FIELDS.get(benchmark, ()))
    if not numbered:
        raise ScoreInputError(f"{path}: no records to score")
    linenos = [n for n, _ in numbered]
    records = [r for _, r in numbered]
    try:
        scores = score_records(benchmark, records, protocol, timeout=timeout, linenos=linenos)
    except ScoreInputError as exc:
        raise ScoreInputError(f"{path}, {exc}") from exc.__cause__
    aggregate = dict(scorer.aggregate(records, scores, protocol))
    result = {"benchmark": benchmark, "protocol": protocol, "n": aggregate.pop("n", len(records)),
              "score": aggregate.pop("score")}
    result.update(aggregate)
    if per_sample:
        try:
            write_per_sample(per_sample, records, scores)
        except OSError as exc:
            raise ScoreInputError(f"cannot write {per_sample}: {exc.strerror or exc}") from None
    return result


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _table_lines(result: Mapping, indent: int = 0) -> list[str]:
    width = max((len(str(k)) for k in result), default=0)
    lines = []
    for key, value in result.items():
        if isinstance(value, Mapping):
            lines.append(" " * indent + str(key))
            lines.extend(_table_lines(value, indent + 2))
        else:
            lines.append(" " * indent + f"{str(key):<{width}}  {_format_value(value)}")
    return lines


def format_table(result: Mapping) -> str:
    """A short human-readable rendering of a `score_file` result (nested sub-scores indented)."""
    return "\n".join(_table_lines(result))


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="BENCHMARK",
                        help=f"one of: {', '.join(sorted(BENCHMARKS))}")
    parser.add_argument("predictions", metavar="PREDICTIONS.jsonl",
                        help="one JSON object per line: `prediction` plus the benchmark's gold fields")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="nvlm",
                        help="nvlm: Megatron-LM's NVLM scripts (default); official: each benchmark's own scorer")
    parser.add_argument("--per-sample", metavar="OUT.jsonl", default=None,
                        help="also write every input record with its `score`")
    parser.add_argument("--json", action="store_true", help="print the aggregate as one JSON object")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="per-program limit for execution-based benchmarks (HumanEval; default 3)")
    parser.set_defaults(func=run)
    return parser


def add_eval_score_parser(subparsers) -> argparse.ArgumentParser:
    """Register `score` on an argparse subparsers object (wired as `nvlm eval score`)."""
    parser = subparsers.add_parser(
        "score", help="score a predictions file",
        description="Score a predictions JSONL file for one benchmark under the nvlm or official protocol.",
    )
    return configure_parser(parser)


def run(args: argparse.Namespace) -> int:
    try:
        result = score_file(args.benchmark, args.predictions, args.protocol, args.per_sample, timeout=args.timeout)
    except ScoreInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(
        prog="nvlm eval score",
        description="Score a predictions JSONL file for one benchmark under the nvlm or official protocol.",
    ))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
