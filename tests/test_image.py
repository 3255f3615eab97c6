"""Tests for nvlm.image: grid choice (hand-computed goldens), an independent per-tile oracle, tile order, bad inputs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.image import (
    ImageError,
    ProcessedImage,
    candidate_grids,
    dynamic_tiles,
    find_grid,
    load_image,
    normalize,
    preprocess,
)

# ------------------------------------------------------------------------------------------------------ oracle
# A plain transcription of the model card's pipeline (InternVL dynamic_preprocess + find_closest_aspect_ratio +
# torchvision ToTensor/Normalize), one tile at a time, with numpy standing in for torchvision.

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def ref_closest(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=True):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target = ref_closest(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target[0]
    target_height = image_size * target[1]
    blocks = target[0] * target[1]
    resized_img = image.resize((target_width, target_height))
    processed = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed.append(resized_img.crop(box))
    if use_thumbnail and len(processed) != 1:
        processed.append(image.resize((image_size, image_size)))
    return processed


def ref_to_tensor_normalize(tile):
    x = np.asarray(tile.convert("RGB")).astype(np.float32).transpose(2, 0, 1) / np.float32(255)  # ToTensor
    return (x - MEAN[:, None, None]) / STD[:, None, None]  # Normalize


def ref_load_image(img, max_num=6, min_num=1, use_thumbnail=True):
    img = img.convert("RGB")
    tiles = ref_dynamic_preprocess(img, min_num=min_num, max_num=max_num, use_thumbnail=use_thumbnail)
    return tiles, torch.from_numpy(np.stack([ref_to_tensor_normalize(t) for t in tiles]))


def noise_image(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    # Smooth gradient plus noise, so both the interpolation and the 0/255 clipping get exercised.
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx * 255 // max(w - 1, 1) + yy * 128 // max(h - 1, 1)) % 256)[..., None]
    arr = (base + rng.integers(-60, 61, (h, w, channels))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode=mode)


# ---------------------------------------------------------------------------------------------- grid goldens
# Candidates for max 6, by area: 1:1 | 1:2 2:1 | 1:3 3:1 | 1:4 2:2 4:1 | 1:5 5:1 | 1:6 2:3 3:2 6:1 (cols:rows).
# A tie switches to the later grid only if W*H > 0.5*448^2*cols*rows = 100,352 * cols*rows.

GRID_CASES = [
    # Square: 1:1 gives diff 0; 2:2 ties; switch iff W*H > 100,352*4 = 401,408.
    (633, 633, 6, (1, 1)),  # 633^2 = 400,689 <= 401,408 -> stays 1x1
    (634, 634, 6, (2, 2)),  # 634^2 = 401,956 >  401,408 -> 2x2
    (448, 448, 6, (1, 1)),  # 200,704 -> 1x1, one tile, no thumbnail
    # Max 12 adds 3:3 (area 9, threshold 100,352*9 = 903,168): 950^2 = 902,500 -> stays 2x2; 951^2 = 904,401 -> 3x3.
    (950, 950, 12, (2, 2)),
    (951, 951, 12, (3, 3)),
    # Exactly at a threshold the later grid does not win (strict >). 1008x896 = 903,168 = 100,352*9, aspect 1.125:
    # 1:1 (diff 0.125), 2:2 ties and 903,168 > 401,408 switches, 3:3 ties but 903,168 > 903,168 is false -> 2x2.
    (1008, 896, 12, (2, 2)),
    # 2048x588 = 1,204,224 = 100,352*12, aspect 3.483: 3:1 is closest (diff 0.483, 4:1 differs by 0.517);
    # 6:2 ties with it, but 1,204,224 > 1,204,224 is false -> 3x1.
    (2048, 588, 12, (3, 1)),
    # Extreme aspects: 40 and 0.025; the widest/tallest grid is closest, no tie possible.
    (4000, 100, 6, (6, 1)),
    (100, 4000, 6, (1, 6)),
    # Aspect exactly 3: 3:1 diff 0 at area 3. With max 12, 6:2 (area 12) ties: 3,000,000 > 100,352*12 = 1,204,224.
    (3000, 1000, 12, (6, 2)),
    (3000, 1000, 6, (3, 1)),  # 6:2 is not a candidate with max 6
    (1500, 500, 12, (3, 1)),  # 750,000 <= 1,204,224 -> no switch to 6:2
    # Exactly halfway between 4 and 5 (aspect 4.5): 4:1 first (diff 0.5), 5:1 ties (diff 0.5, exact in binary);
    # switch iff W*H > 100,352*5 = 501,760.
    (900, 200, 6, (4, 1)),  # 180,000 -> stays 4x1
    (4500, 1000, 6, (5, 1)),  # 4,500,000 -> 5x1
    # Halfway between 2 and 3 (aspect 2.5): 2:1 then 3:1 ties; threshold 100,352*3 = 301,056.
    (500, 200, 6, (2, 1)),  # 100,000 -> 2x1
    (1000, 400, 6, (3, 1)),  # 400,000 -> 3x1
    # Halfway between 1 and 3/2 (aspect 1.25, diffs 0.25 exact): 1:1 first, then 2:2 ties (threshold 401,408),
    # then 3:2 ties (threshold 602,112); each switch is decided on its own.
    (500, 400, 6, (1, 1)),  # 200,000: no switch at all
    (720, 576, 6, (2, 2)),  # 414,720: switches to 2:2 but not on to 3:2
    (1000, 800, 6, (3, 2)),  # 800,000: switches to 2:2, then 3:2
    # Float, not exact, arithmetic: 5/6 is exactly halfway between 2/3 and 1, but in doubles
    # |0.8333333333333334 - 1| = 0.16666666666666663 < |0.8333333333333334 - 0.6666666666666666| = 0.16666666666666674,
    # so 2:3 never ties; 1:1 and 2:2 tie (same ratio) and 1,200,000 > 401,408 picks 2:2. Exact rationals would
    # have let 2:3 tie and win (1,200,000 > 602,112).
    (1000, 1200, 6, (2, 2)),
    (500, 600, 6, (1, 1)),  # 300,000 <= 401,408
    # Small images are upscaled to the closest grid: aspect 1.5 is exactly 3:2.
    (300, 200, 6, (3, 2)),
    # 640x480: aspect 1.333; |1.333-1.5| = 0.167 beats |1.333-1| = 0.333 -> 3:2.
    (640, 480, 6, (3, 2)),
    # A single tile allowed: always 1x1.
    (4000, 100, 1, (1, 1)),
]


@pytest.mark.parametrize("w,h,max_num,expected", GRID_CASES)
def test_find_grid_goldens(w, h, max_num, expected):
    assert find_grid(w, h, max_num=max_num) == expected


def test_find_grid_min_num_excludes_single_tile():
    # min 2: 1:1 is not a candidate. Square image: 1:2 differs by 0.5, 2:1 by 1, 3:1 by 2, 1:3 by 0.667, 4:1 by 3,
    # 1:4 by 0.75, and 2:2 (area 4) by 0 -> 2x2.
    assert find_grid(448, 448, min_num=2, max_num=4) == (2, 2)
    # min 2, max 3, square: without 2:2 the closest is 1:2 (0.5), which comes before every other candidate -> 1x2.
    assert find_grid(448, 448, min_num=2, max_num=3) == (1, 2)


def test_candidate_grids_order():
    # The order CPython's set iteration gives (the reference sorts that set by area with a stable sort).
    assert candidate_grids(1, 6) == [
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2),
    ]
    for mn, mx in [(1, 6), (1, 12), (2, 4), (3, 9), (1, 1)]:
        ref = sorted(
            set((i, j) for n in range(mn, mx + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if mn <= i * j <= mx),
            key=lambda x: x[0] * x[1],
        )
        assert candidate_grids(mn, mx) == ref
    assert len(candidate_grids(1, 6)) == 14  # the paper's 14 aspect ratios
    grids = candidate_grids(1, 12)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


def test_find_grid_matches_oracle_on_many_sizes():
    rng = np.random.default_rng(1)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, (400, 2))]
    sizes += [(s, s) for s in range(600, 700)] + [(k * 5, k * 4) for k in range(100, 200)]
    for max_num in (6, 12):
        grids = candidate_grids(1, max_num)
        for w, h in sizes:
            assert find_grid(w, h, max_num=max_num) == ref_closest(w / h, grids, w, h, 448), (w, h, max_num)


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_num=0), dict(min_num=3, max_num=2), dict(image_size=0)],
)
def test_find_grid_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        find_grid(100, 100, **kwargs)
    with pytest.raises(ValueError, match="positive"):
        find_grid(0, 100)


# -------------------------------------------------------------------------------------------- oracle parity


@pytest.mark.parametrize(
    "w,h,max_tiles,min_tiles,use_thumbnail",
    [
        (640, 480, 6, 1, True),  # 3x2 + thumbnail
        (97, 31, 6, 1, True),  # tiny, aspect 3.13 -> 3x1 upscaled
        (300, 500, 6, 1, False),  # no thumbnail
        (700, 700, 6, 1, True),  # 2x2 by the tie rule
        (1, 1, 6, 1, True),  # one pixel -> one tile, no thumbnail
        (1200, 300, 12, 1, True),  # max 12: aspect 4 -> 4x1 (8:2 would be area 16)
        (333, 1000, 12, 2, True),  # min 2
    ],
)
def test_preprocess_matches_reference(w, h, max_tiles, min_tiles, use_thumbnail):
    img = noise_image(w, h, seed=w * 7919 + h)
    ref_tiles, ref = ref_load_image(img, max_num=max_tiles, min_num=min_tiles, use_thumbnail=use_thumbnail)
    out = preprocess(img, max_tiles=max_tiles, min_tiles=min_tiles, use_thumbnail=use_thumbnail)
    assert isinstance(out, ProcessedImage)
    assert out.pixel_values.dtype == torch.float32 and out.pixel_values.is_contiguous()
    assert out.pixel_values.shape == ref.shape == (out.num_tiles, 3, 448, 448)
    cols, rows = out.grid
    assert out.num_tiles == cols * rows + (use_thumbnail and cols * rows != 1)
    torch.testing.assert_close(out.pixel_values, ref, atol=1e-6, rtol=0)
    # Same float32 operations in the same order: in practice bit-identical.
    assert torch.equal(out.pixel_values, ref)
    # The PIL-level tiles match the reference exactly too.
    tiles = dynamic_tiles(img, min_num=min_tiles, max_num=max_tiles, use_thumbnail=use_thumbnail)
    assert [t.tobytes() for t in tiles] == [t.tobytes() for t in ref_tiles]
    assert torch.equal(normalize(tiles), ref)


def test_preprocess_non_rgb_input_is_converted_first():
    # RGBA: the reference converts (dropping alpha) before resizing.
    img = noise_image(500, 380, seed=3, mode="RGBA")
    _, ref = ref_load_image(img)
    assert torch.equal(preprocess(img).pixel_values, ref)
    # Palette image: converting *after* the resize (Megatron order) would use NEAREST and give different tiles.
    pal = noise_image(500, 380, seed=4).convert("P")
    _, ref = ref_load_image(pal)
    assert torch.equal(preprocess(pal).pixel_values, ref)
    megatron_order = np.asarray(pal.resize((448 * 3, 448 * 2)).convert("RGB"))[:448, :448]
    assert not np.array_equal(np.asarray(ref_dynamic_preprocess(pal.convert("RGB"))[0]), megatron_order)


def test_preprocess_from_encoded_bytes_and_path(tmp_path):
    img = noise_image(320, 200, seed=5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    _, ref = ref_load_image(img)
    for source in (buf.getvalue(), str(path), path, io.BytesIO(buf.getvalue())):
        assert torch.equal(preprocess(source).pixel_values, ref)


def test_normalize_values():
    # ToTensor + Normalize on constant tiles: (v/255 - mean) / std per channel.
    black, white = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (255, 255, 255))
    x = normalize([black, white])
    assert x.shape == (2, 3, 4, 4)
    for c, (m, s) in enumerate(zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])):
        assert x[0, c, 0, 0].item() == pytest.approx(-m / s, abs=1e-6)
        assert x[1, c, 0, 0].item() == pytest.approx((1 - m) / s, abs=1e-6)
    with pytest.raises(ValueError):
        normalize([black, Image.new("RGB", (5, 5))])
    with pytest.raises(ValueError):
        normalize([])


# --------------------------------------------------------------------------------------------- tile layout


def test_tile_order_is_row_major_with_thumbnail_last():
    # 1344x896 has aspect exactly 3:2 -> a 3x2 grid at the image's own size, so the resize is the identity and each
    # 448x448 block becomes one tile unchanged.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    arr = np.zeros((896, 1344, 3), dtype=np.uint8)
    for k, colour in enumerate(colours):
        r, c = divmod(k, 3)
        arr[r * 448 : (r + 1) * 448, c * 448 : (c + 1) * 448] = colour
    img = Image.fromarray(arr)
    out = preprocess(img)
    assert out.grid == (3, 2) and out.num_tiles == 7
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = (out.pixel_values * std + mean) * 255  # back to 0..255
    for k, colour in enumerate(colours):
        expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand(3, 448, 448)
        torch.testing.assert_close(pixels[k], expected, atol=1e-3, rtol=0)
    # Thumbnail last: the whole image shrunk 3x (horizontally) and 2x (vertically); block centres keep their colour.
    thumb = pixels[6]
    for k, colour in enumerate(colours):
        r, c = divmod(k, 3)
        y, x = r * 224 + 112, c * 149 + 75
        torch.testing.assert_close(thumb[:, y, x], torch.tensor(colour, dtype=torch.float32), atol=1e-3, rtol=0)


def test_thumbnail_only_with_more_than_one_tile():
    assert preprocess(noise_image(448, 448, 0)).num_tiles == 1  # 1x1: no thumbnail
    assert preprocess(noise_image(896, 448, 0), max_tiles=2).num_tiles == 3  # 2x1 + thumbnail: never T = 2
    assert preprocess(noise_image(896, 448, 0), max_tiles=2, use_thumbnail=False).num_tiles == 2
    assert preprocess(noise_image(4000, 100, 0), max_tiles=1).num_tiles == 1


@pytest.mark.parametrize("kwargs", [dict(min_tiles=0), dict(max_tiles=2, min_tiles=3), dict(image_size=0)])
def test_preprocess_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="tiles|image_size"):
        preprocess(noise_image(10, 10, 0), **kwargs)


# ------------------------------------------------------------------------------------------------ bad images


def _png_header(width: int, height: int) -> bytes:
    """A PNG with only IHDR + IEND: Pillow can read its size without any pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _encoded(fmt: str, w=64, h=48) -> bytes:
    buf = io.BytesIO()
    noise_image(w, h, seed=9).save(buf, format=fmt)
    return buf.getvalue()


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="not found.*nope.jpg"):
        load_image(missing)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_unreadable_bytes(tmp_path):
    with pytest.raises(ImageError, match="cannot identify"):
        load_image(b"definitely not an image")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ImageError, match="bad.png"):
        load_image(bad)
    with pytest.raises(ImageError):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(fmt, tmp_path):
    data = _encoded(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"truncated.*|.*cut\.") as info:
        load_image(path)
    assert "truncated" in str(info.value) and f"cut.{fmt.lower()}" in str(info.value)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    # The whole file loads.
    assert load_image(data).size == (64, 48)


