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


def test_position_answers_match_whole_words_only():
    leaks = load_recipe()._leaks
    assert leaks("left", "Where is the red circle? bottom left")
    assert not leaks("left", "Where is the red circle? leftover")
    assert not leaks("2", "How many circles are there? 2")
