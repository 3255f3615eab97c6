"""InternViT: the NVLM-D image encoder (InternViT-6B-448px-V1-5 and smaller InternViTs of the same design).

Notable:
- Patch conv (stride = kernel = 14) -> prepend CLS -> add the learned position embedding (no interpolation: NVLM
  always feeds force_image_size tiles) -> pre-norm blocks with LayerScale (`ls1`, `ls2`) -> no final norm.
- qk-norm normalises q and k over the *full* channel vector (all heads at once), not per head.
- The official checkpoint pads 25 heads to 32 with all-zero "dummy" heads (Megatron TP=8). The loader slices them
  away (weights.py verifies they are zero); this module only ever sees the real heads, so the qk-norm mean over
  `hidden_size` channels equals the reference's sum over the first 3200 channels / 3200.
- Parameter names equal the checkpoint's (`attn.qkv`, `attn.q_norm`, `mlp.fc1`, `norm1`, ...).
- Exact (erf) GELU; attention through `scaled_dot_product_attention`, bidirectional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back, then scaled (InternRMSNorm / Qwen2RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (T, 3, S, S) -> (T, D, S/p, S/p) -> (T, N, D), patches row-major
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)  # (T, N+1, D)
        return x + self.position_embedding.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(d, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(d, cfg.layer_norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, D); rows are [Q heads | K heads | V heads]
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)  # over all heads' channels at once
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd), scale hd^-0.5
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = make_norm(cfg, d)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.full((d,), cfg.initializer_factor))
        self.norm2 = make_norm(cfg, d)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((d,), cfg.initializer_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InternViT(nn.Module):
    """(T, 3, S, S) normalised tiles -> (T, 1 + N, D) hidden states of layer `select_layer`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        n = len(self.encoder.layers)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i (HF convention).
        stop = n if select_layer == -1 else (select_layer % (n + 1))
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        return x
