"""P1 + P2: decode speed.

P1: batch-1 greedy decode tokens/s and achieved GB/s (decoder weight bytes read per token x tok/s) against the
    machine's measured read bandwidth and against transformers' `generate` on the same weights.
P2: aggregate tokens/s with 16 concurrent requests through the engine (continuous batching) against running
    them one after another through transformers' `generate`.

Random weights of the `1b` preset (InternViT-300M + Qwen2-0.5B shapes); text-only prompts, so the figures are
about the decoder. A table, then one JSON line.

    python benchmarks/bench_decode.py [--preset 1b] [--dtype bfloat16] [--new-tokens 32] [--requests 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import build, emit, hf_qwen2, memory_bandwidth, timed  # noqa: E402

from nvlm.engine import Engine, Request  # noqa: E402
from nvlm.generate import SamplingParams, generate  # noqa: E402


def decoder_bytes_per_token(model) -> int:
    """Bytes a decode step must read: every decoder weight except the embedding table (one row is read), the
    head included (tied or not)."""
    lm = model.language_model
    total = sum(p.numel() * p.element_size() for p in lm.model.layers.parameters())
    total += sum(p.numel() * p.element_size() for p in lm.model.norm.parameters())
    total += lm.lm_head.weight.numel() * lm.lm_head.weight.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = build(args.preset, dtype)
    hf = hf_qwen2(model, dtype)
    if dtype != torch.float32:
        from nvlm.fast import use_gemv

        use_gemv(model)  # what nvlm.load does on CPU in half precision
    V = model.config.llm_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)]
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n)
    kw = dict(decode=lambda ids: "", stop_ids=[], vocab_limit=V)

    # ---- P1: batch-1 decode ---------------------------------------------------------------------------------
    bw = memory_bandwidth()

    def ours_decode(tokens):
        return generate(model, [prompts[0]], params.replace(max_new_tokens=tokens), **kw)[0].token_ids

    def hf_decode(tokens):
        with torch.inference_mode():
            ids = torch.tensor([prompts[0]])
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:].tolist()

    ours_decode(2), hf_decode(2)  # warm up
    # decode time = (prefill + n tokens) - (prefill + 1 token)
    t_full, ours_ids = timed(lambda: ours_decode(n), 2)
    t_one, _ = timed(lambda: ours_decode(1), 2)
    h_full, hf_ids = timed(lambda: hf_decode(n), 2)
    h_one, _ = timed(lambda: hf_decode(1), 2)
    ours_tps = (n - 1) / (t_full - t_one)
    hf_tps = (n - 1) / (h_full - h_one)
    bpt = decoder_bytes_per_token(model)
    ours_gbs = ours_tps * bpt / 1e9

    # ---- P2: 16 concurrent requests -------------------------------------------------------------------------
    def engine_run():
        eng = Engine(model, vocab_limit=V, stop_ids=[], max_batch=args.requests,
                     max_len=args.prompt_tokens + n + 8, prefix_slots=0)
        reqs = [Request(p, params) for p in prompts]
        for r in reqs:
            eng.submit(r)
        eng.run_until_done()
        return [r.output_ids for r in reqs]

    def hf_sequential():
        return [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p):].tolist()
                for p in prompts]

    e_time, e_out = timed(engine_run, 1)
    with torch.inference_mode():
        s_time, s_out = timed(hf_sequential, 1)
    total = args.requests * n
    agree = sum(a == b for x, y in zip(e_out, s_out) for a, b in zip(x, y)) / total

    rows = [
        ("P1 batch-1 decode tok/s", f"{ours_tps:.2f}", f"{hf_tps:.2f}", f"{ours_tps / hf_tps:.2f}x vs HF"),
        ("P1 achieved GB/s", f"{ours_gbs:.2f}", f"{hf_tps * bpt / 1e9:.2f}",
         f"{ours_gbs / (bw / 1e9):.2f} of measured {bw / 1e9:.1f} GB/s"),
        (f"P2 {args.requests} requests tok/s", f"{total / e_time:.2f}", f"{total / s_time:.2f}",
         f"{s_time / e_time:.2f}x vs sequential HF"),
    ]
    print(f"preset {args.preset}, {args.dtype}, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{n} new tokens, {bpt / 1e9:.2f} GB of decoder weights per token")
    emit(rows, ("figure", "nvlm", "transformers", "ratio"), {
        "benchmark": "decode", "preset": args.preset, "dtype": args.dtype,
        "p1_decode_tok_s_ratio_vs_hf": round(ours_tps / hf_tps, 2),
        "p1_fraction_of_bandwidth": round(ours_gbs / (bw / 1e9), 2),
        "p1_greedy_tokens_equal_hf": ours_ids == hf_ids,
        "p2_throughput_ratio_vs_sequential_hf": round(s_time / e_time, 2),
        "p2_greedy_agreement": round(agree, 3)})


if __name__ == "__main__":
    main()
