"""Tests for nvlm.train.synthetic: answers checked by an independent question parser, hand-built scenes, exact
descriptions, determinism, the held-out split, tile grids, and a blur proxy for text legibility in the thumbnail."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvlm.image import find_grid
from nvlm.train.synthetic import (
    COLOURS,
    SHAPES,
    TEXT_CHARS,
    Obj,
    Scene,
    Text,
    add_synth_parser,
    ask_exist,
    describe,
    evaluate,
    generate_scene,
    normalize_answer,
    object_box,
    questions,
    render,
    text_box,
    write_dataset,
)

NAMES = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "center": (1, 1),
         "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}
POS = "|".join(sorted(NAMES, key=len, reverse=True))
COL = "|".join(COLOURS)
SHP = "|".join(SHAPES)


def oracle(scene: Scene, question: str) -> str:
    """Answer a generated question from the scene alone; fail if the question is ambiguous or not understood."""

    def one(items):
        assert len(items) == 1, f"ambiguous or empty referent for {question!r}: {items}"
        return items[0]

    objs = scene.objects
    at = lambda p: lambda o: o.cell == NAMES[p]  # noqa: E731
    if m := re.fullmatch(rf"What colour is the ({SHP})(?: at the ({POS}))?\?", question):
        return one([o for o in objs if o.shape == m[1] and (not m[2] or at(m[2])(o))]).colour
    if m := re.fullmatch(rf"What shape is the ({COL}) object(?: at the ({POS}))?\?", question):
        return one([o for o in objs if o.colour == m[1] and (not m[2] or at(m[2])(o))]).shape
    if m := re.fullmatch(rf"How many ({SHP})s are there\?", question):
        return str(sum(o.shape == m[1] for o in objs))
    if m := re.fullmatch(rf"How many ({COL}) objects are there\?", question):
        return str(sum(o.colour == m[1] for o in objs))
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(rf"Where is the ({COL}) ({SHP})\?", question):
        return one([o for o in objs if (o.colour, o.shape) == (m[1], m[2])]).position
    if question == "Where is the text?":
        return one(list(scene.texts)).position
    if m := re.fullmatch(r"Where is the text '(\w+)'\?", question):
        return one([t for t in scene.texts if t.text == m[1]]).position
    if m := re.fullmatch(rf"Is there an? ({COL}) ({SHP})\?", question):
        assert question.startswith("Is there an " if m[1][0] in "aeiou" else "Is there a ")
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if question == "What text is written in the image?":
        return one(list(scene.texts)).text
    if m := re.fullmatch(rf"What text is written at the ({POS})\?", question):
        assert len(scene.texts) > 1, "a positional OCR question needs more than one text"
        return one([t for t in scene.texts if t.cell == NAMES[m[1]]]).text
    raise AssertionError(f"question not understood: {question!r}")


# A hand-built scene: two circles (so colour questions about circles need a position), one red and one blue
# object of each colour, one text.
HAND = Scene((300, 200), [Obj("circle", "red", (0, 0)), Obj("circle", "blue", (1, 1)),
                          Obj("triangle", "green", (2, 2))], [Text("K7Q", (2, 0))])


def _all_questions(scene: Scene, n_seeds: int = 200) -> dict[str, tuple[str, str]]:
    out = {}
    for seed in range(n_seeds):
        for t, q, a in questions(scene, random.Random(seed), 6):
            assert out.setdefault(q, (t, a)) == (t, a), f"{q!r} got two answers"
    return out


def test_hand_scene_answers_and_description():
    qa = _all_questions(HAND)
    expected = {
        "What colour is the circle at the top left?": ("colour", "red"),
        "What colour is the circle at the center?": ("colour", "blue"),
        "What colour is the triangle?": ("colour", "green"),
        "What shape is the blue object?": ("shape", "circle"),
        "How many circles are there?": ("count", "2"),
        "How many stars are there?": ("count", "0"),
        "How many objects are there?": ("count", "3"),
        "Where is the green triangle?": ("position", "bottom right"),
        "Where is the text?": ("position", "top right"),
        "Is there a red circle?": ("exist", "yes"),
        "What text is written in the image?": ("ocr", "K7Q"),
    }
    for q, ta in expected.items():
        assert qa.get(q) == ta, q
    # Never asked: the shape alone names two circles.
    assert "What colour is the circle?" not in qa
    assert {q for q, (t, a) in qa.items() if t == "exist" and a == "no"}, "no negative existence question"
    for q, (_, a) in qa.items():
        assert oracle(HAND, q) == a, q
    assert describe(HAND) == ("There are 3 objects. A red circle at the top left. A blue circle at the center. "
                              "A green triangle at the bottom right. The text 'K7Q' is written at the top right.")


def test_hand_scene_positional_ocr_and_articles():
    scene = Scene((336, 224), [Obj("square", "orange", (1, 0)), Obj("square", "orange", (0, 2))],
                  [Text("AB", (0, 0)), Text("ZZ9", (2, 1))])
    qa = _all_questions(scene)
    assert qa["What text is written at the top left?"] == ("ocr", "AB")
    assert qa["What text is written at the right?"] == ("ocr", "ZZ9")
    assert "What text is written in the image?" not in qa
    assert qa["What shape is the orange object at the bottom left?"] == ("shape", "square")
    assert not any(q.startswith("Where is the orange square") for q in qa), "two orange squares: no position question"
    assert qa.get("Is there an orange square?") == ("exist", "yes")
    assert describe(scene) == ("There are 2 objects. An orange square at the top. An orange square at the bottom "
                               "left. The text 'AB' is written at the top left. The text 'ZZ9' is written at the "
                               "right.")
    one = Scene((112, 112), [Obj("star", "purple", (1, 1))])
    assert describe(one) == "There is 1 object. A purple star at the center."


def test_render_shows_the_scene():
    img = np.asarray(render(HAND))
    assert img.shape == (200, 300, 3)
    for o in HAND.objects:  # the shape's centre is exactly its colour (box filter over a filled interior)
        x0, y0, x1, y1 = object_box(HAND, o)
        assert tuple(img[round((y0 + y1) / 2), round((x0 + x1) / 2)]) == COLOURS[o.colour], o
    x0, y0, x1, y1 = text_box(HAND, HAND.texts[0])
    ink = (img[y0:y1, x0:x1].max(axis=2) < 64).sum()
    assert 20 < ink < 0.6 * (x1 - x0) * (y1 - y0)
    assert (img[:, :, 0] == 255).mean() > 0.7  # mostly background


def test_scene_validation():
    with pytest.raises(ValueError, match="share a cell"):
        Scene((112, 112), [Obj("circle", "red", (0, 0))], [Text("AB", (0, 0))])
    with pytest.raises(ValueError, match="does not fit"):
        Scene((112, 112), [], [Text("ABCDEFGH", (0, 0))])
    with pytest.raises(ValueError, match="unknown"):
        Scene((112, 112), [Obj("hexagon", "red", (0, 0))])
    with pytest.raises(ValueError, match="only use|use only"):
        Scene((300, 300), [], [Text("I0", (0, 0))])
    with pytest.raises(ValueError, match="tile_size"):
        generate_scene(random.Random(0), tile_size=32)


def test_random_scenes_questions_are_unambiguous_and_correct():
    rng = random.Random(1)
    types = Counter()
    for _ in range(300):
        scene = generate_scene(rng, tile_size=64)
        for t, q, a in questions(scene, rng, 4):
            types[t] += 1
            assert oracle(scene, q) == a, (scene, q)
    assert set(types) == {"colour", "shape", "count", "position", "exist", "ocr"}
    # Equal weights: every type gets a fair share (ocr less, as not every scene has text).
    assert min(types.values()) > 0.5 * max(types.values()), types


def test_question_weights():
    rng = random.Random(2)
    types = Counter(t for _ in range(100) for t, _, _ in
                    questions(generate_scene(rng, tile_size=64), rng, 3, {"count": 3.0, "exist": 1.0}))
    assert set(types) == {"count", "exist"} and types["count"] > 2 * types["exist"]
    with pytest.raises(ValueError, match="unknown question types"):
        questions(HAND, rng, 1, {"colours": 1.0})


def test_existence_is_balanced():
    rng = random.Random(3)
    answers = Counter()
    near = 0
    for _ in range(1000):
        scene = generate_scene(rng, tile_size=64)
        # Several distinct questions per image: a scene with one object has one "yes" question and many "no" ones.
        for _, q, a in questions(scene, rng, 3, {"exist": 1.0}):
            answers[a] += 1
            if a == "no":
                m = re.fullmatch(rf"Is there an? ({COL}) ({SHP})\?", q)
                near += any(o.colour == m[1] for o in scene.objects) and any(o.shape == m[2] for o in scene.objects)
    n = sum(answers.values())
    assert n > 2500 and abs(answers["yes"] / n - 0.5) < 0.03, answers
    assert near > 0.3 * answers["no"], "too few near-miss negatives"
    # Within an image the answers pair up, and stop rather than repeat the larger side.
    def answers_after(scene, asked):
        return Counter(None if qa is None else qa[1] for qa in (ask_exist(scene, rng, asked) for _ in range(100)))

    assert answers_after(HAND, {"Is there a red circle?"}) == {"no": 100}
    assert answers_after(HAND, {"Is there a purple star?"}) == {"yes": 100}
    assert set(answers_after(HAND, {"Is there a red circle?", "Is there a purple star?"})) == {"yes", "no"}
    one = Scene((112, 112), [Obj("star", "red", (1, 1))])
    assert answers_after(one, {"Is there a red star?", "Is there a blue star?"}) == {None: 100}


def test_scenes_exercise_several_tile_grids():
    for tile in (56, 112):
        rng = random.Random(4)
        grids = Counter(find_grid(*generate_scene(rng, tile_size=tile).size, max_num=6, image_size=tile)
                        for _ in range(120))
        assert len(grids) >= 3, grids
        assert {(1, 1), (2, 2), (3, 2)} <= set(grids), grids


def _detail_kept(img: Image.Image, box, tile: int) -> float:
    """R^2 of the region after a round trip through the thumbnail (bicubic down to one tile, back up): the share
    of the region's variance the thumbnail still carries."""
    w, h = img.size
    full = np.asarray(img.convert("L"), dtype=np.float64)
    back = np.asarray(img.resize((tile, tile), Image.BICUBIC).resize((w, h), Image.BICUBIC).convert("L"),
                      dtype=np.float64)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    a, b = full[y0:y1, x0:x1], back[y0:y1, x0:x1]
    return 1.0 - ((a - b) ** 2).mean() / a.var()


