"""NVLM-D: InternViT -> pixel shuffle -> `mlp1` projector -> merge at `<|vision_pad|>` -> Qwen2 decoder.

NVLM-D is InternVL's design with three differences that matter for loading and parity: the projector `mlp1`
(LayerNorm -> Linear(12800 -> LLM *intermediate* size, no bias) -> GELU -> Linear(-> hidden, no bias)), the
InternViT-6B dummy heads (handled by the loader), and the 1-D tile-tag text around each tile's tokens (prompt.py).

Shapes for NVLM-D-72B: tiles (T, 3, 448, 448) -> ViT (T, 1025, 3200) -> drop CLS (T, 1024, 3200)
-> pixel shuffle (T, 256, 12800) -> mlp1 (T, 256, 8192) -> written, in order, over the T*256 `<|vision_pad|>`
positions of the token embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NVLMConfig
from .decoder import Qwen2ForCausalLM
from .vision import InternViT

DEFAULT_IMAGE_TOKEN_ID = 151654  # <|vision_pad|> in the Qwen2.5 tokenizer NVLM-D ships


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """(T, H, W, C) patch grid -> (T, H*scale, W*scale, C/scale^2).

    v2 (NVLM-D): output token (i, j) holds channels concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]).
    v1 (the InternVL class default) leaves the token grid transposed: token (i, j) holds the block of (j, i).
    The reshapes below are the reference's, so both versions are reproduced bit for bit.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))  # merge column pairs
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))  # merge row pairs
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class Projector(nn.Sequential):
    """`mlp1`: LayerNorm -> Linear -> GELU -> Linear; checkpoint keys mlp1.0 / mlp1.1 / mlp1.3."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, bias: bool = False):
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden, bias=bias), nn.GELU(),
                         nn.Linear(hidden, out_dim, bias=bias))


class NVLM(nn.Module):
    def __init__(self, config: NVLMConfig, projector_bias: bool = False, image_token_id: int = DEFAULT_IMAGE_TOKEN_ID):
        super().__init__()
        self.config = config
        self.image_token_id = image_token_id
        llm = config.llm_config
        self.vision_model = InternViT(config.vision_config)
        self.mlp1 = Projector(config.projector_input_size, llm.intermediate_size, llm.hidden_size, projector_bias)
        self.language_model = Qwen2ForCausalLM(llm)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) tiles -> (T, tokens_per_tile, llm_hidden) image embeddings."""
        vit_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        x = self.vision_model(pixel_values.to(vit_dtype), self.config.select_layer)[:, 1:]  # drop CLS
        t, n, c = x.shape
        side = int(n ** 0.5)
        x = pixel_shuffle(x.reshape(t, side, side, c), self.config.downsample_ratio, self.config.ps_version)
        x = x.reshape(t, -1, x.shape[-1])
        proj_dtype = self.mlp1[1].weight.dtype
        return self.mlp1(x.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the `<|vision_pad|>` positions, in order."""
        embeds = self.embed_tokens(input_ids)  # (B, L, D)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"the prompt has {n_slots} image-token positions (id {self.image_token_id}) but the "
                             f"images give {n_feats} image embeddings; each tile needs exactly "
                             f"{self.config.tokens_per_tile} positions")
        if n_slots:
            feats = image_features.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache=None, cache_pos: int = 0, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) [+ tiles (T, 3, S, S) for all images in order] -> logits (B, L, vocab)."""
        if image_features is None and pixel_values is not None:
            image_features = self.extract_features(pixel_values)
        embeds = self.embed(input_ids, image_features)
        if position_ids is None:
            position_ids = torch.arange(cache_pos, cache_pos + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.expand(input_ids.shape[0], -1)
        return self.language_model(embeds, position_ids, mask, cache, cache_pos)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy over labels != -100 (divide by the supervised-token count yourself)."""
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                               reduction="sum")
