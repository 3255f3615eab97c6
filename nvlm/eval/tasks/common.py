"""What every benchmark loader shares: the `Sample` record, data-file readers, image lookup, option lines.

Notable:
- Every problem with the data is a `DataError` (a ValueError) that names the file, the item and what was expected,
  never a bare KeyError or JSONDecodeError from deep inside a loader.
- Readers are generators where the format allows, so `--limit N` stops early: JSONL line by line, parquet batch by
  batch. A JSON document has to be parsed whole.
- pyarrow is imported only when a parquet file is read; without it the error says `pip install nvlm[eval]`.
- Images are resolved relative to the data file's directory. A relative name is tried as given, under each of the
  benchmark's usual image folders, and then with its leading folders dropped one at a time, so a path written for
  another tree layout ("ai2d/abc_images/1.png") still finds "abc_images/1.png" or "images/1.png".
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import gzip
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The system message every task used at the Megatron NVLM-1.0 tag (and the one NVLM-D was fine-tuned with).
SYSTEM_TAG = "Answer the questions."
# Megatron HEAD's system message for the short-answer tasks it added after the tag (DocVQA, RealWorldQA).
SYSTEM_HEAD = "Follow the user's instruction and answer questions."
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
IMAGE = "<image>"
DEFAULT_MAX_NEW_TOKENS = 128  # Megatron's default --out-seq-length

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Sample:
    """One benchmark item ready for generation.

    `prompt` is the user-turn text with one "<image>" placeholder per entry of `images` (a file path, or the raw
    encoded bytes of an image embedded in a parquet/TSV file). `reference` holds the scorer's gold fields and is
    JSON-serialisable, so a runner can write `{"id", "prediction", **reference}` and score it later.
    """

    id: str
    prompt: str
    images: tuple = ()
    reference: dict = field(default_factory=dict)
    system: str | None = SYSTEM_TAG
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


class DataError(ValueError):
    """A benchmark data file that is missing, unreadable, or not in the expected format."""


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def json_items(path: Path, what: str, data: Any = None) -> list:
    """A JSON file's item list: a top-level list, or the list under "data" (TextVQA, DocVQA wrap theirs).

    `data` is the already-parsed file, where the caller needed its header too.
    """
    data = read_json(path) if data is None else data
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected {what} (a JSON list, or an object with a 'data' list)")
    return data


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Objects of a JSONL file (gzip when the name ends in .gz); blank lines skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
                yield row
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError on a broken file
        raise DataError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet files needs pyarrow: pip install 'nvlm[eval]'") from None
    return pq


def iter_parquet(path: Path, columns: Sequence[str] | None = None, batch_size: int = 64) -> Iterator[dict]:
    """Rows of a parquet file as dicts, read batch by batch; `columns` that the file lacks are skipped."""
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        wanted = None if columns is None else [c for c in columns if c in names]
        for batch in pf.iter_batches(batch_size=batch_size, columns=wanted):
            yield from batch.to_pylist()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None


def read_tsv(path: Path) -> list[dict]:
    """Rows of a VLMEvalKit-style TSV (header line; fields quoted as pandas writes them; base64 images)."""
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # an embedded base64 image is far over csv's 128 KiB default
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable TSV file ({exc})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        csv.field_size_limit(old_limit)
    return rows


def iter_rows(path: Path, what: str, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Rows of a .json / .jsonl(.gz) / .parquet file, dispatched on the file name."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from iter_jsonl(path)
    elif name.endswith(".parquet"):
        yield from iter_parquet(path, columns)
    elif name.endswith(".json"):
        for i, row in enumerate(json_items(path, what)):
            if not isinstance(row, Mapping):
                raise DataError(f"{path}, item {i}: expected a JSON object, got {type(row).__name__}")
            yield row
    else:
        raise DataError(f"{path}: unsupported file type; expected {what}")


# ----------------------------------------------------------------------------------------------------------------
# Finding files and fields


def find_file(directory: Path, patterns: Sequence[str], what: str) -> Path:
    """The one file in `directory` matching the first pattern that matches anything (patterns may hold "**/")."""
    for pattern in patterns:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(directory)) for p in found[:5])
            raise DataError(f"{directory}: several candidate files ({names}); pass the {what} file itself")
    raise DataError(f"{directory}: no {what} file found (looked for {', '.join(patterns)})")


def find_files(directory: Path, patterns: Sequence[str], what: str) -> list[Path]:
    """All files matching the first pattern that matches anything, sorted by path."""
    for pattern in patterns:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found
    raise DataError(f"{directory}: no {what} files found (looked for {', '.join(patterns)})")


def require(row: Mapping, key: str, where: str, what: str = "") -> Any:
    """row[key], or a DataError naming the place and the expected format."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    value = row.get(key)
    if value is None:
        hint = f" (expected {what})" if what else ""
        raise DataError(f"{where}: missing field {key!r}{hint}")
    return value


