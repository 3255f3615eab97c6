"""nvlm.tokenizer against hand-checked Qwen2 ids, a pure-Python rank-BPE oracle and transformers."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from nvlm.tokenizer import (QWEN25_ADDED_TOKENS, Tokenizer, build_byte_tokenizer, build_qwen2_tokenizer,
                            train_bpe_tokenizer)
from qwen_vocab import qwen_tiktoken_path

# Ids from SPEC 10.8 / the brief (Qwen2 base vocabulary).
GOLDEN = [
    ("Hello, world!", [9707, 11, 1879, 0]),
    ("user", [872]),
    ("system", [8948]),
    ("assistant", [77091]),
    ("\n", [198]),
    ("<tile_1>", [27, 21094, 62, 16, 29]),
    ("<tile_6>", [27, 21094, 62, 21, 29]),
    ("<tile_global_thumbnail>", [27, 21094, 19296, 37824, 29]),
    ("\n<Image>", [198, 46465, 29]),
    ("<Image><tile_1>", [46465, 1784, 21094, 62, 16, 29]),
    ("</Image>\n", [522, 1906, 397]),
]

SAMPLE = [
    # pieces of the golden prompts in test_prompt.py
    "Answer the questions.", "What is this?", "A cat.", "Hi", "Describe both.",
    "user\nImage-1: <Image>", "</Image>\nImage-2: <Image>", "</Image>\n<Image>",
    "I'm sure they'LL say it's 12345 or 3.14159, don't you THINK?",
    "  leading spaces, trailing spaces   \n\n\ttabs\r\nand CRLF\n\n\n",
    "café naïve Ελληνικά русский язык العربية",
    "你好，世界！日本語のテキスト。한국어",
    "emoji 😀👍🏽🇫🇷 and symbols ∑∫≈ → ©",
    "def f(x):\n    return x ** 2  # comment\n",
    "URL https://example.com/a?b=c&d=e_f-g",
]

SPECIAL_SAMPLE = [
    "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n<Image><tile_1><|vision_pad|><|vision_pad|>"
    "<tile_global_thumbnail><|vision_pad|></Image>\nWhat?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<tool_call>{\"a\": 1}</tool_call><|fim_prefix|>x<|file_sep|>",
]

# The pre-tokenizer regex as published with Qwen2 (restated here so the oracle does not reuse nvlm's copy).
QWEN_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    out = {}
    for line in qwen_tiktoken_path().read_bytes().splitlines():
        b64, rank = line.split()
        out[base64.b64decode(b64)] = int(rank)
    return out


def rank_bpe_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm in plain Python: regex pieces, then merge the lowest-ranked adjacent pair."""
    regex = pytest.importorskip("regex")
    ids = []
    for piece in regex.findall(QWEN_REGEX, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while True:
            cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
            if not cands:
                break
            _, i = min(cands)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def slow_dir(qwen_tokenizer_dir, tmp_path_factory):
    """Only the slow files the official repo ships (no tokenizer.json)."""
    path = tmp_path_factory.mktemp("qwen_slow")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir / name, path / name)
    return path


@pytest.mark.parametrize("text,ids", GOLDEN, ids=[repr(t) for t, _ in GOLDEN])
def test_golden_ids(qwen_tokenizer, text, ids):
    assert qwen_tokenizer.encode(text) == ids


def test_sizes_and_special_ids(qwen_tokenizer):
    tk = qwen_tokenizer
    assert len(tk) == 151_665
    for k, (token, _) in enumerate(QWEN25_ADDED_TOKENS):
        assert tk.token_to_id(token) == 151_643 + k
        assert tk.id_to_token(151_643 + k) == token
        assert tk.encode(token) == [151_643 + k]
    assert (tk.endoftext_id, tk.im_start_id, tk.im_end_id, tk.vision_pad_id) == (151643, 151644, 151645, 151654)
    assert tk.stop_ids == (151645, 151643)
    assert tk.token_to_id("<not a token>") is None
    assert tk.encode("") == []


def test_matches_rank_bpe_oracle(qwen_tokenizer, ranks):
    for text in SAMPLE + [t for t, _ in GOLDEN]:
        assert qwen_tokenizer.encode(text) == rank_bpe_encode(text, ranks), text