def test_zero_size_images():
    with pytest.raises(ImageError, match="zero-size|zero size"):
        load_image(_png_header(0, 10))
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="zero size"):
        preprocess(Image.new("RGB", (10, 0)))


def test_decompression_bombs_rejected_before_decoding():
    # 10000 x 10000 = 100,000,000 pixels > default max 89,478,485; the header claims it, no pixels follow, so an error
    # about the size (not about missing data) shows that the check ran before decoding.
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow's own warning fires at open; we then refuse
        with pytest.raises(ImageError, match="100,000,000 pixels.*max_pixels"):
            load_image(_png_header(10000, 10000))
    # Beyond twice Pillow's limit Pillow refuses at open; still an ImageError.
    with pytest.raises(ImageError, match="too large|max_pixels"):
        load_image(_png_header(20000, 20000))
    # A caller-chosen limit applies to real files, PIL images and preprocess alike.
    data = _encoded("PNG", 100, 100)
    with pytest.raises(ImageError, match="10,000 pixels, over max_pixels=9,999"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9_999)


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="int"):
        load_image(42)


# ------------------------------------------------------------------------------------------------ colour modes


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "L", "1", "CMYK", "I;16"])
def test_modes_become_rgb_by_plain_convert(mode):
    src = noise_image(40, 30, seed=11, mode="RGBA")
    if mode == "I;16":
        img = Image.fromarray((np.asarray(src.convert("L")).astype(np.uint16) * 3))
    else:
        img = src.convert(mode)
    out = load_image(img)
    assert img.mode == mode and out.mode == "RGB" and out.size == (40, 30)
    # Reference behaviour: a plain convert("RGB") (alpha dropped, 16-bit saturating).
    assert out.tobytes() == img.convert("RGB").tobytes()


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # Pillow's, raised by the reference too
def test_modes_through_encoded_files():
    src = noise_image(40, 30, seed=12, mode="RGBA")
    for mode, fmt in [("RGBA", "PNG"), ("P", "PNG"), ("L", "JPEG"), ("LA", "PNG"), ("CMYK", "JPEG")]:
        buf = io.BytesIO()
        src.convert(mode).save(buf, format=fmt)
        out = load_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == (40, 30)
        assert out.tobytes() == Image.open(io.BytesIO(buf.getvalue())).convert("RGB").tobytes()


def test_careful_conversion_composites_alpha_and_scales_16_bit():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    careful = load_image(rgba, to_rgb="careful")
    assert careful.getpixel((0, 0)) == (255, 255, 255) and careful.getpixel((1, 0)) == (10, 20, 30)
    assert load_image(rgba).getpixel((0, 0)) == (10, 20, 30)  # reference: alpha dropped
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    assert [load_image(deep, to_rgb="careful").getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    assert [load_image(deep).getpixel((x, 0))[0] for x in range(3)] == [0, 255, 255]  # reference saturates
    with pytest.raises(ValueError):
        load_image(rgba, to_rgb="fancy")


def test_load_image_returns_independent_rgb_for_files(tmp_path):
    path = tmp_path / "a.png"
    noise_image(30, 20, seed=13).save(path)
    img = load_image(str(path))
    assert img.mode == "RGB" and np.asarray(img).shape == (20, 30, 3)  # still usable after the file was closed
