"""Dense-label pretraining of a from-scratch InternViT on the synthetic scenes: the tiny model's stand-in for the
pretraining InternViT-6B had before NVLM-D froze it.

Notable:
- Targets come from the renderer (`synthetic.patch_labels`): per 14-px patch, the colour and shape of the object
  covering it, whether an item's centre is in it and that centre's cell in the tile's 3x3 grid, and the characters
  whose glyph centres fall in each third of it; plus pages of dense text (`synthetic.text_page`), which give ~30
  labelled glyphs per tile instead of ~1.
- No head weights: the ViT's first `label_channels()` output channels *are* the label logits (`LABEL_SLICES`). The
  projector then sees features that are mostly the labels themselves. Measured on this project's data (a decoder
  learning "What colour is the <shape>?" among up to 4 objects from a frozen ViT, 300 steps): 67% with these
  channels vs 27% (chance) with the same ViT trained through separate linear heads, whose features keep most of
  their variance in directions the labels do not use.
- `center_output` folds the data mean of the output channels into the last layer's `fc2` bias, so every feature
  the projector sees is (data-)zero-mean. Before centering, 70% of the output's energy was one constant vector
  shared by all patches of all images; with it, a decoder learns the colour of a lone object in ~100 steps, without
  it not in 200 (the image signal is too small a part of each token for the decoder to find).
- The loop is plain single-process AdamW on fresh batches drawn from a seeded stream (the ViT is small; a few
  minutes on a CPU); the result is written as a full checkpoint (everything but the ViT unchanged), atomically.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..image import preprocess
from . import synthetic
from .trainer import param_groups


def _slices() -> dict[str, tuple[int, int]]:
    out, a = {}, 0
    for name, n in synthetic.LABEL_GROUPS:
        out[name] = (a, a + n)
        a += n
    return out


LABEL_SLICES = _slices()
N_CHAR_CLASSES = 1 + len(synthetic.TEXT_CHARS)


def label_channels() -> int:
    """How many output channels the labels take (the ViT's hidden size must be at least this)."""
    return max(b for _, b in LABEL_SLICES.values())


# ---- data -----------------------------------------------------------------------------------------------------

def scene_batch(rng: random.Random, n: int, *, tile_size: int, patch_size: int, max_tiles: int,
                text_scale: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` random scenes (all grids) -> all their tiles (T, 3, S, S) and labels flattened to (T, N[, slots])."""
    pixels, labels = [], []
    for _ in range(n):
        scene = synthetic.generate_scene(rng, tile_size=tile_size, text_scale=text_scale)
        pixels.append(preprocess(synthetic.render(scene), max_tiles=max_tiles, image_size=tile_size).pixel_values)
        labels.append(synthetic.patch_labels(scene, tile_size=tile_size, patch_size=patch_size, max_tiles=max_tiles))
    return torch.cat(pixels), _stack(labels)


def page_batch(rng: random.Random, n: int, *, tile_size: int, patch_size: int,
               text_scale: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels, labels = [], []
    for _ in range(n):
        img, lab = synthetic.text_page(rng, tile_size=tile_size, patch_size=patch_size, text_scale=text_scale)
        pixels.append(preprocess(img, max_tiles=1, image_size=tile_size).pixel_values)
        labels.append(lab)
    return torch.cat(pixels), _stack(labels)


def _stack(labels: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for k in labels[0]:
        a = np.concatenate([lab[k] for lab in labels])  # (T, n, n[, slots])
        out[k] = torch.from_numpy(a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:]))
    return out


def _cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


# ---- objective ------------------------------------------------------------------------------------------------

def _group(x: torch.Tensor, name: str) -> torch.Tensor:
    a, b = LABEL_SLICES[name]
    return x[..., a:b]


def dense_losses(features: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropies of the label channels of `features` (T, N, D) (CLS dropped) against `labels`.

    Background dominates colour/shape/centre, so shape is scored only on covered patches, centre classes 1-2 weigh
    10x, and chars only on patches that hold a glyph (weight 3: it is the slowest to learn).
    """
    zero = features.sum() * 0.0
    out = {"colour": F.cross_entropy(_group(features, "colour").flatten(0, 1), labels["colour"].flatten())}
    covered = labels["shape"] > 0
    out["shape"] = (F.cross_entropy(_group(features, "shape")[covered], labels["shape"][covered])
                    if covered.any() else zero)
    centre = labels["centre"].flatten()
    weight = torch.tensor([1.0, 10.0, 10.0], device=features.device)
    out["centre"] = (F.cross_entropy(_group(features, "centre").flatten(0, 1), centre, weight=weight,
                                     ignore_index=synthetic.IGNORE) if (centre >= 0).any() else zero)
    for k in ("cell_x", "cell_y"):
        t = labels[k].flatten()
        out[k] = (F.cross_entropy(_group(features, k).flatten(0, 1), t, ignore_index=synthetic.IGNORE)
                  if (t >= 0).any() else zero)
    glyph = (labels["chars"] > 0).any(-1)
    chars = _group(features, "chars").reshape(*features.shape[:2], synthetic.CHAR_SLOTS, N_CHAR_CLASSES)
    out["chars"] = (3.0 * F.cross_entropy(chars[glyph].flatten(0, 1), labels["chars"][glyph].flatten())
                    if glyph.any() else zero)
    return out


@torch.no_grad()
def dense_accuracy(features: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy of the label channels where a label is present (colour/shape: covered patches; centre: item
    centres; cell: both coordinates right at item centres; chars: labelled thirds)."""
    def acc(pred, target, where):
        n = int(where.sum())
        return float(((pred == target) & where).sum()) / n if n else float("nan")

    res = {}
    for k in ("colour", "shape", "centre"):
        res[k] = acc(_group(features, k).argmax(-1), labels[k], labels[k] > 0)
    at = labels["cell_x"] >= 0
    both = (_group(features, "cell_x").argmax(-1) == labels["cell_x"]) & \
        (_group(features, "cell_y").argmax(-1) == labels["cell_y"])
    res["cell"] = acc(both, torch.ones_like(both), at)
    chars = _group(features, "chars").reshape(*features.shape[:2], synthetic.CHAR_SLOTS, N_CHAR_CLASSES)
    res["chars"] = acc(chars.argmax(-1), labels["chars"], labels["chars"] > 0)
    return res


def vit_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(T, 3, S, S) -> (T, N, D): the ViT's patch tokens at the layer the projector reads (CLS dropped)."""
    return model.vision_model(pixel_values, model.config.select_layer)[:, 1:]


# ---- the stage ------------------------------------------------------------------------------------------------

def pretrain_vision(model, *, steps: int = 1500, scenes_per_step: int = 16, pages_per_step: int = 16,
                    lr: float = 2e-3, warmup_steps: int = 30, weight_decay: float = 0.01, seed: int = 0,
                    text_scale: int = 1, max_tiles: int = 6, eval_every: int = 250,
                    metrics_path: str | Path | None = None, progress: bool = False) -> list[dict]:
    """Train `model.vision_model` in place on dense labels; returns one metrics dict per evaluation.

    Each step: `scenes_per_step` fresh scenes (all their tiles and thumbnails) and `pages_per_step` text pages.
    AdamW (betas 0.9/0.98), linear warmup then cosine to lr/20, gradient clipping at 1. Evaluations on a fixed
    held-out batch (its own random stream) report `dense_accuracy`.
    """
    cfg = model.config.vision_config
    need = label_channels()
    if cfg.hidden_size < need:
        raise ValueError(f"dense-label pretraining puts {need} label logits in the ViT's output channels; "
                         f"vision_config.hidden_size is {cfg.hidden_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    S, p = model.config.image_size, cfg.patch_size
    vit = model.vision_model
    params = [q for q in vit.parameters()]
    for q in model.parameters():
        q.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(param_groups(vit, weight_decay), lr=lr, betas=(0.9, 0.98))

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    kw = dict(tile_size=S, patch_size=p, text_scale=text_scale)
    eval_rng = random.Random(f"nvlm-vision/{seed}/eval")
    eval_scenes = scene_batch(eval_rng, 64, max_tiles=max_tiles, **kw)
    eval_pages = page_batch(eval_rng, 16, **kw)
    rng = random.Random(f"nvlm-vision/{seed}/train")
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="vision pretraining", unit="step", file=sys.stderr)
    metrics = open(metrics_path, "w", encoding="utf-8") if metrics_path else None
    t0 = time.perf_counter()
    try:
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                vit.eval()
                with torch.no_grad():
                    row = {"step": step, "time_s": round(time.perf_counter() - t0, 1),
                           **{f"scene_{k}": v for k, v in dense_accuracy(vit_features(model, eval_scenes[0]),
                                                                         eval_scenes[1]).items()},
                           "page_chars": dense_accuracy(vit_features(model, eval_pages[0]), eval_pages[1])["chars"]}
                vit.train()
                history.append(row)
                if metrics:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if bar is not None:
                    bar.set_postfix(colour=f"{row['scene_colour']:.2f}", shape=f"{row['scene_shape']:.2f}",
                                    chars=f"{row['page_chars']:.2f}")
            if step == steps:
                break
            pixels, labels = scene_batch(rng, scenes_per_step, max_tiles=max_tiles, **kw)
            if pages_per_step:
                pp, pl = page_batch(rng, pages_per_step, **kw)
                pixels, labels = torch.cat([pixels, pp]), _cat(labels, pl)
            losses = dense_losses(vit_features(model, pixels), labels)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if metrics:
            metrics.close()
    vit.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return history


@torch.no_grad()
def center_output(model, *, n_scenes: int = 128, seed: int = 0, text_scale: int = 1, max_tiles: int = 6) -> float:
    """Fold the data mean of the ViT's output (over the patch tokens of `n_scenes` scenes' tiles) into the last
    layer's fc2 bias, so the features the projector reads are zero-mean; returns the norm of the removed mean.

    Exact: the last layer adds `fc2(...) * ls2` to the residual, so subtracting mean / ls2 from fc2's bias subtracts
    the mean from every output token and changes nothing else. Only valid when the projector reads the last layer.
    """
    n_layers = len(model.vision_model.encoder.layers)
    if model.config.select_layer not in (-1, n_layers):
        raise ValueError("center_output needs select_layer = -1 (the projector must read the last ViT layer)")
    cfg = model.config.vision_config
    pixels, _ = scene_batch(random.Random(f"nvlm-vision/{seed}/center"), n_scenes, tile_size=model.config.image_size,
                            patch_size=cfg.patch_size, max_tiles=max_tiles, text_scale=text_scale)
    mean = torch.cat([vit_features(model, pixels[i:i + 256]) for i in range(0, len(pixels), 256)]).mean((0, 1))
    last = model.vision_model.encoder.layers[-1]
    if (last.ls2.abs() < 1e-6).any():
        raise ValueError("the last ViT layer has a LayerScale entry near 0; its fc2 bias cannot carry the mean")
    last.mlp.fc2.bias -= mean / last.ls2
    return float(mean.norm())
