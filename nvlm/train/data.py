"""Training data: JSONL records -> tokenized samples with loss labels -> padded or packed batches; dataset blends.

Notable:
- Two record styles are read and normalised to `{"images": [absolute paths], "messages": [{"role", "content"}],
  "source": "file:line"}`: LLaVA/InternVL (`image` + `conversations` of `from`/`value`) and OpenAI `messages`
  (string content, or parts; image parts become `<image>` placeholders by the server's rule, see `_openai_content`).
  Malformed lines are skipped with a warning naming the line and counted in `Records.skipped`.
- Labels come from `encode_conversation(...).supervised` (SPEC §5): only each assistant turn's content +
  `<|im_end|>` + `\\n` carry loss. Labels are *not* shifted (`NVLM.loss` shifts). In a batch, -100 also goes on
  padding and on the first token of every sample, so no loss crosses from one packed sample into the next.
- Packed rows get position ids restarting at 0 per sample and a block-diagonal causal "may attend" mask; padding
  attends only to itself (an all-False row would make SDPA return NaN). `mask` is None when every row holds one
  unpadded sample, so the model takes SDPA's plain causal path.
- `Blend` is a pure function of (seed, draw number): the source of draw k comes from a seeded RNG block, the
  sample from a per-(source, epoch) permutation, so the state is a few counters and resume is exact. `unread`
  lets `batches` hand back the one sample that did not fit, which keeps packing exactly resumable too.
- Optional `attend` entries (`[{"turn": k, "word": "circle", "boxes": [[x0, y0, x1, y1], ...], "image": 0}]`, boxes
  in the image's pixels) name, for the k-th assistant answer, a key word of its question and where in the image
  it is. The dataset turns each into (position of the word's first token in that question, positions of the image
  tokens whose square the boxes overlap, in every tile and the thumbnail) for the trainer's auxiliary attention
  loss; an entry whose word is not in its question is dropped with a warning (counted in `.attend_dropped`). An
  entry may name the decoder `layer` and `head` it supervises (default: the `[attention_loss]` table's). An entry
  `{"turn": k, "word": w, "from": "answer"}` (no boxes) supervises the other hop: from the position that predicts
  the answer's first token to the word's first token. An entry `{"turn": k, "answer_token": j, "boxes": [...]}`
  (no word) supervises reading: from the position that predicts the answer's j-th token (0 = the first) to the
  boxes' image tokens, e.g. the j-th character of a text answer to that glyph; one past the answer is dropped.
- Bad data never raises: `ConversationDataset` returns None (counted by reason in `.skipped`, one warning per
  reason) and `Blend` skips it. With `Blend(workers=k)` samples are built in k threads (PIL and torch release the
  GIL for the heavy parts); the stream is the same as with no workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from torch.utils.data import Dataset

from nvlm.image import ImageError, preprocess, tile_layout
from nvlm.prompt import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, encode_conversation
from nvlm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------ samples, batches


@dataclass
class Sample:
    """One tokenized conversation."""

    input_ids: list[int]
    labels: list[int]  # input_ids where supervised, else -100; not shifted
    pixel_values: torch.Tensor | None  # (T, 3, S, S) float32, all images of the sample in order
    num_tiles: list[int] = field(default_factory=list)  # tiles per image, thumbnail included
    # (query position, key positions, (layer, head) or None for the [attention_loss] table's)
    attend: list[tuple[int, tuple[int, ...], tuple[int, int] | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long; -100 on padding, unsupervised tokens and the first token of each sample
    position_ids: torch.Tensor  # (B, L) long, 0.. per sample
    mask: torch.Tensor | None  # (B, 1, L, L) bool "may attend", or None when plain causal is exact
    pixel_values: torch.Tensor | None  # (sum T, 3, S, S), images in row-major order
    num_samples: int
    num_tokens: int  # real (non-pad) tokens
    num_supervised: int  # tokens that carry loss: labels[:, 1:] != -100
    # (row, query position, key positions, (layer, head) or None)
    attend: tuple[tuple[int, int, tuple[int, ...], tuple[int, int] | None], ...] = ()

    def to(self, device, non_blocking: bool = False) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.mask),
                     move(self.pixel_values), self.num_samples, self.num_tokens, self.num_supervised, self.attend)

    @property
    def fill(self) -> float:
        """Real tokens / batch positions: the padding (or packing) efficiency."""
        return self.num_tokens / max(1, self.input_ids.numel())


def _build(rows: Sequence[Sequence[Sample]], pad_id: int) -> Batch:
    """Lay out rows of samples (each row concatenated, right-padded to the longest row) as one Batch."""
    if not rows or any(not row for row in rows):
        raise ValueError("a batch needs at least one row and every row at least one sample")
    lengths = [[len(s) for s in row] for row in rows]
    if any(n == 0 for ns in lengths for n in ns):
        raise ValueError("empty sample (no input ids)")
    B, L = len(rows), max(sum(ns) for ns in lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    # Segment id per position: the sample's index in its row; each pad gets its own negative id, so it
    # only "attends" to itself.
    segment = -1 - torch.arange(L).repeat(B, 1)
    pixels, attend = [], []
    for r, row in enumerate(rows):
        a = 0
        for k, s in enumerate(row):
            if len(s.labels) != len(s.input_ids):
                raise ValueError(f"sample has {len(s.input_ids)} input ids but {len(s.labels)} labels")
            b = a + len(s)
            input_ids[r, a:b] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[r, a:b] = torch.tensor(s.labels, dtype=torch.long)
            labels[r, a] = IGNORE_INDEX  # the previous sample's last token must not learn to predict this one
            position_ids[r, a:b] = torch.arange(b - a)
            segment[r, a:b] = k
            if s.pixel_values is not None:
                pixels.append(s.pixel_values)
            attend += [(r, a + q, tuple(a + k for k in keys), at) for q, keys, at in s.attend]
            a = b
    plain = all(len(row) == 1 for row in rows) and all(sum(ns) == L for ns in lengths)
    mask = None
    if not plain:
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = ((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1)  # (B, 1, L, L)
    return Batch(
        input_ids=input_ids, labels=labels, position_ids=position_ids, mask=mask,
        pixel_values=torch.cat(pixels) if pixels else None,
        num_samples=sum(len(row) for row in rows),
        num_tokens=sum(sum(ns) for ns in lengths),
        num_supervised=int((labels[:, 1:] != IGNORE_INDEX).sum()),
        attend=tuple(attend),
    )


def collate(samples: Sequence[Sample], *, pad_id: int) -> Batch:
    """One sample per row, right-padded to the longest; `mask` is None when no row needs padding."""
    return _build([[s] for s in samples], pad_id)


def pack(samples: Sequence[Sample], *, max_tokens: int, pad_id: int) -> list[Batch]:
    """First-fit decreasing: samples, longest first (ties in input order), each go into the first row with room.

    Returns one single-row Batch per row, in the order rows were opened; within a row, samples keep their input
    order. A sample longer than `max_tokens` is an error (cap sample length with the dataset's `max_len`).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(samples[i])
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens={max_tokens}")
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_tokens - n)
    return [_build([[samples[i] for i in sorted(row)]], pad_id) for row in rows]