def as_list(value: Any, where: str, key: str) -> list:
    """A list field; HF MMMU stores `options` as the repr of a Python list, which is parsed here."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: field {key!r} is not a list: {value[:80]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field {key!r} is not a list (got {type(value).__name__})")
    return list(value)


def clean_number(value: Any) -> Any:
    """NaN (parquet's missing float) -> None, so references stay valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ----------------------------------------------------------------------------------------------------------------
# Images


def resolve_image(base: Path, names: str | Sequence[str], where: str, subdirs: Sequence[str] = ()) -> str:
    """Path of the first existing candidate for a relative image name (see the module docstring for the order).

    `names` may list alternatives (Megatron tries "<id>", "<id>.jpg", "<id>.png"); `subdirs` are the benchmark's
    usual image folders under `base`.
    """
    names = [names] if isinstance(names, str) else list(names)
    roots = [base] + [base / s for s in subdirs]
    tried: list[Path] = []
    for name in names:
        rel = Path(name)
        if rel.is_absolute():
            tried.append(rel)
            continue
        parts = rel.parts
        for start in range(len(parts)):
            tail = Path(*parts[start:])
            tried.extend(root / tail for root in roots)
    for candidate in tried:
        if candidate.is_file():
            return os.path.normpath(candidate)  # "OCRBench/../OCRBench_Images/x.png" -> "OCRBench_Images/x.png"
    folders = ", ".join(str(r) for r in roots)
    raise DataError(f"{where}: image {names[0]!r} not found (looked under {folders})")


def embedded_image(value: Any, base: Path, where: str, subdirs: Sequence[str] = ()) -> str | bytes:
    """An image cell of a parquet/TSV/JSON row: HF's {"bytes", "path"} struct, raw bytes, or a relative path."""
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return resolve_image(base, str(value["path"]), where, subdirs)
        raise DataError(f"{where}: image cell has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return resolve_image(base, value, where, subdirs)
    raise DataError(f"{where}: missing image")


def decode_base64_image(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: image field is not valid base64") from None


# ----------------------------------------------------------------------------------------------------------------
# Options


def letters(n: int) -> list[str]:
    if n > len(_LETTERS):
        raise DataError(f"{n} options is more than the {len(_LETTERS)} letters A-Z")
    return list(_LETTERS[:n])


def lettered_options(options: Iterable[Any]) -> tuple[list[str], dict[str, str]]:
    """(all_choices, index2ans) for options in order: (["A", "B"], {"A": opt0, "B": opt1})."""
    options = [str(o) for o in options]
    all_choices = letters(len(options))
    return all_choices, dict(zip(all_choices, options))


def option_block(options: Sequence[Any], style: str = "A. ") -> str:
    """One line per option, each ending in "\\n": "A. x\\n" (Megatron MathVista/RWQA) or "(A) x\\n" (MMMU)."""
    out = []
    for letter, option in zip(letters(len(options)), options):
        prefix = f"({letter}) " if style == "(A) " else f"{letter}. "
        out.append(f"{prefix}{option}\n")
    return "".join(out)


_OPTION_LINE = re.compile(r"^([A-Z])[.:)]\s*(.*?)\s*$")


def parse_option_lines(text: str) -> list[str]:
    """Option texts of a question that embeds its options as "A. x" lines (A, B, C, ... in order), else []."""
    options: list[str] = []
    for line in text.splitlines():
        m = _OPTION_LINE.match(line.strip())
        if m and len(options) < len(_LETTERS) and m.group(1) == _LETTERS[len(options)]:
            options.append(m.group(2))
    return options if len(options) >= 2 else []
