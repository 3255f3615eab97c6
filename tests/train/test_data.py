"""nvlm.train.data: record formats, loss masking, bad samples, padding/packing isolation, Blend resume.

The byte tokenizer (id b = byte b; <|im_start|> 257, <|im_end|> 258, <|vision_pad|> 267) keeps expected ids
writable by hand.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.config import preset
from nvlm.image import preprocess
from nvlm.tokenizer import build_byte_tokenizer
from nvlm.train.data import (
    Blend, ConversationDataset, Sample, batches, collate, normalize_record, pack, read_records,
)
from nvlm.weights import random_model

S, E, NL, PAD, EOT = 257, 258, 10, 267, 256  # <|im_start|> <|im_end|> "\n" <|vision_pad|> <|endoftext|>
X = -100


def B(text: str) -> list[int]:
    return list(text.encode())


def ignored(text_or_len) -> list[int]:
    return [X] * (text_or_len if isinstance(text_or_len, int) else len(text_or_len))


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (w, h) in {"square": (56, 56), "wide": (112, 56)}.items():
        paths[name] = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    paths["garbage"] = root / "garbage.png"
    paths["garbage"].write_bytes(b"this is not a png")
    paths["missing"] = root / "missing.png"
    return paths


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def dataset(tok, records, **kw) -> ConversationDataset:
    return ConversationDataset(records, tok, tokens_per_tile=4, image_size=56, **kw)


# ------------------------------------------------------------------------------------------------- label masking


def test_labels_two_turns_text_only(tok):
    rec = {"images": [], "messages": [user("Hi"), assistant("Yo"), user("Why?"), assistant("Because.")]}
    s = dataset(tok, [rec], system="Be brief.")[0]
    assert s.input_ids == [
        S, *B("system\nBe brief."), E, NL,
        S, *B("user\nHi"), E, NL,
        S, *B("assistant\nYo"), E, NL,
        S, *B("user\nWhy?"), E, NL,
        S, *B("assistant\nBecause."), E, NL,
    ]
    assert s.labels == [
        X, *ignored("system\nBe brief."), X, X,
        X, *ignored("user\nHi"), X, X,
        X, *ignored("assistant\n"), *B("Yo"), E, NL,
        X, *ignored("user\nWhy?"), X, X,
        X, *ignored("assistant\n"), *B("Because."), E, NL,
    ]
    assert s.pixel_values is None and s.num_tiles == []


def test_labels_two_turns_with_image(tok, images):
    rec = {"images": [str(images["square"])], "messages": [user("Hi"), assistant("Yo"), user("Q"), assistant("A")]}
    s = dataset(tok, [rec], system=None)[0]  # no system turn
    image_block = [*B("<tile_global_thumbnail>"), PAD, PAD, PAD, PAD]  # 56 px -> 1 tile of 4 tokens
    assert s.input_ids == [
        S, *B("user\n<Image>"), *image_block, *B("</Image>\nHi"), E, NL,
        S, *B("assistant\nYo"), E, NL,
        S, *B("user\nQ"), E, NL,
        S, *B("assistant\nA"), E, NL,
    ]
    first_user = 1 + len("user\n<Image>") + len(image_block) + len("</Image>\nHi") + 2
    assert s.labels == [
        *ignored(first_user),
        X, *ignored("assistant\n"), *B("Yo"), E, NL,
        X, *ignored("user\nQ"), X, X,
        X, *ignored("assistant\n"), *B("A"), E, NL,
    ]
    assert s.num_tiles == [1]
    torch.testing.assert_close(s.pixel_values, preprocess(images["square"], image_size=56).pixel_values,
                               rtol=0, atol=0)


def test_multi_image_tiles_and_order(tok, images):
    rec = {"images": [str(images["wide"]), str(images["square"])],
           "messages": [user("<image> and <image>"), assistant("ok")]}
    s = dataset(tok, [rec])[0]
    assert s.num_tiles == [3, 1]
    assert s.pixel_values.shape == (4, 3, 56, 56)
    assert s.input_ids.count(PAD) == 4 * 4
    wide = preprocess(images["wide"], image_size=56).pixel_values
    torch.testing.assert_close(s.pixel_values[:3], wide, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- records


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


QA = [("<image>\nWhat is it?", "A square.")]


def test_both_styles_normalise_alike(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    llava = {"image": "imgs/a.png", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]}
    openai_parts = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.png"}},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]}
    openai_top = {"images": ["imgs/a.png"], "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A square."}]}
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = _write_jsonl(tmp_path / "data.jsonl", [
        llava, openai_parts, "", openai_top, '{"conversations": [', "[1, 2]", text_only,
        {"conversations": [{"from": "robot", "value": "x"}]},
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>"}]},
        {"messages": [{"role": "user", "content": "x"}], "images": ["http://example.com/a.png"]},
    ])
    with caplog.at_level(logging.WARNING, logger="nvlm.train.data"):
        recs = read_records(path)
    assert len(recs) == 4
    assert recs.skipped == Counter(invalid_json=1, not_object=1, bad_messages=1, bad_images=1,
                                   unsupported_image_url=1)
    assert f"{path}:5" in caplog.text and f"{path}:6" in caplog.text  # line numbers count the blank line
    want = {"images": [str(tmp_path / "imgs" / "a.png")],
            "messages": [{"role": "system", "content": "Be brief."}, user("<image>\nWhat is it?"),
                         assistant("A square.")]}
    for rec in recs[:3]:
        assert {k: v for k, v in rec.items() if k != "source"} == want
    assert [r["source"] for r in recs] == [f"{path}:{n}" for n in (1, 2, 4, 7)]
    assert recs[3]["images"] == [] and recs[3]["messages"] == [user("Hi"), assistant("Hello")]


def test_image_paths_root_absolute_and_json_list(tmp_path):
    other = tmp_path / "elsewhere"
    recs = [{"image": "a.png", "conversations": [{"from": "human", "value": "x"}]},
            {"image": "/abs/b.png", "conversations": [{"from": "human", "value": "x"}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "file:///abs/c%20d.png"}]}]}]
    (tmp_path / "list.json").write_text(json.dumps(recs))
    got = read_records(tmp_path / "list.json", image_root=other)
    assert [r["images"] for r in got] == [[str(other / "a.png")], ["/abs/b.png"], ["/abs/c d.png"]]
    assert got[2]["messages"] == [user("<image>")]
    assert got[0]["source"] == f"{tmp_path / 'list.json'}[0]"
    assert read_records(_write_jsonl(tmp_path / "d.jsonl", recs))[0]["images"] == [str(tmp_path / "a.png")]


def test_image_parts_follow_the_server_rule(tmp_path):
    img = {"type": "image_url", "image_url": {"url": "a.png"}}
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare"}, img,
                                                     {"type": "text", "text": "and this"}, img]}]}
    out = normalize_record(rec, tmp_path)
    assert out["messages"][0]["content"] == "<image>\n<image>\nCompare\nand this"
    assert out["images"] == [str(tmp_path / "a.png")] * 2


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "broken.json").write_text("[{]")
    with pytest.raises(ValueError, match="broken.json"):
        read_records(tmp_path / "broken.json")


# --------------------------------------------------------------------------------------------------- bad samples


def test_bad_samples_are_none_and_counted(tok, images, caplog):
    good = {"images": [str(images["square"])], "messages": [user("Hi"), assistant("Yo")], "source": "good"}
    records = [
        {**good, "images": [str(images["missing"])], "source": "missing"},
        {**good, "images": [str(images["garbage"])], "source": "garbage"},
        {**good, "messages": [user("Hi"), assistant("x" * 500)], "source": "long"},
        {**good, "messages": [user("Hi")], "source": "no answer"},
        {**good, "messages": [user("<image> <image>"), assistant("Yo")], "source": "placeholders"},
        {"oops": 1},
        good,
    ]
    ds = dataset(tok, records, max_len=200)
    with caplog.at_level(logging.WARNING, logger="nvlm.train.data"):
        out = [ds[i] for i in range(len(ds))] + [ds[0]]
    assert out[:6] == [None] * 6 and out[7] is None
    assert isinstance(out[6], Sample) and len(out[6]) <= 200
    assert ds.skipped == Counter(bad_image=3, too_long=1, no_assistant=1, bad_prompt=1, bad_record=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5  # once per reason: the second missing image is only counted
    assert "missing.png" in caplog.text and "'long'" not in caplog.text and "long (too_long)" in caplog.text


# -------------------------------------------------------------------------------- packing and padding isolation


@pytest.fixture(scope="module")
def tiny(tok):
    cfg = preset("tiny", vocab_size=300)
    m = random_model(cfg, seed=0).eval()
    m.image_token_id = tok.vision_pad_id
    return m


@pytest.fixture(scope="module")
def three_samples(tok, images, tiny):
    cfg = tiny.config
    recs = [{"images": [str(images["wide"])], "messages": [user("Describe."), assistant("Noise, 2 tiles.")]},
            {"images": [], "messages": [user("Hi"), assistant("Yo"), user("2+2?"), assistant("4")]},
            {"images": [str(images["square"])], "messages": [user("And this?"), assistant("More noise.")]}]
    ds = ConversationDataset(recs, tok, tokens_per_tile=cfg.tokens_per_tile, image_size=cfg.image_size)
    samples = [ds[i] for i in range(3)]
    assert [s.num_tiles for s in samples] == [[3], [], [1]]
    return samples


def _run(m, b):
    with torch.no_grad():
        return m(b.input_ids, b.pixel_values, b.position_ids, b.mask)


def _spans(samples):
    out, a = [], 0
    for s in samples:
        out.append((a, a + len(s)))
        a += len(s)
    return out


def test_packed_losses_equal_separate_losses(tiny, three_samples, tok):
    (packed,) = pack(three_samples, max_tokens=2000, pad_id=tok.endoftext_id)
    L = sum(len(s) for s in three_samples)
    assert packed.input_ids.shape == (1, L) and packed.num_samples == 3 and packed.num_tokens == L
    assert packed.pixel_values.shape == (4, 3, 56, 56)
    for a, b in _spans(three_samples):
        assert packed.position_ids[0, a:b].tolist() == list(range(b - a))
        assert packed.labels[0, a] == X
    logits = _run(tiny, packed)
    total, supervised = 0.0, 0
    for s, (a, b) in zip(three_samples, _spans(three_samples)):
        alone = collate([s], pad_id=tok.endoftext_id)
        assert alone.mask is None
        ref = _run(tiny, alone)
        torch.testing.assert_close(logits[:, a:b], ref, rtol=1e-5, atol=1e-5)
        loss = tiny.loss(ref, alone.labels)
        torch.testing.assert_close(tiny.loss(logits[:, a:b], packed.labels[:, a:b]), loss, rtol=1e-5, atol=1e-5)
        total, supervised = total + loss, supervised + alone.num_supervised
    torch.testing.assert_close(tiny.loss(logits, packed.labels), total, rtol=1e-5, atol=1e-5)
    assert packed.num_supervised == supervised == sum(sum(x != X for x in s.labels) for s in three_samples)
    # The test can fail: plain causal attention over the packed row changes the loss.
    with torch.no_grad():
        leaky = tiny(packed.input_ids, packed.pixel_values)
    assert abs(float(tiny.loss(leaky, packed.labels) - total)) > 1e-3


def test_first_token_of_each_packed_sample_carries_no_loss(tiny, tok):
    # Fully supervised samples: without the first-token rule, the last token of one sample would be trained
    # to predict the first token of the next.
    g = torch.Generator().manual_seed(0)
    samples = [Sample(ids, list(ids), None, []) for ids in
               (torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 5, 9))]
    (packed,) = pack(samples, max_tokens=32, pad_id=tok.endoftext_id)
    assert packed.num_supervised == 6 + 4 + 8
    logits = _run(tiny, packed)
    alone = sum(tiny.loss(_run(tiny, collate([s], pad_id=0)), collate([s], pad_id=0).labels) for s in samples)
    torch.testing.assert_close(tiny.loss(logits, packed.labels), alone, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_losses(tiny, three_samples, tok):
    padded = collate(three_samples, pad_id=tok.endoftext_id)
    L = max(len(s) for s in three_samples)
    assert padded.input_ids.shape == (3, L) and padded.mask.shape == (3, 1, L, L)
    assert padded.num_tokens == sum(len(s) for s in three_samples) and padded.fill < 1
    logits = _run(tiny, padded)
    assert torch.isfinite(logits).all()  # pads attend to themselves, never to nothing
    for r, s in enumerate(three_samples):
        n = len(s)
        assert padded.input_ids[r, n:].eq(tok.endoftext_id).all() and padded.labels[r, n:].eq(X).all()
        alone = collate([s], pad_id=tok.endoftext_id)
        ref = _run(tiny, alone)
        torch.testing.assert_close(logits[r:r + 1, :n], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tiny.loss(logits[r:r + 1], padded.labels[r:r + 1]), tiny.loss(ref, alone.labels),
                                   rtol=1e-5, atol=1e-5)


def _toy(tag: int, n: int) -> Sample:
    return Sample([tag] + [1] * (n - 1), [tag] + [2] * (n - 1), None, [])


def test_pack_is_first_fit_decreasing():
    samples = [_toy(100 + i, n) for i, n in enumerate((3, 8, 4, 6, 5))]
    rows = pack(samples, max_tokens=10, pad_id=0)
    # 8 -> row 0; 6 -> row 1; 5 -> row 2; 4 -> row 1 (6 + 4); 3 -> row 2 (5 + 3); rows keep input order.
    starts = [[int(t) for t, p in zip(r.input_ids[0], r.position_ids[0]) if p == 0] for r in rows]
    assert starts == [[101], [102, 103], [100, 104]]
    assert [r.input_ids.shape[1] for r in rows] == [8, 10, 8]
    m = rows[1].mask[0, 0]  # block-diagonal causal: 4 tokens of sample 102, then 6 of sample 103
    tril = lambda n: torch.ones(n, n).tril()  # noqa: E731
    assert m.equal(torch.block_diag(tril(4), tril(6)).bool())
    assert rows[1].position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="max_tokens"):
        pack([_toy(1, 11)], max_tokens=10, pad_id=0)


def test_batches_padding_and_packing():
    lengths = [5, 9, 3, 7, 7, 2, 10, 4, 6, 1, 8]
    samples = [_toy(100 + i, n) for i, n in enumerate(lengths)]
    plain = list(batches(iter(samples), batch_size=4, max_tokens=None, pad_id=0, packing=False))
    assert [b.num_samples for b in plain] == [4, 4, 3]
    assert plain[0].input_ids[:, 0].tolist() == [100, 101, 102, 103]

    packed = list(batches(iter(samples), batch_size=2, max_tokens=12, pad_id=0, packing=True))
    seen = []
    for b in packed:
        assert b.input_ids.shape[0] <= 2 and b.input_ids.shape[1] <= 12
        seen += [int(t) for t, p in zip(b.input_ids.flatten(), b.position_ids.flatten()) if p == 0 and t >= 100]
    assert sorted(seen) == [100 + i for i in range(len(lengths))]  # each sample exactly once
    assert sum(b.num_tokens for b in packed) == sum(lengths)
    assert sum(b.input_ids.numel() for b in packed) < sum(len(plain_b.input_ids.flatten()) for plain_b in plain)
    # a sample longer than a row is dropped with a warning, not an error
    assert sum(b.num_samples for b in batches(iter(samples), batch_size=2, max_tokens=8, pad_id=0,
                                              packing=True)) == 9  # 9 and 10 dropped


# --------------------------------------------------------------------------------------------------------- Blend


A = [f"a{i}" for i in range(10)]
Bs = [f"b{i}" for i in range(7)]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_blend_weights_and_determinism():
    draws = take(iter(Blend([(A, 3.0), (Bs, 1.0)], seed=0)), 4000)
    frac = sum(x.startswith("a") for x in draws) / len(draws)
    assert abs(frac - 0.75) < 0.03
    assert take(iter(Blend([(A, 3.0), (Bs, 1.0)], seed=0)), 300) == draws[:300]
    assert take(iter(Blend([(A, 3.0), (Bs, 1.0)], seed=1)), 300) != draws[:300]
    assert not any(x.startswith("b") for x in take(iter(Blend([(A, 1.0), (Bs, 0.0)], seed=0)), 200))


def test_blend_reshuffles_each_epoch_and_skips_none():
    epochs = take(iter(Blend([(A, 1.0)], seed=3)), 30)
    for e in range(3):
        assert sorted(epochs[10 * e:10 * e + 10]) == sorted(A)  # every item once per epoch
    assert epochs[:10] != epochs[10:20] != epochs[20:30]
    holey = [None if i % 3 == 0 else f"h{i}" for i in range(9)]
    got = take(iter(Blend([(holey, 1.0)], seed=0)), 60)
    assert None not in got and Counter(got) == Counter({x: 10 for x in holey if x})
    with pytest.raises(RuntimeError, match="no usable sample"):
        take(iter(Blend([(A, 1.0), ([None, None], 1.0)], seed=0)), 1000)


@pytest.mark.parametrize("workers", [0, 2])
def test_blend_resume_is_exact(workers):
    holey = [None if i % 4 == 0 else f"h{i}" for i in range(13)]
    sources = [(A, 2.0), (Bs, 1.0), (holey, 1.0)]
    ref = take(iter(Blend(sources, seed=5)), 400)
    blend = Blend(sources, seed=5, workers=workers)
    it = iter(blend)
    assert take(it, 137) == ref[:137]
    state = json.loads(json.dumps(blend.state_dict()))
    assert take(it, 100) == ref[137:237]
    fresh = Blend(sources, seed=5, workers=workers)
    fresh.load_state_dict(state)
    assert take(iter(fresh), 100) == ref[137:237]
    blend.load_state_dict(state)  # rewinding a running iterator drops what it had prefetched
    assert take(it, 263) == ref[137:]
    with pytest.raises(ValueError, match="seed"):
        Blend(sources, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        Blend([(A, 1.0), (Bs, 1.0), (holey, 1.0)], seed=5).load_state_dict(state)


def test_blend_unread_and_ranks():
    blend = Blend([(A, 1.0), (Bs, 1.0)], seed=0)
    it = iter(blend)
    first = take(it, 5)
    before = blend.state_dict()
    x = next(it)
    blend.unread(x)
    assert blend.state_dict() == before
    with pytest.raises(ValueError):
        blend.unread(x)
    assert take(it, 3)[0] == x
    glob = take(iter(Blend([(A, 1.0), (Bs, 1.0)], seed=0)), 40)
    assert glob[:5] == first and glob[5] == x
    r0 = take(iter(Blend([(A, 1.0), (Bs, 1.0)], seed=0, rank=0, world_size=2)), 20)
    r1 = take(iter(Blend([(A, 1.0), (Bs, 1.0)], seed=0, rank=1, world_size=2)), 20)
    assert r0 == glob[0::2] and r1 == glob[1::2]


def test_packed_batches_resume_exactly_from_blend_state():
    g = np.random.default_rng(0)
    src = [_toy(100 + i, int(n)) for i, n in enumerate(g.integers(1, 12, 50))]

    def stream(state=None):
        blend = Blend([(src, 1.0)], seed=1)
        if state is not None:
            blend.load_state_dict(state)
        return blend, batches(blend, batch_size=2, max_tokens=16, pad_id=0, packing=True)

    blend, it = stream()
    take(it, 3)
    state = blend.state_dict()  # taken while the 3rd batch is "in training"
    expected = take(it, 4)
    _, resumed = stream(state)
    for want, got in zip(expected, take(resumed, 4)):
        assert got.input_ids.equal(want.input_ids) and got.labels.equal(want.labels)


def test_batch_to():
    b = collate([_toy(100, 3), _toy(101, 2)], pad_id=0).to("cpu")
    assert b.mask is not None and b.pixel_values is None and b.num_samples == 2 and b.num_supervised == 3