def batches(stream: Iterable[Sample], *, batch_size: int, max_tokens: int | None, pad_id: int,
            packing: bool) -> Iterator[Batch]:
    """Group a sample stream into batches.

    packing=False: `batch_size` samples per batch, one per row (`collate`); with `max_tokens`, longer samples are
    dropped with a warning. packing=True: up to `batch_size` rows of at most `max_tokens` tokens. Samples are taken
    in stream order and each goes into the first open row with room (a new row while fewer than `batch_size` are
    open); the first sample that fits nowhere closes the batch and starts the next one. Rows are padded to the
    longest row. If the stream has `unread` (a `Blend`), that sample is handed back before the batch is yielded, so
    the stream's `state_dict()` taken while a batch is in use resumes exactly at the next batch. The last,
    possibly smaller batch is yielded when a finite stream ends. `Batch.fill` is the packing efficiency.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if packing and max_tokens is None:
        raise ValueError("packing needs max_tokens (the row length)")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    dropped = 0

    def too_long(s: Sample) -> bool:
        nonlocal dropped
        if max_tokens is None or len(s) <= max_tokens:
            return False
        dropped += 1
        if dropped == 1:
            log.warning("dropping a %d-token sample longer than max_tokens=%d (set the dataset's max_len <= "
                        "max_tokens; further drops are not reported)", len(s), max_tokens)
        return True

    if not packing:
        group: list[Sample] = []
        for s in stream:
            if s is None or too_long(s):
                continue
            group.append(s)
            if len(group) == batch_size:
                yield collate(group, pad_id=pad_id)
                group = []
        if group:
            yield collate(group, pad_id=pad_id)
        return

    unread = getattr(stream, "unread", None)
    rows: list[list[Sample]] = []
    free: list[int] = []
    carry: Sample | None = None
    it = iter(stream)
    end = object()
    while True:
        if carry is not None:
            s, carry = carry, None
        else:
            s = next(it, end)
            if s is end:
                break
        if s is None or too_long(s):
            continue
        n = len(s)
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(s)
                free[r] -= n
                break
        else:
            if len(rows) < batch_size:
                rows.append([s])
                free.append(max_tokens - n)
                continue
            full = _build(rows, pad_id)
            rows, free = [], []
            if unread is not None:
                unread(s)  # before the yield, so the stream's state while `full` is in use excludes `s`
            else:
                carry = s
            yield full
    if rows:
        yield _build(rows, pad_id)


# ------------------------------------------------------------------------------------------------------- records


class Records(list):
    """A list of normalised records; `skipped` counts malformed input lines by reason."""

    def __init__(self, items=(), skipped: Counter | None = None, path: Path | None = None):
        super().__init__(items)
        self.skipped: Counter = skipped if skipped is not None else Counter()
        self.path = path


class _Malformed(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MAX_LINE_WARNINGS = 20


def read_records(path: str | Path, *, image_root: str | Path | None = None) -> Records:
    """Read a JSONL file (or a .json list) of conversations into normalised records.

    Each record becomes `{"images": [absolute paths], "messages": [{"role", "content"}], "source": "path:line"}`.
    Image paths are taken relative to `image_root` (default: the file's directory); `file://` URLs are accepted,
    http(s) and data URLs are not. Malformed lines are skipped with a warning naming the line (the first 20) and
    counted by reason in the result's `skipped`. A missing or unreadable file raises (FileNotFoundError/ValueError).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    root = Path(image_root) if image_root is not None else path.parent
    root = Path(os.path.abspath(root))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read data file {str(path)!r}: {exc}") from exc

    items: list[tuple[str, object]] = []  # (location, parsed value or the exception)
    if text.lstrip().startswith("["):  # a JSON list (the InternVL/LLaVA .json layout)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: the file starts with '[' but is not valid JSON: {exc}") from exc
        items = [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                items.append((f"{path}:{lineno}", _Malformed("invalid_json", f"not valid JSON ({exc})")))

    out = Records(path=path)
    for where, rec in items:
        try:
            if isinstance(rec, _Malformed):
                raise rec
            out.append({**normalize_record(rec, root), "source": where})
        except _Malformed as exc:
            out.skipped[exc.reason] += 1
            n = sum(out.skipped.values())
            if n <= _MAX_LINE_WARNINGS:
                log.warning("skipping %s: %s", where, exc)
            if n == _MAX_LINE_WARNINGS:
                log.warning("%s: more malformed lines are counted but not reported", path)
    if out.skipped:
        log.warning("%s: %d records read, %d malformed lines skipped (%s)", path, len(out),
                    sum(out.skipped.values()), dict(out.skipped))
    return out


def normalize_record(rec: object, image_root: str | Path) -> dict:
    """One raw record (either style) -> `{"images": [...], "messages": [...]}`; raises _Malformed."""
    if not isinstance(rec, dict):
        raise _Malformed("not_object", f"expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec and "messages" in rec:
        raise _Malformed("ambiguous", "has both 'conversations' and 'messages'")
    if "conversations" in rec:
        images = _image_list(rec.get("image", rec.get("images")))
        messages = _llava_messages(rec["conversations"])
    elif "messages" in rec:
        messages, part_images = _openai_messages(rec["messages"])
        top = _image_list(rec.get("images"))
        if part_images and top:
            raise _Malformed("bad_images", "images given both as content parts and in 'images'")
        images = part_images or top
    else:
        raise _Malformed("unknown_format", "expected 'conversations' (LLaVA style) or 'messages' (OpenAI style)")
    if not messages:
        raise _Malformed("bad_messages", "no messages")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i:
            raise _Malformed("bad_messages", f"message {i}: a system message is only allowed first")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders and placeholders != len(images):
        raise _Malformed("bad_images", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    if images and not any(m["role"] == "user" for m in messages):
        raise _Malformed("bad_images", "images given but there is no user message")
    out = {"images": [_resolve(p, image_root) for p in images], "messages": messages}
    if "attend" in rec:
        out["attend"] = _attend_entries(rec["attend"], len(images))
    return out


def _attend_entries(raw, n_images: int) -> list[dict]:
    def bad(msg: str):
        return _Malformed("bad_attend", f"attend: {msg}")

    if not isinstance(raw, list):
        raise bad(f"expected a list, got {type(raw).__name__}")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or set(e) - {"turn", "word", "boxes", "image", "layer", "head", "from",
                                                 "answer_token"}:
            raise bad(f"entry {i} must be an object with turn, word or answer_token, boxes (and image, layer, head, "
                      f"from), got {e!r}")
        turn, word, boxes, image = e.get("turn"), e.get("word"), e.get("boxes"), e.get("image", 0)
        token = e.get("answer_token")
        if "answer_token" in e:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise bad(f"entry {i}: answer_token must be an int >= 0 (a token of the answer), got {token!r}")
            if "word" in e or "from" in e or "boxes" not in e:
                raise bad(f"entry {i}: an answer_token entry has boxes and neither word nor from, got {e!r}")
        elif e.get("from", "answer") != "answer" or ("from" in e) == ("boxes" in e):
            raise bad(f"entry {i}: give either boxes (the word looks at the image) or \"from\": \"answer\" (the answer "
                      f"looks at the word), got {e!r}")
        if not isinstance(turn, int) or isinstance(turn, bool) or turn < 0:
            raise bad(f"entry {i}: turn must be an int >= 0 (the answer's index), got {turn!r}")
        if token is None and (not isinstance(word, str) or not word.strip()):
            raise bad(f"entry {i}: word must be a non-empty string, got {word!r}")
        where = None
        if "layer" in e or "head" in e:
            where = (e.get("layer"), e.get("head"))
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in where):
                raise bad(f"entry {i}: layer and head must come together, as ints >= 0, got {where!r}")
        if "from" in e:
            out.append({"turn": turn, "word": word.strip(), "from": "answer", "at": where})
            continue
        if not isinstance(image, int) or not 0 <= image < n_images:
            raise bad(f"entry {i}: image must index one of the record's {n_images} images, got {image!r}")
        if not isinstance(boxes, list) or not boxes or not all(
                isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                and b[0] < b[2] and b[1] < b[3] for b in boxes):
            raise bad(f"entry {i}: boxes must be a non-empty list of [x0, y0, x1, y1] with x0 < x1, y0 < y1")
        entry = {"turn": turn, "word": None if token is not None else word.strip(),
                 "boxes": [[float(v) for v in b] for b in boxes], "image": image, "at": where}
        out.append(entry if token is None else {**entry, "answer_token": token})
    return out


def box_tokens(boxes: Sequence[Sequence[float]], size: tuple[int, int], grid: tuple[int, int], num_tiles: int,
               tokens_per_tile: int, *, min_overlap: float = 0.15) -> list[int]:
    """Indices, within one image's `num_tiles * tokens_per_tile` image tokens, of the tokens whose square overlaps
    one of `boxes` (image pixels) by more than `min_overlap` of a token side in both directions.

    The layout is the tiler's: the `grid` (cols, rows) tiles row-major, then the thumbnail (the whole image) when
    `num_tiles` is one more than the grid has; each tile's tokens row-major on a sqrt(tokens_per_tile) square.
    """
    g = math.isqrt(tokens_per_tile)
    if g * g != tokens_per_tile:
        raise ValueError(f"tokens_per_tile must be a square, got {tokens_per_tile}")
    cols, rows = grid
    if num_tiles not in (cols * rows, cols * rows + 1):
        raise ValueError(f"{num_tiles} tiles do not match a {cols}x{rows} grid (with or without a thumbnail)")
    w, h = size
    out = []
    for t, (c, r, nc, nr) in enumerate(tile_layout(grid, thumbnail=num_tiles == cols * rows + 1)):
        for x0, y0, x1, y1 in boxes:  # the box in this view's token units
            bx0, bx1 = x0 / w * nc * g - c * g, x1 / w * nc * g - c * g
            by0, by1 = y0 / h * nr * g - r * g, y1 / h * nr * g - r * g
            for i in range(g):
                if min(by1, i + 1) - max(by0, i) <= min_overlap:
                    continue
                for j in range(g):
                    if min(bx1, j + 1) - max(bx0, j) > min_overlap:
                        out.append(t * tokens_per_tile + i * g + j)
    return sorted(set(out))


def _image_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise _Malformed("bad_images", f"image paths must be a string or a list of strings, got {value!r:.80}")


def _resolve(ref: str, root: str | Path) -> str:
    if not ref:
        raise _Malformed("bad_images", "empty image path")
    scheme = urlparse(ref).scheme.lower()
    if scheme == "file":
        u = urlparse(ref)
        if u.netloc not in ("", "localhost"):
            raise _Malformed("bad_images", f"file:// URL with a remote host: {ref!r:.80}")
        ref = unquote(u.path)
    elif scheme in ("http", "https", "data"):
        raise _Malformed("unsupported_image_url", f"{scheme} image URLs are not supported in training data; "
                                                  "download the images and give file paths")
    return os.path.abspath(os.path.join(root, ref))


def _llava_messages(conversations) -> list[dict]:
    if not isinstance(conversations, list):
        raise _Malformed("bad_messages", "'conversations' must be a list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _Malformed("bad_messages", f"conversations[{i}] must be an object")
        role = _LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise _Malformed("bad_messages", f"conversations[{i}]: 'from' must be one of "
                                             f"{', '.join(_LLAVA_ROLES)}, got {turn.get('from')!r:.40}")
        if not isinstance(turn.get("value"), str):
            raise _Malformed("bad_messages", f"conversations[{i}]: 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _openai_messages(raw) -> tuple[list[dict], list[str]]:
    if not isinstance(raw, list):
        raise _Malformed("bad_messages", "'messages' must be a list")
    messages, images = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _Malformed("bad_messages", f"messages[{i}] must be an object")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise _Malformed("bad_messages", f"messages[{i}]: role must be system, user or assistant, "
                                             f"got {m.get('role')!r:.40}")
        content = m.get("content")
        if isinstance(content, list):
            content, refs = _openai_content(content, f"messages[{i}]")
            if refs and role != "user":
                raise _Malformed("bad_images", f"messages[{i}]: images are only allowed in user messages")
            images += refs
        elif not isinstance(content, str):
            raise _Malformed("bad_messages", f"messages[{i}]: content must be a string or a list of parts")
        messages.append({"role": role, "content": content})
    return messages, images


def _openai_content(parts: list, where: str) -> tuple[str, list[str]]:
    """Content parts -> (text, image refs), by the server's rule (nvlm.serve.protocol, vLLM's for NVLM-D): text
    parts joined by "\\n"; one `<image>` line per image part goes first unless the text already has them."""
    texts, refs = [], []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "image"):
            ref = part.get(kind) if kind in part else part.get("image_url", part.get("path"))
            if isinstance(ref, dict):
                ref = ref.get("url", ref.get("path"))
            if not isinstance(ref, str) or not ref:
                raise _Malformed("bad_images", f"{where}.content[{j}]: an image part needs a path or "
                                               "'image_url': {'url': path}")
            refs.append(ref)
        else:
            raise _Malformed("bad_messages", f"{where}.content[{j}]: unsupported part {str(part)[:60]}")
    text = "\n".join(texts)
    present = text.count(IMAGE_PLACEHOLDER)
    if refs and present > len(refs):
        raise _Malformed("bad_images", f"{where}: {present} {IMAGE_PLACEHOLDER} placeholders but {len(refs)} images")
    if len(refs) > present:
        text = "\n".join([IMAGE_PLACEHOLDER] * (len(refs) - present) + ([text] if text else []))
    return text, refs


# ------------------------------------------------------------------------------------------------------- dataset


class ConversationDataset(Dataset):
    """Normalised records -> `Sample`s: images tiled and normalised, prompt rendered in the training format.

    A bad sample (missing or unreadable image, more than `max_len` tokens, no assistant turn, a prompt that cannot
    be rendered) gives None; `skipped` counts them by reason and the first of each reason is logged as a warning.
    With DataLoader worker processes each process has its own `skipped`.
    """

    def __init__(self, records: Sequence[Mapping], tokenizer: Tokenizer, *, tokens_per_tile: int, image_size: int,
                 max_tiles: int = 6, max_len: int = 4096, system: str | None = DEFAULT_SYSTEM,
                 use_thumbnail: bool = True, tile_tags: bool = True):
        for name, v in (("tokens_per_tile", tokens_per_tile), ("image_size", image_size), ("max_tiles", max_tiles),
                        ("max_len", max_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.records = records
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.image_size = image_size
        self.max_tiles = max_tiles
        self.max_len = max_len
        self.system = system
        self.use_thumbnail = use_thumbnail
        self.tile_tags = tile_tags
        self.skipped: Counter = Counter()
        self.attend_dropped = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    def _skip(self, reason: str, where: str, message: str) -> None:
        with self._lock:
            self.skipped[reason] += 1
            first = self.skipped[reason] == 1
        if first:
            log.warning("skipping %s (%s): %s; later samples skipped for this reason are only counted",
                        where, reason, message)
        return None

    def __getitem__(self, i: int) -> Sample | None:
        rec = self.records[i]
        where = rec.get("source", f"record {i}") if isinstance(rec, Mapping) else f"record {i}"
        try:
            messages, paths = rec["messages"], list(rec.get("images") or [])
            has_answer = any(m.get("role") == "assistant" for m in messages)
        except (KeyError, TypeError, AttributeError) as exc:
            return self._skip("bad_record", where, f"not a normalised record ({exc!r})")
        if not has_answer:
            return self._skip("no_assistant", where, "no assistant turn, so nothing to learn")
        pixels, tiles, layouts = [], [], []
        for p in paths:
            try:
                im = preprocess(p, max_tiles=self.max_tiles, image_size=self.image_size,
                                use_thumbnail=self.use_thumbnail)
            except (ImageError, TypeError) as exc:
                return self._skip("bad_image", where, str(exc))
            pixels.append(im.pixel_values)
            tiles.append(im.num_tiles)
            layouts.append((im.size, im.grid))
        try:
            enc = encode_conversation(self.tokenizer, messages, num_tiles=tiles, tokens_per_tile=self.tokens_per_tile,
                                      system=self.system, add_generation_prompt=False, tile_tags=self.tile_tags)
        except (ValueError, TypeError, AttributeError) as exc:
            return self._skip("bad_prompt", where, str(exc))
        if len(enc.input_ids) > self.max_len:
            return self._skip("too_long", where, f"{len(enc.input_ids)} tokens > max_len={self.max_len}")
        labels = [t if sup else IGNORE_INDEX for t, sup in zip(enc.input_ids, enc.supervised)]
        attend = self._attend(rec.get("attend") or [], enc, tiles, layouts, where)
        return Sample(input_ids=enc.input_ids, labels=labels, pixel_values=torch.cat(pixels) if pixels else None,
                      num_tiles=tiles, attend=attend)

    def _attend(self, entries: list[dict], enc, tiles: list[int], layouts: list, where: str) -> list:
        if not entries:
            return []
        ids, sup = enc.input_ids, enc.supervised
        runs = [i for i in range(len(sup)) if sup[i] and (i == 0 or not sup[i - 1])]  # answer starts
        ends = [i for i in range(len(sup)) if sup[i] and (i + 1 == len(sup) or not sup[i + 1])]
        pads = [i for i, t in enumerate(ids) if t == self.tokenizer.vision_pad_id]
        starts = np.cumsum([0] + [n * self.tokens_per_tile for n in tiles]).tolist()
        out = []
        for e in entries:
            k = e["turn"]
            q = None
            if e.get("answer_token") is not None:
                if k < len(runs) and runs[k] + e["answer_token"] <= ends[k]:
                    q = runs[k] - 1 + e["answer_token"]  # the position whose logits predict that token
            elif k < len(runs):
                lo, hi = (ends[k - 1] + 1 if k else 0), runs[k]
                word = self.tokenizer.encode(" " + e["word"])
                for i in range(hi - len(word), lo - 1, -1):
                    if ids[i:i + len(word)] == word:
                        q = i
                        break
            if q is None:
                with self._lock:
                    self.attend_dropped += 1
                    first = self.attend_dropped == 1
                if first and e.get("answer_token") is not None:
                    log.warning("%s: attend answer_token %d is past answer %d; entry dropped (later ones are only "
                                "counted)", where, e["answer_token"], k)
                elif first:
                    log.warning("%s: attend word %r not found in the question of answer %d; entry dropped (later "
                                "ones are only counted)", where, e["word"], k)
                continue
            if e.get("from") == "answer":  # the position whose logits predict the answer's first token
                out.append((runs[k] - 1, (q,), e.get("at")))
                continue
            m = e["image"]
            size, grid = layouts[m]
            keys = box_tokens(e["boxes"], size, grid, tiles[m], self.tokens_per_tile)
            if keys:
                out.append((q, tuple(pads[starts[m] + t] for t in keys), e.get("at")))
        return out


# --------------------------------------------------------------------------------------------------------- blend


@dataclass
class _Cursor:
    draws: int  # global draws made (all ranks)
    counts: list[int]  # draws per source; epoch, position = divmod(count, len(source))

    def copy(self) -> _Cursor:
        return _Cursor(self.draws, list(self.counts))


_BLOCK = 4096  # source choices drawn per RNG block


class Blend:
    """An infinite, deterministic, resumable weighted mix of datasets.

    Draw k picks a source with probability proportional to its weight (uniforms from a seeded RNG, one block of
    4096 per seed sequence (seed, 0, k // 4096)); a source's n-th draw is item `perm[n % len]` of its permutation for
    epoch n // len, seeded by (seed, 1, source, epoch). None samples are skipped; a source that gives nothing but
    None for 2 x len x world_size + 100 draws in a row is an error. With `world_size` > 1, rank r takes the draws
    k with k % world_size == r, so ranks see disjoint parts of one global stream. `workers` > 0 builds samples in
    that many threads, prefetching 2 x workers draws; the stream does not change. One iterator at a time.
    """

    def __init__(self, sources: Sequence[tuple[Dataset, float]], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0):
        if not sources:
            raise ValueError("Blend needs at least one source")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self._sources = [ds for ds, _ in sources]
        weights = [float(w) for _, w in sources]
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
        self._lengths = [len(ds) for ds in self._sources]
        for i, (n, w) in enumerate(zip(self._lengths, weights)):
            if w > 0 and n == 0:
                raise ValueError(f"source {i} is empty but has weight {w}")
        self.weights = weights
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
        self._cdf = cdf / cdf[-1]
        self._cdf[-1] = 1.0  # uniforms are < 1, so the last positive-weight source catches rounding
        self._cursor = _Cursor(0, [0] * len(self._sources))  # after the last sample yielded
        self._none_run = [0] * len(self._sources)
        self._last: tuple[_Cursor, list[int], Sample] | None = None  # state before the last yield, and its sample
        self._pending: tuple[Sample, _Cursor, list[int]] | None = None  # an unread sample, and the state after it
        self._version = 0  # bumped by load_state_dict: a running iterator drops its prefetched draws
        self._choices: tuple[int, np.ndarray] = (-1, np.empty(0))
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # -------------------------------------------------------------- the pure draw sequence
    def _choose(self, k: int) -> int:
        block, off = divmod(k, _BLOCK)
        if self._choices[0] != block:
            u = np.random.default_rng([self.seed, 0, block]).random(_BLOCK)
            self._choices = (block, np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self._cdf) - 1))
        return int(self._choices[1][off])

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self._sources):  # prefetch spans at most two epochs per source
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, 1, s, epoch]).permutation(self._lengths[s])
        return self._perms[key]

    def _advance(self, cur: _Cursor) -> tuple[int, int, bool]:
        """Make draw `cur.draws`: (source, item index, whether it is this rank's)."""
        k = cur.draws
        s = self._choose(k)
        epoch, pos = divmod(cur.counts[s], self._lengths[s])
        cur.counts[s] += 1
        cur.draws += 1
        return s, int(self._perm(s, epoch)[pos]), k % self.world_size == self.rank

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Sample]:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="blend") if self.workers else None
        depth = 2 * self.workers if pool else 1
        queue: deque = deque()  # (source, cursor after the draw, future or item index)
        version, fetch = None, None
        try:
            while True:
                if self._pending is not None:
                    sample, after, none_run = self._pending
                    self._pending = None
                    self._last = (self._cursor, list(self._none_run), sample)
                    self._cursor, self._none_run = after, none_run
                    yield sample
                    continue
                if version != self._version:
                    for *_, job in queue:
                        if pool:
                            job.cancel()
                    queue.clear()
                    version, fetch = self._version, self._cursor.copy()
                while len(queue) < depth:
                    while True:
                        s, idx, mine = self._advance(fetch)
                        if mine:
                            break
                    job = pool.submit(self._sources[s].__getitem__, idx) if pool else idx
                    queue.append((s, fetch.copy(), job))
                s, after, job = queue.popleft()
                sample = job.result() if pool else self._sources[s][job]
                before = (self._cursor, list(self._none_run))
                self._cursor = after
                if sample is None:
                    self._none_run[s] += 1
                    limit = 2 * self._lengths[s] * self.world_size + 100
                    if self._none_run[s] >= limit:
                        raise RuntimeError(f"Blend source {s} gave no usable sample in {limit} draws in a row; "
                                           "check its data (see the dataset's `skipped` counts)")
                    continue
                self._none_run[s] = 0
                self._last = (*before, sample)
                yield sample
        finally:
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)

    def unread(self, sample: Sample) -> None:
        """Hand back the sample just yielded: the state goes back to before it and the iterator yields it again."""
        if self._last is None or self._last[2] is not sample or self._pending is not None:
            raise ValueError("unread takes back only the last sample yielded, once")
        before, none_run, _ = self._last
        self._pending = (sample, self._cursor, self._none_run)
        self._cursor, self._none_run, self._last = before, none_run, None

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Where the stream stands: after the last sample yielded (and not unread). Plain ints and lists."""
        return {"version": 1, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "lengths": list(self._lengths), "weights": list(self.weights), "draws": self._cursor.draws,
                "counts": list(self._cursor.counts), "none_run": list(self._none_run)}

    def load_state_dict(self, d: Mapping) -> None:
        """Continue exactly where `d` was taken; the blend (seed, rank, world size, sources, weights) must match."""
        mine = self.state_dict()

        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

        for key in ("version", "seed", "rank", "world_size", "lengths", "weights"):
            if plain(d.get(key)) != mine[key]:
                raise ValueError(f"cannot resume this Blend from the state: {key} is {d.get(key)!r}, "
                                 f"this blend has {mine[key]!r}")
        counts, draws = [int(c) for c in d["counts"]], int(d["draws"])
        if len(counts) != len(self._sources) or sum(counts) != draws:
            raise ValueError("inconsistent Blend state: counts do not add up to draws")
        self._cursor = _Cursor(draws, counts)
        self._none_run = [int(c) for c in d["none_run"]]
        self._last = self._pending = None
        self._version += 1
