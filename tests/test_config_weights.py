"""Config parsing, checkpoint layout, loader errors, atomic writes, 72B shapes, device maps.

`fixtures/nvlm_d_72b_config.json` is NVLM-D-72B's config.json written out from the field table in SPEC §1.1-1.3.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvlm.config import ConfigError, NVLMConfig, preset
from nvlm.placement import auto_device_map, device_for, split_device_map
from nvlm.weights import CheckpointError, build_model, load_checkpoint, random_model, save_checkpoint, stored_shapes

FIXTURES = Path(__file__).parent / "fixtures"


def official() -> dict:
    return json.loads((FIXTURES / "nvlm_d_72b_config.json").read_text())


def test_official_config_parses_and_round_trips():
    cfg = NVLMConfig.from_dict(official())
    assert cfg.vision_config.hidden_size == 3200 and cfg.vision_config.num_attention_heads == 25
    assert cfg.llm_config.num_key_value_heads == 8 and cfg.llm_config.vocab_size == 152064
    assert cfg.ps_version == "v2" and cfg.max_dynamic_patch == 6 and cfg.tokens_per_tile == 256
    assert cfg.projector_input_size == 12800
    out = cfg.to_dict()
    # every official key survives (leaked generation keys and the "llama" model_type included)
    for key, value in official().items():
        if key in ("llm_config", "vision_config"):
            for k, v in value.items():
                assert out[key][k] == v, (key, k)
        else:
            assert out[key] == value, key
    assert NVLMConfig.from_dict(out) == cfg


@pytest.mark.parametrize("path, value, field", [
    (("ps_version",), "v3", "ps_version"),
    (("llm_config", "architectures"), ["LlamaForCausalLM"], "llm_config.architectures"),
    (("model_type",), "internvl_chat", "model_type"),
    (("vision_config", "norm_type"), "batch_norm", "vision_config.norm_type"),
    (("llm_config", "hidden_act"), "gelu", "llm_config.hidden_act"),
    (("downsample_ratio",), 0.25, "downsample_ratio"),
    (("select_layer",), 99, "select_layer"),
    (("llm_config", "num_key_value_heads"), 7, "num_key_value_heads"),
])
def test_unsupported_values_name_the_field(path, value, field):
    d = official()
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=field):
        NVLMConfig.from_dict(d)


def test_missing_subconfig_is_named():
    d = official()
    del d["llm_config"]
    with pytest.raises(ConfigError, match="llm_config"):
        NVLMConfig.from_dict(d)


def test_72b_shapes_on_meta_match_the_official_counts():
    """SPEC §1.4: LLM 72,706,203,648; InternViT with dummy heads 6,052,672,640; mlp1 620,717,056; 79.38B."""
    model = build_model(NVLMConfig.from_dict(official()).replace(
        vision_config=dataclasses.replace(NVLMConfig.from_dict(official()).vision_config, num_dummy_heads=7)))
    shapes = stored_shapes(model)

    def count(prefix):
        return sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(prefix))

    assert count("language_model.") == 72_706_203_648
    assert count("vision_model.") == 6_052_672_640
    assert count("mlp1.") == 620_717_056
    assert count("") == 79_379_593_344
    assert shapes["vision_model.encoder.layers.0.attn.qkv.weight"] == (12288, 3200)
    assert shapes["vision_model.encoder.layers.0.attn.proj.weight"] == (3200, 4096)
    assert shapes["vision_model.encoder.layers.0.attn.q_norm.weight"] == (4096,)
    assert shapes["mlp1.1.weight"] == (29568, 12800) and shapes["mlp1.3.weight"] == (8192, 29568)
    assert "mlp1.1.bias" not in shapes and len(shapes) == 4 + 45 * 13 + 4 + 3 + 80 * 12  # embeddings, ViT layers, mlp1, LLM ends, LLM layers
    assert all(p.device.type == "meta" for p in model.parameters())


# ---- checkpoint I/O ------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_ckpt(tmp_path):
    model = random_model(preset("tiny", vocab_size=300), seed=3)
    path = save_checkpoint(model, tmp_path / "ck")
    return path, model


def _rewrite(path: Path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tiny_ckpt):
    path, _ = tiny_ckpt

    def damage(sd):
        del sd["mlp1.0.bias"]
        sd["language_model.model.extra.weight"] = torch.zeros(2)
        sd["language_model.model.norm.weight"] = torch.zeros(3)

    _rewrite(path, damage)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "missing keys (1): mlp1.0.bias" in msg
    assert "unexpected keys (1): language_model.model.extra.weight" in msg
    assert "language_model.model.norm.weight: checkpoint [3] vs expected [64]" in msg


def test_truncated_shard_is_reported(tiny_ckpt):
    path, _ = tiny_ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_nonzero_dummy_value_rows_are_rejected(tiny_ckpt):
    path, model = tiny_ckpt
    v = model.config.vision_config

    def damage(sd):
        w = sd["vision_model.encoder.layers.1.attn.qkv.weight"]
        w[-1] = 1.0  # last row = a dummy head's value channel

    _rewrite(path, damage)
    with pytest.raises(CheckpointError, match="dummy heads' value rows"):
        load_checkpoint(path)
    assert v.num_dummy_heads == 1


def test_mixed_fp32_bf16_checkpoint_loads_in_each_dtype(tiny_ckpt):
    """Like the official file: fp32 ViT qkv/proj/norms and LLM q/k/v, bf16 everything else."""
    path, model = tiny_ckpt
    fp32_keys = ("attn.qkv", "attn.proj", "q_norm", "k_norm", "q_proj", "k_proj", "v_proj")

    def mix(sd):
        for k in sd:
            if not any(s in k for s in fp32_keys):
                sd[k] = sd[k].to(torch.bfloat16)

    _rewrite(path, mix)
    sd = load_file(path / "model.safetensors")
    assert sd["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert sd["language_model.model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    m32 = load_checkpoint(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    w = model.language_model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(m32.language_model.model.layers[0].mlp.up_proj.weight, w.bfloat16().float())
    assert torch.equal(m32.language_model.model.layers[0].self_attn.q_proj.weight,
                       model.language_model.model.layers[0].self_attn.q_proj.weight)
    mbf = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in mbf.parameters())


def test_save_is_atomic(tiny_ckpt, monkeypatch):
    path, model = tiny_ckpt
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    import nvlm.weights as w

    calls = []

    def failing_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*a, **k)

    monkeypatch.setattr(w, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(random_model(model.config, seed=9), path, max_shard_bytes=100_000)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before  # old checkpoint untouched
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind


def test_resolve_reports_missing_directory_and_offline_hub(tmp_path, monkeypatch):
    from nvlm.weights import resolve_checkpoint

    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):
        resolve_checkpoint("nvidia/NVLM-D-72B")


# ---- device maps ---------------------------------------------------------------------------------------------

def test_split_device_map_follows_the_model_card_rule():
    # 80 layers on 8 GPUs: ceil(80 / 7.5) = 11 per GPU, GPU 0 gets ceil(11 / 2) = 6; the last layer goes to GPU 0.
    dmap = split_device_map(80, 8)
    where = [dmap[f"language_model.model.layers.{i}"] for i in range(80)]
    assert where[:6] == [0] * 6 and where[6:17] == [1] * 11 and where[72:79] == [7] * 7 and where[79] == 0
    assert dmap["vision_model"] == dmap["mlp1"] == dmap["language_model.lm_head"] == 0
    assert "language_model.model.layers.80" not in dmap
    assert device_for("language_model.model.layers.17.mlp.up_proj.weight", dmap) == torch.device("cuda:2")
    assert device_for("language_model.model.layers.1.mlp.up_proj.weight", dmap) == torch.device("cuda:0")


def test_auto_device_map_follows_free_memory():
    cfg = preset("tiny", vocab_size=300)
    from nvlm.placement import _layer_bytes

    layer, fixed = _layer_bytes(cfg, torch.float32)
    # GPU 1 has room for exactly one layer after the reserve, GPU 0 for the fixed parts + one layer.
    free = [int((fixed + layer) / 0.9) + 16, int(layer / 0.9) + 16]
    dmap = auto_device_map(cfg, free, torch.float32)
    assert [dmap[f"language_model.model.layers.{i}"] for i in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="GiB"):
        auto_device_map(cfg, [fixed], torch.float32)
