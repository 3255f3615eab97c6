"""Multi-device placement: which device holds each part of the model (a transform; the model file stays pure).

Notable:
- `split_device_map` is the model card's `split_model` rule: GPU 0 holds the ViT, projector, embeddings, final norm,
  lm_head and the *last* decoder layer, and counts as half a GPU for the decoder layers; the rest are spread evenly.
- `auto_device_map` spreads decoder layers in proportion to each GPU's free memory (what is left on GPU 0 after the
  fixed parts), keeping contiguous runs so activations cross devices as few times as possible.
- A device map is {module-prefix: device}; `device_for(key, map)` resolves a parameter name by its longest prefix.
  The decoder moves activations to each layer's device, so any map works.
"""

from __future__ import annotations

import math

import torch

from .config import NVLMConfig

FIXED_ON_FIRST = ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm",
                  "language_model.lm_head")


def split_device_map(num_layers: int, num_gpus: int) -> dict[str, int]:
    """The model card's split_model(): first GPU treated as half a GPU; last layer pinned to GPU 0."""
    if num_gpus < 1:
        raise ValueError("split_device_map needs at least one GPU")
    per_gpu = math.ceil(num_layers / (num_gpus - 0.5)) if num_gpus > 1 else num_layers
    counts = [per_gpu] * num_gpus
    counts[0] = math.ceil(counts[0] * 0.5) if num_gpus > 1 else num_layers
    dmap: dict[str, int] = {}
    layer = 0
    for gpu, n in enumerate(counts):
        for _ in range(n):
            if layer < num_layers:
                dmap[f"language_model.model.layers.{layer}"] = gpu
            layer += 1
    for name in FIXED_ON_FIRST:
        dmap[name] = 0
    dmap[f"language_model.model.layers.{num_layers - 1}"] = 0
    return dmap


def _layer_bytes(config: NVLMConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one decoder layer, bytes of everything pinned to the first device)."""
    from .weights import build_model

    model = build_model(config)
    size = torch.tensor([], dtype=dtype).element_size()
    layer = sum(p.numel() for p in model.language_model.model.layers[0].parameters()) * size
    total = sum(p.numel() for p in model.parameters()) * size
    return layer, total - layer * config.llm_config.num_hidden_layers


def auto_device_map(config: NVLMConfig, free_bytes: list[int], dtype: torch.dtype = torch.bfloat16,
                    reserve: float = 0.1) -> dict[str, int]:
    """Spread decoder layers over GPUs in proportion to free memory (`reserve` is kept for activations/KV)."""
    if not free_bytes:
        raise ValueError("auto_device_map needs at least one device")
    n = config.llm_config.num_hidden_layers
    layer, fixed = _layer_bytes(config, dtype)
    capacity = [int(f * (1 - reserve)) for f in free_bytes]
    capacity[0] -= fixed
    if capacity[0] < 0 or sum(max(c, 0) for c in capacity) < n * layer:
        need = (fixed + n * layer) / 2 ** 30
        have = sum(free_bytes) * (1 - reserve) / 2 ** 30
        raise ValueError(f"the model needs {need:.1f} GiB but the devices have {have:.1f} GiB free "
                         f"(after a {reserve:.0%} reserve); use more GPUs, a smaller dtype or quantization")
    slots = [max(c, 0) // layer for c in capacity]
    share = [s / sum(slots) for s in slots]
    counts = [min(slots[i], round(share[i] * n)) for i in range(len(slots))]
    i = 0
    while sum(counts) < n:  # hand out what rounding left over, where there is room
        if counts[i % len(counts)] < slots[i % len(counts)]:
            counts[i % len(counts)] += 1
        i += 1
    while sum(counts) > n:
        j = max(range(len(counts)), key=lambda k: counts[k])
        counts[j] -= 1
    dmap = {name: 0 for name in FIXED_ON_FIRST}
    layer_idx = 0
    for gpu, c in enumerate(counts):
        for _ in range(c):
            dmap[f"language_model.model.layers.{layer_idx}"] = gpu
            layer_idx += 1
    return dmap


def device_for(key: str, device_map: dict[str, int | str]) -> torch.device:
    """Device of a parameter name under a device map (longest matching module prefix)."""
    best = None
    for prefix in device_map:
        if key == prefix or key.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ValueError(f"device map does not place {key!r}")
    dev = device_map[best]
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def resolve_device_map(spec, config: NVLMConfig, dtype: torch.dtype) -> dict[str, int | str] | None:
    """`None`, "split", "auto" or an explicit dict -> a device map (or None for single-device)."""
    if spec is None or isinstance(spec, dict):
        return spec
    if not torch.cuda.is_available():
        raise ValueError(f"device_map={spec!r} needs CUDA GPUs; none are available")
    count = torch.cuda.device_count()
    if spec == "split":
        return split_device_map(config.llm_config.num_hidden_layers, count)
    if spec == "auto":
        free = [torch.cuda.mem_get_info(i)[0] for i in range(count)]
        return auto_device_map(config, free, dtype)
    raise ValueError(f"device_map must be None, 'split', 'auto' or a dict, got {spec!r}")
