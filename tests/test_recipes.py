"""Pieces of recipes/train_tiny.py that are not exercised by the shipped model's own test."""

from __future__ import annotations

import json

from scripts import load_script


def load_recipe():
    return load_script("recipes/train_tiny.py")


def record(image: str, q: str, a: str) -> dict:
    return {"id": f"{image}-0", "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}


def test_group_turns_drops_answers_the_conversation_already_gives(tmp_path):
    recs = [
        record("a.png", "What colour is the square?", "orange"),
        record("a.png", "What shape is the orange object?", "square"),  # "square" is in the first question
        record("a.png", "Where is the orange square?", "bottom left"),
        record("a.png", "What colour is the circle at the bottom left?", "red"),  # fine: "red" not said yet
        record("a.png", "How many squares are there?", "1"),  # counts and yes/no are never dropped
        record("a.png", "Is there a red circle?", "yes"),
        record("b.png", "What shape is the blue object?", "star"),
    ]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    n = load_recipe().group_turns(src, tmp_path / "mt.jsonl")
    convs = [json.loads(line) for line in (tmp_path / "mt.jsonl").read_text().splitlines()]
    assert n == 2 and [c["image"] for c in convs] == ["a.png", "b.png"]
    turns = [t["value"] for t in convs[0]["conversations"]]
    assert turns == ["<image>\nWhat colour is the square?", "orange", "Where is the orange square?", "bottom left",
                     "What colour is the circle at the bottom left?", "red", "How many squares are there?", "1",
                     "Is there a red circle?", "yes"]
    assert [t["value"] for t in convs[1]["conversations"]] == ["<image>\nWhat shape is the blue object?", "star"]


def test_group_turns_moves_attend_entries_with_their_questions(tmp_path):
    def att(word):
        return [{"turn": 0, "word": word, "boxes": [[0, 0, 1, 1]]}]

    recs = [
        record("a.png", "What colour is the square?", "orange") | {"attend": att("square")},
        record("a.png", "What shape is the orange object?", "square") | {"attend": att("orange")},  # dropped
        record("a.png", "Is there a red circle?", "yes"),
        record("a.png", "How many circles are there?", "1") | {"attend": att("circles")},
        record("b.png", "Is there a red circle?", "no"),
    ]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    load_recipe().group_turns(src, tmp_path / "mt.jsonl")
    a, b = [json.loads(line) for line in (tmp_path / "mt.jsonl").read_text().splitlines()]
    assert [t["value"] for t in a["conversations"][::2]] == [
        "<image>\nWhat colour is the square?", "Is there a red circle?", "How many circles are there?"]
    assert a["attend"] == [{"turn": 0, "word": "square", "boxes": [[0, 0, 1, 1]]},
                           {"turn": 2, "word": "circles", "boxes": [[0, 0, 1, 1]]}]
    assert "attend" not in b


def test_position_answers_match_whole_words_only():
    leaks = load_recipe()._leaks
    assert leaks("left", "Where is the red circle? bottom left")
    assert not leaks("left", "Where is the red circle? leftover")
    assert not leaks("2", "How many circles are there? 2")


def test_tokenizer_corpus_frame_option_merges_the_prompt_frame_but_spells_texts_to_read(tmp_path):
    from nvlm.prompt import encode_conversation
    from nvlm.tokenizer import train_bpe_tokenizer

    recs = [{**record(f"{i}.png", "What colour is the circle?", "red"), "type": "colour"} for i in range(20)]
    recs += [{**record(f"t{i}.png", "What text is written at the top?", "QZX7"), "type": "ocr"} for i in range(20)]
    recs += [{**record(f"p{i}.png", "Where is the text 'QZX7'?", "top"), "type": "position"} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "describe.jsonl").write_text("")
    recipe = load_recipe()
    conv = [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
            {"role": "assistant", "content": "QZX7"}]
    pieces = {}
    for frame in (False, True):
        corpus = recipe.tokenizer_corpus(tmp_path, frame=frame)
        assert not any("QZX7" in t for t in corpus)  # neither the OCR answer nor the quoted text
        tok = train_bpe_tokenizer(corpus, vocab_size=512)
        enc = encode_conversation(tok, conv, num_tiles=[3], tokens_per_tile=4, add_generation_prompt=False)
        pieces[frame] = [tok.decode([i]) for i in enc.input_ids if i != tok.vision_pad_id]
        assert " circle" in pieces[frame]
        assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"  # the byte alphabet keeps every string encodable
    for whole in ("system", "user", "assistant", "_thumbnail"):
        assert whole in pieces[True] and whole not in pieces[False], whole
    a = pieces[True].index("assistant")
    assert pieces[True][a + 2:a + 6] == ["Q", "Z", "X", "7"]  # texts to read: one character per token
    assert len(pieces[True]) < len(pieces[False]) - 20


def test_read_harness_scores_ocr_answers_per_character():
    harness = load_script("recipes/read_harness.py")
    recs = [record("a.png", "What text is written in the image?", t) for t in ("AB7", "QQ", "K9M2")]
    got = harness.char_scores(recs, ["AB7", " QZ", "K9"])
    # (answers are stripped) position 0: A, Q, K right -> 3/3; 1: B right, Z for Q, 9 right -> 2/3;
    # 2: 7 right, M missing -> 1/2; 3: 2 missing -> 0/1. Exact: the first only; length right: the first two.
    assert got == {"n": 3, "exact": round(1 / 3, 4), "length": round(2 / 3, 4),
                   "by_position": {0: 1.0, 1: round(2 / 3, 4), 2: 0.5, 3: 0.0}}


def test_recipe_dtype_auto_follows_the_cpu(monkeypatch):
    recipe = load_recipe()
    import nvlm.train.trainer as trainer

    assert recipe.resolve_dtype("float32") == "float32" and recipe.resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert recipe.resolve_dtype("auto") == "bfloat16"
    for answer in (False, None):  # no native bf16, or unknown: float32
        monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda answer=answer: answer)
        assert recipe.resolve_dtype("auto") == "float32"


def test_non_ocr_accuracy_weights_types_by_their_counts():
    recipe = load_recipe()
    scores = {"colour": {"n": 10, "accuracy": 1.0}, "count": {"n": 30, "accuracy": 0.5},
              "ocr": {"n": 50, "accuracy": 0.0}, "all": {"n": 90, "accuracy": 0.2778}}
    assert recipe.non_ocr_accuracy(scores) == (10 * 1.0 + 30 * 0.5) / 40  # OCR and "all" left out
