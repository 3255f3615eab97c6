"""Qwen2 decoder: the NVLM-D language model (Qwen2-72B-Instruct and smaller Qwen2s).

Notable:
- Pre-norm RMSNorm blocks, GQA attention with bias on q/k/v only, neox-style RoPE (rotate-half over the full
  head_dim) computed in fp32 from explicit position ids, SwiGLU MLP, final norm, lm_head (untied for NVLM-D-72B;
  tied when `tie_word_embeddings`).
- Takes input *embeddings* (the image features are merged in by model.py) plus position ids, so left-padded batches
  and packed training samples work: the caller passes a boolean attention mask (True = may attend) or none for the
  plain causal case.
- `KVCache` is a module of preallocated buffers (gpt-fast style); `forward(..., cache=..., cache_pos=p)` writes the
  new keys/values at [p, p+T) and attends over [0, p+T).
- `rope_scaling={"type": "dynamic"}` (in the official config) is a no-op up to max_position_embeddings, as in HF.
- Parameter names equal the checkpoint's under `language_model.` (`model.layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig
from .vision import RMSNorm


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin of shape (B, 1, T, head_dim), computed in fp32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                 .float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, H_kv, S_max, hd)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    # Training hook: called with the RoPE'd (q, k) of every forward when set (the auxiliary attention loss).
    qk_hook = None

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, cache_pos: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_hook is not None:
            self.qk_hook(q, k)
        if cache is not None:
            k, v = cache.update(cache_pos, k, v)
        # Causal without a mask only when queries and keys line up (no cache prefix): SDPA's is_causal aligns the
        # triangle to the top-left corner.
        causal = mask is None and k.shape[2] == T and T > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """Embeddings in, logits out. `forward(embeds (B,T,D), position_ids (B,T))` -> (B, T, vocab)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        """One KVCache per layer, each on the device of its layer (so multi-device placement just works)."""
        caches = []
        for layer in self.model.layers:
            w = layer.input_layernorm.weight  # a float tensor even when the linears are quantized
            caches.append(KVCache(batch, self.config.num_key_value_heads, max_len, self.config.head_dim,
                                  dtype or w.dtype, device or w.device))
        return caches

    def hidden_states(self, embeds, position_ids, mask=None, cache: list[KVCache] | None = None, cache_pos: int = 0):
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.model.layers):
            dev = layer.input_layernorm.weight.device
            if x.device != dev:  # multi-device placement: follow the layer
                x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
                mask = mask.to(dev) if mask is not None else None
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None, cache_pos)
        x = x.to(self.model.norm.weight.device)
        return self.model.norm(x)

    def forward(self, embeds, position_ids, mask=None, cache=None, cache_pos: int = 0, last_only: bool = False):
        """Logits (B, T, vocab); with `last_only`, (B, 1, vocab) for the last position (prefill needs no more)."""
        h = self.hidden_states(embeds, position_ids, mask, cache, cache_pos)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h.to(self.lm_head.weight.device))
