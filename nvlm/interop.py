"""Hand an nvlm model's weights to `transformers` modules (needs `transformers`; nvlm never imports it otherwise).

Used by the parity tests (transformers' modules are the independent reference) and by the benchmarks (the HF
baselines run on exactly the same weights). The tensors are shared, not copied.

- `to_transformers_qwen2(model)`: `Qwen2ForCausalLM` with the language model's weights (same key names).
- `to_transformers_internvl_vision(model)`: `InternVLVisionModel` with the ViT's weights: the fused `attn.qkv` split
  into q/k/v, `ls1/ls2` -> `lambda_1/2`, `norm1/2` -> `layernorm_before/after` (dummy heads already dropped).
"""

from __future__ import annotations

import torch


def to_transformers_qwen2(model, *, attn_implementation: str = "eager", dtype: torch.dtype | None = None):
    import transformers

    c = model.config.llm_config
    cfg = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation=attn_implementation, pad_token_id=0)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(model.language_model.state_dict(), strict=False, assign=True)
    if unexpected or any("rotary" not in k and not (c.tie_word_embeddings and k == "lm_head.weight")
                         for k in missing):
        raise ValueError(f"weights do not map onto Qwen2ForCausalLM: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg)  # its buffers were created on meta
    hf = hf.eval()
    return hf.to(dtype) if dtype is not None else hf


def to_transformers_internvl_vision(model, *, attn_implementation: str = "eager"):
    import transformers

    v = model.config.vision_config
    cfg = transformers.InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size, attention_bias=v.qkv_bias, use_qk_norm=v.qk_normalization,
        norm_type=v.norm_type, layer_norm_eps=v.layer_norm_eps, image_size=v.image_size, patch_size=v.patch_size,
        use_mean_pooling=True, hidden_act="gelu", attn_implementation=attn_implementation)
    hf = transformers.InternVLVisionModel(cfg).eval()
    sd = model.vision_model.state_dict()
    d = v.hidden_size
    m = {"embeddings.cls_token": sd["embeddings.class_embedding"],
         "embeddings.patch_embeddings.projection.weight": sd["embeddings.patch_embedding.weight"],
         "embeddings.patch_embeddings.projection.bias": sd["embeddings.patch_embedding.bias"],
         "embeddings.position_embeddings": sd["embeddings.position_embedding"]}
    for i in range(v.num_hidden_layers):
        p, a, r = f"encoder.layers.{i}.", f"encoder.layer.{i}.attention.", f"encoder.layer.{i}."
        w = sd[p + "attn.qkv.weight"]
        m |= {a + "q_proj.weight": w[:d], a + "k_proj.weight": w[d:2 * d], a + "v_proj.weight": w[2 * d:],
              a + "projection_layer.weight": sd[p + "attn.proj.weight"],
              a + "projection_layer.bias": sd[p + "attn.proj.bias"],
              r + "lambda_1": sd[p + "ls1"], r + "lambda_2": sd[p + "ls2"]}
        if v.qkv_bias:
            b = sd[p + "attn.qkv.bias"]
            m |= {a + "q_proj.bias": b[:d], a + "k_proj.bias": b[d:2 * d], a + "v_proj.bias": b[2 * d:]}
        if v.qk_normalization:
            m |= {a + "q_norm.weight": sd[p + "attn.q_norm.weight"], a + "k_norm.weight": sd[p + "attn.k_norm.weight"]}
        for name in ("fc1", "fc2"):
            m |= {r + f"mlp.{name}.weight": sd[p + f"mlp.{name}.weight"], r + f"mlp.{name}.bias": sd[p + f"mlp.{name}.bias"]}
        for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            m[r + theirs + ".weight"] = sd[p + ours + ".weight"]
            if v.norm_type == "layer_norm":
                m[r + theirs + ".bias"] = sd[p + ours + ".bias"]
    hf.load_state_dict(m, strict=True)
    return hf
