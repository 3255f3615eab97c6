"""Train the tiny NVLM-D that nvlm ships as its default model, from scratch, on the synthetic shapes-and-text data.

    python recipes/train_tiny.py --out runs/tiny-nvlm            # the shipped model (see README for time/scores)
    python recipes/train_tiny.py --out runs/tiny-nvlm --install  # ... and copy it into nvlm/assets/tiny-nvlm
    python recipes/train_tiny.py --out runs/quick --scale 0.1    # a 10x shorter run (data and steps)

One command, everything through the public pieces (`nvlm synth`, `nvlm train` configs, `nvlm.load`):
1. Data (`nvlm.train.synthetic`, tile size 112, up to 6 tiles + thumbnail): OUT/data (scenes on every grid) and
   OUT/data-1x1 (1x1 scenes only, plus close-ups of single items: `zoom_close.jsonl`, an item filling 1/4-2/3 of
   the image, and `zoom.jsonl`, up to 5x its size), each with dense descriptions (`describe.jsonl`) and 4 questions
   per image grouped into one multi-turn conversation (`qa_multiturn.jsonl`: the image is encoded once for 4
   supervised answers). Both share the fixed held-out split `test.jsonl` (500 scenes on every grid, independent of
   the training size), used only for scoring.
2. Tokenizer: a byte-level BPE (at most 512 base ids; the corpus yields 404) learned from the training prompts and
   answers with the random text strings removed (so texts to read are always spelled one character per token),
   plus the Qwen2.5 added tokens.
3. Model (`tiny_model_config`): the NVLM-D architecture (InternViT-style ViT, pixel shuffle 0.5, 2-layer MLP
   projector, Qwen2 decoder), 112-px tiles with 14-px patches = 16 image tokens per tile, random initialisation.
4. Curriculum, all with the `full` stage (every parameter learns; the paper's stages keep a pretrained ViT frozen,
   which a from-scratch model does not have): stage 0 close-ups only; stage 1 1x1 scenes (questions, close-ups,
   descriptions); stage 2 every grid with the earlier data mixed in (exported in bf16, the shipped file).
5. Scores: greedy answers to every held-out question, exact match per question type and OCR per tile grid
   (`synthetic.evaluate`), written to OUT/scores.json and, with --install, next to the shipped model.

The last line of stdout is one JSON object with the configuration, the times and the scores.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSET_DIR = ROOT / "nvlm" / "assets" / "tiny-nvlm"

TILE = 112
SEED = 0
N_TEST = 500
QUESTIONS_PER_IMAGE = 4

STAGE_TOML = """\
# nvlm train {toml}   (written by recipes/train_tiny.py)
stage = "full"
model = "{model}"
output_dir = "{output_dir}"
seed = {seed}
device = "cpu"
dtype = "float32"
global_batch_size = {batch}
micro_batch_size = {micro}
save_every = {save_every}
keep_last = 1
log_every = 50
resume = true
export_dtype = "{export_dtype}"

[data]
max_len = 1024
max_tiles = {max_tiles}
packing = true
tile_tags = {tile_tags}
workers = 1
{sources}
[optimizer]
lr = {lr}
min_lr = {min_lr}
betas = [0.9, 0.98]
weight_decay = 0.01
warmup_steps = {warmup}
max_steps = {steps}
grad_clip = 1.0
"""


def tiny_model_config(vocab_size: int, *, max_tiles: int = 6):
    """The shipped model's shapes: ViT 128 x 4 layers, decoder 256 x 4 layers (GQA 4:2), 16 tokens per tile."""
    from nvlm.config import LLMConfig, NVLMConfig, VisionConfig

    return NVLMConfig(
        vision_config=VisionConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                   patch_size=14, image_size=TILE, num_dummy_heads=0, initializer_range=0.02),
        llm_config=LLMConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=768, vocab_size=vocab_size, max_position_embeddings=2048,
                             rope_theta=10000.0, tie_word_embeddings=False),
        force_image_size=TILE, max_dynamic_patch=max_tiles, torch_dtype="float32",
    ).validate()


