"""Image loading and dynamic tiling for NVLM-D (SPEC §3), reproducing the model card's `load_image` exactly.

What is notable:
- RGB first: images are converted with a plain `convert("RGB")` *before* resizing, as the HF card does (alpha is
  dropped, not composited; 16-bit values saturate at 255). Megatron resized in the original mode and converted per
  tile later (SPEC §10.10), which differs for P/L/RGBA inputs. `to_rgb="careful"` is an opt-in that composites alpha
  on white and rescales 16-bit greyscale; it is not what the model was evaluated with.
- Grid choice is InternVL's `find_closest_aspect_ratio` to the bit: candidates come from the same Python set sorted
  by area (the set's iteration order breaks within-area ties), differences are plain float arithmetic, and on an
  exactly equal difference the later (larger) grid wins only if `W*H > 0.5 * S^2 * cols * rows`. So an exactly
  square image gets 2x2 tiles above 401,408 px and 1x1 at or below.
- Tiles are row-major (left->right, top->bottom). The thumbnail (whole image resized to SxS) is appended last and
  only when there is more than one tile, so T is 1 or 3..max+1, never 2.
- Default max is 6 tiles (the config's `max_dynamic_patch`), not the README's 12 (SPEC §3.4).
- `preprocess` resizes once, rearranges the whole uint8 image into (T, 3, S, S) with one strided copy and normalises
  in one pass, with the same float32 operations as torchvision's ToTensor + Normalize on CPU (x / 255, - mean,
  / std), so it is bit-identical to the per-tile reference.
- EXIF orientation is not applied and only the first frame of animated images is used, as in the reference.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from struct import error as StructError
from typing import BinaryIO, Literal, Union

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Same value as Pillow's own default Image.MAX_IMAGE_PIXELS (~89.5 MP, a 1 GiB RGBA buffer / 3).
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


class ImageError(ValueError):
    """An image could not be read or is unusable (missing, corrupt, truncated, empty or too large)."""


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # (T, 3, S, S) float32, ImageNet-normalised; thumbnail last when T > 1
    grid: tuple[int, int]  # (cols, rows) of the tile grid; T = cols * rows (+ 1 thumbnail when that is > 1)
    num_tiles: int  # T, thumbnail included
    size: tuple[int, int] = (0, 0)  # (width, height) of the source image


# ----------------------------------------------------------------------------------------------------- loading


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.size[0]}x{source.size[1]}>"
    name = getattr(source, "name", None)
    return repr(name) if isinstance(name, str) else f"<{type(source).__name__}>"


def _check_size(img: Image.Image, max_pixels: int, what: str) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {what} has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"image {what} is {w}x{h} = {w * h:,} pixels, over max_pixels={max_pixels:,} "
            "(possible decompression bomb; pass a larger max_pixels to allow it)"
        )


def _careful_rgb(img: Image.Image) -> Image.Image:
    """Opt-in conversion: alpha composited on white, 16-bit greyscale rescaled to 8 bits instead of saturating."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_rgb(img: Image.Image, to_rgb: str, what: str) -> Image.Image:
    try:
        if to_rgb == "careful":
            return _careful_rgb(img)
        # The reference: a plain convert. An RGB image is returned as is (the reference's convert would copy it).
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as e:  # e.g. "conversion from La to RGB not supported"
        raise ImageError(f"cannot convert image {what} from mode {img.mode!r} to RGB: {e}") from e


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    to_rgb: Literal["reference", "careful"] = "reference",
) -> Image.Image:
    """Open and fully decode an image as RGB.

    `source` is a path (str or os.PathLike), the encoded bytes, a binary file-like object, or a PIL image (an RGB
    PIL image is returned as is, after a size check). The size is checked against `max_pixels` from the header,
    before any pixel is decoded; Pillow's own bomb guard (2 x Image.MAX_IMAGE_PIXELS) still applies on top.
    `to_rgb="reference"` (default) is the card's plain `convert("RGB")`; `"careful"` composites alpha on white and
    rescales 16-bit greyscale to 8 bits.

    Raises ImageError (a ValueError) naming the problem and the source: missing or unreadable file, unknown format,
    truncated data, zero size, too many pixels. Raises TypeError for a source of an unsupported type.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if to_rgb not in ("reference", "careful"):
        raise ValueError(f"to_rgb must be 'reference' or 'careful', got {to_rgb!r}")
    what = _describe(source)

    if isinstance(source, Image.Image):
        _check_size(source, max_pixels, what)
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"cannot decode image {what}: {e}") from e
        return _to_rgb(source, to_rgb, what)

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image file not found: {str(path)!r}")
        if not path.is_file():
            raise ImageError(f"image path is not a file: {str(path)!r}")
        fp: BinaryIO | str | Path = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        fp = source
    else:
        raise TypeError(f"cannot load an image from {type(source).__name__}; pass a path, bytes, a file or a PIL image")

    try:
        with Image.open(fp) as img:
            _check_size(img, max_pixels, what)  # header only: nothing decoded yet
            img.load()
            rgb = _to_rgb(img, to_rgb, what)
            return img.copy() if rgb is img else rgb  # closing the file invalidates `img` itself
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {what} is too large for Pillow's decompression-bomb guard: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"cannot identify image {what}: not a supported format, or an empty/zero-size image") from e
    except (OSError, SyntaxError, ValueError, EOFError, StructError) as e:  # StructError: short headers in some plugins
        raise ImageError(f"cannot read image {what}: {e}") from e


# ------------------------------------------------------------------------------------------------- grid choice


def _check_range(min_num: int, max_num: int) -> None:
    if min_num < 1:
        raise ValueError(f"min number of tiles must be >= 1, got {min_num}")
    if max_num < min_num:
        raise ValueError(f"max number of tiles ({max_num}) must be >= min number of tiles ({min_num})")


@lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # Built exactly as InternVL's dynamic_preprocess builds it: the set's iteration order (deterministic for small
    # int tuples in CPython) decides the order within an area under the stable sort, which breaks exact ties.
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, in the reference's order (by area, then set order)."""
    _check_range(min_num, max_num)
    return list(_candidate_grids(min_num, max_num))