@pytest.mark.parametrize("tile", [64, 112])
@pytest.mark.parametrize("grid", [(2, 2), (3, 2), (2, 3)])
def test_text_detail_is_lost_in_the_thumbnail_but_shapes_survive(tile, grid):
    rng = random.Random(5)
    w, h = grid[0] * tile, grid[1] * tile
    for shape in SHAPES:
        text = "".join(rng.choice(TEXT_CHARS) for _ in range(3))
        scene = Scene((w, h), [Obj(shape, "blue", (0, 0))], [Text(text, (1, 1))])
        img = render(scene)
        assert _detail_kept(img, text_box(scene, scene.texts[0]), tile) < 0.6, (shape, text)
        assert _detail_kept(img, object_box(scene, scene.objects[0]), tile) > 0.85, shape
    # The proxy can fail: at text_scale 3 the glyphs are as coarse as the shapes and survive the thumbnail.
    big = Scene((w, h), [], [Text("K7", (1, 1))], text_scale=3)
    assert _detail_kept(render(big), text_box(big, big.texts[0]), tile) > 0.7


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dataset_is_deterministic_and_well_formed(tmp_path):
    a = write_dataset(tmp_path / "a", n_train=6, n_test=3, seed=7, tile_size=64)
    write_dataset(tmp_path / "b", n_train=6, n_test=3, seed=7, tile_size=64)
    write_dataset(tmp_path / "c", n_train=6, n_test=3, seed=8, tile_size=64)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db
    assert set(da) == set(dc) and all(da[k] != dc[k] for k in da if k.startswith("images/"))
    assert len([k for k in da if k.startswith("images/")]) == 9

    root = tmp_path / "a"
    train = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    desc = [json.loads(line) for line in (root / "describe.jsonl").read_text().splitlines()]
    assert len(desc) == 6 and 6 <= len(train) <= 18
    for rec in train + desc:
        assert set(rec) == {"id", "image", "conversations", "type", "grid"}
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        with Image.open(root / rec["image"]) as im:
            assert tuple(rec["grid"]) == find_grid(*im.size, max_num=6, image_size=64)
    assert {r["type"] for r in desc} == {"describe"}
    meta = json.loads((root / "meta.json").read_text())
    assert meta == a and meta["params"]["tile_size"] == 64
    assert sum(v for k, v in meta["counts"]["train"].items() if not k.startswith(("grid", "describe"))) == len(train)
    with pytest.raises(ValueError, match="not empty"):
        write_dataset(root, n_train=1, n_test=1, seed=7, tile_size=64)
    write_dataset(root, n_train=2, n_test=1, seed=7, tile_size=64, kinds=("qa",), overwrite=True)
    assert not (root / "describe.jsonl").exists() and len(list((root / "images").iterdir())) == 3


