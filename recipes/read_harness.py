"""A reading stage on top of a trained tiny model: can attention supervision per character teach it OCR? The
experiment behind the README's OCR findings, and a starting point for whoever takes OCR further.

    python recipes/read_harness.py --out runs/read                      # from the shipped model, 300 steps, ViT too
    python recipes/read_harness.py --out runs/read-frozen --stage sft   # the same with the ViT frozen

One `nvlm train` stage from `--model` on the recipe's full data (every grid, 4 questions per image as one
conversation, OCR questions included at weight 2; the first steps x batch images of `train_tiny.py`'s dataset, whose
held-out split it shares), with the recipe's three supervised heads plus one more (`--ocr-head`): from the position
that predicts the j-th character of an OCR answer to the j-th glyph's image tokens (`synthetic.ocr_entries`, entries
`{"answer_token": j, "boxes": [glyph j]}`). Stage `full` (default) also trains the ViT, which NVLM-D keeps frozen:
the toy's ViT never saw words, so it is given the chance to re-encode glyphs for the decoder. Scored greedily on
the 2,000 held-out questions, with OCR also per character position, and `glyph_probe` (what a linear map reads
from one image token) on the start and final models. The last line of stdout is one JSON object.

    python recipes/read_harness.py --out runs/probe --probe-only                 # the probe of the shipped model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_tiny  # noqa: E402


def char_scores(records: list[dict], preds: list[str]) -> dict:
    """OCR answers character by character: {"exact", "length", "by_position": {j: share right at position j}}."""
    right, seen = defaultdict(int), defaultdict(int)
    exact = length = 0
    for r, pred in zip(records, preds):
        truth, pred = r["conversations"][-1]["value"].strip(), pred.strip()
        exact += pred == truth
        length += len(pred) == len(truth)
        for j, ch in enumerate(truth):
            seen[j] += 1
            right[j] += j < len(pred) and pred[j] == ch
    n = max(1, len(records))
    return {"n": len(records), "exact": round(exact / n, 4), "length": round(length / n, 4),
            "by_position": {j: round(right[j] / seen[j], 4) for j in sorted(seen)}}


def glyph_probe(model_dir: str | Path, *, scenes: int = 1500, seed: int = 5, steps: int = 400) -> dict:
    """How well a linear map reads glyphs from a model's image tokens: on the full-resolution tiles of `scenes` random
    scenes with text, every token that holds a glyph centre, target = the leftmost such glyph's character; a softmax
    probe trained on 80% of the tokens, scored on the rest, for the ViT output after pixel shuffle (the projector's
    input) and for the projector's output (what the decoder gets). Also how often the prediction is *a* character of
    the token. What the decoder could read from one attended token, at best linearly."""
    import random

    import numpy as np
    import torch

    from nvlm.image import preprocess
    from nvlm.model import pixel_shuffle
    from nvlm.train import synthetic as S
    from nvlm.weights import load_checkpoint

    model = load_checkpoint(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    tile, patch = cfg.force_image_size, cfg.vision_config.patch_size
    side, tok = tile // patch, 2 * patch  # patches per tile side; token side in pixels (pixel shuffle 0.5)
    rng = random.Random(seed)
    feats: dict[str, list] = {"vit": [], "projector": []}
    leftmost, present = [], []
    for _ in range(scenes):
        scene = S.generate_scene(rng, tile_size=tile, text_prob=1.0, text_scale=2)
        img = preprocess(S.render(scene), max_tiles=cfg.max_dynamic_patch, image_size=tile)
        with torch.no_grad():
            x = model.vision_model(img.pixel_values.float(), cfg.select_layer)[:, 1:]
            vit = pixel_shuffle(x.reshape(len(x), side, side, -1), cfg.downsample_ratio, cfg.ps_version)
            vit = vit.reshape(len(x), -1, vit.shape[-1])
            proj = model.mlp1(vit)
        glyphs = [g for t in scene.texts for g in S.glyph_centres(scene, t)]
        for v, (sx, sy, ox, oy) in enumerate(S.tile_views(scene.size, tile_size=tile, max_tiles=cfg.max_dynamic_patch)):
            if min(sx, sy) < S.MIN_GLYPH_SCALE:  # the thumbnail
                continue
            tokens: dict[int, list] = {}
            for gx, gy, ch in glyphs:
                x_, y_ = gx * sx - ox, gy * sy - oy
                if 0 <= x_ < tile and 0 <= y_ < tile:
                    tokens.setdefault(int(y_ // tok) * (tile // tok) + int(x_ // tok), []).append((x_, ch))
            for k, chars in tokens.items():
                feats["vit"].append(vit[v, k].numpy())
                feats["projector"].append(proj[v, k].numpy())
                leftmost.append(S.TEXT_CHARS.index(min(chars)[1]))
                present.append({S.TEXT_CHARS.index(c) for _, c in chars})
    y = torch.tensor(leftmost)
    cut = int(0.8 * len(y))
    out = {"tokens": len(y), "glyphs_per_token": round(float(np.mean([len(s) for s in present])), 2),
           "chance": round(1 / len(S.TEXT_CHARS), 4)}
    torch.manual_seed(seed)
    for name, rows in feats.items():
        x = torch.tensor(np.array(rows))
        x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-6)
        w = torch.zeros(x.shape[1], len(S.TEXT_CHARS), requires_grad=True)
        b = torch.zeros(len(S.TEXT_CHARS), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-4 * (w ** 2).sum()
            loss.backward()
            opt.step()
        pred = (x[cut:] @ w + b).argmax(1).tolist()
        out[name] = {"leftmost": round(sum(p == t for p, t in zip(pred, y[cut:].tolist())) / len(pred), 4),
                     "any": round(sum(p in s for p, s in zip(pred, present[cut:])) / len(pred), 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=str(train_tiny.ASSET_DIR), help="where to start (default: the shipped model)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="peak lr (floor 5e-5)")
    p.add_argument("--stage", choices=("full", "sft"), default="full", help="full: the ViT learns too (default)")
    p.add_argument("--ocr-head", default="3,0", metavar="LAYER,HEAD", help="the head that looks from answer "
                   "character j at glyph j (default %(default)s)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto = bf16 autocast on a CPU with native bf16, else float32 (train_tiny.resolve_dtype)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--probe-only", action="store_true", help="only the linear glyph probe of --model (glyph_probe)")
    a = p.parse_args(argv)

    import torch

    import nvlm
    from nvlm.train.config import load_config
    from nvlm.train.synthetic import QTYPES, answer_questions, evaluate, read_jsonl, write_dataset
    from nvlm.train.trainer import Trainer

    torch.set_num_threads(a.threads)
    if a.probe_only:
        print(json.dumps({"model": a.model, "probe": glyph_probe(a.model)}))
        return 0
    ocr_at = train_tiny.layer_head_arg(p, "--ocr-head", a.ocr_head)
    if ocr_at is None:
        p.error("--ocr-head: give LAYER,HEAD (the experiment is about that head)")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "meta.json").exists():
        write_dataset(data, n_train=a.steps * a.batch, n_test=train_tiny.N_TEST, seed=train_tiny.SEED,
                      tile_size=train_tiny.TILE, max_tiles=6, questions_per_image=train_tiny.QUESTIONS_PER_IMAGE,
                      text_scale=2, kinds=("qa",), weights=dict.fromkeys(QTYPES, 1.0) | {"ocr": 2.0}, attend=True,
                      attend_object_at=(1, 0), attend_answer_at=(2, 0), attend_ocr_at=ocr_at, overwrite=True,
                      progress=sys.stderr.isatty())
    turns = data / "qa_multiturn.jsonl"
    if not turns.exists():
        train_tiny.group_turns(data / "train.jsonl", turns)
    toml = train_tiny.stage_toml(out, "stage", model=Path(a.model).resolve(), sources=[(turns, 1.0)], steps=a.steps,
                                 lr=a.lr, min_lr=5e-5, batch=a.batch, micro=a.batch, warmup=min(30, a.steps // 5),
                                 max_tiles=6, tile_tags=True, attention_weight=1.0,
                                 dtype=train_tiny.resolve_dtype(a.dtype), stage=a.stage)
    if not (out / "stage" / "final" / "config.json").exists():
        Trainer(load_config(toml), progress=sys.stderr.isatty()).fit()
    rows = [json.loads(line) for line in (out / "stage" / "metrics.jsonl").read_text().splitlines()]

    t = time.perf_counter()
    records = read_jsonl(data / "test.jsonl")
    pipe = nvlm.load(out / "stage" / "final", device="cpu", dtype="float32")
    preds = answer_questions(pipe, records, data)
    scores = evaluate(list(zip(records, preds)))
    ocr = [(r, pr) for r, pr in zip(records, preds) if r["type"] == "ocr"]
    chars = char_scores([r for r, _ in ocr], [pr for _, pr in ocr])
    print(f"{'type':<12}{'n':>6}{'accuracy':>10}")
    for g in (*train_tiny.NON_OCR, "ocr"):
        print(f"{g:<12}{scores[g]['n']:>6}{scores[g]['accuracy']:>10.3f}")
    print("OCR characters right by position: " + ", ".join(f"{j}: {v:.3f}" for j, v in chars["by_position"].items())
          + f" (chance {1 / 32:.3f}); answer length right {chars['length']:.3f}")
    for r, pr in ocr[:8]:
        print(f"  {r['conversations'][-1]['value']!r:>8} -> {pr!r}")
    probes = {"start": glyph_probe(a.model), "final": glyph_probe(out / "stage" / "final")}
    for name, pr in probes.items():
        print(f"linear glyph probe, {name} model: leftmost glyph of a token from the ViT output "
              f"{pr['vit']['leftmost']:.3f}, from the projector output {pr['projector']['leftmost']:.3f} "
              f"({pr['tokens']} tokens, {pr['glyphs_per_token']} glyphs each on average, chance {pr['chance']:.3f})")
    print(json.dumps({
        "model": a.model, "stage": a.stage, "steps": a.steps, "batch": a.batch, "lr": a.lr, "ocr_head": list(ocr_at),
        "dtype": train_tiny.resolve_dtype(a.dtype),
        "train_minutes": round(sum(r["step_time_s"] for r in rows) / 60, 1), "eval_s": round(time.perf_counter() - t),
        "final_attention_loss": rows[-1].get("attention_loss"),
        "non_ocr": round(train_tiny.non_ocr_accuracy(scores), 4),
        "ocr": scores["ocr"]["accuracy"], "ocr_chars": chars, "probe": probes,
        "types": {g: round(scores[g]["accuracy"], 4) for g in train_tiny.NON_OCR}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
