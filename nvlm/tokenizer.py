"""The checkpoint's Qwen2 tokenizer, run by the `tokenizers` library (no transformers at runtime).

Notable:
- NVLM-D ships the Qwen2.5 tokenizer: byte-level BPE over 151,643 base tokens plus 22 added tokens
  (ids 151643..151664), so len(tokenizer) = 151,665 while the embedding has 152,064 rows (SPEC 4.1).
- `Tokenizer.from_dir` reads `tokenizer.json` when present and otherwise builds the same pipeline from
  the slow files the official repo ships (`vocab.json`, `merges.txt`, `tokenizer_config.json`),
  the way `Qwen2Tokenizer` does: NFC, the Qwen2 split regex, byte-level, BPE, no BOS.
- `build_qwen2_tokenizer` derives that vocabulary from tiktoken ranks (`qwen.tiktoken`, same base
  vocab as Qwen2): a token's merge is the two parts that rank-BPE reaches using only lower ranks.
- `build_byte_tokenizer` is a 278-id stand-in (256 bytes + the 22 added tokens) for tiny models;
  `train_bpe_tokenizer` learns a small BPE of the same kind (Qwen2 pre-tokenizer, byte-level) from a corpus.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_PAD = "<|vision_pad|>"

# Qwen2.5's added tokens in id order (first id = base vocab size). Only the tool-call tags are plain
# "added" tokens; the rest are special (skipped by decode(skip_special_tokens=True)).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True),
    (VISION_PAD, True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
)

QWEN25_MODEL_MAX_LENGTH = 131072

# Written by `save` unless the loaded tokenizer_config.json says otherwise (Qwen2.5 values).
_DEFAULT_CONFIG: dict = {
    "tokenizer_class": "Qwen2Tokenizer",
    "add_bos_token": False,
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": IM_END,
    "pad_token": ENDOFTEXT,
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "model_max_length": QWEN25_MODEL_MAX_LENGTH,
    "split_special_tokens": False,
}


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE files.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to U+0100 onwards.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class Tokenizer:
    """A byte-level BPE tokenizer with the Qwen2 chat tokens; wraps a `tokenizers.Tokenizer`."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None):
        self._tk = backend
        # tokenizer_config.json fields other than added_tokens_decoder (which `save` rebuilds).
        self.config = {**_DEFAULT_CONFIG, **(config or {})}
        self.config.pop("added_tokens_decoder", None)

    # ------------------------------------------------------------------ construction / files
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` if present, else the slow files `vocab.json` + `merges.txt` + `tokenizer_config.json`."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        config_file = path / "tokenizer_config.json"
        fast_file = path / "tokenizer.json"
        if fast_file.is_file():
            config = _read_json(config_file) if config_file.is_file() else {}
            try:
                backend = tokenizers.Tokenizer.from_file(str(fast_file))
            except Exception as exc:
                raise ValueError(f"cannot parse {fast_file}: {exc}") from exc
            return cls(backend, config)

        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found (and no tokenizer.json in {path})")
        vocab = _read_json(path / "vocab.json")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{path / 'vocab.json'} must map token strings to integer ids")
        merges = _read_merges(path / "merges.txt")
        config = _read_json(config_file)
        added = _parse_added_tokens(config.get("added_tokens_decoder", {}), config_file)
        return cls(_build_backend(vocab, merges, added), config)

    def save(self, path: str | Path) -> None:
        """Write `vocab.json`, `merges.txt`, `tokenizer_config.json` and `tokenizer.json` into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = json.loads(self._tk.to_str())["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"only BPE tokenizers can be saved as vocab.json/merges.txt, not {model.get('type')}")
        vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
        # tokenizers serialises merges as [a, b] pairs (>= 0.20) or "a b" strings (older).
        merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model["merges"]]
        (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")

        added = self._tk.get_added_tokens_decoder()
        decoder = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())
        }
        config = {**self.config, "added_tokens_decoder": decoder}
        if "additional_special_tokens" not in config:
            named = {config.get("eos_token"), config.get("pad_token"), config.get("bos_token"), config.get("unk_token")}
            config["additional_special_tokens"] = [
                t.content for _, t in sorted(added.items()) if t.special and t.content not in named
            ]
        text = json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n"
        (path / "tokenizer_config.json").write_text(text, encoding="utf-8")
        self._tk.save(str(path / "tokenizer.json"), pretty=False)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text (`<|im_start|>`, ...) become single ids. No BOS."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def __len__(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tk

    @property
    def model_max_length(self) -> int:
        return int(self.config.get("model_max_length") or QWEN25_MODEL_MAX_LENGTH)

    # ------------------------------------------------------------------ special ids
    def _require(self, token: str) -> int:
        i = self._tk.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {token} token")
        return i

    @property
    def im_start_id(self) -> int:
        return self._require(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._require(IM_END)

    @property
    def endoftext_id(self) -> int:
        return self._require(ENDOFTEXT)

    @property
    def vision_pad_id(self) -> int:
        return self._require(VISION_PAD)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation ends at `<|im_end|>` or `<|endoftext|>` (SPEC 11.5)."""
        return (self.im_end_id, self.endoftext_id)

    def __repr__(self) -> str:
        return f"Tokenizer(size={len(self)})"


# ---------------------------------------------------------------------- builders
def build_qwen2_tokenizer(tiktoken_path: str | Path) -> Tokenizer:
    """The Qwen2.5 tokenizer from Qwen's tiktoken ranks (`base64token rank` per line) + the 22 added tokens."""
    path = Path(tiktoken_path)
    ranks = _read_tiktoken(path)
    byte_char = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    # Rank order = merge priority, so merges come out sorted as BPE needs them.
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        parts = _rank_bpe(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"{path}: token of rank {rank} ({token!r}) does not split into two lower-ranked parts")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    first_added = len(vocab)
    return Tokenizer(_build_backend(vocab, merges, _qwen25_added(first_added)))


def build_byte_tokenizer() -> Tokenizer:
    """A 278-id tokenizer for tiny models: byte b has id b (no merges), then the 22 Qwen2.5 added tokens."""
    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    return Tokenizer(_build_backend(vocab, [], _qwen25_added(256)))


def train_bpe_tokenizer(texts, vocab_size: int = 512) -> Tokenizer:
    """A small byte-level BPE for tiny models, learned from `texts` (an iterable of strings).

    Same pipeline as Qwen2 (NFC, the Qwen2 split regex, byte-level, BPE) and the 22 Qwen2.5 added tokens after
    the `vocab_size` base ids, so every string stays encodable (all 256 bytes are in the base vocabulary) and the
    prompt format is unchanged; only the merges are the corpus's. Deterministic for a given corpus.
    """
    from tokenizers.trainers import BpeTrainer

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    byte_char = bytes_to_unicode()
    tk = tokenizers.Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = [byte_char[b] for b in range(256)]
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=alphabet, limit_alphabet=256)
    tk.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Ids 0..255 are the bytes in byte order (as in build_byte_tokenizer), merged tokens follow in merge order.
    ordered = {byte_char[b]: b for b in range(256)}
    for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tok not in ordered:
            ordered[tok] = len(ordered)
    return Tokenizer(_build_backend(ordered, merges, _qwen25_added(len(ordered))))


def _qwen25_added(first_id: int) -> list[tuple[int, AddedToken]]:
    return [(first_id + k, AddedToken(token, special=special, normalized=False))
            for k, (token, special) in enumerate(QWEN25_ADDED_TOKENS)]


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]],
                   added: list[tuple[int, AddedToken]]) -> tokenizers.Tokenizer:
    tk = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                  continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # tokenizers assigns ids itself (an existing vocab id, else the next free one), so add in id order
    # and check that each lands where the config says.
    for want, token in sorted(added, key=lambda x: x[0]):
        if token.special:
            tk.add_special_tokens([token])
        else:
            tk.add_tokens([token])
        got = tk.token_to_id(token.content)
        if got != want:
            raise ValueError(f"added token {token.content!r} should have id {want} but got {got} "
                             f"(added token ids must follow the base vocabulary without gaps)")
    return tk


def _rank_bpe(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-pair merge `token` tiktoken-style (lowest rank first) using only ranks below `max_rank`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken file {path} not found")
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                b64, rank = line.split()
                ranks[base64.b64decode(b64, validate=True)] = int(rank)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: expected 'base64token rank', got {line[:80]!r}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be unique and cover 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]})")
    return ranks


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    for lineno, line in enumerate(lines, 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not pair[0] or not pair[1]:
            raise ValueError(f"{path}:{lineno}: expected two space-separated tokens, got {line[:80]!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _parse_added_tokens(decoder: dict, config_file: Path) -> list[tuple[int, AddedToken]]:
    if not isinstance(decoder, dict):
        raise ValueError(f"{config_file}: added_tokens_decoder must be an object")
    added = []
    for key, spec in decoder.items():
        try:
            added.append((int(key), AddedToken(
                spec["content"], special=bool(spec.get("special", False)),
                normalized=bool(spec.get("normalized", not spec.get("special", False))),
                lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                single_word=bool(spec.get("single_word", False)),
            )))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{config_file}: bad added_tokens_decoder entry {key!r}: {exc}") from exc
    return added