def test_decode(qwen_tokenizer):
    tk = qwen_tokenizer
    for text in SAMPLE + SPECIAL_SAMPLE:
        assert tk.decode(tk.encode(text), skip_special_tokens=False) == text
    ids = tk.encode("<|im_start|>assistant\nHi<tool_call>x</tool_call><|im_end|>")
    # Special tokens are dropped; the tool-call tags are plain added tokens in Qwen2.5 and stay.
    assert tk.decode(ids) == "assistant\nHi<tool_call>x</tool_call>"


def test_nfc_normalization(qwen_tokenizer):
    assert qwen_tokenizer.encode("cafe\u0301") == qwen_tokenizer.encode("caf\u00e9")


def test_saved_files(qwen_tokenizer_dir):
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert config["add_bos_token"] is False and config["split_special_tokens"] is False
    assert config["model_max_length"] == 131072 and config["errors"] == "replace"
    decoder = config["added_tokens_decoder"]
    assert [(int(i), d["content"], d["special"]) for i, d in decoder.items()] == [
        (151_643 + k, t, s) for k, (t, s) in enumerate(QWEN25_ADDED_TOKENS)
    ]
    assert not decoder["151657"]["special"] and decoder["151654"]["special"]
    vocab = json.loads((qwen_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151_643 and vocab["Ġ"] == 220 and vocab["!"] == 0
    merges = (qwen_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "Ġ Ġ" and len(merges) == 1 + 151_643 - 256


def test_slow_and_fast_files_agree(qwen_tokenizer, slow_dir):
    slow = Tokenizer.from_dir(slow_dir)
    assert len(slow) == len(qwen_tokenizer)
    for text in SAMPLE + SPECIAL_SAMPLE:
        assert slow.encode(text) == qwen_tokenizer.encode(text), text
    assert [slow.id_to_token(i) for i in range(151_640, 151_665)] == [
        qwen_tokenizer.id_to_token(i) for i in range(151_640, 151_665)
    ]


def test_transformers_reads_our_slow_files(qwen_tokenizer, slow_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(slow_dir))
    assert len(ref) == len(qwen_tokenizer)
    assert ref.eos_token == "<|im_end|>" and ref.bos_token is None
    for text in SAMPLE + SPECIAL_SAMPLE:
        ids = qwen_tokenizer.encode(text)
        assert ref.encode(text) == ids, text
        assert ref.decode(ids, skip_special_tokens=True) == qwen_tokenizer.decode(ids)


# ---------------------------------------------------------------- small tokenizers (no download)
def test_byte_tokenizer(tmp_path):
    tk = build_byte_tokenizer()
    assert len(tk) == 278
    assert tk.encode("Aé\n") == [0x41, 0xC3, 0xA9, 0x0A]
    assert tk.encode("<|im_start|>hi<|vision_pad|>") == [257, ord("h"), ord("i"), 267]
    assert (tk.endoftext_id, tk.im_start_id, tk.im_end_id, tk.vision_pad_id) == (256, 257, 258, 267)
    assert tk.decode(tk.encode("héllo 😀<|im_end|>")) == "héllo 😀"
    tk.save(tmp_path)
    fast = Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    slow = Tokenizer.from_dir(tmp_path)
    text = SPECIAL_SAMPLE[0] + SAMPLE[6]
    assert fast.encode(text) == slow.encode(text) == tk.encode(text)
    assert len(fast) == len(slow) == 278


def test_trained_bpe_tokenizer(tmp_path):
    corpus = ["There are 3 objects. A red circle at the top left.", "What colour is the circle at the top left?",
              "Where is the blue star?", "<tile_1><tile_2><tile_global_thumbnail>"] * 20
    tk = train_bpe_tokenizer(corpus, vocab_size=300)
    assert 256 < len(tk) - len(QWEN25_ADDED_TOKENS) <= 300
    base = len(tk) - len(QWEN25_ADDED_TOKENS)
    assert (tk.endoftext_id, tk.im_start_id, tk.vision_pad_id) == (base, base + 1, base + 11)
    # corpus words became single tokens; bytes keep their ids, so anything stays encodable
    assert tk.encode(" circle") == [tk.token_to_id("Ġcircle")]
    assert len(tk.encode("What colour is the circle?")) < len("What colour is the circle?") / 2
    assert tk.encode("KQ") == [ord("K"), ord("Q")]  # no upper-case pair in the corpus: one token per character
    for text in ("héllo 😀", "K7Q 42", "<|im_start|>user\nhi<|im_end|>"):
        assert tk.decode(tk.encode(text), skip_special_tokens=False) == text
    assert train_bpe_tokenizer(corpus, vocab_size=300).encode(corpus[0]) == tk.encode(corpus[0])  # deterministic
    tk.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode(corpus[1]) == tk.encode(corpus[1])
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(corpus, vocab_size=100)


def test_merges_from_tiktoken_ranks(tmp_path):
    def write(tokens: list[bytes]):
        lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]
        path = tmp_path / "t.tiktoken"
        path.write_text("\n".join(lines) + "\n")
        return path

    byte_tokens = [bytes([b]) for b in range(256)]
    # "bc" has a lower rank than "ab", so "abc" must be merged as ("a", "bc").
    tk = build_qwen2_tokenizer(write(byte_tokens + [b"bc", b"ab", b"abc"]))
    assert len(tk) == 259 + len(QWEN25_ADDED_TOKENS)
    assert tk.encode("abc") == [258] and tk.encode("abcab") == [258, 257]
    assert tk.vision_pad_id == 259 + 11
    tk.save(tmp_path / "out")
    assert (tmp_path / "out" / "merges.txt").read_text().splitlines()[1:] == ["b c", "a b", "a bc"]
    # "abcd" (rank 258) can only be built through "abc" (rank 259): not a valid BPE vocabulary.
    with pytest.raises(ValueError, match="does not split into two"):
        build_qwen2_tokenizer(write(byte_tokens + [b"ab", b"bc", b"abcd", b"abc"]))
    with pytest.raises(ValueError, match="single bytes"):
        build_qwen2_tokenizer(write(byte_tokens[1:] + [b"ab"]))
    (tmp_path / "bad.tiktoken").write_text("QQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        build_qwen2_tokenizer(tmp_path / "bad.tiktoken")
    with pytest.raises(FileNotFoundError):
        build_qwen2_tokenizer(tmp_path / "missing.tiktoken")


def test_missing_and_corrupt_files(tmp_path):
    build_byte_tokenizer().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    Tokenizer.from_dir(tmp_path)  # the slow files alone are enough

    merges = (tmp_path / "merges.txt").read_text()
    (tmp_path / "merges.txt").write_text(merges + "a b c\n")
    with pytest.raises(ValueError, match=r"merges.txt:\d+"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text(merges)

    vocab = (tmp_path / "vocab.json").read_text(encoding="utf-8")
    (tmp_path / "vocab.json").write_text(vocab[:-10], encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text(vocab, encoding="utf-8")

    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    gap = dict(config, added_tokens_decoder={"300": config["added_tokens_decoder"]["256"]})
    config_path.write_text(json.dumps(gap))
    with pytest.raises(ValueError, match="should have id 300"):
        Tokenizer.from_dir(tmp_path)
    config_path.write_text(json.dumps(dict(config, added_tokens_decoder={})))
    bare = Tokenizer.from_dir(tmp_path)
    assert len(bare) == 256
    with pytest.raises(ValueError, match=r"<\|vision_pad\|>"):
        bare.vision_pad_id
    with pytest.raises(ValueError, match="im_end"):
        bare.stop_ids


def test_qwen_vocab_env_override(tmp_path, monkeypatch):
    import qwen_vocab

    copy = tmp_path / "q.tiktoken"
    copy.write_text("IQ== 0\n")
    monkeypatch.setenv(qwen_vocab.ENV_VAR, str(copy))
    assert qwen_vocab.qwen_tiktoken_path() == copy
    monkeypatch.setenv(qwen_vocab.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match=qwen_vocab.ENV_VAR):
        qwen_vocab.qwen_tiktoken_path()
