"""Weight-only int8/int4 (nvlm/quantize.py): error bounds from the quantization step, kernel vs fallback, the whole
model against float32, and save -> load_quantized identity."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvlm.config import preset
from nvlm.generate import SamplingParams, generate
from nvlm.quantize import (Int4WeightOnlyLinear, Int8WeightOnlyLinear, _int4_kernel_ok, _int8_kernel_ok,
                           is_quantized_checkpoint, load_quantized, pack_nibbles, quantize_checkpoint, quantize_model,
                           save_quantized, unpack_nibbles)
from nvlm.weights import CheckpointError, load_checkpoint, random_model, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:weight-only int8/int4 on CPU is fast only")

IMAGE_TOKEN = 299


def tiny(seed=0, dtype=torch.float32, tied=False):
    cfg = preset("tiny", vocab_size=300)
    if tied:
        cfg = cfg.replace(llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=True))
    m = random_model(cfg, seed=seed, dtype=dtype)
    m.image_token_id = IMAGE_TOKEN
    return m


def ids(batch=2, length=16, seed=0):
    return torch.randint(0, IMAGE_TOKEN, (batch, length), generator=torch.Generator().manual_seed(seed))


def linear(n_in, n_out, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[3] = 0  # an all-zero row must not give NaN scales
    return lin


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ---- single layers -------------------------------------------------------------------------------------------

def test_int8_error_within_half_a_step():
    lin = linear(96, 48)
    q = Int8WeightOnlyLinear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (48,)
    step = q.scales[:, None]  # (N, 1): one quantization step per output channel
    err = (q.dequantize() - lin.weight).abs()
    assert torch.all(err <= step / 2 + 1e-7)
    assert torch.all(q.weight[3] == 0)
    x = torch.randn(5, 96)
    # |y_q - y| <= sum_k |x_k| * step_n / 2 per output
    bound = x.abs() @ (step / 2).expand(-1, 96).T + 1e-5
    assert torch.all((q(x) - lin(x)).abs() <= bound)
    assert not torch.allclose(q(x), lin(x), atol=1e-6, rtol=0)  # it does quantize


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_error_within_half_a_step(group_size):
    lin = linear(128, 48)
    q = Int4WeightOnlyLinear.from_linear(lin, group_size)  # float32 on CPU: the portable (dequantize) layout
    assert q.layout is None
    scales = q.scales_and_zeros[..., 0].T  # (N, G)
    step = scales.repeat_interleave(group_size, dim=1)  # (N, K)
    err = (q.dequantize() - lin.weight).abs()
    assert torch.all(err <= step / 2 + 1e-6)
    x = torch.randn(5, 128)
    bound = x.abs() @ (step / 2).T + 1e-5
    assert torch.all((q(x) - lin(x)).abs() <= bound)
    # int4 is coarser than int8 on the same layer
    e8 = (Int8WeightOnlyLinear.from_linear(lin)(x) - lin(x)).abs().mean()
    assert (q(x) - lin(x)).abs().mean() > e8


def test_nibble_packing_roundtrip():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = pack_nibbles(q)
    assert p.shape == (16, 32) and p.dtype == torch.uint8
    assert int(p[0, 0]) == int(q[0, 0]) * 16 + int(q[0, 1])  # even column in the high nibble
    assert torch.equal(unpack_nibbles(p), q)


@pytest.mark.skipif(not _int8_kernel_ok("cpu", torch.bfloat16), reason="no CPU _weight_int8pack_mm in this torch")
def test_int8_kernel_equals_fallback():
    q = Int8WeightOnlyLinear.from_linear(linear(96, 48, seed=1))
    x = torch.randn(3, 96)
    # float32 inputs: the kernel runs (slowly) and must agree with the fallback to float32 rounding
    torch.testing.assert_close(q.forward_kernel(x), q.forward_dequant(x), rtol=1e-5, atol=1e-5)
    qb = copy.deepcopy(q).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(qb.forward_kernel(xb).float(), qb.forward_dequant(xb).float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(qb(xb), qb.forward_kernel(xb) + qb.bias)  # decode-sized input takes the kernel


@pytest.mark.skipif(not _int4_kernel_ok("cpu", torch.bfloat16, 32, 2), reason="no CPU int4 kernels in this torch")
def test_int4_kernel_equals_fallback_and_unpacks_exactly():
    lin = linear(128, 48, seed=2).to(torch.bfloat16)
    q = Int4WeightOnlyLinear.from_linear(lin, 32)
    assert q.layout == "cpu"
    ref_q, scales, zeros = Int4WeightOnlyLinear.quantize_weight(lin.weight.detach(), 32)
    assert torch.equal(q.portable(), pack_nibbles(ref_q))  # the packed form gives back the exact nibbles
    x = torch.randn(3, 128)
    w = q.dequantize(torch.float32)
    torch.testing.assert_close(q.forward_kernel(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(q.forward_kernel(xb).float(), q.forward_dequant(xb).float(), rtol=2e-2, atol=2e-2)
    # the same stored tensors loaded as float32 take the portable path and agree
    q32 = Int4WeightOnlyLinear.from_stored(pack_nibbles(ref_q), scales, zeros, lin.bias.detach(), group_size=32,
                                           device="cpu", dtype=torch.float32)
    assert q32.layout is None
    torch.testing.assert_close(q32(x), q(xb).float(), rtol=2e-2, atol=2e-2)


# ---- the whole model -----------------------------------------------------------------------------------------

# Random weights give nearly flat logits (median top-1 margin ~0.03 here vs int4 errors up to ~0.07), so int4 flips
# some near-ties: besides top-1 agreement, the quantized pick must be among the reference's top 3.
@pytest.mark.parametrize("mode,dtype,group_size,min_cos,min_agree", [
    ("int8", torch.float32, 128, 0.999, 0.95),
    ("int8", torch.bfloat16, 128, 0.999, 0.9),
    ("int4", torch.float32, 32, 0.99, 0.6),
    ("int4", torch.bfloat16, 32, 0.99, 0.6),
])
def test_quantized_model_close_to_float32(mode, dtype, group_size, min_cos, min_agree):
    ref_model = tiny()
    x = ids()
    with torch.no_grad():
        ref = ref_model(x)
        q = quantize_model(tiny(dtype=dtype), mode, group_size=group_size)
        out = q(x).float()
    n_layers = q.config.llm_config.num_hidden_layers
    assert len(q.config.extra["quantization_config"]["modules"]) == 7 * n_layers
    cos = cosine(out, ref)
    pick = out.argmax(-1)
    agree = (pick == ref.argmax(-1)).float().mean().item()
    in_top3 = (ref.topk(3, dim=-1).indices == pick[..., None]).any(-1).float().mean().item()
    assert cos > min_cos, cos
    assert agree >= min_agree, agree
    assert in_top3 >= 0.9, in_top3
    assert cos < 1 - 1e-7  # the logits did change


def test_vision_and_projector_untouched():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("language_model.")}
    quantize_model(m, "int8")
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    for name, mod in m.named_modules():
        if isinstance(mod, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            assert name.startswith("language_model.model.layers.")
    assert type(m.mlp1[1]) is nn.Linear and type(m.language_model.lm_head) is nn.Linear
    assert all(type(mod) is nn.Linear for mod in m.vision_model.modules() if isinstance(mod, nn.Linear))


def test_int4_skips_layers_not_divisible_by_group_size():
    m = tiny(dtype=torch.bfloat16)  # hidden 64, intermediate 128: only down_proj (in 128) fits group 128
    with pytest.warns(UserWarning, match=r"12 layer\(s\) left unquantized .*group_size=128"):
        quantize_model(m, "int4", group_size=128)
    layer = m.language_model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, Int4WeightOnlyLinear)
    assert type(layer.mlp.up_proj) is nn.Linear and type(layer.self_attn.q_proj) is nn.Linear
    assert m.config.extra["quantization_config"]["modules"] == [
        f"language_model.model.layers.{i}.mlp.down_proj" for i in range(2)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="int8, int4"):
        quantize_model(tiny(), "int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_model(tiny(), "int4", group_size=48)
    m = quantize_model(tiny(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(m, "int8")


# ---- checkpoints ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size,tied,head", [
    ("int8", 128, False, False),
    ("int4", 32, False, False),
    ("int8", 128, True, True),  # a tied lm_head is untied and quantized; the embedding stays bf16
    ("int4", 64, True, True),
])
def test_save_load_identical_logits(tmp_path, mode, group_size, tied, head):
    m = quantize_model(tiny(dtype=torch.bfloat16, tied=tied), mode, group_size=group_size, include_lm_head=head)
    x = ids()
    with torch.no_grad():
        want = m(x)
    path = save_quantized(m, tmp_path / "q")
    assert is_quantized_checkpoint(path)
    loaded = load_quantized(path, dtype=torch.bfloat16, device="cpu")
    loaded.image_token_id = IMAGE_TOKEN
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    qc = loaded.config.extra["quantization_config"]
    assert qc["mode"] == mode and qc["modules"] == m.config.extra["quantization_config"]["modules"]
    assert ("language_model.lm_head" in qc["modules"]) == head
    assert not loaded.config.llm_config.tie_word_embeddings if head else True
    head_mod = loaded.language_model.lm_head
    assert isinstance(head_mod, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)) == head
    # stored dtypes: int weights, model-dtype scales
    from nvlm.weights import checkpoint_tensors
    t = checkpoint_tensors(path)
    w = t["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert t["language_model.model.layers.0.self_attn.q_proj.scales"].dtype == torch.bfloat16
    assert "language_model.model.layers.0.self_attn.q_proj.bias" in t


def test_quantize_checkpoint_matches_in_memory_quantization(tmp_path):
    """The offline path (no packing, so no unpacking to save) gives the same model as quantizing at load."""
    save_checkpoint(tiny(), tmp_path / "plain")
    (tmp_path / "plain" / "vocab.json").write_text("{}")  # tokenizer files are copied along
    quantize_checkpoint(tmp_path / "plain", tmp_path / "q", "int4", group_size=32)
    assert (tmp_path / "q" / "vocab.json").exists()
    loaded = load_quantized(tmp_path / "q", dtype=torch.bfloat16)
    direct = quantize_model(load_checkpoint(tmp_path / "plain", dtype=torch.bfloat16), "int4", group_size=32)
    kernel = _int4_kernel_ok("cpu", torch.bfloat16, 32, 2)
    assert loaded.language_model.model.layers[0].mlp.up_proj.layout == ("cpu" if kernel else None)
    loaded.image_token_id = direct.image_token_id = IMAGE_TOKEN
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), direct(x))


def test_plain_checkpoint_is_not_quantized(tmp_path):
    save_checkpoint(tiny(), tmp_path / "plain")
    assert not is_quantized_checkpoint(tmp_path / "plain")
    assert not is_quantized_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(tmp_path / "plain")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny(), tmp_path / "x")


def test_load_reports_damaged_checkpoint(tmp_path):
    import json

    m = quantize_model(tiny(dtype=torch.bfloat16), "int8")
    save_quantized(m, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["mode"] = "int4"
    cfg["quantization_config"]["group_size"] = 32
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="q_proj.weight: checkpoint torch.int8"):
        load_quantized(tmp_path / "q")


def test_generate_on_quantized_model():
    m = quantize_model(tiny(dtype=torch.bfloat16), "int8")
    assert m.language_model.make_cache(1, 2)[0].k.dtype == torch.bfloat16  # not the int8 weights' dtype
    prompt = ids(1, 10, seed=3)[0].tolist()
    out = generate(m, [prompt], SamplingParams(max_new_tokens=8), decode=lambda t: "", stop_ids=[],
                   vocab_limit=IMAGE_TOKEN)[0]
    # greedy with the cache equals argmax of a full uncached forward over prompt + output
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = m(seq)[0, len(prompt) - 1:-1, :IMAGE_TOKEN]
    assert logits.argmax(-1).tolist() == out.token_ids
