"""Pipeline proof (issue 3, target a): a from-scratch tiny NVLM-D memorises 256 synthetic image questions, and the
answers collapse when the images are shuffled among the questions, so the image really reaches the decoder.

    python benchmarks/overfit_proof.py                  # ~1.5 min training on 2 CPU cores, writes into a temp dir
    python benchmarks/overfit_proof.py --out runs/overfit --steps 600 --threads 2

What it does, all through the public pieces (no training code of its own):
1. A ~0.48M-parameter model (`overfit_config`: 56-px tiles = 4 image tokens, a 2-layer 32-wide ViT, a 2-layer
   128-wide decoder, byte tokenizer, vocab 320) with random weights, saved in the official layout.
2. `nvlm.train.synthetic.write_dataset`: 256 single-tile (1x1) scenes, no text, one question each of the types that
   need the image (colour, shape, count, position, exist).
3. `nvlm train` on a TOML written next to the data (stage `sft`: decoder + `mlp1` learn, the random ViT stays
   frozen as SPEC 5 says), AdamW lr 3e-3 -> 3e-4, batch 32, 600 steps (75 epochs).
4. Greedy answers from `nvlm.load(OUT/final).generate`, scored with `synthetic.evaluate`, once with each question's
   own image and once with the images permuted among the questions (a derangement: no question keeps its image).

Baselines in the table: `majority` = the majority answer per question type; `question-only` = the best any
image-blind model can do on this set (the most common answer of each distinct question string; it is above the
majority because e.g. "What colour is the star at the top left?" occurs once or twice in 256 questions).
The last line of stdout is one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

QTYPES = ("colour", "shape", "count", "position", "exist")

TRAIN_TOML = """\
# nvlm train {out}/train.toml   (written by benchmarks/overfit_proof.py)
stage = "sft"
model = "{out}/base"
output_dir = "{out}/run"
seed = {seed}
device = "cpu"
dtype = "float32"
global_batch_size = {batch}
micro_batch_size = {batch}
save_every = 0
keep_last = 1
log_every = 100
resume = false

[data]
max_len = 512
max_tiles = 1
packing = false

[[data.sources]]
path = "{out}/data/train.jsonl"

