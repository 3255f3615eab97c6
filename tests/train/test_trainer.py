"""Trainer tests on the tiny preset (CPU, fp32, one process): config presets, LR schedule, freezing per stage,
loss normalisation over micro-batch splits, LoRA merge, exact in-process resume, export + chat, CLI and plot."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from nvlm.config import preset
from nvlm.tokenizer import build_byte_tokenizer
from nvlm.train.checkpoint import MARKER, latest_checkpoint, list_checkpoints
from nvlm.train.config import LoraConfig, OptimizerConfig, TrainConfigError, load_config
from nvlm.train.lora import apply_lora, merge_lora
from nvlm.train.trainer import Trainer, cpu_has_native_bf16, lr_at
from nvlm.weights import load_checkpoint, random_model, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 70), "blue": (40, 90, 220), "yellow": (235, 205, 30)}


# ---- fixtures: a tiny checkpoint (byte tokenizer) and a small JSONL set with drawn images --------------------------

def make_checkpoint(path: Path) -> Path:
    model = random_model(preset("tiny", vocab_size=320), seed=0)
    return save_checkpoint(model, path, tokenizer=build_byte_tokenizer(), dtype=torch.float32)


def write_data(root: Path, n: int = 32, image_every: int = 2, seed: int = 0) -> Path:
    """LLaVA-style image records (56x56 = 1 tile, 112x56 = 2 tiles + thumbnail) and OpenAI-style text records."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        if i % image_every == 0:
            name, rgb = rng.choice(sorted(COLOURS.items()))
            size = rng.choice([(56, 56), (112, 56)])
            im = Image.new("RGB", size, (250, 250, 250))
            x, y = rng.randrange(4, size[0] - 30), rng.randrange(4, size[1] - 30)
            ImageDraw.Draw(im).ellipse([x, y, x + 24, y + 24], fill=rgb)
            im.save(root / f"img{i}.png")
            lines.append({"image": f"img{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the circle?"},
                {"from": "gpt", "value": name}]})
        else:
            a, b = rng.randrange(20), rng.randrange(20)
            msgs = [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]
            if i % 5 == 1:  # multi-turn
                msgs += [{"role": "user", "content": "and doubled?"},
                         {"role": "assistant", "content": str(2 * (a + b))}]
            lines.append({"messages": msgs})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("image_data"), image_every=1)


def make_config(base: Path, data: Path, out: Path, *sets: str):
    d = {"model": str(base), "output_dir": str(out), "stage": "sft", "device": "cpu", "global_batch_size": 4,
         "micro_batch_size": 2, "save_every": 0, "log_every": 0,
         "data": {"sources": [{"path": str(data)}], "max_tiles": 3, "max_len": 1024},
         "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "max_steps": 3}}
    return load_config(data=d, overrides=list(sets))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- config ------------------------------------------------------------------------------------------------------

def test_stage_presets_follow_the_paper_tables():
    minimal = {"model": "m", "output_dir": "o", "data": {"sources": [{"path": "x.jsonl"}]}}
    pre = load_config(data={**minimal, "stage": "pretrain"})
    assert pre.optimizer == OptimizerConfig(lr=1e-4, min_lr=2.5e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                            warmup_steps=500, max_steps=20_000, grad_clip=10.0)
    assert (pre.global_batch_size, pre.data.max_len, pre.data.max_tiles) == (2048, 512, 1)
    sft = load_config(data={**minimal, "stage": "sft"})
    assert sft.optimizer == OptimizerConfig(lr=2e-6, min_lr=2.5e-7, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1,
                                            warmup_steps=1000, max_steps=40_000, grad_clip=10.0)
    assert (sft.global_batch_size, sft.data.max_len, sft.data.max_tiles) == (128, 3200, 6)
    assert sft.lora is None
    # the stage may come from --set and then picks its own preset
    assert load_config(data=minimal, overrides=["stage=pretrain"]).optimizer.lr == 1e-4


def test_overrides_types_and_errors(tmp_path):
    minimal = {"model": "m", "output_dir": "o", "data": {"sources": [{"path": "x.jsonl"}]}}
    c = load_config(data=minimal, overrides=["optimizer.lr=3e-5", "optimizer.betas=[0.8, 0.9]", "data.packing=true",
                                             "output_dir=runs/x y", "lora.r=8", "micro_batch_size=4"])
    assert c.optimizer.lr == 3e-5 and c.optimizer.betas == (0.8, 0.9) and c.data.packing
    assert c.output_dir == "runs/x y" and c.lora == LoraConfig(r=8) and c.micro_batch_size == 4
    assert load_config(data=minimal, overrides=["lora.r=8", "lora.enabled=false"]).lora is None
    with pytest.raises(TrainConfigError, match="optimizer.lrr"):
        load_config(data=minimal, overrides=["optimizer.lrr=1"])
    with pytest.raises(TrainConfigError, match="global_batch_size"):
        load_config(data=minimal, overrides=["global_batch_size=10", "micro_batch_size=4"])
    with pytest.raises(TrainConfigError, match="micro_batch_size must be int"):
        load_config(data=minimal, overrides=["micro_batch_size=1.5"])
    with pytest.raises(TrainConfigError, match="stage"):
        load_config(data=minimal, overrides=["stage=rlhf"])
    with pytest.raises(TrainConfigError, match="KEY=VALUE"):
        load_config(data=minimal, overrides=["optimizer.lr"])
    toml = tmp_path / "c.toml"
    toml.write_text('stage = "pretrain"\nmodel = "m"\noutput_dir = "o"\n[[data.sources]]\npath = "a.jsonl"\n'
                    'weight = 2\nimage_root = "imgs"\n[optimizer]\nmax_steps = 7\n')
    c = load_config(toml, ["optimizer.warmup_steps=2"])
    assert c.data.sources[0].weight == 2.0 and c.data.sources[0].image_root == "imgs"
    assert (c.optimizer.max_steps, c.optimizer.warmup_steps, c.optimizer.lr) == (7, 2, 1e-4)


@pytest.mark.parametrize("name", ["pretrain_example.toml", "sft_example.toml"])
def test_example_configs_parse_and_hold_their_launch_command(name):
    path = REPO / "configs" / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"nvlm train configs/{name}" in first
    cfg = load_config(path)
    assert cfg.stage == name.split("_")[0]


# ---- schedule ----------------------------------------------------------------------------------------------------

def test_warmup_cosine_lr_values():
    o = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=12)
    # step s (0-based) uses n = s + 1: warmup lr * n / 4, then cosine over the 8 remaining steps
    expected = {0: 2.5e-4, 1: 5e-4, 3: 1e-3,
                4: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 8)),  # 9.6575e-4
                7: 5.5e-4,  # half way: (lr + min_lr) / 2
                10: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 7 / 8)),  # 1.3425e-4
                11: 1e-4, 50: 1e-4}
    for step, lr in expected.items():
        assert lr_at(step, o) == pytest.approx(lr, rel=1e-12), step
    assert lr_at(4, o) == pytest.approx(9.65746e-4, rel=1e-5)
    assert lr_at(0, OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=2)) == pytest.approx(5e-4)


