"""The public Python API: `nvlm.load(path)` -> `Pipeline` with `.chat`, `.stream`, `.generate`.

Notable:
- Ties the layers together in data-flow order: images -> tiles (image.py) -> prompt ids with tile-tag blocks
  (prompt.py) -> image features + decoder (model.py) -> sampler (generate.py) -> text.
- Defaults follow SPEC §11: the trained ChatML format with system "Answer the questions.", up to
  `max_dynamic_patch` (6) tiles + thumbnail, greedy decoding, stop at `<|im_end|>` / `<|endoftext|>`.
- float32 on CPU, bfloat16 on CUDA unless `dtype` says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import NVLMConfig
from .generate import Completion, SamplingParams, generate, stream
from .image import load_image, preprocess
from .model import NVLM
from .placement import resolve_device_map
from .prompt import DEFAULT_SYSTEM, encode_conversation
from .tokenizer import Tokenizer
from .weights import load_checkpoint, resolve_checkpoint

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

ImageInput = Any  # a path, bytes, a file object or a PIL image


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ChatResult:
    text: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_tiles: list[int]
    finish_reason: str
    logprobs: list[list[tuple[int, float]]] | None = None

    def to_json(self) -> dict:
        out = {"text": self.text, "prompt_token_ids": self.prompt_token_ids,
               "output_token_ids": self.output_token_ids, "num_tiles": self.num_tiles,
               "finish_reason": self.finish_reason, "logprobs": None}
        if self.logprobs is not None:
            out["logprobs"] = [[{"token_id": int(i), "logprob": float(lp)} for i, lp in step]
                               for step in self.logprobs]
        return out


@dataclass
class Prepared:
    """A prompt ready for the model: token ids and the tiles of its images."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    num_tiles: list[int] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)


