"""P3 + P4: time to first token of image queries.

P3: a 640x480 image (3x2 tiles + thumbnail = 7 tiles) and a question, through the engine in bfloat16 (AMX/bf16
    matmuls for the ViT and the prefill), against the HF-style path the official remote code takes on a CPU: the
    model card's per-tile preprocessing, float32 eager-attention InternViT (transformers' InternVLVisionModel),
    the projector, and a float32 eager prefill of transformers' Qwen2ForCausalLM over the merged embeddings.
P4: a follow-up question about the same image in the same conversation: the engine reuses the vision features and
    the KV of the earlier turns (prefix cache) and prefills only the new turn; the official `chat()` recomputes the
    image and the whole history, as the HF-style path does here.

Random weights of the `1b` preset (InternViT-300M + Qwen2-0.5B shapes). A table, then one JSON line.

    python benchmarks/bench_ttft.py [--preset 1b] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from common import build, emit, hf_qwen2, model_card_pixels  # noqa: E402

from nvlm.engine import Engine, ImageInput, Request, image_key  # noqa: E402
from nvlm.generate import SamplingParams  # noqa: E402
from nvlm.image import find_grid, preprocess  # noqa: E402
from nvlm.prompt import encode_conversation  # noqa: E402
from nvlm.tokenizer import build_byte_tokenizer  # noqa: E402

def hf_vision(model):
    from nvlm.interop import to_transformers_internvl_vision

    return to_transformers_internvl_vision(model, attn_implementation="eager")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    img = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(img).ellipse((60, 60, 300, 300), fill="red")
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    raw = buf.getvalue()
    tok = build_byte_tokenizer()

    ref32 = build(args.preset, torch.float32)
    ours = build(args.preset, torch.float32).to(torch.bfloat16)  # same weights, bf16 compute
    cfg = ref32.config
    for m in (ref32, ours):
        m.image_token_id = tok.vision_pad_id
    size, per_tile = cfg.image_size, cfg.tokens_per_tile
    q1 = "What is in this image? Describe every object and its colour in detail, please."
    q2 = "And where is the red circle?"

    def prompt(turns, num_tiles):
        return encode_conversation(tok, turns, num_tiles=num_tiles, tokens_per_tile=per_tile).input_ids

    # ---- HF-style path (what the official remote code computes on a CPU) -------------------------------------
    hv, hl = hf_vision(ref32), hf_qwen2(ref32, torch.float32, attn="eager")

    @torch.inference_mode()
    def hf_ttft(ids):
        t = time.perf_counter()
        pv = model_card_pixels(Image.open(io.BytesIO(raw)).convert("RGB"), cfg.max_dynamic_patch, size)
        vit = hv(pixel_values=pv).last_hidden_state[:, 1:]
        n, tokens, c = vit.shape
        side = int(tokens ** 0.5)
        from nvlm.model import pixel_shuffle

        x = pixel_shuffle(vit.reshape(n, side, side, c), 0.5, cfg.ps_version).reshape(n, -1, 4 * c)
        feats = ref32.mlp1(x)
        ids_t = torch.tensor([ids])
        emb = hl.get_input_embeddings()(ids_t)
        emb = emb.masked_scatter((ids_t == tok.vision_pad_id)[..., None], feats.reshape(-1, emb.shape[-1]))
        logits = hl(inputs_embeds=emb, logits_to_keep=1).logits
        int(logits[0, -1, :len(tok)].argmax())
        return time.perf_counter() - t

    # ---- nvlm engine, bf16 --------------------------------------------------------------------------------
    engine = Engine(ours, vocab_limit=len(tok), stop_ids=tok.stop_ids, max_batch=2, max_len=4096)

    def engine_request(ids, max_tokens=1):
        def pixels():
            return preprocess(Image.open(io.BytesIO(raw)), max_tiles=cfg.max_dynamic_patch, image_size=size).pixel_values

        cols, rows = find_grid(*img.size, max_num=cfg.max_dynamic_patch, image_size=size)
        n_tiles = cols * rows + (1 if cols * rows > 1 else 0)
        im = ImageInput(image_key(raw, cfg.max_dynamic_patch, size), n_tiles * per_tile, pixels)
        req = Request(ids, SamplingParams(max_new_tokens=max_tokens), images=[im])
        t = time.perf_counter()
        engine.submit(req)
        while req.first_token_time is None:
            engine.step()
        ttft = req.first_token_time - t
        engine.run_until_done()
        return ttft, req

    turn1 = prompt([{"role": "user", "content": q1}], [7])
    assert turn1.count(tok.vision_pad_id) == 7 * per_tile
    ours_p3, first = engine_request(turn1, max_tokens=16)
    answer = first.output_ids
    if answer and answer[-1] in tok.stop_ids:
        answer = answer[:-1]
    history = [{"role": "user", "content": "<image>\n" + q1}, {"role": "assistant", "content": tok.decode(answer)},
               {"role": "user", "content": q2}]
    turn2 = prompt(history, [7])
    hf_p3 = hf_ttft(turn1)
    ours_p4, follow = engine_request(turn2)
    hf_p4 = hf_ttft(turn2)
    # also: our own bf16 path recomputing everything (no caches), to separate caching from precision
    fresh = Engine(ours, vocab_limit=len(tok), stop_ids=tok.stop_ids, max_batch=2, max_len=4096)
    engine, saved = fresh, engine
    ours_p4_nocache, _ = engine_request(turn2)
    engine = saved

    rows = [
        ("P3 TTFT, 7-tile image query", f"{len(turn1)} tok", f"{ours_p3:.2f} s", f"{hf_p3:.2f} s",
         f"{hf_p3 / ours_p3:.2f}x"),
        ("P4 TTFT, follow-up turn (prefix cache)", f"{len(turn2)} tok ({follow.cached_tokens} cached)",
         f"{ours_p4:.3f} s", f"{hf_p4:.2f} s", f"{hf_p4 / ours_p4:.1f}x"),
        ("   same follow-up, nvlm bf16 without caches", f"{len(turn2)} tok", f"{ours_p4_nocache:.2f} s", "",
         f"cache alone: {ours_p4_nocache / ours_p4:.1f}x"),
    ]
    print(f"preset {args.preset}, {args.threads} threads; nvlm: engine in bfloat16; reference: HF-style float32 "
          f"eager path")
    emit(rows, ("figure", "prompt", "nvlm", "HF-style", "ratio"), {
        "benchmark": "ttft", "preset": args.preset, "p3_ttft_ratio_vs_hf_style": round(hf_p3 / ours_p3, 2),
        "p4_followup_ttft_ratio_vs_recompute": round(hf_p4 / ours_p4, 1),
        "p4_prefix_cache_alone_ratio": round(ours_p4_nocache / ours_p4, 1),
        "p4_cached_tokens": follow.cached_tokens, "p4_prompt_tokens": len(turn2)})


if __name__ == "__main__":
    main()