def test_held_out_split_is_by_scene_and_fixed(tmp_path):
    # One shape, no text, 1x1 images: only 216 distinct scenes, so train scenes equal to test ones must be skipped.
    kw = dict(n_test=40, seed=0, tile_size=64, max_tiles=1, max_objects=1, text_prob=0.0)
    meta = write_dataset(tmp_path / "a", n_train=120, **kw)
    assert meta["skipped_train_scenes_equal_to_test"] > 0

    def contents(name):
        return {(tuple(r["grid"]), r["conversations"][1]["value"])
                for r in map(json.loads, (tmp_path / "a" / name).read_text().splitlines())}

    train, test = contents("describe.jsonl"), contents("describe_test.jsonl")
    assert len(test) > 20 and len(train) > 20 and not train & test
    # The test set depends on (seed, n_test) only.
    write_dataset(tmp_path / "b", n_train=5, **kw)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    for k in da:
        if "test" in k:
            assert da[k] == db[k], k


def test_evaluate():
    def rec(t, a, grid=(1, 1)):
        return {"type": t, "grid": list(grid), "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                 {"from": "gpt", "value": a}]}

    preds = [(rec("colour", "red"), " Red. "), (rec("colour", "red"), "blue"), (rec("colour", "blue"), "blue"),
             (rec("ocr", "K7Q", (3, 2)), "'K7Q'"), (rec("ocr", "AB"), "A B"),
             (rec("exist", "yes"), "yes"), (rec("exist", "no"), "Yes")]
    res = evaluate(preds)
    assert res["colour"] == {"n": 3, "accuracy": 2 / 3, "majority_answer": "red", "majority_accuracy": 2 / 3}
    assert res["ocr"]["accuracy"] == 0.5 and res["ocr/3x2"]["accuracy"] == 1.0 and res["ocr/1x1"]["accuracy"] == 0
    assert res["exist"]["majority_answer"] == "no"  # a tie breaks alphabetically
    assert res["all"]["n"] == 7 and res["all"]["accuracy"] == pytest.approx(4 / 7)
    res = evaluate(preds, baseline_records=[rec("colour", "blue")] * 3)
    assert res["colour"]["majority_answer"] == "blue" and res["colour"]["majority_accuracy"] == pytest.approx(1 / 3)
    assert normalize_answer('  "Top  Left." ') == "top left"


def test_cli_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="nvlm")
    add_synth_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["synth", str(tmp_path / "d"), "--train", "2", "--test", "1", "--tile-size", "56",
                              "--weights", "ocr=2,count=1", "--json"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["params"]["weights"] == {"ocr": 2.0, "count": 1.0} and meta["params"]["tile_size"] == 56
    with pytest.raises(ValueError, match="TYPE=NUMBER"):
        args = parser.parse_args(["synth", str(tmp_path / "e"), "--weights", "ocr"])
        args.func(args)
    args = parser.parse_args(["synth", str(tmp_path / "f"), "--train", "20", "--test", "0", "--attend-object-head",
                              "1,0", "--attend-answer-head", "2,1"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["params"]["attend"] and meta["params"]["attend_object_at"] == [1, 0]
    assert meta["params"]["attend_answer_at"] == [2, 1]
    args = parser.parse_args(["synth", str(tmp_path / "o"), "--train", "20", "--test", "0", "--weights", "ocr=1",
                              "--text-prob", "1", "--tile-size", "112", "--text-scale", "2", "--attend-ocr-head", "3,0"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["params"]["attend"] and meta["params"]["attend_ocr_at"] == [3, 0]
    recs = [json.loads(x) for x in (tmp_path / "o" / "train.jsonl").read_text().splitlines()]
    reads = [r for r in recs if r.get("attend")]
    assert reads and all(len(r["attend"]) == len(r["conversations"][1]["value"]) for r in reads)
    for flags, match in ((["--attend-object-head", "1"], "LAYER,HEAD"), (["--attend-answer-head", "2,0"], "needs")):
        with pytest.raises(ValueError, match=match):
            args = parser.parse_args(["synth", str(tmp_path / "g"), "--train", "1", "--test", "0", *flags])
            args.func(args)


def test_train_grids_restrict_training_images_and_keep_the_held_out_split(tmp_path):
    full = write_dataset(tmp_path / "a", n_train=12, n_test=8, seed=3, tile_size=56, kinds=("qa",))
    easy = write_dataset(tmp_path / "b", n_train=12, n_test=8, seed=3, tile_size=56, kinds=("qa",),
                         train_grids=[(1, 1)])
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    grids = {tuple(json.loads(line)["grid"]) for line in (tmp_path / "b" / "train.jsonl").read_text().splitlines()}
    assert grids == {(1, 1)}
    assert easy["params"]["train_grids"] == [[1, 1]] and "train_grids" not in full["params"]
    with pytest.raises(ValueError, match="train_grids"):
        write_dataset(tmp_path / "c", n_train=1, n_test=0, tile_size=56, max_tiles=1, train_grids=[(2, 1)])


def test_question_form_names_every_question_the_generator_asks():
    from nvlm.train.synthetic import question_form

    assert question_form("<image>\nWhat colour is the circle?") == "colour of the only <shape>"
    assert question_form("What colour is the circle at the top left?") == "colour of the <shape> at <position>"
    assert question_form("How many objects are there?") == "count of all objects"
    assert question_form("How many red objects are there?") == "count of a colour"
    assert question_form("How many stars are there?") == "count of a shape"
    assert question_form("Where is the text 'AB'?") == question_form("Where is the text?") == "position of a text"
    assert question_form("Where is the red star?") == "position of a <colour> <shape>"
    assert question_form("What text is written at the top?") == "text at <position>"
    assert question_form("Describe the image.") == "other"
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        scene = generate_scene(rng, tile_size=112, text_scale=2)
        seen |= {question_form(q) for _, q, _ in questions(scene, rng, 4)}
    assert "other" not in seen and len(seen) == 12