def group_turns(qa_path: Path, out_path: Path) -> int:
    """One multi-turn conversation per image from single-question records (same order as the file)."""
    from nvlm.train.synthetic import multi_turn, read_jsonl

    by_image: dict[str, list[dict]] = defaultdict(list)
    for rec in read_jsonl(qa_path):
        by_image[rec["image"]].append(rec)
    with open(out_path, "w", encoding="utf-8") as f:
        for image, recs in by_image.items():
            conv = multi_turn((r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in recs)
            f.write(json.dumps({"id": recs[0]["id"].rsplit("-", 1)[0], "image": image, "conversations": conv}) + "\n")
    return len(by_image)


def tokenizer_corpus(data: Path) -> list[str]:
    """Prompts and answers of the training files without the texts to read (quoted strings, OCR answers)."""
    from nvlm.prompt import tile_tags

    texts = ["Answer the questions.", "<Image>", "</Image>"] + tile_tags(7)
    for name in ("describe.jsonl", "train.jsonl"):
        for line in (data / name).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            for turn in rec["conversations"]:
                if rec["type"] == "ocr" and turn["from"] == "gpt":
                    continue
                texts.append(re.sub(r"'[A-Z0-9]+'", "''", turn["value"].replace("<image>\n", "")))
    return texts


def stage_toml(out: Path, name: str, *, model: Path, sources: list[tuple[Path, float]], steps: int, lr: float,
               batch: int, micro: int, warmup: int, max_tiles: int, tile_tags: bool,
               export_dtype: str = "float32") -> Path:
    src = "".join(f'\n[[data.sources]]\npath = "{p.as_posix()}"\nweight = {w}\n' for p, w in sources)
    toml = out / f"{name}.toml"
    toml.write_text(STAGE_TOML.format(
        toml=toml.as_posix(), model=model.as_posix(), output_dir=(out / name).as_posix(), seed=SEED, batch=batch,
        micro=micro, save_every=max(50, steps // 10), max_tiles=max_tiles, tile_tags=str(tile_tags).lower(),
        sources=src, lr=lr, min_lr=lr / 20, warmup=warmup, steps=steps, export_dtype=export_dtype))
    return toml


def evaluate_model(pipe, data: Path, *, max_tiles: int | None = None, tile_tags: bool = True,
                   progress: bool = False) -> dict:
    """Greedy answers of `pipe` to the held-out questions of `data/test.jsonl`, scored per type and OCR grid."""
    from nvlm.train.synthetic import answer_questions, evaluate, read_jsonl

    records = read_jsonl(data / "test.jsonl")
    preds = answer_questions(pipe, records, data, max_tiles=max_tiles, tile_tags=tile_tags, progress=progress)
    return evaluate(list(zip(records, preds)), baseline_records=read_jsonl(data / "train.jsonl"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/tiny-nvlm", help="output directory (default runs/tiny-nvlm)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply data size and steps (default 1)")
    p.add_argument("--train-images", type=int, default=24000, help="stage-2 training images (all grids)")
    p.add_argument("--easy-images", type=int, default=12000, help="stage-1 training images (1x1 only)")
    p.add_argument("--stage0-steps", type=int, default=250)
    p.add_argument("--stage1-steps", type=int, default=500)
    p.add_argument("--stage2-steps", type=int, default=1100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--max-tiles", type=int, default=6, help="1 = thumbnail only (ablation)")
    p.add_argument("--no-tile-tags", action="store_true", help="train and score without tile tags (ablation)")
    p.add_argument("--ocr-weight", type=float, default=2.0, help="OCR question weight (others 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None, help="reuse this synthetic dataset directory (default OUT/data)")
    p.add_argument("--install", action="store_true", help=f"copy the final model into {ASSET_DIR.relative_to(ROOT)}")
    a = p.parse_args(argv)

    import torch

    import nvlm
    from nvlm.tokenizer import train_bpe_tokenizer
    from nvlm.train.config import load_config
    from nvlm.train.synthetic import QTYPES, write_dataset, write_zoom_dataset
    from nvlm.train.trainer import Trainer
    from nvlm.weights import random_model, save_checkpoint

    torch.set_num_threads(a.threads)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()
    times: dict[str, float] = {}
    tags = not a.no_tile_tags

    t0 = time.perf_counter()
    data = Path(a.data).resolve() if a.data else out / "data"
    easy = data.with_name(data.name + "-1x1")
    n_train = round(a.train_images * a.scale)
    n_easy = round(a.easy_images * a.scale)
    weights = dict.fromkeys(QTYPES, 1.0) | {"ocr": a.ocr_weight}
    for d, n, grids in ((data, n_train, None), (easy, n_easy, [(1, 1)])):
        if not (d / "meta.json").exists():
            write_dataset(d, n_train=n, n_test=N_TEST, seed=SEED, tile_size=TILE, max_tiles=6,
                          questions_per_image=QUESTIONS_PER_IMAGE, weights=weights, train_grids=grids,
                          overwrite=True, progress=progress)
        group_turns(d / "train.jsonl", d / "qa_multiturn.jsonl")
    for name, zoom in (("zoom_close", (1.1, 2.0)), ("zoom", (1.2, 5.0))):
        if not (easy / f"{name}.jsonl").exists():
            write_zoom_dataset(easy, n=n_easy // 2, seed=SEED, tile_size=TILE, zoom=zoom, name=name, progress=progress)
    times["data_s"] = time.perf_counter() - t0

    base = out / "base"
    if not (base / "config.json").exists():
        tok = train_bpe_tokenizer(tokenizer_corpus(data), vocab_size=512)
        cfg = tiny_model_config(-(-len(tok) // 32) * 32, max_tiles=a.max_tiles)
        save_checkpoint(random_model(cfg, seed=SEED), base, tokenizer=tok, dtype=torch.float32)

    s0 = round(a.stage0_steps * a.scale)
    s1 = round(a.stage1_steps * a.scale)
    s2 = round(a.stage2_steps * a.scale)
    common = dict(batch=a.batch, micro=a.micro, max_tiles=a.max_tiles, tile_tags=tags)
    stages = [
        # Stage 0: close-ups only (one item filling 1/4-2/3 of the image), short answers: the vision path learns to
        # see. (From scratch, an object that fills the image is learned in ~20 steps, one covering 1/40 of it not in
        # hundreds: the decoder's attention starts uniform over ~50 positions.)
        ("stage0", stage_toml(out, "stage0", model=base, sources=[(easy / "zoom_close.jsonl", 1.0)], steps=s0, lr=a.lr,
                              warmup=min(30, s0 // 5), **common)),
        # Stage 1: 1x1 scenes (one tile, text legible in it), questions and descriptions, close-ups kept in.
        ("stage1", stage_toml(out, "stage1", model=out / "stage0" / "final",
                              sources=[(easy / "qa_multiturn.jsonl", 2.0), (easy / "zoom.jsonl", 1.0),
                                       (easy / "zoom_close.jsonl", 0.5), (easy / "describe.jsonl", 0.5)],
                              steps=s1, lr=a.lr, warmup=min(50, s1 // 5), **common)),
        # Stage 2: every grid, up to 6 tiles + thumbnail; the earlier data mixed in.
        ("stage2", stage_toml(out, "stage2", model=out / "stage1" / "final",
                              sources=[(data / "qa_multiturn.jsonl", 3.0), (data / "describe.jsonl", 0.5),
                                       (easy / "zoom.jsonl", 0.5), (easy / "qa_multiturn.jsonl", 0.5)],
                              steps=s2, lr=a.lr, warmup=min(50, s2 // 10), export_dtype="bfloat16", **common)),
    ]
    history = {}
    for name, toml in stages:
        if not (out / name / "final" / "config.json").exists():
            Trainer(load_config(toml), progress=progress).fit()
        # Time and loss from the metrics (also right when an earlier invocation did the training, or resumed).
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        times[f"{name}_s"] = sum(r["step_time_s"] for r in rows)
        history[name] = round(rows[-1]["loss"], 4) if rows else None
        print(f"{name}: {len(rows)} steps, {times[f'{name}_s'] / 60:.1f} min, final loss {history[name]}",
              file=sys.stderr)

    final = out / "stage2" / "final"
    t = time.perf_counter()
    pipe = nvlm.load(final, device="cpu", dtype="float32")
    scores = evaluate_model(pipe, data, max_tiles=a.max_tiles, tile_tags=tags, progress=progress)
    times["eval_s"] = time.perf_counter() - t
    n_params = sum(v.numel() for v in pipe.model.state_dict().values())

    print(f"{'group':<12}{'n':>5}{'accuracy':>10}{'majority':>10}")
    for g, r in scores.items():
        print(f"{g:<12}{r['n']:>5}{r['accuracy']:>10.3f}{r['majority_accuracy']:>10.3f}")
    non_ocr = [r for g, r in scores.items() if g in ("colour", "shape", "count", "position", "exist")]
    summary = {
        "params": n_params, "train_images": n_train, "stage0_steps": s0, "stage1_steps": s1,
        "stage2_steps": s2, "batch": a.batch, "lr": a.lr, "max_tiles": a.max_tiles, "tile_tags": tags,
        "threads": torch.get_num_threads(), "final_loss": history,
        "minutes": {k: round(v / 60, 2) for k, v in times.items()},
        "train_minutes": round(sum(v for k, v in times.items() if k.startswith("stage")) / 60, 1),
        "non_ocr_accuracy": sum(r["accuracy"] * r["n"] for r in non_ocr) / max(1, sum(r["n"] for r in non_ocr)),
        "scores": {g: {"n": r["n"], "accuracy": round(r["accuracy"], 4),
                       "majority_accuracy": round(r["majority_accuracy"], 4)} for g, r in scores.items()},
        "command": "python recipes/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": json.loads((data / "meta.json").read_text())["params"],
    }
    (out / "scores.json").write_text(json.dumps(summary, indent=1) + "\n")
    if a.install:
        tmp = ASSET_DIR.with_name(ASSET_DIR.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, tmp)  # what was scored: stage 2 exports bf16
        (tmp / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
        shutil.rmtree(ASSET_DIR, ignore_errors=True)
        tmp.rename(ASSET_DIR)
        print(f"installed {ASSET_DIR}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
