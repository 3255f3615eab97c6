"""Multi-process and crash tests (slow): `torchrun` with 2 gloo ranks on 127.0.0.1 against one process, and a run
killed with SIGKILL after a checkpoint landed, resumed, against an uninterrupted run. Tiny preset, CPU, fp32."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from nvlm.config import preset
from nvlm.tokenizer import build_byte_tokenizer
from nvlm.train.checkpoint import MARKER, latest_checkpoint
from nvlm.train.config import load_config
from nvlm.train.trainer import Trainer
from nvlm.weights import load_checkpoint, random_model, save_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
KEYS = ("step", "loss", "lr", "grad_norm", "supervised_tokens", "tokens")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint and 48 records, every second one with a drawn image (1 or 2 tiles + thumbnail)."""
    root = tmp_path_factory.mktemp("dist")
    base = save_checkpoint(random_model(preset("tiny", vocab_size=320), seed=0), root / "tiny",
                           tokenizer=build_byte_tokenizer(), dtype=torch.float32)
    rng = random.Random(1)
    lines = []
    for i in range(48):
        if i % 2 == 0:
            name, rgb = rng.choice([("red", (220, 40, 40)), ("blue", (40, 90, 220)), ("green", (40, 160, 70))])
            im = Image.new("RGB", rng.choice([(56, 56), (112, 56)]), (250, 250, 250))
            ImageDraw.Draw(im).rectangle([8, 8, 40, 40], fill=rgb)
            im.save(root / f"img{i}.png")
            lines.append({"image": f"img{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": name}]})
        else:
            a, b = rng.randrange(50), rng.randrange(50)
            lines.append({"messages": [{"role": "user", "content": f"{a}+{b}="},
                                       {"role": "assistant", "content": str(a + b)}]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return base, data


def write_config(path: Path, base: Path, data: Path, out: Path, **top) -> Path:
    """A TOML run config; `top` holds extra top-level keys, `data_`/`optimizer_`/`lora_` prefixed ones go below."""
    tables: dict[str, dict] = {"": {"stage": "sft", "model": str(base), "output_dir": str(out), "device": "cpu",
                                    "global_batch_size": 4, "micro_batch_size": 2, "save_every": 0, "log_every": 1},
                               "data": {"max_tiles": 3, "max_len": 1024},
                               "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "max_steps": 3}}
    for k, v in top.items():
        table, key = k.split("_", 1) if k.startswith(("data_", "optimizer_", "lora_")) else ("", k)
        tables.setdefault(table, {})[key] = v

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    text = "".join(f"{k} = {value(v)}\n" for k, v in tables.pop("").items())
    for name, kv in tables.items():
        text += f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items())
    text += f'[[data.sources]]\npath = "{data}"\n'
    path.write_text(text)
    return path


def env() -> dict[str, str]:
    # one thread per process: the same kernels in every run, and 2 ranks fit on 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(config: Path, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    # rendezvous on 127.0.0.1 port 0: the agent binds a free port itself (no pick-then-bind race with other tests)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", config.stem,
           "-m", "nvlm", "train", str(config), "--progress", "off"]
    for attempt in range(2):
        res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
        if res.returncode == 0 or "address already in use" not in res.stderr.lower():
            break  # retry only a port clash with another process on this machine
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def metrics(out: Path) -> list[dict]:
    return [{k: m[k] for k in KEYS} for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("variant", [
    {},  # full SFT, padded micro-batches
    {"data_packing": True, "data_max_tokens": 1024, "lora_r": 4, "lora_projector": True},  # packed rows, LoRA
    {"stage": "pretrain", "data_max_tiles": 1},  # only mlp1 learns: its gradient must be reduced on every rank
], ids=["sft", "packed-lora", "pretrain"])
def test_two_ranks_match_one(setup, tmp_path, variant):
    base, data = setup
    one = Trainer(load_config(write_config(tmp_path / "one.toml", base, data, tmp_path / "one", **variant)))
    ref = [{k: m[k] for k in KEYS} for m in one.fit()]
    two = torchrun(write_config(tmp_path / "two.toml", base, data, tmp_path / "two", micro_batch_size=1, **variant))
    got = metrics(tmp_path / "two")
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(ref, got):
        assert b["supervised_tokens"] == a["supervised_tokens"] and b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-5)
        assert b["lr"] == a["lr"]
    assert "step 3/3 loss" in two.stderr
    # rank 0 gathered the sharded model into the official layout
    wa = load_checkpoint(tmp_path / "one" / "final").state_dict()
    wb = load_checkpoint(tmp_path / "two" / "final").state_dict()
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def test_two_ranks_resume_exactly(setup, tmp_path):
    """Sharded (DCP) model/optimizer state, per-rank data streams and per-rank RNG (LoRA dropout) come back."""
    base, data = setup
    kw = dict(micro_batch_size=1, save_every=2, keep_last=0, optimizer_max_steps=4, lora_r=4, lora_dropout=0.3,
              data_packing=True, data_max_tokens=1024)
    full = tmp_path / "full"
    torchrun(write_config(tmp_path / "full.toml", base, data, full, **kw))
    part = tmp_path / "part"
    shutil.copytree(full, part)  # the same run as if it had died right after its step-2 checkpoint
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "checkpoints" / "step_00000004")
    res = torchrun(write_config(tmp_path / "part.toml", base, data, part, **kw))
    assert "resuming from" in res.stderr and "step_00000002" in res.stderr
    assert metrics(part) == metrics(full)
    a, b = load_checkpoint(full / "final").state_dict(), load_checkpoint(part / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_and_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
    base, data = setup
    steps = 10
    kw = dict(save_every=2, keep_last=0, global_batch_size=8, micro_batch_size=4, optimizer_max_steps=steps,
              optimizer_warmup_steps=2)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    cmd = [sys.executable, "-m", "nvlm", "train", "--progress", "off"]
    res = subprocess.run(cmd + [str(write_config(tmp_path / "ref.toml", base, data, ref_out, **kw))], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]

    config = write_config(tmp_path / "run.toml", base, data, out, **kw)
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd + [str(config)], env=env(), stdout=subprocess.DEVNULL, stderr=err)
    marker = out / "checkpoints" / "step_00000002" / MARKER
    deadline = time.monotonic() + 90
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    last = latest_checkpoint(out)
    done = int(last.name.split("_")[1])
    assert 2 <= done < steps

    # debris a crash can leave: a newer checkpoint without its marker, a half-written temp directory
    shutil.copytree(last, last.parent / f"step_{done + 1:08d}")
    (last.parent / f"step_{done + 1:08d}" / MARKER).unlink()
    (last.parent / f".step_{done + 2:08d}.tmp").mkdir()

    res = subprocess.run(cmd + [str(config)], env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resuming from {last}" in res.stderr
    assert metrics(out) == metrics(ref_out)  # identical: same data order, weights, optimizer and RNG state
    a, b = load_checkpoint(ref_out / "final").state_dict(), load_checkpoint(out / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
