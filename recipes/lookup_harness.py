"""A short decoder run on one-tile scenes that measures how the attention supervision of the tiny-model recipe
changes what the decoder learns: the harness behind the README's findings table.

    python recipes/train_tiny.py --out runs/tiny-nvlm                                  # stage V's ViT comes from here
    python recipes/lookup_harness.py --vision runs/tiny-nvlm/vision --out runs/harness/both
    python recipes/lookup_harness.py --vision runs/tiny-nvlm/vision --out runs/harness/no-hop --answer-head ''

One `nvlm train` stage (the recipe's settings: stage `sft` with the ViT frozen, batch 32, lr 1e-3 -> 5e-5, bf16
autocast where the CPU has it natively (`--dtype`), packing, attention loss weight 1) on 1x1 scenes with up to 6
shapes and texts in 70% of them (questions of every type but OCR, 4 per image as one conversation), from a recipe
run's stage-V checkpoint; then greedy
answers to the non-OCR questions about 600 unseen 1x1 scenes (their own seed, not the held-out split of the
shipped model), scored per question type and per question form. The supervision is the recipe's: the one-word
lookups at the `[attention_loss]` table's head (layer 0, head 0), `--object-head` and `--answer-head` as in
`recipes/train_tiny.py` ('' switches one off). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_tiny  # noqa: E402

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", required=True, help="a stage-V checkpoint (a recipe run's OUT/vision)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--object-head", default="1,0", metavar="LAYER,HEAD")
    p.add_argument("--answer-head", default="2,0", metavar="LAYER,HEAD")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto = bf16 autocast on a CPU with native bf16, else float32 (train_tiny.resolve_dtype)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    import torch

    import nvlm
    from nvlm.train.config import load_config
    from nvlm.train.synthetic import QTYPES, answer_questions, evaluate, read_jsonl, write_dataset
    from nvlm.train.trainer import Trainer

    torch.set_num_threads(a.threads)
    object_at = train_tiny.layer_head_arg(p, "--object-head", a.object_head)
    answer_at = train_tiny.layer_head_arg(p, "--answer-head", a.answer_head)
    if answer_at and not object_at:
        p.error("--answer-head needs --object-head")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = dict(tile_size=train_tiny.TILE, questions_per_image=train_tiny.QUESTIONS_PER_IMAGE, text_scale=2,
                  kinds=("qa",))
    train_dir, eval_dir = out / "train-data", out / "eval-data"
    if not (train_dir / "meta.json").exists():
        write_dataset(train_dir, n_train=a.steps * a.batch, n_test=train_tiny.N_TEST, seed=train_tiny.SEED,
                      max_tiles=6, train_grids=[(1, 1)], train_max_objects=6, weights=dict.fromkeys(QTYPES, 1.0),
                      attend=True, attend_object_at=object_at, attend_answer_at=answer_at, overwrite=True, **common)
    if not (eval_dir / "meta.json").exists():
        write_dataset(eval_dir, n_train=0, n_test=600, seed=1, max_tiles=1, overwrite=True, **common)
    turns = train_dir / "qa_multiturn-no-ocr.jsonl"
    if not turns.exists():
        train_tiny.group_turns(train_dir / "train.jsonl", turns, set(train_tiny.NON_OCR))
    toml = train_tiny.stage_toml(out, "stage", model=Path(a.vision).resolve(), sources=[(turns, 1.0)], steps=a.steps,
                                 lr=a.lr, min_lr=a.lr / 20, batch=a.batch, micro=a.batch, warmup=min(50, a.steps // 5),
                                 max_tiles=6, tile_tags=True, attention_weight=1.0,
                                 dtype=train_tiny.resolve_dtype(a.dtype))
    if not (out / "stage" / "final" / "config.json").exists():
        Trainer(load_config(toml), progress=sys.stderr.isatty()).fit()
    rows = [json.loads(line) for line in (out / "stage" / "metrics.jsonl").read_text().splitlines()]

    t = time.perf_counter()
    records = [r for r in read_jsonl(eval_dir / "test.jsonl") if r["type"] in train_tiny.NON_OCR]
    pipe = nvlm.load(out / "stage" / "final", device="cpu", dtype="float32")
    preds = answer_questions(pipe, records, eval_dir)
    scores = evaluate(list(zip(records, preds)))
    forms = train_tiny.form_scores(records, preds)
    print(f"{'type / form':<46}{'n':>6}{'accuracy':>10}")
    for g in (*train_tiny.NON_OCR, "all"):
        print(f"{g:<46}{scores[g]['n']:>6}{scores[g]['accuracy']:>10.3f}")
    for name, r in forms.items():
        print(f"  {name:<44}{r['n']:>6}{r['accuracy']:>10.3f}")
    print(json.dumps({
        "vision": a.vision, "steps": a.steps, "batch": a.batch, "lr": a.lr,
        "object_head": list(object_at) if object_at else None, "answer_head": list(answer_at) if answer_at else None,
        "train_minutes": round(sum(r["step_time_s"] for r in rows) / 60, 1), "eval_s": round(time.perf_counter() - t),
        "non_ocr": round(scores["all"]["accuracy"], 4),
        "types": {g: round(scores[g]["accuracy"], 4) for g in train_tiny.NON_OCR},
        "forms": {name: r["accuracy"] for name, r in forms.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
