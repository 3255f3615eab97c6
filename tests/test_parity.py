"""Parity against independent references, fp32 on CPU, weights loaded by nvlm's production loader.

- Decoder: transformers' Qwen2ForCausalLM on the same weights (logits; cached decode == full forward).
- Vision: transformers' InternVLVisionModel on the same weights, and a naive from-the-spec InternViT that runs the
  checkpoint's padded heads (dummy heads included) straight from the safetensors file.
- Pixel shuffle v2/v1 against the explicit index formula of SPEC §2.4.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

from nvlm.config import preset
from nvlm.interop import to_transformers_internvl_vision, to_transformers_qwen2
from nvlm.model import pixel_shuffle
from nvlm.weights import load_checkpoint, random_model, save_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random checkpoint in the official layout (1 dummy ViT head, projector without bias), and the loaded
    model."""
    cfg = preset("tiny", vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("parity") / "ckpt"
    save_checkpoint(random_model(cfg, seed=1), path, max_shard_bytes=200_000)  # force several shards
    model = load_checkpoint(path)
    model.image_token_id = VOCAB - 1  # random ids below are drawn from [0, VOCAB - 1)
    return path, model


def _hf_qwen2(model):
    return to_transformers_qwen2(model)


def test_checkpoint_is_sharded_with_dummy_heads(ckpt):
    path, model = ckpt
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    sd = {}
    for f in path.glob("model-*.safetensors"):
        sd.update(load_file(f))
    v = model.config.vision_config
    assert sd["vision_model.encoder.layers.0.attn.qkv.weight"].shape[0] == 3 * (v.num_attention_heads + 1) * v.head_dim
    assert "mlp1.1.bias" not in sd and "mlp1.3.bias" not in sd


def test_decoder_logits_match_transformers(ckpt):
    _, model = ckpt
    hf = _hf_qwen2(model)
    ids = torch.randint(0, VOCAB - 1, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_cached_decode_equals_full_forward(ckpt):
    _, model = ckpt
    lm = model.language_model
    ids = torch.randint(0, VOCAB - 1, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = lm.make_cache(1, 12)
        steps = [model(ids[:, :5], cache=cache, cache_pos=0)]
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], cache=cache, cache_pos=t))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def _hf_internvl_vision(model):
    return to_transformers_internvl_vision(model)


def test_vision_matches_transformers_internvl(ckpt):
    _, model = ckpt
    hf = _hf_internvl_vision(model)
    s = model.config.image_size
    pv = torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.vision_model(pv)
        ref = hf(pixel_values=pv).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _naive_internvit(sd, cfg, pv):
    """InternViT straight from the (padded) checkpoint tensors, following SPEC §2.1-2.3 literally: all stored
    heads run, the qk-norm variance is the sum of squares of the first `hidden` channels / hidden."""
    v = cfg.vision_config
    d, hd = v.hidden_size, v.head_dim
    pre = "vision_model."
    x = torch.nn.functional.conv2d(pv, sd[pre + "embeddings.patch_embedding.weight"],
                                   sd[pre + "embeddings.patch_embedding.bias"], stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[pre + "embeddings.class_embedding"].expand(x.shape[0], 1, d), x], 1)
    x = x + sd[pre + "embeddings.position_embedding"]

    def rms(t, w, n):
        var = t[..., :n].pow(2).sum(-1, keepdim=True) / n
        return t * torch.rsqrt(var + v.layer_norm_eps) * w

    for i in range(v.num_hidden_layers):
        p = f"{pre}encoder.layers.{i}."
        h = rms(x, sd[p + "norm1.weight"], d)
        qkv = h @ sd[p + "attn.qkv.weight"].T
        heads = qkv.shape[-1] // (3 * hd)
        B, N, _ = qkv.shape
        q, k, val = qkv.reshape(B, N, 3, heads, hd).unbind(2)
        q = rms(q.flatten(2), sd[p + "attn.q_norm.weight"], d).reshape(B, N, heads, hd)
        k = rms(k.flatten(2), sd[p + "attn.k_norm.weight"], d).reshape(B, N, heads, hd)
        q, k, val = (t.transpose(1, 2) for t in (q, k, val))
        att = ((q * hd ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        o = (att @ val).transpose(1, 2).reshape(B, N, heads * hd)
        x = x + (o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]) * sd[p + "ls1"]
        h = rms(x, sd[p + "norm2.weight"], d)
        m = h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        x = x + (m @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]) * sd[p + "ls2"]
    return x


def test_vision_matches_naive_reference_with_dummy_heads(ckpt, tmp_path):
    path, model = ckpt
    sd = {}
    for f in path.glob("model-*.safetensors"):
        sd.update(load_file(f))
    # Make the dummy heads' q/k rows non-zero: they must still contribute nothing (their v rows are zero).
    v = model.config.vision_config
    padded = (v.num_attention_heads + v.num_dummy_heads) * v.head_dim
    for i in range(v.num_hidden_layers):
        w = sd[f"vision_model.encoder.layers.{i}.attn.qkv.weight"]
        w[v.hidden_size:padded] = torch.randn_like(w[v.hidden_size:padded])
        w[padded + v.hidden_size:2 * padded] = torch.randn_like(w[padded + v.hidden_size:2 * padded])
    s = model.config.image_size
    pv = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _naive_internvit(sd, model.config, pv)
        ours = model.vision_model(pv)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_index_formula():
    T, G, C = 2, 8, 5
    x = torch.randn(T, G, G, C)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (T, G // 2, G // 2, 4 * C)
    out1 = pixel_shuffle(x, 0.5, "v1")
    for i in range(G // 2):
        for j in range(G // 2):
            want = torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j],
                              x[:, 2 * i + 1, 2 * j + 1]], -1)
            assert torch.equal(out[:, i, j], want)
            assert torch.equal(out1[:, j, i], want)  # v1: the token grid is transposed


def test_projector_and_merge(ckpt):
    """extract_features == mlp1(pixel_shuffle(ViT without CLS)) computed by hand, and the merge puts tile t's
    token n at the (t * N + n)-th image position."""
    _, model = ckpt
    cfg = model.config
    s = cfg.image_size
    pv = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        vit = model.vision_model(pv)[:, 1:]
        g = int(vit.shape[1] ** 0.5)
        x = vit.reshape(2, g, g, -1)
        tokens = []
        for i in range(g // 2):
            for j in range(g // 2):
                tokens.append(torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j],
                                         x[:, 2 * i + 1, 2 * j + 1]], -1))
        sh = torch.stack(tokens, 1)
        ln = torch.nn.functional.layer_norm(sh, sh.shape[-1:], model.mlp1[0].weight, model.mlp1[0].bias, 1e-5)
        h = torch.nn.functional.gelu(ln @ model.mlp1[1].weight.T) @ model.mlp1[3].weight.T
        feats = model.extract_features(pv)
        torch.testing.assert_close(feats, h, rtol=1e-5, atol=1e-5)

        n = cfg.tokens_per_tile
        ids = torch.randint(0, 100, (1, 3 + 2 * n))
        ids[0, 2:2 + 2 * n] = model.image_token_id
        emb = model.embed(ids, feats)
        assert torch.equal(emb[0, 2:2 + 2 * n], feats.reshape(-1, feats.shape[-1]))
        assert torch.equal(emb[0, :2], model.embed_tokens(ids[0, :2]))
        with pytest.raises(ValueError, match="image-token positions"):
            model.embed(ids, feats[:1])
