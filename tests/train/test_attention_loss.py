"""The auxiliary attention loss: `attend` entries in records -> (query, key) positions -> -log(attention mass).

Expected positions are written out by hand with the byte tokenizer (id b = byte b, <|vision_pad|> 267); the loss is
checked against an explicit softmax over the same q and k, and against training (the supervised head's mass on its
targets has to rise).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.config import preset
from nvlm.tokenizer import build_byte_tokenizer
from nvlm.train.config import TrainConfigError, from_dict
from nvlm.train.data import ConversationDataset, Sample, box_tokens, collate, pack, read_records
from nvlm.train.synthetic import (Obj, Scene, Text, attend_entry, glyph_boxes, object_box, object_entry, ocr_entries,
                                  text_box)
from nvlm.train.trainer import TrainStep, attention_mass_loss
from nvlm.weights import random_model

S, E, NL, PAD = 257, 258, 10, 267


def B(text: str) -> list[int]:
    return list(text.encode())


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "square.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------------ geometry


def test_box_tokens_one_tile():
    # 112-px tile, 4x4 tokens of 28 px: a box on token (row 1, col 2) exactly
    assert box_tokens([[56, 28, 84, 56]], (112, 112), (1, 1), 1, 16) == [6]
    # 4 px into the next token is 1/7 of a token side, under the 0.15 threshold; 5 px is over it
    assert box_tokens([[0, 0, 32, 28]], (112, 112), (1, 1), 1, 16) == [0]
    assert box_tokens([[0, 0, 33, 28]], (112, 112), (1, 1), 1, 16) == [0, 1]
    # the image's own pixels, not the tile's: a 224x224 image on one tile halves the box
    assert box_tokens([[112, 56, 168, 112]], (224, 224), (1, 1), 1, 16) == [6]
    # two boxes, union
    assert box_tokens([[0, 0, 28, 28], [84, 84, 112, 112]], (112, 112), (1, 1), 1, 16) == [0, 15]


def test_box_tokens_tiles_and_thumbnail():
    # 224x112 on a 2x1 grid + thumbnail: the top half of the left tile, and the top-left quarter of the thumbnail
    assert box_tokens([[0, 0, 112, 56]], (224, 112), (2, 1), 3, 16) == [0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 36, 37]
    # a box across the tile border: the right column of tile 1, the left column of tile 2, two thumbnail tokens
    assert box_tokens([[84, 0, 140, 28]], (224, 112), (2, 1), 3, 16) == [3, 16, 33, 34]
    with pytest.raises(ValueError, match="do not match a 2x1 grid"):
        box_tokens([[0, 0, 1, 1]], (224, 112), (2, 1), 5, 16)
    with pytest.raises(ValueError, match="square"):
        box_tokens([[0, 0, 1, 1]], (112, 112), (1, 1), 1, 8)


# --------------------------------------------------------------------------------------------------------- data


def test_dataset_turns_entries_into_positions(tok, square, caplog):
    rec = {"images": [str(square)], "source": "rec",
           "messages": [{"role": "user", "content": "<image>\nIs the red one big?"}, {"role": "assistant", "content": "no"},
                        {"role": "user", "content": "And the red one?"}, {"role": "assistant", "content": "yes"}],
           "attend": [{"turn": 1, "word": "red", "boxes": [[28, 28, 56, 56]], "image": 0},  # token (1, 1) of 2x2
                      {"turn": 0, "word": "red", "boxes": [[0, 0, 28, 56]], "image": 0},  # tokens (0, 0), (1, 0)
                      {"turn": 0, "word": "green", "boxes": [[0, 0, 28, 28]], "image": 0},  # not in the question
                      {"turn": 1, "word": "one", "boxes": [[0, 28, 28, 56]], "image": 0, "at": (2, 1)},
                      {"turn": 1, "word": "red", "from": "answer", "at": (3, 0)}]}  # the answer -> the word
    ds = ConversationDataset([rec], tok, tokens_per_tile=4, image_size=56, system=None)
    with caplog.at_level(logging.WARNING, logger="nvlm.train.data"):
        s = ds[0]
    image_block = [*B("<tile_global_thumbnail>"), PAD, PAD, PAD, PAD]
    first = [S, *B("user\n<Image>"), *image_block, *B("</Image>\nIs the red one big?"), E, NL,
             S, *B("assistant\nno"), E, NL]
    assert s.input_ids == first + [S, *B("user\nAnd the red one?"), E, NL, S, *B("assistant\nyes"), E, NL]
    pad0 = 1 + len("user\n<Image>") + len("<tile_global_thumbnail>")  # the first image token
    q0 = pad0 + 4 + len("</Image>\nIs the")  # the space of " red"
    q1 = len(first) + 1 + len("user\nAnd the")
    assert s.input_ids[q0:q0 + 4] == B(" red") and s.input_ids[q1:q1 + 4] == B(" red")
    q2 = len(first) + 1 + len("user\nAnd the red")
    assert s.input_ids[q2:q2 + 4] == B(" one")
    assert s.attend[:2] == [(q1, (pad0 + 3,), None), (q0, (pad0, pad0 + 2), None)]
    assert s.attend[2] == (q2, (pad0 + 2,), (2, 1))
    yes = s.input_ids.index(ord("y"))  # the answer's first token; its logits come from the position before it
    assert s.input_ids[yes - 10:yes] == B("assistant\n") and s.labels[yes] == ord("y") and s.labels[yes - 1] == -100
    assert s.attend[3] == (yes - 1, (q1,), (3, 0))
    assert ds.attend_dropped == 1 and "'green' not found" in caplog.text


def test_answer_token_entries_look_from_each_answer_position(tok, square, caplog):
    rec = {"images": [str(square)], "source": "rec",
           "messages": [{"role": "user", "content": "<image>\nRead it."}, {"role": "assistant", "content": "AB"}],
           "attend": [{"turn": 0, "answer_token": 0, "boxes": [[0, 0, 28, 28]], "image": 0, "at": (3, 0)},
                      {"turn": 0, "answer_token": 1, "boxes": [[28, 0, 56, 28]], "image": 0, "at": (3, 0)},
                      {"turn": 0, "answer_token": 4, "boxes": [[0, 0, 28, 28]], "image": 0, "at": (3, 0)}]}
    ds = ConversationDataset([rec], tok, tokens_per_tile=4, image_size=56, system=None)
    with caplog.at_level(logging.WARNING, logger="nvlm.train.data"):
        s = ds[0]
    pad0 = 1 + len("user\n<Image>") + len("<tile_global_thumbnail>")
    a = s.input_ids.index(ord("A"))
    assert s.input_ids[a:a + 4] == [ord("A"), ord("B"), E, NL] and s.labels[a - 1] == -100
    # the logits at a - 1 predict "A" (glyph 0), those at a predict "B" (glyph 1); the answer is A B <|im_end|> \n,
    # so token 4 is past it
    assert s.attend == [(a - 1, (pad0,), (3, 0)), (a, (pad0 + 1,), (3, 0))]
    assert ds.attend_dropped == 1 and "answer_token 4 is past answer 0" in caplog.text


def test_malformed_attend_skips_the_record(tmp_path, square):
    good = {"image": str(square), "conversations": [{"from": "human", "value": "<image>\nred?"},
                                                    {"from": "gpt", "value": "yes"}]}
    bad = [{"turn": -1, "word": "red", "boxes": [[0, 0, 1, 1]]}, {"turn": 0, "word": "", "boxes": [[0, 0, 1, 1]]},
           {"turn": 0, "word": "red", "boxes": [[5, 0, 1, 1]]}, {"turn": 0, "word": "red", "boxes": [[0, 0, 1, 1]],
                                                                 "image": 1}, "red",
           {"turn": 0, "word": "red", "boxes": [[0, 0, 1, 1]], "layer": 1},  # a layer needs its head
           {"turn": 0, "word": "red", "boxes": [[0, 0, 1, 1]], "layer": 1, "head": -1},
           {"turn": 0, "word": "red", "from": "question"}, {"turn": 0, "word": "red"},  # from what? boxes?
           {"turn": 0, "word": "red", "from": "answer", "boxes": [[0, 0, 1, 1]]},  # both
           {"turn": 0, "answer_token": -1, "boxes": [[0, 0, 1, 1]]}, {"turn": 0, "answer_token": 0},  # no boxes
           {"turn": 0, "answer_token": 0, "word": "red", "boxes": [[0, 0, 1, 1]]},  # a word or a token, not both
           {"turn": 0, "answer_token": True, "boxes": [[0, 0, 1, 1]]}]
    lines = [{**good, "attend": [e]} for e in bad] + [{**good, "attend": [{"turn": 0, "word": "red",
                                                                            "boxes": [[0, 0, 1, 1]]}]},
                                                       {**good, "attend": [{"turn": 0, "word": "red", "layer": 1,
                                                                            "head": 0, "boxes": [[0, 0, 1, 1]]},
                                                                           {"turn": 0, "word": "red", "from": "answer",
                                                                            "layer": 2, "head": 1}]},
                                                       {**good, "attend": [{"turn": 0, "answer_token": 1,
                                                                            "boxes": [[0, 0, 1, 1]]}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = read_records(path)
    assert len(recs) == 3 and recs.skipped == {"bad_attend": 14}
    assert recs[0]["attend"] == [{"turn": 0, "word": "red", "boxes": [[0.0, 0.0, 1.0, 1.0]], "image": 0, "at": None}]
    assert recs[1]["attend"][0]["at"] == (1, 0)
    assert recs[1]["attend"][1] == {"turn": 0, "word": "red", "from": "answer", "at": (2, 1)}
    assert recs[2]["attend"] == [{"turn": 0, "word": None, "answer_token": 1, "boxes": [[0.0, 0.0, 1.0, 1.0]],
                                  "image": 0, "at": None}]


def test_packing_offsets_attend_positions():
    a = Sample([1, 2, 3, 4], [-100, -100, 3, 4], None, attend=[(2, (0, 1), None)])
    b = Sample([5, 6, 7], [-100, 6, 7], None, attend=[(1, (0,), (1, 0)), (2, (0, 1), None)])
    (row,) = pack([a, b], max_tokens=16, pad_id=0)
    assert row.attend == ((0, 2, (0, 1), None), (0, 5, (4,), (1, 0)), (0, 6, (4, 5), None))
    assert collate([a, b], pad_id=0).attend == ((0, 2, (0, 1), None), (1, 1, (0,), (1, 0)), (1, 2, (0, 1), None))
    assert row.to("cpu").attend == row.attend


# --------------------------------------------------------------------------------------------------------- loss


def test_attention_mass_loss_equals_an_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    Bn, H, Hkv, L, hd = 2, 4, 2, 9, 8
    q, k = torch.randn(Bn, H, L, hd, generator=g), torch.randn(Bn, Hkv, L, hd, generator=g)
    seg = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])  # row 0 packs two samples
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()).unsqueeze(1)
    attend = [(0, 3, (0, 2)), (0, 7, (4, 5)), (1, 8, (1, 6, 7))]
    for head in (0, 3):
        want = 0.0
        for r, p, keys in attend:
            start = 4 if (r, p) == (0, 7) else 0  # the query's own sample
            kv = head // 2
            dots = [float(q[r, head, p] @ k[r, kv, j]) / math.sqrt(hd) for j in range(start, p + 1)]
            z = sum(math.exp(d) for d in dots)
            want -= math.log(sum(math.exp(dots[j - start]) for j in keys) / z)
        got = attention_mass_loss(q, k, mask, attend, head)
        assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="after the query"):
        attention_mass_loss(q, k, mask, [(0, 2, (3,))], 0)


def test_attention_loss_trains_the_head_and_leaves_ce_alone(tok):
    cfg = preset("tiny", vocab_size=300)
    torch.manual_seed(0)
    model = random_model(cfg, seed=0).train()
    model.image_token_id = tok.vision_pad_id
    a = from_dict({"model": "m", "output_dir": "o", "data": {"sources": [{"path": "x"}]},
                   "attention_loss": {"weight": 1.0, "layer": 1, "head": 2}}).attention_loss
    step = TrainStep(model, a)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (2, 24), generator=g)
    labels = ids.clone()
    attend = ((0, 20, (3, 4)), (1, 15, (9,)))  # arbitrary, fixed targets: only the loss can make the head find them
    ce_plain = step(ids, labels)
    ce_with = step(ids, labels, attend=attend, attention_scale=0.0)  # scale 0: no hook, no change
    assert torch.equal(ce_plain, ce_with)
    total = step(ids, labels, attend=attend, attention_scale=3.0)
    att = step.last_attention_sum
    assert total.item() == pytest.approx(ce_plain.item() + 3.0 * att.item(), rel=1e-6)
    assert model.language_model.model.layers[1].self_attn.qk_hook is None  # removed after the forward
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = att.item() / 2
    for _ in range(30):
        opt.zero_grad()
        step(ids, labels, attend=attend, attention_scale=50.0).backward()
        opt.step()
    last = step.last_attention_sum.item() / 2
    assert math.exp(-first) < 0.25 and math.exp(-last) > 0.9  # mean mass on the targets: from < 25% to > 90%


def test_entries_naming_their_layer_and_head_are_summed_per_head(tok):
    cfg = preset("tiny", vocab_size=300)
    model = random_model(cfg, seed=0)
    model.image_token_id = tok.vision_pad_id
    a = from_dict({"model": "m", "output_dir": "o", "data": {"sources": [{"path": "x"}]},
                   "attention_loss": {"weight": 1.0, "layer": 1, "head": 2}}).attention_loss
    step = TrainStep(model, a)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(2))
    default, e1, e2, e3 = (0, 20, (3, 4), None), (1, 15, (9,), (0, 1)), (0, 18, (2,), (1, 0)), (1, 22, (5, 6), (0, 1))
    with torch.no_grad():
        step(ids, ids.clone(), attend=(default, e1, e2, e3), attention_scale=1.0)
        got = step.last_attention_sum.item()
        layers = model.language_model.model.layers
        qk = {}
        for i in (0, 1):
            layers[i].self_attn.qk_hook = lambda q, k, i=i: qk.__setitem__(i, (q, k))
        step(ids, ids.clone())
        for i in (0, 1):
            layers[i].self_attn.qk_hook = None
    want = (attention_mass_loss(*qk[1], None, [default], 2) + attention_mass_loss(*qk[0], None, [e1, e3], 1)
            + attention_mass_loss(*qk[1], None, [e2], 0))
    assert got == pytest.approx(want.item(), rel=1e-5)
    assert all(layer.self_attn.qk_hook is None for layer in layers)
    with pytest.raises(ValueError, match="outside the decoder"):
        step(ids, ids.clone(), attend=((0, 20, (3,), (len(layers), 0)),), attention_scale=1.0)


def test_attention_loss_config_errors():
    base = {"model": "m", "output_dir": "o", "data": {"sources": [{"path": "x"}]}}
    assert from_dict(base).attention_loss is None
    with pytest.raises(TrainConfigError, match="activation_checkpointing"):
        from_dict({**base, "attention_loss": {}, "activation_checkpointing": True})
    with pytest.raises(TrainConfigError, match=">= 0"):
        from_dict({**base, "attention_loss": {"weight": -1.0}})
    with pytest.raises(TrainConfigError, match="attention_loss.layr"):
        from_dict({**base, "attention_loss": {"layr": 1}})


# ----------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_attend_entries():
    red_circle, blue_circle, red_star = (Obj("circle", "red", (0, 0), 0.6, (0.0, 0.0)),
                                         Obj("circle", "blue", (2, 2), 0.6, (0.0, 0.0)),
                                         Obj("star", "red", (1, 1), 0.6, (0.0, 0.0)))
    sc = Scene((120, 120), (red_circle, blue_circle, red_star))

    def box(o):
        return [round(v, 2) for v in object_box(sc, o)]

    assert box(red_star) == [48.0, 48.0, 72.0, 72.0]  # centre cell 40-80, shape 0.6 x 40 px wide
    assert attend_entry(sc, "What colour is the star?") == {"turn": 0, "word": "star", "boxes": [box(red_star)]}
    assert attend_entry(sc, "What shape is the blue object?") == {"turn": 0, "word": "blue",
                                                                   "boxes": [box(blue_circle)]}
    assert attend_entry(sc, "How many circles are there?") == {"turn": 0, "word": "circles",
                                                                "boxes": [box(red_circle), box(blue_circle)]}
    assert attend_entry(sc, "How many red objects are there?")["boxes"] == [box(red_circle), box(red_star)]
    for q in ("What colour is the circle?",  # two circles: the key word does not pick one
              "What shape is the red object?", "How many squares are there?", "How many objects are there?",
              "Is there a red circle?", "Where is the red star?", "What colour is the circle at the top left?"):
        assert attend_entry(sc, q) is None, q


def test_synthetic_object_entries():
    red_circle, blue_circle, red_star = (Obj("circle", "red", (0, 0), 0.6, (0.0, 0.0)),
                                         Obj("circle", "blue", (2, 2), 0.6, (0.0, 0.0)),
                                         Obj("star", "red", (1, 1), 0.6, (0.0, 0.0)))
    sc = Scene((120, 120), (red_circle, blue_circle, red_star), (Text("AB", (2, 0)),))

    def box(o):
        return [round(v, 2) for v in object_box(sc, o)]

    def entry(q):
        return object_entry(sc, q, (1, 3))

    at = {"layer": 1, "head": 3}
    # from the last key word to the one item the answer is about, whatever the question's form
    assert entry("Where is the red star?") == {"turn": 0, "word": "star", "boxes": [box(red_star)], **at}
    assert entry("What colour is the star?") == {"turn": 0, "word": "star", "boxes": [box(red_star)], **at}
    assert entry("What colour is the circle at the top left?") == {"turn": 0, "word": "left",
                                                                     "boxes": [box(red_circle)], **at}
    assert entry("What colour is the circle at the bottom right?")["boxes"] == [box(blue_circle)]
    assert entry("What shape is the red object at the center?") == {"turn": 0, "word": "center",
                                                                       "boxes": [box(red_star)], **at}
    assert entry("What shape is the blue object?") == {"turn": 0, "word": "blue", "boxes": [box(blue_circle)], **at}
    assert entry("Where is the text?") == {"turn": 0, "word": "text",
                                           "boxes": [[float(v) for v in text_box(sc, sc.texts[0])]], **at}
    for q in ("What colour is the circle?", "Where is the blue star?", "Is there a red circle?",
              "How many circles are there?", "How many objects are there?", "Where is the text 'AB'?",
              "What text is written in the image?"):
        assert entry(q) is None, q
    # the one-word entries of two more forms, at the table's layer and head
    assert attend_entry(sc, "How many objects are there?", extended=True) == {
        "turn": 0, "word": "objects", "boxes": [box(red_circle), box(blue_circle), box(red_star)]}
    assert attend_entry(sc, "Where is the text?", extended=True)["boxes"] == entry("Where is the text?")["boxes"]
    assert attend_entry(sc, "How many objects are there?") is None and attend_entry(sc, "Where is the text?") is None


def test_synthetic_ocr_entries():
    # 120x120 image, cells of 40 px; text scale 2: glyphs advance 12 px, ink rows 1-8 of 11 -> y 2..18 of 22
    sc = Scene((120, 120), (Obj("circle", "red", (0, 0)),), (Text("AB7", (1, 2)), Text("QQ", (2, 0))),
               text_scale=2)
    x0, y0, x1, y1 = text_box(sc, sc.texts[0])
    assert (x0, y0, x1, y1) == (42, 89, 78, 111)  # 36x22 px centred in the cell 40-80 x 80-120
    assert glyph_boxes(sc, sc.texts[0]) == [[42.0, 91.0, 54.0, 107.0], [54.0, 91.0, 66.0, 107.0],
                                            [66.0, 91.0, 78.0, 107.0]]
    got = ocr_entries(sc, "What text is written at the bottom?", (3, 1))
    assert got == [{"turn": 0, "answer_token": j, "boxes": [b], "layer": 3, "head": 1}
                   for j, b in enumerate(glyph_boxes(sc, sc.texts[0]))]
    assert [e["boxes"] for e in ocr_entries(sc, "What text is written at the top right?", (3, 1))] == [
        [b] for b in glyph_boxes(sc, sc.texts[1])]
    # two texts: "in the image" names none; no text at the position; not an OCR question
    for q in ("What text is written in the image?", "What text is written at the top left?", "Where is the text?"):
        assert ocr_entries(sc, q, (3, 1)) == [], q
    one = Scene((120, 120), (), (Text("K9", (0, 1)),), text_scale=2)
    assert len(ocr_entries(one, "What text is written in the image?", (3, 1))) == 2


def test_write_dataset_attend_keeps_the_held_out_split(tmp_path):
    from nvlm.train.synthetic import write_dataset

    common = dict(n_train=40, n_test=10, seed=3, tile_size=112, kinds=("qa",), questions_per_image=4, text_scale=2)
    write_dataset(tmp_path / "plain", **common)
    meta = write_dataset(tmp_path / "att", attend=True, **common)
    assert meta["params"]["attend"] is True
    assert (tmp_path / "plain" / "test.jsonl").read_bytes() == (tmp_path / "att" / "test.jsonl").read_bytes()
    plain = [json.loads(x) for x in (tmp_path / "plain" / "train.jsonl").read_text().splitlines()]
    att = [json.loads(x) for x in (tmp_path / "att" / "train.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "attend"} for r in att] == plain  # same questions, same answers
    with_entries = [r for r in att if "attend" in r]
    assert with_entries and all(r["type"] in ("colour", "shape", "count") for r in with_entries)
    for r in with_entries:
        (e,) = r["attend"]
        assert e["turn"] == 0 and e["word"] in r["conversations"][0]["value"]
    meta = write_dataset(tmp_path / "two", attend=True, attend_object_at=(1, 0), **common)
    assert meta["params"]["attend_object_at"] == [1, 0]
    assert (tmp_path / "two" / "test.jsonl").read_bytes() == (tmp_path / "plain" / "test.jsonl").read_bytes()
    two = [json.loads(x) for x in (tmp_path / "two" / "train.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "attend"} for r in two] == plain
    later = [r for r in two if any("layer" in e for e in r.get("attend", []))]
    assert {r["type"] for r in later} == {"position", "colour", "shape"}
    assert all(e["layer"] == 1 and e["head"] == 0 for r in later for e in r["attend"] if "layer" in e)
    assert len([r for r in two if "attend" in r]) > len(with_entries)  # and one-word entries of more forms
    write_dataset(tmp_path / "ans", attend=True, attend_object_at=(1, 0), attend_answer_at=(2, 1), **common)
    ans = [json.loads(x) for x in (tmp_path / "ans" / "train.jsonl").read_text().splitlines()]
    assert [r.get("attend") for r in ans] == [
        r["attend"] + [{"turn": 0, "word": r["attend"][-1]["word"], "from": "answer", "layer": 2, "head": 1}]
        if "attend" in r else None for r in two]
    write_dataset(tmp_path / "ocr", attend=True, attend_object_at=(1, 0), attend_answer_at=(2, 1),
                  attend_ocr_at=(3, 0), **common)
    ocr = [json.loads(x) for x in (tmp_path / "ocr" / "train.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "attend"} for r in ocr] == plain
    reads = [r for r in ocr if any("answer_token" in e for e in r.get("attend", []))]
    assert reads and {r["type"] for r in reads} == {"ocr"}
    for r, before in zip(ocr, ans):
        extra = r.get("attend", [])[len(before.get("attend") or []):]
        answer = r["conversations"][1]["value"]
        assert [e["answer_token"] for e in extra] == (list(range(len(answer))) if r in reads else [])
        assert all(e["layer"] == 3 and e["head"] == 0 for e in extra)