def find_grid(width: int, height: int, *, min_num: int = 1, max_num: int = 6, image_size: int = 448) -> tuple[int, int]:
    """The (cols, rows) grid InternVL's `find_closest_aspect_ratio` picks for a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    _check_range(min_num, max_num)
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            # Tie (same ratio, or exactly halfway): a later, larger grid wins only for a big enough image.
            best = (cols, rows)
    return best


# ------------------------------------------------------------------------------------------------------ tiling


def tile_layout(grid: tuple[int, int], *, thumbnail: bool) -> list[tuple[int, int, int, int]]:
    """The views `dynamic_tiles` / `preprocess` cut, in their order: tile (c, r) of the (cols, rows) `grid`,
    row-major, then the thumbnail if `thumbnail`; each as (c, r, nc, nr) = tile (c, r) of an nc x nr cut of the
    whole image (the thumbnail is (0, 0, 1, 1))."""
    cols, rows = grid
    return [(c, r, cols, rows) for r in range(rows) for c in range(cols)] + ([(0, 0, 1, 1)] if thumbnail else [])


def dynamic_tiles(
    img: Image.Image, *, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """The reference's `dynamic_preprocess` as PIL tiles: row-major tiles, then the thumbnail if more than one tile."""
    cols, rows = find_grid(img.width, img.height, min_num=min_num, max_num=max_num, image_size=image_size)
    s = image_size
    resized = img.resize((s * cols, s * rows))  # PIL's default filter (BICUBIC for RGB), as the reference
    tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(img.resize((s, s)))
    return tiles


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def _normalize_u8(x: np.ndarray) -> torch.Tensor:
    """(T, 3, S, S) uint8 -> float32 with torchvision's CPU arithmetic: ToTensor (x / 255) then Normalize."""
    return torch.from_numpy(x).to(torch.float32).div_(255).sub_(_MEAN).div_(_STD)


def normalize(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack RGB tiles of equal size S x S into a (T, 3, S, S) float32 tensor, ImageNet-normalised."""
    if not tiles:
        raise ValueError("normalize needs at least one tile")
    size = tiles[0].size
    if size[0] != size[1] or any(t.size != size for t in tiles):
        raise ValueError(f"tiles must be square and all of one size, got {[t.size for t in tiles]}")
    arrays = [np.asarray(t if t.mode == "RGB" else t.convert("RGB")) for t in tiles]  # each (S, S, 3) uint8
    return _normalize_u8(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def preprocess(
    image: ImageSource,
    *,
    max_tiles: int = 6,
    min_tiles: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> ProcessedImage:
    """Load (if needed), tile and normalise one image exactly as the model card's `load_image(..., max_num=max_tiles)`.

    `image` is anything `load_image` accepts (a non-RGB PIL image is converted first, as the reference does).
    """
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles ({max_tiles}) must be >= min_tiles ({min_tiles})")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    img = load_image(image)
    cols, rows = find_grid(img.width, img.height, min_num=min_tiles, max_num=max_tiles, image_size=image_size)
    s, n = image_size, cols * rows
    thumb = use_thumbnail and n != 1
    out = np.empty((n + thumb, 3, s, s), dtype=np.uint8)
    # One resize, then one strided copy: (rows*S, cols*S, 3) -> (rows, cols, 3, S, S), i.e. row-major tiles.
    big = np.asarray(img.resize((s * cols, s * rows)))
    out[:n].reshape(rows, cols, 3, s, s)[...] = big.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3)
    if thumb:
        out[n] = np.asarray(img.resize((s, s))).transpose(2, 0, 1)
    return ProcessedImage(pixel_values=_normalize_u8(out), grid=(cols, rows), num_tiles=n + thumb,
                          size=(img.width, img.height))
