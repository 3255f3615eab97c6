"""Procedural shapes-and-text scenes with questions and answers, for training a tiny NVLM-D from scratch.

What is notable:
- A scene is 1-6 coloured shapes and 0-2 short text snippets, each alone in one cell of a 3x3 grid, so nothing
  overlaps and a position ("top left", "center", ...) names at most one thing. Geometry is stored as fractions of
  the cell, so a hand-built `Scene` needs only names and cells.
- Image sizes are `tile_size` times a (cols, rows) grid of 1x1, 2x1, 1x2, 2x2, 3x2 or 2x3, scaled by 0.85-1.15 with
  a +-3% aspect jitter, so that `nvlm.image.find_grid` picks those grids and tiles are not exact crops.
- Shapes are a fraction of their cell, so they stay recognisable in the SxS thumbnail. Text is Pillow's built-in
  bitmap font (5x7 glyphs, 1-2 px strokes; no font files, identical on every machine) at a fixed pixel size: crisp
  in the full-resolution tiles, blurred in the thumbnail, which shrinks the image 2x (2x1, 1x2: squeezed along one
  axis; 2x2: partly guessable) to 3x (3x2, 2x3: gone). On a 1x1 image there is no thumbnail and the only tile
  shows the text crisp.
- Questions are asked only when they have one answer: "What colour is the circle?" only if there is one circle
  (otherwise "... the circle at the top left?"); "Where is the red star?" only if there is one red star.
- Existence questions are yes/no balanced by a coin; half the "no" answers are near misses (the colour and the
  shape both occur, but not together), so the model has to bind attributes to objects.
- The held-out split is by scene and does not depend on n_train: test scenes come from their own random stream, and
  a training scene whose content (grid, shapes and texts by cell) equals a test scene's is skipped.
- Output is byte-identical for a seed: pure-Python `random` seeded with strings (SHA-512, no hash randomisation),
  PNGs without metadata, JSON written in a fixed key order.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Container, Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # clearly distinct hues, all far from the near-white background and the near-black text
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 30),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "purple": (145, 65, 190),
}
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
GRIDS = ((1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3))  # (cols, rows) of tile_size
# Uppercase letters and digits without the pairs a 5x7 font makes ambiguous (I/1, O/0).
TEXT_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
QTYPES = ("colour", "shape", "count", "position", "exist", "ocr")
DESCRIBE_PROMPT = "Describe every object and text in the image."
GLYPH_W, GLYPH_H = 6, 11  # advance and line height of Pillow's bitmap font, in pixels
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, for anti-aliased edges
MIN_TILE_SIZE = 48  # a 1x1 image's cell must hold two glyphs


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    # load_default() returns a FreeType font when FreeType is present (Pillow >= 10.1); the bitmap one is the same
    # on every machine, which the byte-identical output needs.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader else ImageFont.load_default()


# ------------------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """A filled shape alone in one cell of the 3x3 grid."""

    shape: str
    colour: str
    cell: tuple[int, int]  # (col, row), 0..2 each
    size: float = 0.7  # diameter as a fraction of the cell's shorter side
    offset: tuple[float, float] = (0.0, 0.0)  # centre shift from the cell centre, as fractions of the cell's sides

    @property
    def position(self) -> str:
        return POSITIONS[self.cell[1]][self.cell[0]]


@dataclass(frozen=True)
class Text:
    """A short uppercase/digit string alone in one cell, in the bitmap font."""

    text: str
    cell: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell[1]][self.cell[0]]


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]  # (width, height) in pixels
    objects: tuple[Obj, ...]
    texts: tuple[Text, ...] = ()
    background: tuple[int, int, int] = (255, 255, 255)
    text_colour: tuple[int, int, int] = (0, 0, 0)
    text_scale: int = 1  # integer upscale of the bitmap font (nearest neighbour)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(self.size))
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "texts", tuple(self.texts))
        w, h = self.size
        if w < 3 or h < 3:
            raise ValueError(f"scene size must be at least 3x3, got {w}x{h}")
        cells = [o.cell for o in self.objects] + [t.cell for t in self.texts]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two items share a cell: {sorted(cells)}")
        for c, r in cells:
            if not (0 <= c < 3 and 0 <= r < 3):
                raise ValueError(f"cell {(c, r)} is outside the 3x3 grid")
        for o in self.objects:
            if o.shape not in SHAPES or o.colour not in COLOURS:
                raise ValueError(f"unknown shape or colour in {o}; shapes {SHAPES}, colours {tuple(COLOURS)}")
        cw, ch = w / 3, h / 3
        for t in self.texts:
            if not t.text or any(ch_ not in TEXT_CHARS for ch_ in t.text):
                raise ValueError(f"text {t.text!r} must be non-empty and use only {TEXT_CHARS!r}")
            tw, th = GLYPH_W * len(t.text) * self.text_scale, GLYPH_H * self.text_scale
            if tw > cw or th > ch:
                raise ValueError(f"text {t.text!r} ({tw}x{th} px) does not fit its {cw:.0f}x{ch:.0f} px cell")

    def key(self) -> tuple:
        """What a question can ask about: shapes and texts by cell (not sizes, offsets or ink colours)."""
        return (tuple(sorted((o.cell, o.shape, o.colour) for o in self.objects)),
                tuple(sorted((t.cell, t.text) for t in self.texts)))


def _cell_box(size: tuple[int, int], cell: tuple[int, int]) -> tuple[float, float, float, float]:
    w, h = size
    c, r = cell
    return c * w / 3, r * h / 3, (c + 1) * w / 3, (r + 1) * h / 3


def generate_scene(
    rng: random.Random,
    *,
    tile_size: int = 112,
    grids: Sequence[tuple[int, int]] = GRIDS,
    min_objects: int = 1,
    max_objects: int = 6,
    text_prob: float = 0.7,
    max_texts: int = 2,
    text_scale: int = 1,
) -> Scene:
    """A random scene: an image `grid * tile_size` (jittered), 1-6 shapes and, with `text_prob`, 1-`max_texts` texts."""
    if tile_size < MIN_TILE_SIZE * text_scale:
        raise ValueError(f"tile_size must be >= {MIN_TILE_SIZE * text_scale} for text_scale={text_scale}, "
                         f"got {tile_size}")
    if not 1 <= min_objects <= max_objects or max_objects + max_texts > 9:
        raise ValueError(f"need 1 <= min_objects <= max_objects and max_objects + max_texts <= 9, got "
                         f"{min_objects}, {max_objects}, {max_texts}")
    cols, rows = rng.choice(list(grids))
    scale, aspect = rng.uniform(0.85, 1.15), rng.uniform(0.97, 1.03)
    w, h = round(cols * tile_size * scale * aspect), round(rows * tile_size * scale / aspect)
    cw, ch = w / 3, h / 3

    n_obj = rng.randint(min_objects, max_objects)
    n_txt = rng.randint(1, max_texts) if max_texts and rng.random() < text_prob else 0
    cells = rng.sample([(c, r) for r in range(3) for c in range(3)], n_obj + n_txt)

    objects = []
    for cell in cells[:n_obj]:
        size = rng.uniform(0.5, 0.8)
        d = size * min(cw, ch)
        # The shift keeps the shape well inside its cell (40% of the slack stays as margin on each side).
        sx, sy = 0.3 * (1 - d / cw), 0.3 * (1 - d / ch)
        objects.append(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), cell, round(size, 3),
                           (round(rng.uniform(-sx, sx), 3), round(rng.uniform(-sy, sy), 3))))
    texts = []
    max_chars = min(4, int((cw - 2) // (GLYPH_W * text_scale)))
    for cell in cells[n_obj:]:
        s = "".join(rng.choice(TEXT_CHARS) for _ in range(rng.randint(2, max_chars)))
        tw, th = GLYPH_W * len(s) * text_scale, GLYPH_H * text_scale
        sx, sy = 0.3 * (1 - tw / cw), 0.3 * (1 - th / ch)
        texts.append(Text(s, cell, (round(rng.uniform(-sx, sx), 3), round(rng.uniform(-sy, sy), 3))))
    g = rng.randint(225, 255)
    return Scene((w, h), tuple(objects), tuple(texts), background=(g, g, g),
                 text_colour=(rng.randint(0, 40),) * 3, text_scale=text_scale)


# ------------------------------------------------------------------------------------------------------ drawing


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = 0.85 * r  # half-side: about the circle's area
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        r *= 1.15
        cy += r / 4  # centre the bounding box, not the centroid (the apex reaches r, the base only r/2)
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        r *= 1.1
        cy += r * (1 - math.cos(math.pi / 5)) / 2
        pts = []
        for k in range(10):  # five points, inner radius 0.45 so it never reads as a blob
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def object_box(scene: Scene, obj: Obj) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the square the shape is drawn in, in image pixels."""
    x0, y0, x1, y1 = _cell_box(scene.size, obj.cell)
    r = obj.size * min(x1 - x0, y1 - y0) / 2
    cx = (x0 + x1) / 2 + obj.offset[0] * (x1 - x0)
    cy = (y0 + y1) / 2 + obj.offset[1] * (y1 - y0)
    return cx - r, cy - r, cx + r, cy + r