def test_trainer_applies_the_schedule(base, data, tmp_path):
    cfg = make_config(base, data, tmp_path, "optimizer.warmup_steps=2", "optimizer.max_steps=4")
    t = Trainer(cfg)
    lrs = [t.step()["lr"] for _ in range(4)]
    assert lrs == pytest.approx([5e-4, 1e-3, 5.5e-4, 1e-4], rel=1e-12)


# ---- freezing ----------------------------------------------------------------------------------------------------

def test_pretrain_trains_only_the_projector(base, image_data, tmp_path):
    t = Trainer(make_config(base, image_data, tmp_path, "stage=pretrain", "data.max_tiles=1"))
    before = snapshot(t.model)
    m = t.step()
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    for k, v in t.model.state_dict().items():
        if k.startswith("mlp1."):
            assert not torch.equal(v, before[k]), f"{k} did not change"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"


def test_sft_trains_llm_and_projector_not_vit(base, data, tmp_path):
    t = Trainer(make_config(base, data, tmp_path))
    assert not any(p.requires_grad for p in t.model.vision_model.parameters())
    before = snapshot(t.model)
    t.step()
    t.step()  # (the first global batch of this blend happens to be text-only)
    for k, v in t.model.state_dict().items():
        if k.startswith(("mlp1.", "language_model.")):
            assert not torch.equal(v, before[k]), f"{k} did not change"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"


def test_full_stage_trains_everything_including_the_vit(base, image_data, tmp_path):
    t = Trainer(make_config(base, image_data, tmp_path, "stage=full", "data.max_tiles=1"))
    assert all(p.requires_grad for p in t.model.parameters())
    before = snapshot(t.model)
    t.step()
    changed = {k for k, v in t.model.state_dict().items() if not torch.equal(v, before[k])}
    vit = {k for k in before if k.startswith("vision_model.")}
    assert vit & changed and "vision_model.embeddings.patch_embedding.weight" in changed
    assert {k for k in before if k.startswith("mlp1.")} <= changed


# ---- loss normalisation ------------------------------------------------------------------------------------------

