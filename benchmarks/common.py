"""Shared helpers for the benchmarks: a random model of a preset, its transformers twin, memory bandwidth."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from PIL import Image


def build(preset_name: str, dtype: torch.dtype, seed: int = 0):
    from nvlm.config import preset
    from nvlm.weights import random_model

    cfg = preset(preset_name)
    model = random_model(cfg, seed=seed, dtype=dtype)
    model.image_token_id = cfg.llm_config.vocab_size - 1  # an id no random prompt uses
    return model


def hf_qwen2(model, dtype: torch.dtype, attn: str = "sdpa"):
    """transformers' Qwen2ForCausalLM sharing the weights of `model.language_model`."""
    from nvlm.interop import to_transformers_qwen2

    return to_transformers_qwen2(model, attn_implementation=attn, dtype=dtype)


def memory_bandwidth(gb: float = 1.0, repeats: int = 5) -> float:
    """Measured read bandwidth (bytes/s): the best of `repeats` full reductions over a `gb`-GB tensor."""
    x = torch.ones(int(gb * 1e9 / 4), dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def timed(fn, repeats: int = 1):
    """(best seconds, last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def emit(rows: list[tuple], header: tuple, result: dict) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(json.dumps(result))


MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def model_card_pixels(img: Image.Image, max_num: int, size: int) -> torch.Tensor:
    """The model card's load_image: dynamic_preprocess, then per tile ToTensor + Normalize (torchvision's math)."""
    from nvlm.image import find_grid

    cols, rows = find_grid(*img.size, max_num=max_num, image_size=size)
    resized = img.resize((cols * size, rows * size))
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows)
             for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(img.resize((size, size)))
    out = []
    for t in tiles:
        x = torch.from_numpy(np.array(t)).permute(2, 0, 1).float().div(255)
        out.append((x - torch.tensor(MEAN, dtype=torch.float32)[:, None, None])
                   / torch.tensor(STD, dtype=torch.float32)[:, None, None])
    return torch.stack(out)