class Pipeline:
    """An NVLM-D model with its tokenizer and preprocessing. `pipe.model` is the underlying `nn.Module`."""

    def __init__(self, model: NVLM, tokenizer: Tokenizer, path: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.config: NVLMConfig = model.config
        if len(tokenizer) > self.config.llm_config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                             f"{self.config.llm_config.vocab_size}")
        model.image_token_id = tokenizer.vision_pad_id

    # ---- preparation ---------------------------------------------------------------------------------------
    def _messages(self, prompt: str | Sequence[dict], history: Sequence[tuple[str, str]] | None) -> list[dict]:
        if isinstance(prompt, str):
            msgs: list[dict] = []
            for q, a in history or ():
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            return msgs + [{"role": "user", "content": prompt}]
        if history:
            raise ValueError("pass either a message list or a question with history, not both")
        return [dict(m) for m in prompt]

    def prepare(self, prompt: str | Sequence[dict], images: Sequence[ImageInput] = (), *,
                history: Sequence[tuple[str, str]] | None = None, system: str | None = DEFAULT_SYSTEM,
                max_tiles: int | None = None, style: str = "megatron", tile_tags: bool = True) -> Prepared:
        cfg = self.config
        max_tiles = cfg.max_dynamic_patch if max_tiles is None else max_tiles
        processed = [preprocess(load_image(im), max_tiles=max_tiles, min_tiles=min(cfg.min_dynamic_patch, max_tiles),
                                image_size=cfg.image_size, use_thumbnail=cfg.use_thumbnail) for im in images]
        num_tiles = [p.num_tiles for p in processed]
        enc = encode_conversation(self.tokenizer, self._messages(prompt, history), num_tiles=num_tiles,
                                  tokens_per_tile=cfg.tokens_per_tile, system=system, style=style,
                                  tile_tags=tile_tags)
        pv = torch.cat([p.pixel_values for p in processed]) if processed else None
        return Prepared(enc.input_ids, pv, num_tiles, [p.grid for p in processed])

    def image_features(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        if pixel_values is None:
            return None
        dev = self.model.vision_model.embeddings.patch_embedding.weight.device
        with torch.inference_mode():
            return self.model.extract_features(pixel_values.to(dev))

    def _gen_kwargs(self) -> dict:
        tok = self.tokenizer
        return dict(decode=tok.decode, stop_ids=tok.stop_ids, vocab_limit=len(tok))

    # ---- public API ----------------------------------------------------------------------------------------
    def generate_prepared(self, prepared: Sequence[Prepared], params: SamplingParams) -> list[Completion]:
        pvs = [p.pixel_values for p in prepared if p.pixel_values is not None]
        feats = self.image_features(torch.cat(pvs)) if pvs else None
        return generate(self.model, [p.input_ids for p in prepared], params, image_features=feats,
                        pad_id=self.tokenizer.endoftext_id, **self._gen_kwargs())

    def chat(self, prompt: str | Sequence[dict], images: Sequence[ImageInput] | ImageInput = (), *,
             history: Sequence[tuple[str, str]] | None = None, system: str | None = DEFAULT_SYSTEM,
             max_tiles: int | None = None, style: str = "megatron", **sampling) -> ChatResult:
        """One answer. `prompt` is a question (with optional `history` of (question, answer) pairs) or a list
        of {"role", "content"} messages; `<image>` marks where each image goes (default: before the question)."""
        images = _as_list(images)
        prepared = self.prepare(prompt, images, history=history, system=system, max_tiles=max_tiles, style=style)
        out = self.generate_prepared([prepared], SamplingParams(**sampling))[0]
        return ChatResult(out.text, prepared.input_ids, out.token_ids, prepared.num_tiles, out.finish_reason,
                          out.logprobs)

    def stream(self, prompt: str | Sequence[dict], images: Sequence[ImageInput] | ImageInput = (), *,
               history: Sequence[tuple[str, str]] | None = None, system: str | None = DEFAULT_SYSTEM,
               max_tiles: int | None = None, style: str = "megatron", **sampling) -> Iterator[str]:
        """Like `chat`, as an iterator of text deltas (never splitting a UTF-8 character)."""
        images = _as_list(images)
        prepared = self.prepare(prompt, images, history=history, system=system, max_tiles=max_tiles, style=style)
        feats = self.image_features(prepared.pixel_values)
        yield from stream(self.model, prepared.input_ids, SamplingParams(**sampling), image_features=feats,
                          **self._gen_kwargs())

    def generate(self, prompts: Sequence[str | Sequence[dict]], images: Sequence[Sequence[ImageInput]] | None = None,
                 *, system: str | None = DEFAULT_SYSTEM, max_tiles: int | None = None, style: str = "megatron",
                 tile_tags: bool = True, **sampling) -> list[ChatResult]:
        """Static batch: several prompts (each with its own list of images) run together, left-padded."""
        images = images if images is not None else [()] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        prepared = [self.prepare(p, _as_list(im), system=system, max_tiles=max_tiles, style=style,
                                 tile_tags=tile_tags) for p, im in zip(prompts, images)]
        outs = self.generate_prepared(prepared, SamplingParams(**sampling))
        return [ChatResult(o.text, p.input_ids, o.token_ids, p.num_tiles, o.finish_reason, o.logprobs)
                for p, o in zip(prepared, outs)]


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def load(path: str | Path | None = None, *, dtype: str | torch.dtype | None = None, device: str | None = None,
         device_map: str | dict | None = None, quantize: str | None = None, group_size: int = 128,
         quantize_lm_head: bool = False, progress: bool = False) -> Pipeline:
    """Load a checkpoint directory (or Hub repo id) in the official NVLM-D layout; no path = the bundled tiny model.

    `quantize="int8"|"int4"` swaps the decoder's linears for weight-only quantized ones after loading (a checkpoint
    saved quantized is detected and loaded as such). With quantization, `dtype="auto"` means bfloat16 even on CPU:
    the int8/int4 kernels want half-precision activations.
    """
    from .quantize import is_quantized_checkpoint, load_quantized, quantize_model

    if path is None:
        from .assets import default_model_path

        path = default_model_path()
        if path is None:
            raise ValueError("no path given and this nvlm build bundles no default model")
    directory = resolve_checkpoint(path)
    device = device or default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    quantized_on_disk = is_quantized_checkpoint(directory)
    if (quantize or quantized_on_disk) and dtype in (None, "auto"):
        dtype = torch.bfloat16
    dt = parse_dtype(dtype, device)
    dmap = resolve_device_map(device_map, NVLMConfig.from_file(directory), dt) if device_map else None
    if quantized_on_disk:
        model = load_quantized(directory, dtype=dt, device=device, device_map=dmap)
    else:
        model = load_checkpoint(directory, dtype=dt, device=device, device_map=dmap, progress=progress)
        if quantize:
            quantize_model(model, quantize, group_size=group_size, include_lm_head=quantize_lm_head)
    if torch.device(device).type == "cpu" and dt in (torch.bfloat16, torch.float16) and dmap is None:
        from .fast import use_gemv

        use_gemv(model)  # ~1.3x batch-1 decode on CPU in half precision (only plain nn.Linear modules)
    tokenizer = Tokenizer.from_dir(directory)
    return Pipeline(model, tokenizer, directory)