def test_micro_batch_split_does_not_change_the_result(base, data, tmp_path):
    """Loss = sum CE / supervised tokens of the whole global batch, so 1 x 4 == 2 x 2 == 4 x 1 (fp32)."""
    grads, runs = {}, {}
    for micro in (4, 2, 1):
        cfg = make_config(base, data, tmp_path / f"m{micro}", f"micro_batch_size={micro}", "optimizer.max_steps=2")
        t = Trainer(cfg)
        loss = [t.accumulate()["loss"] for _ in range(2)]  # gradients of two global batches, summed
        grads[micro] = (loss, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        t = Trainer(cfg)
        runs[micro] = ([t.step()["loss"] for _ in range(2)], snapshot(t.model))
    ref_loss, ref_grads = grads[4]
    assert "mlp1.1.weight" in ref_grads and "language_model.lm_head.weight" in ref_grads
    for micro in (2, 1):
        loss, g = grads[micro]
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        assert g.keys() == ref_grads.keys()
        worst = max((g[k] - ref_grads[k]).abs().max().item() for k in g)
        assert worst < 1e-6, f"micro-batch {micro}: gradients differ by {worst}"
    # weights after two AdamW steps: 1 x 4 == 2 x 2. (With 4 x 1 a few ~1e-9 gradients differ in their last bits,
    # and Adam's g / sqrt(v) blows such differences up to ~lr, so the comparison above is on the gradients.)
    (l4, w4), (l2, w2) = runs[4], runs[2]
    assert l2 == pytest.approx(l4, abs=1e-6)
    worst = max((w2[k] - w4[k]).abs().max().item() for k in w4)
    assert worst < 1e-6, f"weights differ by {worst}"


def test_packing_gives_the_padded_loss(base, data, tmp_path):
    padded = Trainer(make_config(base, data, tmp_path / "pad", "optimizer.max_steps=2"))
    packed = Trainer(make_config(base, data, tmp_path / "pack", "optimizer.max_steps=2", "data.packing=true",
                                 "data.max_tokens=1024", "micro_batch_size=4"))
    a = [padded.step() for _ in range(2)]
    b = [packed.step() for _ in range(2)]
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], abs=1e-5)
    assert [m["supervised_tokens"] for m in b] == [m["supervised_tokens"] for m in a]
    assert all(m["efficiency"] == 1.0 for m in b)  # packed rows carry no padding
    assert all(0 < m["efficiency"] < 1.0 for m in a)


def test_cpu_native_bf16_from_cpuinfo_flags():
    xeon = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    epyc = "processor\t: 0\nflags\t\t: fpu sse2 fma avx2 sha_ni\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert cpu_has_native_bf16(xeon) is True and cpu_has_native_bf16(arm) is True
    assert cpu_has_native_bf16(epyc) is False
    assert cpu_has_native_bf16("processor\t: 0\n") is None  # no flags line: unknown


def test_bf16_on_a_cpu_without_it_warns(base, data, tmp_path, monkeypatch, caplog):
    import nvlm.train.trainer as trainer

    for native, warned in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda native=native: native)
        caplog.clear()
        Trainer(make_config(base, data, tmp_path / f"w{native}", "optimizer.max_steps=1", "dtype=bfloat16"))
        assert ("emulates it" in caplog.text) == warned, native
    caplog.clear()
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    Trainer(make_config(base, data, tmp_path / "fp32", "optimizer.max_steps=1"))  # auto = fp32 on CPU: no warning
    assert "emulates it" not in caplog.text


def test_activation_checkpointing_and_bf16(base, data, tmp_path):
    plain = Trainer(make_config(base, data, tmp_path / "a", "optimizer.max_steps=2"))
    ac = Trainer(make_config(base, data, tmp_path / "b", "optimizer.max_steps=2", "activation_checkpointing=true"))
    la = [plain.step()["loss"] for _ in range(2)]
    lb = [ac.step()["loss"] for _ in range(2)]
    assert lb == pytest.approx(la, abs=1e-6)
    wa, wb = snapshot(plain.model), snapshot(ac.model)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    bf = Trainer(make_config(base, data, tmp_path / "c", "optimizer.max_steps=2", "dtype=bfloat16"))
    lc = [bf.step()["loss"] for _ in range(2)]
    assert lc == pytest.approx(la, abs=0.05)
    assert all(p.dtype == torch.float32 for p in bf.model.parameters())  # autocast; fp32 master weights


# ---- LoRA --------------------------------------------------------------------------------------------------------

