"""Training throughput: real (non-pad) tokens/s of `nvlm train` steps for the `tiny` and `100m` presets, with and
without sequence packing, on synthetic image + text conversations (`nvlm synth`). Stage `sft` (LLM + projector
trained, ViT frozen), fp32 on CPU (bf16 autocast on CUDA), one process. The first step is a warm-up and is not
counted. `--dtypes float32 bfloat16` also runs every case with bf16 autocast and reports bf16's speed relative to
fp32 (on a CPU without native bf16 PyTorch emulates it: `nvlm.train.trainer.cpu_has_native_bf16`). A table, then
one JSON line.

    python benchmarks/bench_train.py [--presets tiny 100m] [--steps 3] [--batch 8] [--dtypes auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402


def run(preset_name: str, packing: bool, root: Path, steps: int, batch: int, dtype: str = "auto") -> dict:
    from nvlm.config import preset
    from nvlm.tokenizer import build_byte_tokenizer
    from nvlm.train.config import load_config
    from nvlm.train.synthetic import write_dataset
    from nvlm.train.trainer import Trainer
    from nvlm.weights import random_model, save_checkpoint

    cfg = preset(preset_name, vocab_size=320)  # byte-level vocabulary: the cost is the model, not a huge head
    base = root / f"{preset_name}-base"
    if not base.exists():
        save_checkpoint(random_model(cfg, seed=0), base, tokenizer=build_byte_tokenizer())
    data = root / f"synth-{cfg.image_size}"
    if not data.exists():
        write_dataset(data, n_train=64, n_test=0, seed=0, tile_size=cfg.image_size, max_tiles=1)
    out = root / f"run-{preset_name}-{'packed' if packing else 'padded'}-{dtype}"
    conf = load_config(data={
        "stage": "sft", "model": str(base), "output_dir": str(out), "device": "auto", "dtype": dtype,
        "global_batch_size": batch, "micro_batch_size": batch, "save_every": 10_000, "log_every": 10_000,
        "data": {"max_len": 1024, "max_tiles": 1, "packing": packing, "max_tokens": 1024,
                 "sources": [{"path": str(data / "describe.jsonl"), "weight": 1.0},
                             {"path": str(data / "train.jsonl"), "weight": 1.0}]},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 1, "max_steps": steps + 1}})
    trainer = Trainer(conf, progress=False)
    trainer.step()  # warm-up
    metrics = [trainer.step() for _ in range(steps)]
    tokens = sum(m["tokens"] for m in metrics)
    seconds = sum(m["step_time_s"] for m in metrics)
    return {"preset": preset_name, "packing": packing, "dtype": dtype, "params": sum(p.numel() for p in trainer.model.parameters()),
            "tokens_per_s": tokens / seconds, "samples_per_s": steps * batch / seconds,
            "efficiency": sum(m["efficiency"] for m in metrics) / len(metrics)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "100m"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                    help="trainer dtypes to run (default auto: fp32 on CPU, bf16 autocast on CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            for dtype in args.dtypes:
                for packing in (False, True):
                    results.append(run(name, packing, Path(tmp), args.steps, args.batch, dtype))
    rows = [(r["preset"], f"{r['params'] / 1e6:.1f}M", r["dtype"], "packed" if r["packing"] else "padded",
             f"{r['tokens_per_s']:.0f}", f"{r['samples_per_s']:.2f}", f"{r['efficiency']:.2f}") for r in results]
    print(f"stage sft, batch {args.batch}, {args.threads} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    summary = {"benchmark": "train", "dtypes": args.dtypes}
    first = args.dtypes[0]
    for name in args.presets:
        pad = next(r for r in results if r["preset"] == name and not r["packing"] and r["dtype"] == first)
        pack = next(r for r in results if r["preset"] == name and r["packing"] and r["dtype"] == first)
        summary[f"{name}_tokens_per_s_padded"] = round(pad["tokens_per_s"])
        summary[f"{name}_tokens_per_s_packed"] = round(pack["tokens_per_s"])
        summary[f"{name}_packing_speedup"] = round(pack["tokens_per_s"] / pad["tokens_per_s"], 2)
        if {"float32", "bfloat16"} <= set(args.dtypes):
            speed = {r["dtype"]: r["tokens_per_s"] for r in results if r["preset"] == name and r["packing"]}
            summary[f"{name}_bf16_vs_fp32_packed"] = round(speed["bfloat16"] / speed["float32"], 3)
    emit(rows, ("preset", "params", "dtype", "batching", "tokens/s", "samples/s", "fill"), summary)


if __name__ == "__main__":
    main()