[optimizer]
lr = {lr}
min_lr = {min_lr}
betas = [0.9, 0.98]
weight_decay = 0.0
warmup_steps = {warmup}
max_steps = {steps}
grad_clip = 1.0
"""


def overfit_config(tile_size: int = 56, hidden: int = 128, layers: int = 2, vision_hidden: int = 32):
    """The proof model: tiny preset shapes with a wider decoder, a byte vocabulary and one tile per image."""
    from nvlm.config import LLMConfig, NVLMConfig, VisionConfig

    return NVLMConfig(
        vision_config=VisionConfig(hidden_size=vision_hidden, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=2 * vision_hidden, patch_size=14, image_size=tile_size,
                                   num_dummy_heads=1, initializer_range=0.02),
        llm_config=LLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=2 * hidden, vocab_size=320,
                             max_position_embeddings=1024, rope_theta=10000.0),
        force_image_size=tile_size, max_dynamic_patch=1,
    ).validate()


def question_only_accuracy(records: list[dict]) -> float:
    """Accuracy of the best image-blind predictor on `records`: the most common answer of each question string."""
    from nvlm.train.synthetic import normalize_answer

    by_q: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_q[r["conversations"][0]["value"]][normalize_answer(r["conversations"][-1]["value"])] += 1
    return sum(c.most_common(1)[0][1] for c in by_q.values()) / len(records)


def derangement(n: int, seed: int) -> list[int]:
    rng = random.Random(f"overfit-proof/{seed}")
    perm = list(range(n))
    while n > 1 and any(perm[i] == i for i in range(n)):
        rng.shuffle(perm)
    return perm


def run_proof(out: str | Path, *, n: int = 256, steps: int = 600, lr: float = 3e-3, batch: int = 32,
              warmup: int = 20, seed: int = 0, tile_size: int = 56, hidden: int = 128, layers: int = 2,
              threads: int | None = 2, progress: bool = False) -> dict:
    """Build, train and evaluate under `out`; returns the numbers (see the module docstring)."""
    import torch

    import nvlm
    from nvlm.tokenizer import build_byte_tokenizer
    from nvlm.train.config import load_config
    from nvlm.train.synthetic import answer_questions, evaluate, read_jsonl, write_dataset
    from nvlm.train.trainer import Trainer
    from nvlm.weights import random_model, save_checkpoint

    if threads:
        torch.set_num_threads(threads)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = overfit_config(tile_size, hidden, layers)
    model = random_model(cfg, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, out / "base", tokenizer=build_byte_tokenizer(), dtype=torch.float32)
    write_dataset(out / "data", n_train=n, n_test=0, seed=seed, tile_size=tile_size, kinds=("qa",),
                  questions_per_image=1, weights=dict.fromkeys(QTYPES, 1.0), max_tiles=1, text_prob=0.0,
                  overwrite=True)
    toml = out / "train.toml"
    toml.write_text(TRAIN_TOML.format(out=out.as_posix(), seed=seed, batch=batch, lr=lr, min_lr=lr / 10,
                                      warmup=warmup, steps=steps))

    t0 = time.perf_counter()
    trainer = Trainer(load_config(toml), progress=progress)
    history = trainer.fit()
    train_s = time.perf_counter() - t0

    records = read_jsonl(out / "data" / "train.jsonl")
    images = [out / "data" / r["image"] for r in records]
    pipe = nvlm.load(out / "run" / "final", device="cpu", dtype="float32")
    t1 = time.perf_counter()

    def answers(imgs):
        return answer_questions(pipe, records, out / "data", images=imgs, batch=64, max_new_tokens=16)

    own = evaluate(list(zip(records, answers(images))))
    perm = derangement(len(records), seed)
    shuffled = evaluate(list(zip(records, answers([images[j] for j in perm]))))
    eval_s = time.perf_counter() - t1
    return {
        "n": len(records), "steps": steps, "epochs": steps * batch / len(records), "batch": batch, "lr": lr,
        "tile_size": tile_size, "params": n_params, "threads": torch.get_num_threads(),
        "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "accuracy": own["all"]["accuracy"], "shuffled_accuracy": shuffled["all"]["accuracy"],
        "majority_accuracy": own["all"]["majority_accuracy"],
        "question_only_accuracy": question_only_accuracy(records),
        "per_type": {t: {"n": own[t]["n"], "accuracy": own[t]["accuracy"],
                         "shuffled_accuracy": shuffled[t]["accuracy"],
                         "majority_accuracy": own[t]["majority_accuracy"],
                         "question_only_accuracy": question_only_accuracy([r for r in records if r["type"] == t])}
                     for t in QTYPES if t in own},
    }


def print_table(res: dict, file=sys.stdout) -> None:
    print(f"{'type':<10}{'n':>5}{'own image':>11}{'shuffled':>10}{'majority':>10}{'q-only':>8}", file=file)
    rows = list(res["per_type"].items()) + [("all", {
        "n": res["n"], "accuracy": res["accuracy"], "shuffled_accuracy": res["shuffled_accuracy"],
        "majority_accuracy": res["majority_accuracy"], "question_only_accuracy": res["question_only_accuracy"]})]
    for t, r in rows:
        print(f"{t:<10}{r['n']:>5}{r['accuracy']:>11.3f}{r['shuffled_accuracy']:>10.3f}"
              f"{r['majority_accuracy']:>10.3f}{r['question_only_accuracy']:>8.3f}", file=file)
    print(f"{res['params']:,} parameters, {res['n']} samples, {res['steps']} steps x batch {res['batch']} "
          f"({res['epochs']:.0f} epochs), {res['threads']} threads: train {res['train_s']} s, eval {res['eval_s']} s, "
          f"final loss {res['final_loss']:.4f}", file=file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output directory (default: a temporary one, removed afterwards)")
    p.add_argument("--n", type=int, default=256, help="training questions = images (default 256)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=56)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2; 0 = torch's default)")
    a = p.parse_args(argv)
    kw = dict(n=a.n, steps=a.steps, lr=a.lr, batch=a.batch, seed=a.seed, tile_size=a.tile_size, hidden=a.hidden,
              layers=a.layers, threads=a.threads or None, progress=sys.stderr.isatty())
    if a.out:
        res = run_proof(a.out, **kw)
    else:
        with tempfile.TemporaryDirectory(prefix="nvlm-overfit-") as tmp:
            res = run_proof(tmp, **kw)
    print_table(res)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