def test_lora_merge_gives_the_adapter_logits():
    torch.manual_seed(0)
    model = random_model(preset("tiny", vocab_size=320), seed=1)
    model.image_token_id = 300
    apply_lora(model, LoraConfig(r=4, alpha=8, projector=True, vision=True))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert any(".q_proj." in n for n in names) and any("mlp1.1." in n for n in names)
    assert any("vision_model." in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero: make the adapters do something
                p.normal_(0, 0.2)
    model.eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[0, 3:7] = 300  # 1 tile x 4 image tokens
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(ids, pixels)
        merge_lora(model)
        merged = model(ids, pixels)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(random_model(preset("tiny", vocab_size=320)).state_dict())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_lora_training_trains_adapters_and_exports_merged(base, data, tmp_path):
    import nvlm

    cfg = make_config(base, data, tmp_path, "lora.r=4", "lora.alpha=8", "optimizer.max_steps=2")
    t = Trainer(cfg)
    assert all("lora_" in n or n.startswith("mlp1.") for n in t.trainable)
    before = snapshot(t.model)
    t.fit()
    after = snapshot(t.model)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (("lora_" in k) or k.startswith("mlp1.")), k
    # final/ holds the merged weights under the official names and gives the adapter model's logits
    final = load_checkpoint(tmp_path / "final")
    assert not any("lora" in k for k in final.state_dict())
    t.model.eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(final(ids), t.model(ids), atol=1e-5, rtol=1e-5)
    assert isinstance(nvlm.load(tmp_path / "final", device="cpu").chat("1+1=", max_new_tokens=3).text, str)


# ---- checkpoints, resume, export ---------------------------------------------------------------------------------

def test_resume_in_process_is_exact_and_ignores_incomplete(base, data, tmp_path):
    # LoRA dropout makes the run depend on the torch RNG, so the RNG state must come back too
    sets = ("lora.r=4", "lora.dropout=0.2", "optimizer.max_steps=4", "save_every=2")
    ref = Trainer(make_config(base, data, tmp_path / "ref", *sets)).fit()

    out = tmp_path / "run"
    t = Trainer(make_config(base, data, out, *sets))
    first = [t.step(), t.step()]
    t.save()
    assert [m["loss"] for m in first] == [m["loss"] for m in ref[:2]]
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == "step_00000002" and (ck / MARKER).is_file()
    # a newer checkpoint that never completed, and a stale temp dir, must be ignored
    shutil.copytree(ck, ck.parent / "step_00000003")
    (ck.parent / "step_00000003" / MARKER).unlink()
    (ck.parent / ".step_00000004.tmp").mkdir()
    assert latest_checkpoint(out) == ck
    del t

    resumed = Trainer(make_config(base, data, out, *sets))
    assert resumed.step_count == 2 and resumed.resumed_from == ck
    rest = resumed.fit()
    keys = ("step", "loss", "lr", "grad_norm", "supervised_tokens", "tokens")
    assert [{k: m[k] for k in keys} for m in rest] == [{k: m[k] for k in keys} for m in ref[2:]]
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert not (ck.parent / ".step_00000004.tmp").exists()  # swept by the next save

    with pytest.raises(ValueError, match="already holds training checkpoints"):
        Trainer(make_config(base, data, out, *sets, "resume=false"))


def test_export_loads_with_nvlm_load_and_chats(base, data, tmp_path):
    import nvlm

    t = Trainer(make_config(base, data, tmp_path, "optimizer.max_steps=2"))
    t.fit()
    final = tmp_path / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer_config.json").is_file()
    exported = load_checkpoint(final).state_dict()
    for k, v in t.model.state_dict().items():
        assert torch.equal(exported[k], v), k
    pipe = nvlm.load(final, device="cpu")
    img = next(data.parent.glob("img*.png"))
    for res in (pipe.chat("2+3=", max_new_tokens=4), pipe.chat("What colour is the circle?", img, max_new_tokens=4)):
        assert isinstance(res.text, str) and len(res.output_token_ids) >= 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens", "efficiency", "padded_tokens"):
        assert key in lines[0]
    assert json.loads((tmp_path / "run_config.json").read_text())["stage"] == "sft"


def test_cli_train_and_plot(base, data, tmp_path, capsys):
    from nvlm.cli import main

    toml = tmp_path / "run.toml"
    toml.write_text(f'# nvlm train {toml}\nstage = "pretrain"\nmodel = "{base}"\noutput_dir = "{tmp_path / "out"}"\n'
                    f'device = "cpu"\nglobal_batch_size = 2\nmicro_batch_size = 1\nlog_every = 1\n'
                    f'[data]\nmax_tiles = 1\n[[data.sources]]\npath = "{data}"\n'
                    '[optimizer]\nmax_steps = 2\nwarmup_steps = 1\n')
    assert main(["train", str(toml), "--set", "optimizer.lr=1e-3", "--json", "--progress", "off"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["step"] == 2
    assert "step 2/2 loss" in out.err
    assert main(["train", str(toml), "--print-config", "--set", "optimizer.lr=1e-3"]) == 0
    assert json.loads(capsys.readouterr().out)["optimizer"]["lr"] == 1e-3
    assert main(["train", str(toml), "--set", "optimizer.nope=1"]) == 2  # a config error: one line, status 2
    assert "optimizer.nope" in capsys.readouterr().err
    png = tmp_path / "loss.png"
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert main(["plot", str(metrics), "-o", str(png), "--metrics", "loss,lr,grad_norm"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
