"""P7: image preprocessing throughput (images/s) against the model card's PIL pipeline.

Baseline: the model card's `load_image` (open + RGB, resize to the tile grid, crop tiles, thumbnail, then per tile
ToTensor + Normalize as torchvision computes them), one image after another. nvlm: `nvlm.image.preprocess`
(one resize per size, one strided copy into (T, 3, S, S), one vectorised normalisation), one image at a time and
through a thread pool (PIL's resize releases the GIL). Both produce identical tensors (checked here).
A table, then one JSON line.

    python benchmarks/bench_preprocess.py [--images 24] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, model_card_pixels  # noqa: E402

from nvlm.image import preprocess  # noqa: E402

SIZES = [(640, 480), (1024, 768), (800, 1200), (1920, 1080), (500, 500), (300, 900)]


def make_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        arr = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((w, h), Image.BILINEAR)  # smooth content, like a photo
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the per-image work is PIL + one numpy pass; threads go to the pool
    data = make_images(args.images)

    def baseline():
        return [model_card_pixels(Image.open(io.BytesIO(d)).convert("RGB"), args.max_tiles, 448) for d in data]

    def ours_serial():
        return [preprocess(d, max_tiles=args.max_tiles).pixel_values for d in data]

    def ours_pool():
        with ThreadPoolExecutor(args.workers) as pool:
            return list(pool.map(lambda d: preprocess(d, max_tiles=args.max_tiles).pixel_values, data))

    def best(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    tb, ref = best(baseline)
    ts, ser = best(ours_serial)
    tp, par = best(ours_pool)
    same = all(torch.equal(a, b) for a, b in zip(ref, ser)) and all(torch.equal(a, b) for a, b in zip(ref, par))
    n = len(data)
    tiles = sum(x.shape[0] for x in ref)
    rows = [("model card pipeline", f"{n / tb:.1f}", "1.00x"),
            ("nvlm preprocess, 1 image at a time", f"{n / ts:.1f}", f"{tb / ts:.2f}x"),
            (f"nvlm preprocess, {args.workers} threads", f"{n / tp:.1f}", f"{tb / tp:.2f}x")]
    print(f"{n} JPEG images ({', '.join(f'{w}x{h}' for w, h in SIZES)}), {tiles} tiles, max {args.max_tiles} "
          f"tiles; outputs identical: {same}")
    emit(rows, ("pipeline", "images/s", "vs model card"), {
        "benchmark": "preprocess", "images": n, "identical_outputs": same,
        "p7_ratio_serial": round(tb / ts, 2), "p7_ratio_threads": round(tb / tp, 2)})


if __name__ == "__main__":
    main()