def text_box(scene: Scene, text: Text) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the text's glyph cells (ink and its blank rows), in image pixels."""
    x0, y0, x1, y1 = _cell_box(scene.size, text.cell)
    tw, th = GLYPH_W * len(text.text) * scene.text_scale, GLYPH_H * scene.text_scale
    left = round((x0 + x1 - tw) / 2 + text.offset[0] * (x1 - x0))
    top = round((y0 + y1 - th) / 2 + text.offset[1] * (y1 - y0))
    return left, top, left + tw, top + th


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon(_polygon(shape, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.size`."""
    w, h = scene.size
    k = SUPERSAMPLE
    big = Image.new("RGB", (w * k, h * k), scene.background)
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        _draw_shape(draw, o.shape, tuple(v * k for v in object_box(scene, o)), COLOURS[o.colour])
    img = big.reduce(k)  # box filter: anti-aliased edges, exact and deterministic
    for t in scene.texts:
        # Text is drawn at the final resolution: the bitmap font's 1-px strokes are the point.
        x0, y0, x1, y1 = text_box(scene, t)
        mask = Image.new("L", (GLYPH_W * len(t.text), GLYPH_H), 0)
        ImageDraw.Draw(mask).text((0, 0), t.text, font=_font(), fill=255)
        if scene.text_scale != 1:
            mask = mask.resize((x1 - x0, y1 - y0), Image.NEAREST)
        img.paste(scene.text_colour, (x0, y0), mask)
    return img


# --------------------------------------------------------------------------------------------------- questions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


QA = tuple[str, str]  # (question, answer)


def _pick(rng: random.Random, cands: list[QA], exclude: Container[str]) -> QA | None:
    cands = [qa for qa in cands if qa[0] not in exclude]
    return rng.choice(cands) if cands else None


# Each ask_* returns a (question, answer) that has one answer in the scene and is not in `exclude` (the questions
# already asked about this image), or None when there is none.


def ask_colour(scene: Scene, rng: random.Random, exclude: Container[str] = ()) -> QA | None:
    n = Counter(o.shape for o in scene.objects)
    return _pick(rng, [(f"What colour is the {o.shape}{'' if n[o.shape] == 1 else f' at the {o.position}'}?",
                        o.colour) for o in scene.objects], exclude)


def ask_shape(scene: Scene, rng: random.Random, exclude: Container[str] = ()) -> QA | None:
    n = Counter(o.colour for o in scene.objects)
    return _pick(rng, [(f"What shape is the {o.colour} object{'' if n[o.colour] == 1 else f' at the {o.position}'}?",
                        o.shape) for o in scene.objects], exclude)


def ask_count(scene: Scene, rng: random.Random, exclude: Container[str] = ()) -> QA | None:
    kinds = [
        [(f"How many {s}s are there?", str(sum(o.shape == s for o in scene.objects))) for s in SHAPES],  # 0 occurs
        [(f"How many {c} objects are there?", str(sum(o.colour == c for o in scene.objects))) for c in COLOURS],
        [("How many objects are there?", str(len(scene.objects)))],
    ]
    kinds = [k for k in kinds if any(q not in exclude for q, _ in k)]
    return _pick(rng, rng.choice(kinds), exclude) if kinds else None


def ask_position(scene: Scene, rng: random.Random, exclude: Container[str] = ()) -> QA | None:
    n = Counter((o.colour, o.shape) for o in scene.objects)
    cands = [(f"Where is the {o.colour} {o.shape}?", o.position) for o in scene.objects if n[o.colour, o.shape] == 1]
    if len(scene.texts) == 1:
        cands.append(("Where is the text?", scene.texts[0].position))
    else:
        cands += [(f"Where is the text '{t.text}'?", t.position) for t in scene.texts]
    return _pick(rng, cands, exclude)


def ask_exist(scene: Scene, rng: random.Random, exclude: Container[str] = ()) -> QA | None:
    # Within an image the answers pair up: a fair coin when as many "yes" as "no" were asked (and only if both
    # remain), the other side otherwise. Retrying a spent side until the other came up would tilt images with
    # several questions (one object: one "yes", twenty "no") towards "no".
    def q(c: str, s: str) -> str:
        return f"Is there {_a(c)} {s}?"

    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colours, shapes = {c for c, _ in present}, {s for _, s in present}
    yes = [(q(c, s), "yes") for c, s in sorted(present)]
    no = [(q(c, s), "no") for c, s in absent]
    near = [(q(c, s), "no") for c, s in absent if c in colours and s in shapes]  # both occur, not together
    free_yes, free_no = ([x for x in side if x[0] not in exclude] for side in (yes, no))
    asked_yes, asked_no = len(yes) - len(free_yes), len(no) - len(free_no)
    if asked_yes == asked_no:
        if not free_yes or not free_no:
            return None
        side = "yes" if rng.random() < 0.5 else "no"
    else:
        side = "yes" if asked_yes < asked_no else "no"
    if side == "yes":
        return _pick(rng, yes, exclude)
    near_free = any(x[0] not in exclude for x in near)
    return _pick(rng, near if near_free and rng.random() < 0.5 else no, exclude)


def ask_ocr(scene: Scene, rng: random.Random, exclude: Container[str] = ()) -> QA | None:
    if len(scene.texts) == 1:
        return _pick(rng, [("What text is written in the image?", scene.texts[0].text)], exclude)
    return _pick(rng, [(f"What text is written at the {t.position}?", t.text) for t in scene.texts], exclude)


ASK: dict[str, Callable[[Scene, random.Random, Container[str]], QA | None]] = {
    "colour": ask_colour, "shape": ask_shape, "count": ask_count,
    "position": ask_position, "exist": ask_exist, "ocr": ask_ocr,
}


def questions(scene: Scene, rng: random.Random, n: int = 1,
              weights: dict[str, float] | None = None) -> list[tuple[str, str, str]]:
    """Up to `n` distinct (qtype, question, answer) for the scene; types drawn by `weights` (default: equal)."""
    weights = dict.fromkeys(QTYPES, 1.0) if weights is None else weights
    unknown = set(weights) - set(ASK)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; known: {QTYPES}")
    types = [t for t in QTYPES if weights.get(t, 0) > 0 and not (t == "ocr" and not scene.texts)]
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for _ in range(10 * n):
        if len(out) == n or not types:
            break
        t = rng.choices(types, [weights[t] for t in types])[0]
        qa = ASK[t](scene, rng, seen)
        if qa is None:  # spent for this image; retrying would skew "exist" towards its larger side
            types.remove(t)
        else:
            seen.add(qa[0])
            out.append((t, *qa))
    return out


def attend_entry(scene: Scene, question: str, *, extended: bool = False) -> dict | None:
    """Where a question's key word points in the image, for the trainer's attention loss (`nvlm.train.data`):
    `{"turn": 0, "word", "boxes"}` for "What colour is the <shape>?" and "What shape is the <colour> object?" (one
    such shape), "How many <shape>s / <colour> objects are there?" (at least one); with `extended` also "How many
    objects are there?" (every object) and "Where is the text?" (the only text); None for the other questions
    (their key is two words, or a position, or not an object)."""
    if question == "How many objects are there?":  # not "How many <shape>s" with shape "object"
        if not extended or not scene.objects:
            return None
        return {"turn": 0, "word": "objects", "boxes": [_box(scene, o) for o in scene.objects]}
    if question == "Where is the text?":
        return _text_entry(scene) if extended and len(scene.texts) == 1 else None
    m = (re.fullmatch(r"What colour is the (\w+)\?", question) or re.fullmatch(r"How many (\w+)s are there\?", question)
         or re.fullmatch(r"What shape is the (\w+) object\?", question)
         or re.fullmatch(r"How many (\w+) objects are there\?", question))
    if m is None:
        return None
    key = m[1]
    objs = [o for o in scene.objects if key in (o.shape, o.colour)]
    if not objs or (question.startswith("What") and len(objs) != 1):
        return None
    word = key + "s" if question.startswith("How many") and key in SHAPES else key
    return {"turn": 0, "word": word, "boxes": [_box(scene, o) for o in objs]}


def object_entry(scene: Scene, question: str, at: tuple[int, int]) -> dict | None:
    """For a question about one object or text, an attention-loss entry at decoder layer/head `at` (`"layer"`,
    `"head"`) from the question's *last* key word to that item: "What colour is the <shape>[ at the <position>]?",
    "What shape is the <colour> object[ at the <position>]?", "Where is the <colour> <shape>?" and "Where is the
    text?". Where the key is two words the entry needs a layer after the first, where the words before the last
    one have reached it; one such entry for every question of these forms gives them one place to read the item
    from. None for other questions (counts, existence, OCR, a text named by its content)."""
    layer, head = at
    if question == "Where is the text?":
        e = _text_entry(scene) if len(scene.texts) == 1 else None
        return None if e is None else {**e, "layer": layer, "head": head}
    m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
    if m is not None and m[1] != "text":
        objs = [o for o in scene.objects if (o.colour, o.shape) == (m[1], m[2])]
        word = m[2]
    else:
        m = (re.fullmatch(r"What colour is the (\w+)(?: at the ([\w ]+))?\?", question)
             or re.fullmatch(r"What shape is the (\w+) object(?: at the ([\w ]+))?\?", question))
        if m is None:
            return None
        objs = [o for o in scene.objects if m[1] in (o.shape, o.colour) and m[2] in (None, o.position)]
        word = m[2].split()[-1] if m[2] else m[1]
    if len(objs) != 1:
        return None
    return {"turn": 0, "word": word, "boxes": [_box(scene, objs[0])], "layer": layer, "head": head}


def glyph_boxes(scene: Scene, text: Text) -> list[list[float]]:
    """(x0, y0, x1, y1) of each character's glyph cell, its ink rows only (1-8 of the font's 11), in image pixels."""
    x0, y0, _, _ = text_box(scene, text)
    k = scene.text_scale
    return [[float(x0 + i * GLYPH_W * k), float(y0 + k), float(x0 + (i + 1) * GLYPH_W * k), float(y0 + 9 * k)]
            for i in range(len(text.text))]


def ocr_entries(scene: Scene, question: str, at: tuple[int, int]) -> list[dict]:
    """For an OCR question ("What text is written in the image?" / "... at the <position>?"), one attention-loss
    entry per character at decoder layer/head `at`: from the position that predicts the answer's j-th token (the
    tokenizer spells texts one character per token) to the j-th glyph (`glyph_boxes`). [] for other questions."""
    if question == "What text is written in the image?":
        texts = list(scene.texts) if len(scene.texts) == 1 else []
    else:
        m = re.fullmatch(r"What text is written at the ([\w ]+)\?", question)
        texts = [t for t in scene.texts if m and t.position == m[1]]
    if len(texts) != 1:
        return []
    layer, head = at
    return [{"turn": 0, "answer_token": j, "boxes": [b], "layer": layer, "head": head}
            for j, b in enumerate(glyph_boxes(scene, texts[0]))]


def _text_entry(scene: Scene) -> dict:
    return {"turn": 0, "word": "text", "boxes": [[float(v) for v in text_box(scene, scene.texts[0])]]}


def _box(scene: Scene, obj: Obj) -> list[float]:
    return [round(v, 2) for v in object_box(scene, obj)]


def describe(scene: Scene) -> str:
    """Every shape then every text, in reading order (by cell): the dense first-stage target."""
    objs = sorted(scene.objects, key=lambda o: (o.cell[1], o.cell[0]))
    n = len(objs)
    parts = [f"There is {n} object." if n == 1 else f"There are {n} objects."]
    parts += [f"{_a(o.colour).capitalize()} {o.shape} at the {o.position}." for o in objs]
    parts += [f"The text '{t.text}' is written at the {t.position}."
              for t in sorted(scene.texts, key=lambda t: (t.cell[1], t.cell[0]))]
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------------ dataset


def multi_turn(pairs: Iterable[tuple[str, str]]) -> list[dict]:
    """LLaVA-style turns for (question, answer) pairs about one image: `<image>\\n` before the first question only."""
    conv: list[dict] = []
    for k, (q, a) in enumerate(pairs):
        q = q.replace("<image>\n", "", 1)
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv


def _record(rid: str, image: str, question: str, answer: str, qtype: str, grid: tuple[int, int],
            attend: list[dict] | None = None) -> dict:
    rec = {"id": rid, "image": image,
           "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
           "type": qtype, "grid": list(grid)}
    if attend:
        rec["attend"] = attend
    return rec


OUTPUTS = ("describe.jsonl", "describe_test.jsonl", "train.jsonl", "test.jsonl", "meta.json")


def write_dataset(
    out_dir: str | Path,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    tile_size: int = 112,
    kinds: Iterable[str] = ("describe", "qa"),
    questions_per_image: int = 3,
    weights: dict[str, float] | None = None,
    max_tiles: int = 6,
    min_objects: int = 1,
    max_objects: int = 6,
    text_prob: float = 0.7,
    max_texts: int = 2,
    text_scale: int = 1,
    train_grids: Sequence[tuple[int, int]] | None = None,
    train_max_objects: int | None = None,
    attend: bool = False,
    attend_object_at: tuple[int, int] | None = None,
    attend_answer_at: tuple[int, int] | None = None,
    attend_ocr_at: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write images and LLaVA-style JSONL under `out_dir`; returns the contents of meta.json.

    Files: images/{train,test}-NNNNNN.png; describe.jsonl (one description per training image) and
    describe_test.jsonl (per test image) for kind "describe"; train.jsonl and test.jsonl (`questions_per_image`
    distinct questions per image, one per record) for kind "qa"; meta.json (parameters and counts per type).
    Records: {"id", "image", "conversations": [human "<image>\\n"+question, gpt answer], "type", "grid"}, where
    grid is the (cols, rows) that `nvlm.image.find_grid` picks at `tile_size` with `max_tiles`.
    `train_grids` restricts the training images to some of the grids (e.g. [(1, 1)] for an easy first stage) while
    the held-out split stays the one of `max_tiles`, so datasets that differ only in it share test.jsonl;
    `train_max_objects` likewise caps the shapes per training image (a curriculum stage) and leaves the test split.
    `attend`: training QA records also get `attend` (`attend_entry`) where the question has one key word;
    `attend_object_at` = (layer, head): also `attend_entry(extended=True)` and `object_entry(at=...)`;
    `attend_answer_at` = (layer, head): and, for a question with entries, one from the answer to its last entry's
    word (`{"from": "answer"}`), the hop that brings what the word looked up to where the answer is predicted;
    `attend_ocr_at` = (layer, head): OCR questions get `ocr_entries` (answer character j -> glyph j).
    """
    from ..image import find_grid

    kinds = tuple(kinds)
    if not kinds or set(kinds) - {"describe", "qa"}:
        raise ValueError(f"kinds must be a non-empty subset of ('describe', 'qa'), got {kinds}")
    if n_train < 0 or n_test < 0 or questions_per_image < 1:
        raise ValueError("n_train and n_test must be >= 0 and questions_per_image >= 1")
    weights = dict.fromkeys(QTYPES, 1.0) if weights is None else {t: float(v) for t, v in weights.items()}
    if set(weights) - set(QTYPES) or not any(v > 0 for v in weights.values()):
        raise ValueError(f"weights must give a positive weight to some of {QTYPES}, got {weights}")
    grids = [g for g in GRIDS if g[0] * g[1] <= max_tiles]
    if not grids:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    params = dict(n_train=n_train, n_test=n_test, seed=seed, tile_size=tile_size, kinds=list(kinds),
                  questions_per_image=questions_per_image, weights=weights, max_tiles=max_tiles,
                  min_objects=min_objects, max_objects=max_objects, text_prob=text_prob, max_texts=max_texts,
                  text_scale=text_scale, grids=[list(g) for g in grids])
    if (attend_object_at or attend_answer_at or attend_ocr_at) and not attend:
        raise ValueError("attend_object_at / attend_answer_at / attend_ocr_at need attend=True")
    if attend_answer_at is not None and attend_object_at is None:
        raise ValueError("attend_answer_at needs attend_object_at (the answer hop follows the object entries)")
    if attend:
        params["attend"] = True
        if attend_object_at is not None:
            params["attend_object_at"] = list(attend_object_at)
        if attend_answer_at is not None:
            params["attend_answer_at"] = list(attend_answer_at)
        if attend_ocr_at is not None:
            params["attend_ocr_at"] = list(attend_ocr_at)
    gen = dict(tile_size=tile_size, grids=grids, min_objects=min_objects, max_objects=max_objects,
               text_prob=text_prob, max_texts=max_texts, text_scale=text_scale)
    gen_train = gen
    if train_grids is not None:
        train_grids = [tuple(g) for g in train_grids]
        if not train_grids or set(train_grids) - set(grids):
            raise ValueError(f"train_grids must be a non-empty subset of {grids}, got {train_grids}")
        gen_train = dict(gen_train, grids=train_grids)
        params["train_grids"] = [list(g) for g in train_grids]
    if train_max_objects is not None:
        if not min_objects <= train_max_objects <= max_objects:
            raise ValueError(f"train_max_objects must be in [{min_objects}, {max_objects}], got {train_max_objects}")
        gen_train = dict(gen_train, max_objects=train_max_objects)
        params["train_max_objects"] = train_max_objects
    generate_scene(random.Random(0), **gen)  # validate the parameters before touching the disk

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(out / "images", ignore_errors=True)
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)

    # Test scenes first, from their own stream, so the held-out set is fixed by (seed, n_test) alone.
    test_keys: set = set()
    counts: dict[str, Counter] = {"train": Counter(), "test": Counter()}
    want = {"describe.jsonl": "describe" in kinds, "describe_test.jsonl": "describe" in kinds,
            "train.jsonl": "qa" in kinds, "test.jsonl": "qa" in kinds}
    handles = {name: open(out / name, "w", encoding="utf-8", newline="\n") for name, on in want.items() if on}
    skipped = 0
    try:
        for split, n in (("test", n_test), ("train", n_train)):
            rng = random.Random(f"nvlm-synth/{seed}/{split}")
            bar = _progress(n, split) if progress else None
            i = 0
            while i < n:
                scene = generate_scene(rng, **(gen if split == "test" else gen_train))
                key = (find_grid(*scene.size, max_num=max_tiles, image_size=tile_size), scene.key())
                if split == "test":
                    test_keys.add(key)
                elif key in test_keys:
                    skipped += 1
                    continue
                grid = key[0]
                name = f"{split}-{i:06d}"
                image = f"images/{name}.png"
                render(scene).save(out / image, format="PNG")
                if "describe" in kinds:
                    f = handles["describe.jsonl" if split == "train" else "describe_test.jsonl"]
                    f.write(json.dumps(_record(f"{name}-d", image, DESCRIBE_PROMPT, describe(scene), "describe",
                                               grid)) + "\n")
                    counts[split]["describe"] += 1
                if "qa" in kinds:
                    f = handles[f"{split}.jsonl"]
                    for k, (t, q, a) in enumerate(questions(scene, rng, questions_per_image, weights)):
                        att = None
                        if attend and split == "train":
                            ext = attend_object_at is not None
                            att = [e for e in (attend_entry(scene, q, extended=ext),
                                               object_entry(scene, q, attend_object_at) if ext else None) if e]
                            if att and attend_answer_at is not None:
                                layer, head = attend_answer_at
                                att.append({"turn": 0, "word": att[-1]["word"], "from": "answer", "layer": layer,
                                            "head": head})
                            if attend_ocr_at is not None and t == "ocr":
                                att += ocr_entries(scene, q, attend_ocr_at)
                        f.write(json.dumps(_record(f"{name}-{k}", image, q, a, t, grid, att)) + "\n")
                        counts[split][t] += 1
                counts[split][f"grid {grid[0]}x{grid[1]}"] += 1
                i += 1
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
    finally:
        for f in handles.values():
            f.close()
    meta = {"generator": "nvlm.train.synthetic", "params": params,
            "shapes": list(SHAPES), "colours": list(COLOURS), "positions": [p for row in POSITIONS for p in row],
            "describe_prompt": DESCRIBE_PROMPT, "skipped_train_scenes_equal_to_test": skipped,
            "counts": {s: dict(sorted(c.items())) for s, c in counts.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ dense labels

CHAR_SLOTS = 3  # glyph centres per patch, by thirds of its width (at most one glyph centre per third: see below)
# Label groups in the order their logits sit in a ViT's output channels (nvlm.train.vision_pretrain): class 0 of
# colour/shape/chars is "nothing", centre is none/object/text; cell_x/cell_y are only defined where centre != 0.
LABEL_GROUPS = (("colour", 1 + len(COLOURS)), ("shape", 1 + len(SHAPES)), ("centre", 3), ("cell_x", 3),
                ("cell_y", 3), ("chars", CHAR_SLOTS * (1 + len(TEXT_CHARS))))
IGNORE = -100
MIN_COVER = 0.15  # an object labels a patch when it covers at least this share of the patch's pixels
GLYPH_INK_Y = 4.5  # vertical centre of a glyph's ink in its line: capitals and digits fill rows 1-8 of 11
MIN_GLYPH_SCALE = 0.8  # glyphs are labelled only in views that shrink the text by less than this (so not in thumbnails)


def tile_views(size: tuple[int, int], *, tile_size: int, max_tiles: int,
               use_thumbnail: bool = True) -> list[tuple[float, float, int, int]]:
    """For each tile `nvlm.image.preprocess` cuts (row-major, thumbnail last), the map from image pixels to the
    tile's pixels as (sx, sy, ox, oy): x_tile = x * sx - ox, y_tile = y * sy - oy."""
    from ..image import find_grid, tile_layout

    w, h = size
    cols, rows = find_grid(w, h, max_num=max_tiles, image_size=tile_size)
    return [(tile_size * nc / w, tile_size * nr / h, c * tile_size, r * tile_size)
            for c, r, nc, nr in tile_layout((cols, rows), thumbnail=use_thumbnail and cols * rows > 1)]


def _instance_map(scene: Scene) -> Image.Image:
    """Mode-L image of the scene's size: pixel = 1 + index of the shape drawn there, 0 elsewhere."""
    m = Image.new("L", scene.size, 0)
    draw = ImageDraw.Draw(m)
    for i, o in enumerate(scene.objects):
        _draw_shape(draw, o.shape, object_box(scene, o), i + 1)
    return m


def _empty_labels(n_views: int, n: int) -> dict:
    import numpy as np

    def full(fill: int):
        return np.full((n_views, n, n), fill, dtype=np.int64)

    return {"colour": full(0), "shape": full(0), "centre": full(0), "cell_x": full(IGNORE), "cell_y": full(IGNORE),
            "chars": np.zeros((n_views, n, n, CHAR_SLOTS), dtype=np.int64)}


def _label_glyphs(labels: dict, t: int, glyphs, view, tile_size: int, patch: int) -> None:
    """Glyph centres (x, y, char) in image pixels -> chars[t, row, col, third of the patch]."""
    sx, sy, ox, oy = view
    n = tile_size // patch
    for gx, gy, ch in glyphs:
        x, y = gx * sx - ox, gy * sy - oy
        if 0 <= x < n * patch and 0 <= y < n * patch:
            i, j = int(y // patch), int(x // patch)
            labels["chars"][t, i, j, min(CHAR_SLOTS - 1, int((x - j * patch) * CHAR_SLOTS / patch))] = \
                TEXT_CHARS.index(ch) + 1


def glyph_centres(scene: Scene, text: Text) -> list[tuple[float, float, str]]:
    """(x, y, character) of each glyph's ink centre, in image pixels."""
    x0, y0, _, _ = text_box(scene, text)
    k = scene.text_scale
    return [(x0 + (i + 0.5) * GLYPH_W * k, y0 + GLYPH_INK_Y * k, ch) for i, ch in enumerate(text.text)]


def patch_labels(scene: Scene, *, tile_size: int = 112, patch_size: int = 14, max_tiles: int = 6,
                 use_thumbnail: bool = True) -> dict:
    """Per-patch targets for every tile `nvlm.image.preprocess` makes of `render(scene)`: arrays (T, n, n) with
    n = tile_size // patch_size (chars: (T, n, n, CHAR_SLOTS)).

    - colour, shape: the object covering the most of the patch (at least MIN_COVER of its pixels), else 0.
    - centre: 1 (object) or 2 (text) where the centre of an item's box falls in the patch, else 0; cell_x, cell_y:
      that centre's column and row of a 3x3 grid over the *tile* (for a 1x1 image and for the thumbnail, the
      scene's own cells, i.e. the position words), IGNORE elsewhere.
    - chars: 1 + index in TEXT_CHARS of the glyph whose centre falls in each third of the patch (glyphs advance
      GLYPH_W * text_scale >= 6 px, a third of a 14-px patch is 4.7 px, so two centres never share a third),
      only in views that keep the text at MIN_GLYPH_SCALE or more (the full-resolution tiles, not the thumbnail).
    """
    import numpy as np

    if tile_size % patch_size:
        raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size {patch_size}")
    views = tile_views(scene.size, tile_size=tile_size, max_tiles=max_tiles, use_thumbnail=use_thumbnail)
    n, p = tile_size // patch_size, patch_size
    labels = _empty_labels(len(views), n)
    inst = _instance_map(scene)
    w, h = scene.size
    colour_of = np.array([0] + [list(COLOURS).index(o.colour) + 1 for o in scene.objects])
    shape_of = np.array([0] + [SHAPES.index(o.shape) + 1 for o in scene.objects])
    items = ([(object_box(scene, o), 1) for o in scene.objects] + [(text_box(scene, t), 2) for t in scene.texts])
    glyphs = [g for t in scene.texts for g in glyph_centres(scene, t)]
    for t, (sx, sy, ox, oy) in enumerate(views):
        view = np.asarray(inst.resize((round(w * sx), round(h * sy)), Image.NEAREST))[oy:oy + tile_size,
                                                                                         ox:ox + tile_size]
        blocks = view.reshape(n, p, n, p).transpose(0, 2, 1, 3).reshape(n * n, p * p)
        # Pixels of each shape per patch; column 0 stays 0, so a patch no shape touches has best = 0.
        counts = np.zeros((n * n, 1 + len(scene.objects)), dtype=np.int64)
        for k in range(1, counts.shape[1]):
            counts[:, k] = (blocks == k).sum(1)
        best = counts.argmax(1)  # the first of equally covering shapes
        covered = counts.max(1) >= MIN_COVER * p * p
        labels["colour"][t] = np.where(covered, colour_of[best], 0).reshape(n, n)
        labels["shape"][t] = np.where(covered, shape_of[best], 0).reshape(n, n)
        for (x0, y0, x1, y1), kind in items:
            cx, cy = (x0 + x1) / 2 * sx - ox, (y0 + y1) / 2 * sy - oy
            if 0 <= cx < tile_size and 0 <= cy < tile_size:
                i, j = int(cy // p), int(cx // p)
                labels["centre"][t, i, j] = kind
                labels["cell_x"][t, i, j] = int(cx * 3 / tile_size)
                labels["cell_y"][t, i, j] = int(cy * 3 / tile_size)
        if min(sx, sy) >= MIN_GLYPH_SCALE:
            _label_glyphs(labels, t, glyphs, (sx, sy, ox, oy), tile_size, p)
    return labels


def text_page(rng: random.Random, *, tile_size: int = 112, patch_size: int = 14,
              text_scale: int = 1) -> tuple[Image.Image, dict]:
    """A one-tile page of random strings (2-4 characters) in lines, with its `patch_labels`-style targets.

    Only chars is labelled (colour/shape 0: there are no shapes; centre and cells IGNORE: page strings are not
    scene items). The page is drawn at 0.85-1.15x the tile and resized to it as a tile would be, so glyphs come at
    the scales and sub-pixel phases the scene tiles show. Dense text gives a from-scratch ViT ~30 glyphs per tile
    instead of ~1.
    """
    import numpy as np

    k = text_scale
    side = round(tile_size * rng.uniform(0.85, 1.15) / k)  # in font pixels
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    glyphs = []
    y = rng.randint(0, 8)
    while y + GLYPH_H <= side:
        x = rng.randint(0, 10)
        while True:
            s = "".join(rng.choice(TEXT_CHARS) for _ in range(rng.randint(2, 4)))
            if x + len(s) * GLYPH_W > side:
                break
            draw.text((x, y), s, font=_font(), fill=255)
            glyphs += [((x + (i + 0.5) * GLYPH_W) * k, (y + GLYPH_INK_Y) * k, ch) for i, ch in enumerate(s)]
            x += len(s) * GLYPH_W + rng.randint(6, 30)
        y += GLYPH_H + rng.randint(2, 16)
    g = rng.randint(225, 255)
    img = Image.new("RGB", (side * k, side * k), (g, g, g))
    img.paste((rng.randint(0, 40),) * 3, (0, 0), mask.resize((side * k, side * k), Image.NEAREST))
    n = tile_size // patch_size
    labels = _empty_labels(1, n)
    labels["centre"][:] = IGNORE
    scale = tile_size / (side * k)
    _label_glyphs(labels, 0, glyphs, (scale, scale, 0, 0), tile_size, patch_size)
    return img.resize((tile_size, tile_size), Image.BICUBIC), labels


# --------------------------------------------------------------------------------------------------- evaluation


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes and no trailing period."""
    s = " ".join(text.split()).lower().rstrip(".").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":  # 'K7Q' or "top left."
        s = s[1:-1].strip().rstrip(".").strip()
    return s


def _answer(record: dict) -> str:
    return record["conversations"][-1]["value"]


def evaluate(predictions: Sequence[tuple[dict, str]], *, baseline_records: Sequence[dict] | None = None) -> dict:
    """Exact-match accuracy (after `normalize_answer`) per question type, with the majority-answer baseline.

    Returns {group: {"n", "accuracy", "majority_answer", "majority_accuracy"}} for every type, "all", and OCR by
    tile grid ("ocr/1x1", "ocr/3x2", ...): on 1x1 images the text is in the only tile; the thumbnail shrinks 2x1 and
    1x2 images 2x along one axis (text squeezed, partly guessable), 2x2 2x along both and 3x2/2x3 about 3x (text
    gone), so a model that reads the tiles keeps its OCR accuracy across grids. The majority answer of a type
    comes from `baseline_records` (e.g. the training records) when given, else from the evaluated records
    themselves (an upper bound on what a blind guesser gets).
    """
    groups: dict[str, list[tuple[dict, str]]] = {}
    for rec, pred in predictions:
        t = rec["type"]
        groups.setdefault(t, []).append((rec, pred))
        groups.setdefault("all", []).append((rec, pred))
        if t == "ocr" and "grid" in rec:
            groups.setdefault("ocr/{}x{}".format(*rec["grid"]), []).append((rec, pred))
    source = baseline_records if baseline_records is not None else [r for r, _ in predictions]
    by_type: dict[str, Counter] = {}
    for rec in source:
        by_type.setdefault(rec["type"], Counter())[normalize_answer(_answer(rec))] += 1
    majority = {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in by_type.items()}

    result = {}
    for g in sorted(groups):
        items = groups[g]
        correct = sum(normalize_answer(p) == normalize_answer(_answer(r)) for r, p in items)
        blind = sum(majority.get(r["type"]) == normalize_answer(_answer(r)) for r, _ in items)
        result[g] = {"n": len(items), "accuracy": correct / len(items),
                     "majority_answer": majority.get(g.split("/")[0]) if g != "all" else None,
                     "majority_accuracy": blind / len(items)}
    return result


def answer_questions(pipe, records: Sequence[dict], root: str | Path, *, images: Sequence[str | Path] | None = None,
                     batch: int = 50, max_new_tokens: int = 12, max_tiles: int | None = None, tile_tags: bool = True,
                     progress: bool = False) -> list[str]:
    """Greedy answers of `pipe` (an `nvlm.Pipeline`) to the first question of each record, about the record's image
    under `root` (or about `images[i]`, e.g. to shuffle images among the questions)."""
    if images is None:
        images = [Path(root) / r["image"] for r in records]
    elif len(images) != len(records):
        raise ValueError(f"{len(records)} records but {len(images)} images")
    it = range(0, len(records), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="answering", unit="batch", file=sys.stderr)
    out: list[str] = []
    for i in it:
        chunk = records[i:i + batch]
        qs = [r["conversations"][0]["value"].replace("<image>\n", "", 1) for r in chunk]
        res = pipe.generate(qs, [[str(p)] for p in images[i:i + batch]], max_new_tokens=max_new_tokens,
                            max_tiles=max_tiles, tile_tags=tile_tags)
        out += [r.text for r in res]
    return out


QUESTION_FORMS = (  # (pattern, name) of the questions `ask_*` write, first match wins
    (r"What colour is the \w+\?", "colour of the only <shape>"),
    (r"What colour is the \w+ at the", "colour of the <shape> at <position>"),
    (r"What shape is the \w+ object\?", "shape of the only <colour> object"),
    (r"What shape is the \w+ object at", "shape of the <colour> object at <position>"),
    (r"How many objects", "count of all objects"),
    (r"How many \w+s are", "count of a shape"),
    (r"How many \w+ objects", "count of a colour"),
    (r"Where is the text", "position of a text"),
    (r"Where is the", "position of a <colour> <shape>"),
    (r"Is there", "existence"),
    (r"What text is written in", "text of the only text"),
    (r"What text is written at", "text at <position>"),
)


def question_form(question: str) -> str:
    """The form of a generated question ("colour of the <shape> at <position>", ...; "other" for none of them)."""
    q = question.replace("<image>\n", "", 1)
    return next((name for pattern, name in QUESTION_FORMS if re.match(pattern, q)), "other")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------- CLI


def _parse_weights(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--weights wants TYPE=NUMBER pairs like 'ocr=2,count=1', got {part!r}") from None
    return out


def parse_layer_head(flag: str, text: str | None) -> tuple[int, int] | None:
    """'LAYER,HEAD' -> (layer, head); '' or None -> None; ValueError naming `flag` otherwise."""
    if not text:
        return None
    try:
        layer, head = (int(x) for x in text.split(","))
    except ValueError:
        layer = head = -1
    if min(layer, head) < 0:
        raise ValueError(f"{flag} wants LAYER,HEAD (two ints >= 0), got {text!r}")
    return layer, head


def cmd_synth(args: argparse.Namespace) -> int:
    meta = write_dataset(
        args.out_dir, n_train=args.train, n_test=args.test, seed=args.seed, tile_size=args.tile_size,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        questions_per_image=args.questions_per_image, weights=_parse_weights(args.weights),
        max_tiles=args.max_tiles, max_objects=args.max_objects, text_prob=args.text_prob,
        text_scale=args.text_scale,
        attend=args.attend or bool(args.attend_object_head or args.attend_answer_head or args.attend_ocr_head),
        attend_object_at=parse_layer_head("--attend-object-head", args.attend_object_head),
        attend_answer_at=parse_layer_head("--attend-answer-head", args.attend_answer_head),
        attend_ocr_at=parse_layer_head("--attend-ocr-head", args.attend_ocr_head),
        overwrite=args.overwrite, progress=sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(meta))
    else:
        for split, c in meta["counts"].items():
            print(f"{split}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        print(f"wrote {args.out_dir}")
    return 0


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    """Register `synth` on an argparse subparsers object (wired as `nvlm synth`)."""
    p = subparsers.add_parser(
        "synth", help="write a synthetic shapes-and-text Q&A dataset for training a tiny model",
        description="Write procedural images (coloured shapes and short texts on 1x1..3x2 tile grids) with "
        "dense descriptions (describe.jsonl, describe_test.jsonl) and questions (train.jsonl, held-out "
        "test.jsonl) in the LLaVA conversation format, plus meta.json. The same seed writes the same bytes.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must be empty unless --overwrite)")
    p.add_argument("--train", type=int, default=10000, metavar="N", help="training images (default 10000)")
    p.add_argument("--test", type=int, default=500, metavar="N", help="held-out images (default 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--tile-size", type=int, default=112, metavar="PX",
                   help="the model's tile size (force_image_size); images are 1x1..3x2 tiles of it (default 112)")
    p.add_argument("--max-tiles", type=int, default=6, metavar="N", help="the model's max tiles per image (default 6)")
    p.add_argument("--questions-per-image", type=int, default=3, metavar="K",
                   help="distinct questions (one record each) per image (default 3)")
    p.add_argument("--kinds", default="describe,qa", help="what to write: describe, qa or both (default both)")
    p.add_argument("--weights", default=None, metavar="TYPE=W,...",
                   help=f"question-type weights, e.g. 'ocr=2,exist=1' (types: {', '.join(QTYPES)}; default equal)")
    p.add_argument("--max-objects", type=int, default=6, metavar="N", help="most shapes per image (default 6)")
    p.add_argument("--text-prob", type=float, default=0.7, metavar="P", help="share of images with text (default 0.7)")
    p.add_argument("--text-scale", type=int, default=1, metavar="K",
                   help="integer upscale of the 6x11 px bitmap font (default 1; larger text stays legible in "
                   "the thumbnail)")
    p.add_argument("--attend", action="store_true", help="give training QA records `attend` entries (key word -> "
                   "boxes) for the trainer's attention_loss")
    p.add_argument("--attend-object-head", default=None, metavar="LAYER,HEAD",
                   help="also entries at this decoder layer/head from a colour, shape or position question's last key "
                   "word to its item (implies --attend; see the tiny-model recipe)")
    p.add_argument("--attend-answer-head", default=None, metavar="LAYER,HEAD",
                   help="and from the answer to that word (needs --attend-object-head)")
    p.add_argument("--attend-ocr-head", default=None, metavar="LAYER,HEAD",
                   help="entries at this layer/head from the position predicting an OCR answer's j-th character to "
                   "the j-th glyph (implies --attend)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    p.add_argument("--json", action="store_true", help="print meta.json as one JSON line")
    p.set_defaults(func=cmd_synth)
    return p
