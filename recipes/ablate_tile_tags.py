"""Tile-tag ablation at toy scale (the paper's Table 1 claim): the tiny-model recipe trained three times on the same
data, (1) with tile tags, (2) without tags (the tiles' tokens follow each other), (3) thumbnail only (1 tile: the
whole image at 112 px), and scored on the held-out OCR questions, overall and per tile grid.

    python recipes/ablate_tile_tags.py --out runs/ablation                 # --scale 0.3 of the recipe per arm
    python recipes/ablate_tile_tags.py --out runs/ablation --scale 1.0     # the full recipe per arm (3x 2 hours)

Each arm is `recipes/train_tiny.py` with the same seed, data, model shapes and steps; only how the image reaches
the decoder differs. The last line of stdout is one JSON object with the three arms' scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_tiny  # noqa: E402

ARMS = {"tags": [], "no-tags": ["--no-tile-tags"], "thumbnail-only": ["--max-tiles", "1"]}
GRIDS = ("1x1", "2x1", "1x2", "2x2", "3x2", "2x3")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--scale", type=float, default=0.3, help="steps and data of each arm vs the recipe (default 0.3)")
    p.add_argument("--ocr-weight", type=float, default=4.0, help="OCR question weight (default 4: OCR is the point)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    a, rest = p.parse_known_args(argv)
    out = Path(a.out).resolve()
    results = {}
    for arm in a.arms.split(","):
        if arm not in ARMS:
            p.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
        args = ["--out", str(out / arm), "--data", str(out / "data"), "--scale", str(a.scale),
                "--ocr-weight", str(a.ocr_weight), *ARMS[arm], *rest]
        print(f"== {arm}: python recipes/train_tiny.py {' '.join(args)}", file=sys.stderr)
        train_tiny.main(args)
        results[arm] = json.loads((out / arm / "scores.json").read_text())

    print(f"{'arm':<16}{'ocr':>7}" + "".join(f"{'ocr/' + g:>9}" for g in GRIDS) + f"{'non-ocr':>9}{'train min':>10}")
    for arm, r in results.items():
        s = r["scores"]
        print(f"{arm:<16}{s['ocr']['accuracy']:>7.3f}"
              + "".join(f"{s.get('ocr/' + g, {}).get('accuracy', float('nan')):>9.3f}" for g in GRIDS)
              + f"{r['non_ocr_accuracy']:>9.3f}{r['train_minutes']:>10.1f}")
    print(json.dumps({"scale": a.scale, "ocr_weight": a.ocr_weight, "arms": {
        arm: {"ocr": r["scores"]["ocr"]["accuracy"], "non_ocr": round(r["non_ocr_accuracy"], 4),
              "ocr_by_grid": {g: r["scores"][f"ocr/{g}"]["accuracy"] for g in GRIDS if f"ocr/{g}" in r["scores"]},
              "train_minutes": r["train_minutes"]} for arm, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
