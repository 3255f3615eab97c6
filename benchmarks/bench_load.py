"""Checkpoint loading: peak RAM and speed of nvlm's loader vs transformers' `from_pretrained`.

Creates a sharded random checkpoint of the `100m` preset in bf16 (a few hundred MB), then, each in a fresh
process (so peak RSS is the loader's own): nvlm's `load_checkpoint` on the whole NVLM-D checkpoint, and
transformers' `Qwen2ForCausalLM.from_pretrained` on the same language-model tensors saved in the Qwen2 layout.
Peak RSS is measured as (ru_maxrss after loading - RSS after imports) and divided by the bytes of weights that
process loaded; speed is compared per GB loaded. A table, then one JSON line.

    python benchmarks/bench_load.py [--preset 100m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PROBE = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    {imports}
    def status(key):  # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork + exec
        for line in open('/proc/self/status'):
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    base = status('VmRSS')
    t = time.perf_counter()
    model = {load}
    dt = time.perf_counter() - t
    # time until every weight byte is resident (a lazily mmapped load pays here, on first use)
    with torch.no_grad():
        for p in model.parameters():
            p.float().sum() if p.numel() < 2**24 else sum(c.float().sum() for c in p.split(1024))
    dt_touch = time.perf_counter() - t
    peak = status('VmHWM')
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({{"seconds": dt, "seconds_touched": dt_touch, "peak_delta": peak - base,
                      "weight_bytes": nbytes}}))
""")


def probe(imports: str, load: str) -> dict:
    code = PROBE.format(imports=imports, load=load)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="100m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from nvlm.config import preset
    from nvlm.weights import random_model, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_model(preset(args.preset), seed=0, dtype=torch.bfloat16)
        save_checkpoint(model, tmp / "nvlm", max_shard_bytes=100 * 2 ** 20)
        # The same language-model tensors in the plain Qwen2 layout, for transformers.
        llm_dir = tmp / "qwen2"
        llm_dir.mkdir()
        c = model.config.llm_config
        sd = {k: v.contiguous() for k, v in model.language_model.state_dict().items()}
        save_file(sd, str(llm_dir / "model.safetensors"), metadata={"format": "pt"})
        (llm_dir / "config.json").write_text(json.dumps({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}))
        del model, sd
        ckpt_bytes = sum(f.stat().st_size for f in (tmp / "nvlm").glob("*.safetensors"))

        runs = {"nvlm": [], "transformers": []}
        for _ in range(args.repeats):
            runs["nvlm"].append(probe("from nvlm.weights import load_checkpoint",
                                      f"load_checkpoint({str(tmp / 'nvlm')!r}, dtype=torch.bfloat16)"))
            runs["transformers"].append(probe(
                "from transformers import Qwen2ForCausalLM",
                f"Qwen2ForCausalLM.from_pretrained({str(llm_dir)!r}, dtype=torch.bfloat16)"))

    def best(name):
        r = min(runs[name], key=lambda x: x["seconds_touched"])
        gb = r["weight_bytes"] / 1e9
        return {"seconds": r["seconds"], "seconds_touched": r["seconds_touched"], "weight_bytes": r["weight_bytes"],
                "rss_ratio": max(x["peak_delta"] for x in runs[name]) / r["weight_bytes"],
                "s_per_gb": r["seconds"] / gb, "s_per_gb_touched": r["seconds_touched"] / gb}

    ours, ref = best("nvlm"), best("transformers")
    print(f"checkpoint: preset {args.preset}, {ckpt_bytes / 2**20:.0f} MiB in bf16 shards of <= 100 MiB")
    print(f"{'loader':<14}{'weights MiB':>12}{'load s':>8}{'load s/GB':>11}{'resident s/GB':>15}"
          f"{'peak RSS / weights':>20}")
    for name, r in (("nvlm", ours), ("transformers", ref)):
        print(f"{name:<14}{r['weight_bytes'] / 2**20:>12.0f}{r['seconds']:>8.3f}{r['s_per_gb']:>11.3f}"
              f"{r['s_per_gb_touched']:>15.3f}{r['rss_ratio']:>20.3f}")
    print("resident = load + reading every weight once (transformers maps the file lazily and pays on first use)")
    print(json.dumps({"benchmark": "load", "preset": args.preset, "checkpoint_mib": round(ckpt_bytes / 2**20),
                      "nvlm_peak_rss_over_weights": round(ours["rss_ratio"], 3),
                      "transformers_peak_rss_over_weights": round(ref["rss_ratio"], 3),
                      "load_speedup_per_gb_vs_transformers": round(ref["s_per_gb"] / ours["s_per_gb"], 2),
                      "resident_speedup_per_gb_vs_transformers":
                          round(ref["s_per_gb_touched"] / ours["s_per_gb_touched"], 2)}))


if __name__ == "__main__":
    main()
