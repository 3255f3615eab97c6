"""Dense per-patch labels (synthetic.patch_labels / text_page) and the ViT pretraining stage (vision_pretrain).

The labels are checked against the rendered pixels as `nvlm.image.preprocess` tiles them (an independent path:
the labels come from scene geometry, the pixels from the renderer and the tiler), and on hand-built scenes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nvlm.config import LLMConfig, NVLMConfig, VisionConfig
from nvlm.image import IMAGENET_MEAN, IMAGENET_STD, preprocess
from nvlm.train import synthetic as syn
from nvlm.train import vision_pretrain as vp
from nvlm.weights import random_model

S, P = 112, 14
N = S // P


def tiles_u8(img, max_tiles=6) -> np.ndarray:
    """preprocess(img) back to uint8 RGB: (T, S, S, 3)."""
    pv = preprocess(img, max_tiles=max_tiles, image_size=S).pixel_values
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((pv * std + mean) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def patch(a: np.ndarray, i: int, j: int) -> np.ndarray:
    return a[i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(-1, 3).astype(int)


def test_hand_built_scene():
    scene = syn.Scene((112, 112), [syn.Obj("square", "red", (0, 0), size=0.8)],
                      [syn.Text("AB", (2, 2))], text_scale=2)
    lab = syn.patch_labels(scene, tile_size=S, patch_size=P, max_tiles=6)
    assert lab["colour"].shape == (1, N, N) and lab["chars"].shape == (1, N, N, syn.CHAR_SLOTS)
    red = list(syn.COLOURS).index("red") + 1
    square = syn.SHAPES.index("square") + 1
    # the square's box: cell (0, 0) is 0..37 px, the shape 0.8 of it around the cell centre (18.7 px)
    x0, y0, x1, y1 = syn.object_box(scene, scene.objects[0])
    inside = [(i, j) for i in range(N) for j in range(N) if x0 <= j * P and (j + 1) * P <= x1
              and y0 <= i * P and (i + 1) * P <= y1]
    assert inside and all(lab["colour"][0, i, j] == red and lab["shape"][0, i, j] == square for i, j in inside)
    assert lab["colour"][0, N - 1, 0] == 0 and lab["shape"][0, N - 1, 0] == 0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ci, cj = int(cy // P), int(cx // P)
    assert lab["centre"][0, ci, cj] == 1 and (lab["cell_x"][0, ci, cj], lab["cell_y"][0, ci, cj]) == (0, 0)
    assert (lab["centre"][0] == 1).sum() == 1 and (lab["centre"][0] == 2).sum() == 1
    assert (lab["cell_x"][0][lab["centre"][0] == 0] == syn.IGNORE).all()
    text_centre = np.argwhere(lab["centre"][0] == 2)[0]
    assert tuple(lab["cell_x"][0][tuple(text_centre)] for _ in [0]) == (2,)
    glyphs = sorted(lab["chars"][0][lab["chars"][0] > 0].tolist())
    assert glyphs == sorted([syn.TEXT_CHARS.index("A") + 1, syn.TEXT_CHARS.index("B") + 1])


def test_labels_agree_with_rendered_tiles():
    rng = random.Random(7)
    checked = {"colour": 0, "chars": 0, "thumb": 0}
    for _ in range(40):
        scene = syn.generate_scene(rng, tile_size=S, text_scale=2)
        lab = syn.patch_labels(scene, tile_size=S, patch_size=P, max_tiles=6)
        tiles = tiles_u8(syn.render(scene))
        assert len(tiles) == lab["colour"].shape[0]  # one label grid per tile, thumbnail included
        for t in range(len(tiles)):
            for i in range(N):
                for j in range(N):
                    px = patch(tiles[t], i, j)
                    c = lab["colour"][t, i, j]
                    near = {name: (np.abs(px - np.array(rgb)).max(1) < 50).mean() for name, rgb in
                            syn.COLOURS.items()}
                    if c:  # the labelled colour is really there (>= 15% by geometry; resampling blurs edges)
                        assert near[list(syn.COLOURS)[c - 1]] > 0.05
                        checked["colour"] += 1
                    else:  # and an unlabelled patch has no object filling a quarter of it
                        assert max(near.values()) < 0.25
                    if (lab["chars"][t, i, j] > 0).any():  # ink under a labelled glyph
                        assert (px.max(1) < 120).sum() >= 3
                        checked["chars"] += 1
            if t == len(tiles) - 1 and len(tiles) > 1:
                assert (lab["chars"][t] == 0).all()  # no glyph labels in the thumbnail
                checked["thumb"] += 1
    assert min(checked.values()) > 5, checked


def test_every_glyph_is_labelled_once_across_tiles():
    rng = random.Random(11)
    for _ in range(30):
        scene = syn.generate_scene(rng, tile_size=S, text_scale=2, text_prob=1.0)
        lab = syn.patch_labels(scene, tile_size=S, patch_size=P, max_tiles=6, use_thumbnail=False)
        labelled = sorted(lab["chars"][lab["chars"] > 0].tolist())
        expected = sorted(syn.TEXT_CHARS.index(ch) + 1 for t in scene.texts for ch in t.text)
        assert labelled == expected
        # item centres too: each exactly once over the tiles (they partition the image)
        assert (lab["centre"] == 1).sum() == len(scene.objects) and (lab["centre"] == 2).sum() == len(scene.texts)


def test_text_page():
    img, lab = syn.text_page(random.Random(3), tile_size=S, patch_size=P, text_scale=1)
    assert img.size == (S, S)
    assert (lab["chars"] > 0).sum() >= 20
    assert (lab["centre"] == syn.IGNORE).all() and (lab["colour"] == 0).all()
    tile = tiles_u8(img, max_tiles=1)[0]
    for i, j in np.argwhere((lab["chars"][0] > 0).any(-1)):
        assert (patch(tile, i, j).max(1) < 120).sum() >= 3


def _tiny(hidden=128):
    cfg = NVLMConfig(vision_config=VisionConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=256, patch_size=P, image_size=S,
                                                num_dummy_heads=0),
                     llm_config=LLMConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=128, vocab_size=320),
                     force_image_size=S).validate()
    return random_model(cfg, seed=0)


def test_label_channels_fit_and_too_narrow_vit_is_refused():
    assert vp.label_channels() == 120
    with pytest.raises(ValueError, match="hidden_size"):
        vp.pretrain_vision(_tiny(hidden=64), steps=1)


def test_center_output_is_exact():
    model = _tiny()
    rng = random.Random(0)
    pixels, _ = vp.scene_batch(rng, 4, tile_size=S, patch_size=P, max_tiles=6, text_scale=1)
    with torch.no_grad():
        before = vp.vit_features(model, pixels)
        norm = vp.center_output(model, n_scenes=16)
        after = vp.vit_features(model, pixels)
        probe, _ = vp.scene_batch(random.Random("nvlm-vision/0/center"), 16, tile_size=S, patch_size=P,
                                  max_tiles=6, text_scale=1)
        assert vp.vit_features(model, probe).mean((0, 1)).abs().max() < 1e-4
    shift = before - after  # the same vector for every token of every tile
    assert norm > 0.1
    torch.testing.assert_close(shift, shift[:1, :1].expand_as(shift), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_pretraining_learns_colours():
    model = _tiny()
    hist = vp.pretrain_vision(model, steps=60, scenes_per_step=8, pages_per_step=2, eval_every=60, lr=4e-3,
                              text_scale=2)
    assert [h["step"] for h in hist] == [0, 60]
    assert hist[-1]["scene_colour"] > hist[0]["scene_colour"] + 0.15, hist
    assert all(not p.requires_grad for p in model.parameters())
