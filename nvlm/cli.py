"""`nvlm <verb>`: one CLI, each verb a thin call into the library.

Verbs: `chat` (one-shot or interactive), `init` (random checkpoint of a preset in the official layout),
`serve` (OpenAI-compatible server + chat page), `eval run|score|report`, `train`, `plot`. Errors the user can fix
print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .assets import default_model_path

EXIT_USAGE = 2


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512, help="most tokens to generate (default 512)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=0, metavar="K", help="report the top-K logprobs per token")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint directory or Hub repo id (default: the bundled model)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--device-map", default=None, choices=["split", "auto"],
                   help="spread the decoder over all GPUs: 'split' (model card rule) or 'auto' (by free memory)")
    g.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the decoder's linears at load")
    g.add_argument("--quantize-lm-head", action="store_true", help="with --quantize, also quantize the lm_head")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
                logprobs=args.logprobs)


def _load(args):
    from .pipeline import load

    path = args.model or default_model_path()
    if path is None:
        raise ValueError("no --model given and this nvlm build bundles no default model")
    return load(path, dtype=args.dtype, device=args.device, device_map=args.device_map, quantize=args.quantize,
                quantize_lm_head=args.quantize_lm_head, progress=sys.stderr.isatty())


# ---- chat ----------------------------------------------------------------------------------------------------

def cmd_chat(args) -> int:
    pipe = _load(args)
    system = "" if args.no_system else args.system
    sampling = _sampling(args)
    if args.question is not None:
        if args.json:
            res = pipe.chat(args.question, args.image, system=system, max_tiles=args.max_tiles,
                            style=args.prompt_style, **sampling)
            print(json.dumps(res.to_json()))
        else:
            for delta in pipe.stream(args.question, args.image, system=system, max_tiles=args.max_tiles,
                                     style=args.prompt_style, **sampling):
                print(delta, end="", flush=True)
            print()
        return 0
    return _interactive(pipe, args, system, sampling)


def _interactive(pipe, args, system, sampling) -> int:
    from .image import ImageError, load_image

    messages: list[dict] = []
    images: list = []
    pending = list(args.image)
    print("nvlm chat: type a question; /image PATH attaches an image to the next question, /reset starts over, "
          "/exit quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages, images, pending = [], [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                load_image(path)
            except ImageError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"(image attached: {path})", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; use /image PATH, /reset or /exit", file=sys.stderr)
            continue
        content = "".join("<image>\n" for _ in pending) + line
        turn = messages + [{"role": "user", "content": content}]
        answer = []
        try:
            for delta in pipe.stream(turn, images + pending, system=system, max_tiles=args.max_tiles,
                                     style=args.prompt_style, **sampling):
                answer.append(delta)
                print(delta, end="", flush=True)
        except (ValueError, OSError) as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        images += pending
        pending = []
        messages = turn + [{"role": "assistant", "content": "".join(answer)}]


# ---- init ----------------------------------------------------------------------------------------------------

def _tokenizer_from(spec: str):
    from .tokenizer import Tokenizer, build_byte_tokenizer, build_qwen2_tokenizer

    if spec == "byte":
        return build_byte_tokenizer()
    p = Path(spec)
    if p.is_dir():
        return Tokenizer.from_dir(p)
    if p.suffix == ".tiktoken" and p.exists():
        return build_qwen2_tokenizer(p)
    raise ValueError(f"--tokenizer {spec!r}: expected 'byte', a tokenizer directory or a qwen.tiktoken file")


def cmd_init(args) -> int:
    import torch

    from .config import preset
    from .weights import build_model, random_model, save_checkpoint, stored_shapes

    if args.dry_run:
        cfg = preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
        model = build_model(cfg)  # meta device: no memory
        shapes = stored_shapes(model)

        def count(prefix: str) -> int:
            return sum(int(torch.Size(s).numel()) for k, s in shapes.items() if k.startswith(prefix))

        print(json.dumps({"preset": args.preset, "stored_parameters": count(""),
                          "vision_model": count("vision_model."), "mlp1": count("mlp1."),
                          "language_model": count("language_model."),
                          "runtime_parameters": sum(p.numel() for p in model.parameters()),
                          "tokens_per_tile": cfg.tokens_per_tile, "num_tensors": len(shapes),
                          **({"shapes": {k: list(v) for k, v in shapes.items()}} if args.shapes else {})}))
        return 0
    if args.out is None:
        raise ValueError("nvlm init needs an output directory (or --dry-run)")
    from .pipeline import parse_dtype

    tok = _tokenizer_from(args.tokenizer)
    vocab = args.vocab_size or _round_up(len(tok), 64)
    if vocab < len(tok):
        raise ValueError(f"--vocab-size {vocab} is smaller than the tokenizer ({len(tok)} tokens)")
    cfg = preset(args.preset, vocab_size=vocab)
    model = random_model(cfg, seed=args.seed, std=args.std)
    save_checkpoint(model, args.out, tokenizer=tok, dtype=parse_dtype(args.dtype, "cpu"),
                    max_shard_bytes=int(args.max_shard_mb * 2 ** 20))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: preset {args.preset}, {n:,} parameters, vocab {vocab}, tokenizer {len(tok)} tokens",
          file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from .pipeline import parse_dtype
    from .quantize import quantize_checkpoint

    quantize_checkpoint(args.src, args.dst, args.mode, group_size=args.group_size, include_lm_head=args.lm_head,
                        dtype=parse_dtype(args.dtype, "cpu"))
    print(f"wrote {args.dst}: {args.mode} weight-only decoder linears", file=sys.stderr)
    return 0


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ---- entry ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvlm", description="NVIDIA NVLM-D vision-language models: chat, "
                                     "create checkpoints, evaluate.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("chat", help="ask questions about images (one-shot or interactive)",
                       description="Ask a question about zero or more images. Without QUESTION, start an "
                       "interactive multi-turn chat (/image PATH, /reset, /exit).")
    p.add_argument("question", nargs="?", help="the question; omit for an interactive chat")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable)")
    p.add_argument("--max-tiles", type=int, default=None, help="most 448px tiles per image (default: config, 6)")
    p.add_argument("--system", default="Answer the questions.", help="system message")
    p.add_argument("--no-system", action="store_true", help="omit the system turn")
    p.add_argument("--prompt-style", default="megatron", choices=["megatron", "hf"],
                   help="megatron = the trained format (default); hf = the HF remote code's rendering")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, prompt_token_ids, "
                   "output_token_ids, logprobs, num_tiles)")
    _add_model(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("init", help="create a random-weight checkpoint in the official NVLM-D layout",
                       description="Create a checkpoint of a preset size with random weights (config.json, "
                       "safetensors shards + index, tokenizer files). --dry-run builds the model on the meta "
                       "device and prints parameter counts (works for the 72B preset).")
    p.add_argument("out", nargs="?", help="output directory")
    p.add_argument("--preset", default="tiny", help="tiny, 100m, 1b or nvlm-d-72b (default tiny)")
    p.add_argument("--tokenizer", default="byte",
                   help="'byte' (278-token byte-level tokenizer), a tokenizer directory, or a qwen.tiktoken file")
    p.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: tokenizer size rounded "
                   "up to 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-mb", type=float, default=2048, help="shard size limit in MiB")
    p.add_argument("--dry-run", action="store_true", help="build on the meta device and print counts only")
    p.add_argument("--shapes", action="store_true", help="with --dry-run, also print every tensor's shape")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 copy of a checkpoint",
                       description="Quantize the decoder's linears of a checkpoint (official layout in, official "
                       "layout + quantization_config out). `nvlm chat/serve --model DST` load it as is.")
    p.add_argument("src", help="checkpoint directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--mode", required=True, choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128, 256)")
    p.add_argument("--lm-head", action="store_true", help="also quantize the lm_head")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the scales and of the unquantized tensors")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="evaluate: run benchmarks, score and report", description="Evaluation tools.")
    esub = p.add_subparsers(dest="eval_verb", metavar="EVAL_VERB")
    try:
        from .eval.score import add_eval_score_parser
        add_eval_score_parser(esub)
        from .eval.cli import add_eval_run_parsers
        add_eval_run_parsers(esub)
    except ImportError:  # pragma: no cover - eval package missing from a partial install
        pass
    p.set_defaults(func=lambda a: (p.print_help(), EXIT_USAGE)[1])

    from .serve.cli import add_serve_parser

    add_serve_parser(sub)

    from .train.synthetic import add_synth_parser

    add_synth_parser(sub)

    try:
        from .train.cli import add_train_parsers
        add_train_parsers(sub)
    except ImportError:  # pragma: no cover - train package missing from a partial install
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .config import ConfigError  # noqa: F401 (a ValueError)

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"nvlm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
