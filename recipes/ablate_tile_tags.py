"""Tile-tag ablation at toy scale (the paper's Table 1 claim): the full-grid stages of the tiny-model recipe (s2 and
s3, the only ones with multi-tile images) run three times from the same s1 model on the same data, (1) with tile
tags, (2) without tags (the tiles' tokens follow each other inside <Image>...</Image>), (3) thumbnail only (1 tile:
the whole image at 112 px), scored on the held-out OCR questions, overall and per tile grid (and the other types).

    python recipes/train_tiny.py --out runs/tiny-nvlm                                 # the full recipe first
    python recipes/ablate_tile_tags.py --from-run runs/tiny-nvlm --full-steps 500     # three shorter s2 (+ s3) stages

Stage V and s1 (the ViT and the 1x1 decoder stage) are shared, so the arms differ only where multi-tile images
appear. Each arm is `recipes/train_tiny.py` with the same seed, data, model and steps; only how
the image reaches the decoder differs. The last line of stdout is one JSON object with the three arms' scores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_tiny  # noqa: E402

ARMS = {"tags": [], "no-tags": ["--no-tile-tags"], "thumbnail-only": ["--max-tiles", "1"]}
GRIDS = ("1x1", "2x1", "1x2", "2x2", "3x2", "2x3")


def full_minutes(summary: dict) -> float:
    """Minutes of steps of the full-grid stages (the only ones the arms differ in) in a train_tiny.py summary."""
    return sum(summary["minutes"][f"{name}_s"] for name in train_tiny.FULL_STAGES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--from-run", default="runs/tiny-nvlm", help="a train_tiny.py run: its data, ViT and 1x1 stages")
    p.add_argument("--full-steps", type=int, default=500, help="steps of the first full-grid stage in each arm; the "
                   "later ones run in the recipe's proportion to it")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    a, rest = p.parse_known_args(argv)
    out = Path(a.out).resolve()
    src = Path(a.from_run).resolve()
    shared = list(train_tiny.ONE_TILE_STAGES)
    full = {c[0]: c[4] for c in train_tiny.CURRICULUM if c[0] in train_tiny.FULL_STAGES}
    if not (src / shared[-1] / "final" / "config.json").exists():
        p.error(f"{src} has no finished stage {shared[-1]}; run recipes/train_tiny.py --out {a.from_run} first")
    run_steps = json.loads((src / "scores.json").read_text())["stage_steps"]
    steps = [run_steps[c] for c in shared] + [
        max(1, round(a.full_steps * n / full[train_tiny.FULL_STAGES[0]])) for n in full.values()]
    results = {}
    for arm in a.arms.split(","):
        if arm not in ARMS:
            p.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
        (out / arm).mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "vision_summary.json", out / arm / "vision_summary.json")
        for part in ("vision", *shared):
            if not (out / arm / part).exists():
                shutil.copytree(src / part, out / arm / part, ignore=shutil.ignore_patterns("checkpoints"))
        args = ["--out", str(out / arm), "--data", str(src / "data"), "--stage-steps", ",".join(map(str, steps)),
                *ARMS[arm], *rest]
        print(f"== {arm}: python recipes/train_tiny.py {' '.join(args)}", file=sys.stderr)
        train_tiny.main(args)
        results[arm] = json.loads((out / arm / "scores.json").read_text())

    print(f"{'arm':<16}{'ocr':>7}" + "".join(f"{'ocr/' + g:>9}" for g in GRIDS) + f"{'non-ocr':>9}{'train min':>10}")
    for arm, r in results.items():
        s = r["scores"]
        print(f"{arm:<16}{s['ocr']['accuracy']:>7.3f}"
              + "".join(f"{s.get('ocr/' + g, {}).get('accuracy', float('nan')):>9.3f}" for g in GRIDS)
              + f"{r['non_ocr_accuracy']:>9.3f}{r['train_minutes']:>10.1f}")
    # the other question types per arm, and the minutes of the stages the arms differ in
    print(f"{'arm':<16}" + "".join(f"{t:>10}" for t in train_tiny.NON_OCR) + f"{'full min':>10}")
    for arm, r in results.items():
        print(f"{arm:<16}" + "".join(f"{r['scores'][t]['accuracy']:>10.3f}" for t in train_tiny.NON_OCR)
              + f"{full_minutes(r):>10.1f}")
    print(json.dumps({"from_run": a.from_run, "full_steps": a.full_steps, "arms": {
        arm: {"ocr": r["scores"]["ocr"]["accuracy"], "non_ocr": round(r["non_ocr_accuracy"], 4),
              "ocr_by_grid": {g: r["scores"][f"ocr/{g}"]["accuracy"] for g in GRIDS if f"ocr/{g}" in r["scores"]},
              "types": {t: r["scores"][t]["accuracy"] for t in train_tiny.NON_OCR},
              "train_minutes": r["train_minutes"], "full_stage_minutes": round(full_minutes(r), 2)}
        for arm, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
