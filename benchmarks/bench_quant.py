"""P5: batch-1 decode speed of weight-only int8 / int4 (nvlm/quantize.py) vs bf16 on CPU, with greedy agreement.

One process, one set of random bf16 weights (`random_model`, the `1b` preset by default: InternViT-300M + Qwen2-0.5B
shapes). For each variant (bf16; int8 and int4 on the decoder layers; the same with the lm_head quantized too,
which matters at this size: the tied 151936 x 896 head is ~28% of the bytes read per token):
- decode tok/s: one prompt of `--prompt-len` random ids, `--new-tokens` greedy tokens, timed from the first
  token (after prefill) to the last; the variants take turns, best of `--repeats` rounds (the cores are shared);
- achieved GB/s: bytes of decoder weights read per token (every decoder tensor but the embedding table, of which one
  row is read; the head counted even when tied) x tok/s;
- greedy agreement with bf16 over `--prompts` fixed random prompts (batched): the fraction of positions with the same
  token, the fraction inside the common prefix, and teacher-forced top-1 agreement (each model predicts every step
  of bf16's own continuation, so one early flip does not count twice), and the relative error of those logits.
  Random weights give nearly flat logits and a chaotic 24-layer stack (on `1b`, a 0.8% per-layer int8 error becomes
  ~5% on the logits, int4's 10% becomes ~57%), so these understate the agreement of a trained model.
A table, then one JSON line.

    python benchmarks/bench_quant.py [--preset 1b] [--new-tokens 64] [--threads 2]
    python benchmarks/bench_quant.py --preset tiny --new-tokens 16     # seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

TARGET_INT8_SPEEDUP = 1.7


def weight_bytes_per_token(model) -> int:
    """Bytes of the decoder's tensors read once per decoded token (all but the embedding table)."""
    lm = model.language_model
    total = 0
    for name, mod in lm.named_modules():
        if mod is lm.model.embed_tokens:
            continue
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def decode_speed(model, prompt, new_tokens, vocab, repeats) -> tuple[float, float]:
    """(decode tok/s, prefill seconds): best of `repeats` runs (first token -> last token; prompt -> first token)."""
    from nvlm.generate import SamplingParams, generate_tokens

    best_rate, best_prefill = 0.0, float("inf")
    params = SamplingParams(max_new_tokens=new_tokens)
    for _ in range(repeats):
        t0 = time.perf_counter()
        times = []
        for _tok, _ in generate_tokens(model, [prompt], params, stop_ids=[], vocab_limit=vocab):
            times.append(time.perf_counter())
        best_prefill = min(best_prefill, times[0] - t0)
        best_rate = max(best_rate, (len(times) - 1) / (times[-1] - times[0]))
    return best_rate, best_prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the agreement measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="bf16,int8,int4,int8+head,int4+head")
    args = ap.parse_args()

    from nvlm.config import preset
    from nvlm.generate import SamplingParams, generate
    from nvlm.quantize import quantize_model
    from nvlm.weights import random_model

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="int4: .* left unquantized")
    cfg = preset(args.preset)
    vocab = cfg.llm_config.vocab_size
    t = time.perf_counter()
    base = random_model(cfg, seed=0, dtype=torch.bfloat16)
    base.image_token_id = -1  # text only: no id is an image slot
    print(f"# {args.preset}: random bf16 weights in {time.perf_counter() - t:.0f} s; {args.threads} threads; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}", flush=True)

    g = torch.Generator().manual_seed(1234)
    high = min(vocab, 150000)  # ordinary (non-special) ids
    speed_prompt = torch.randint(0, high, (args.prompt_len,), generator=g).tolist()
    prompts = torch.randint(0, high, (args.prompts, args.prompt_len), generator=g).tolist()
    greedy = SamplingParams(max_new_tokens=args.new_tokens)

    models = {}
    for variant in args.variants.split(","):
        mode, head = variant.split("+")[0], variant.endswith("+head")
        if mode == "bf16":
            models[variant] = base
            continue
        t = time.perf_counter()
        models[variant] = quantize_model(copy.deepcopy(base), mode, group_size=args.group_size,
                                         include_lm_head=head)
        print(f"# {variant}: quantized in {time.perf_counter() - t:.1f} s", flush=True)
    for model in models.values():
        decode_speed(model, speed_prompt, min(4, args.new_tokens), vocab, 1)  # warm-up (kernel probes, allocator)

    # Round-robin timing, best of `repeats` per variant: the cores are shared, so no variant gets all the quiet.
    results: dict[str, dict] = {v: {"tok_s": 0.0, "prefill_s": float("inf")} for v in models}
    for _ in range(args.repeats):
        for variant, model in models.items():
            rate, prefill = decode_speed(model, speed_prompt, args.new_tokens, vocab, 1)
            r = results[variant]
            r["tok_s"], r["prefill_s"] = max(r["tok_s"], rate), min(r["prefill_s"], prefill)
    print("# " + ", ".join(f"{v}: {r['tok_s']:.1f} tok/s" for v, r in results.items()), flush=True)

    reference: list[list[int]] | None = None
    ref_logits = None
    for variant, model in models.items():
        outs = [c.token_ids for c in generate(model, prompts, greedy, decode=lambda ids: "", stop_ids=[],
                                              vocab_limit=vocab)]
        row = results[variant]
        row["weight_mb_per_token"] = weight_bytes_per_token(model) / 1e6
        row["gb_s"] = row["weight_mb_per_token"] / 1e3 * row["tok_s"]
        if reference is None:
            reference = outs
        n = sum(len(r) for r in reference)
        row["greedy_match"] = sum(a == b for r, o in zip(reference, outs) for a, b in zip(r, o)) / n
        prefix = []
        for r, o in zip(reference, outs):
            k = next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
            prefix.append(k)
        row["prefix_match"] = sum(prefix) / n
        with torch.inference_mode():  # teacher-forced: every step of bf16's continuation
            seq = torch.tensor([p + r for p, r in zip(prompts, reference)])
            logits = model(seq)[:, args.prompt_len - 1:-1, :vocab]
            row["teacher_forced_top1"] = (logits.argmax(-1) == seq[:, args.prompt_len:]).float().mean().item()
            if ref_logits is None:
                ref_logits = logits
            diff = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(logits, ref_logits))
            row["logit_rel_err"] = (diff / sum((b.double() ** 2).sum() for b in ref_logits)).sqrt().item()

    base_rate = results.get("bf16", next(iter(results.values())))["tok_s"]
    print(f"\n{'variant':<11} {'tok/s':>7} {'vs bf16':>7} {'MB/tok':>7} {'GB/s':>6} {'prefill s':>9} "
          f"{'greedy':>7} {'prefix':>7} {'tf top1':>7} {'logit err':>9}")
    for variant, r in results.items():
        r["speedup"] = r["tok_s"] / base_rate
        print(f"{variant:<11} {r['tok_s']:>7.1f} {r['speedup']:>6.2f}x {r['weight_mb_per_token']:>7.0f} "
              f"{r['gb_s']:>6.1f} {r['prefill_s']:>9.3f} {r['greedy_match']:>7.3f} {r['prefix_match']:>7.3f} "
              f"{r['teacher_forced_top1']:>7.3f} {r['logit_rel_err']:>9.3f}")
    print("# greedy: same token at the same position; prefix: inside the common prefix; tf top1: teacher-forced on "
          "bf16's continuation (bf16's own < 1: batched full forward vs cached decode rounding); logit err: "
          "|logits - bf16| / |bf16| teacher-forced")
    best_int8 = max((r["speedup"] for v, r in results.items() if v.startswith("int8")), default=None)
    print(json.dumps({"bench": "quant", "preset": args.preset, "threads": args.threads,
                      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prompts": args.prompts,
                      "group_size": args.group_size, "torch": torch.__version__,
                      "results": {v: {k: round(x, 4) for k, x in r.items()} for v, r in results.items()},
                      "int8_best_speedup": round(best_int8, 3) if best_int8 else None,
                      "target_int8_speedup": TARGET_INT8_SPEEDUP,
                      "meets_target": bool(best_int8 and best_int8 >= TARGET_INT8_SPEEDUP)}))


if __name__ == "__main__":
    main()
