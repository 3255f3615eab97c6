"""`nvlm serve`: load a checkpoint, start the engine, serve the OpenAI-compatible API with uvicorn.

Notable:
- `--max-len` defaults to min(8192, the model's context): the engine reserves K/V for every slot up front, and the
  72B model's full context in 32 slots would not fit any machine (vLLM's NVLM-D examples also use 4096-8192).
- `--kv-cache-gb` bounds that reservation instead: the batch becomes what fits.
- `--quantize` is applied before the engine is built (weight-only, `nvlm.quantize`).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MAX_LEN = 8192


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API (chat/completions, completions, models, metrics)",
        description="Serve a checkpoint over HTTP: POST /v1/chat/completions (text + images as data:, file:// or "
        "http(s) URLs), POST /v1/completions (raw text), GET /v1/models, GET /health, GET /metrics (Prometheus). "
        "Requests are batched continuously; repeated images and shared prompt prefixes are cached.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint directory or Hub repo id (default: the bundled model)")
    g.add_argument("--served-model-name", default=None, help="the model id in /v1/models and responses "
                   "(default: the checkpoint directory's name)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--device-map", default=None, choices=["split", "auto"],
                   help="spread the decoder over all GPUs: 'split' (model card rule) or 'auto' (by free memory)")
    g.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")

    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("NVLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NVLM_API_KEY; none = open)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (default 16)")
    g.add_argument("--max-len", type=int, default=None,
                   help=f"context per sequence, prompt + output (default min({DEFAULT_MAX_LEN}, model context))")
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="K/V memory budget in GiB; the batch shrinks to what fits (default: 2 x max-batch slots)")
    g.add_argument("--max-tokens", type=int, default=512, help="default max_tokens of a request (default 512)")

    g = p.add_argument_group("images")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow file:// image URLs under DIR (default: file:// refused)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="let the server download http(s) image URLs (it can then reach any address it can)")
    g.add_argument("--max-images", type=int, default=8, help="most images per request (default 8)")
    g.add_argument("--max-image-pixels", type=int, default=None,
                   help="largest image in pixels, checked before decoding (default ~89.5M, Pillow's)")
    g.add_argument("--max-tiles", type=int, default=None,
                   help="most 448px tiles per image, also the default (default: the config's max_dynamic_patch, 6)")
    p.set_defaults(func=cmd_serve)
    return p


def build_engine(pipe, *, max_batch: int = 16, max_len: int | None = None, kv_cache_gb: float | None = None):
    from ..engine import Engine

    context = pipe.config.llm_config.max_position_embeddings
    max_len = max_len or min(DEFAULT_MAX_LEN, context)
    if max_len < 2 or max_len > context:
        raise ValueError(f"--max-len must be between 2 and the model's context ({context}), got {max_len}")
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    kv = int(kv_cache_gb * 2 ** 30) if kv_cache_gb is not None else None
    return Engine(pipe.model, vocab_limit=len(pipe.tokenizer), stop_ids=pipe.tokenizer.stop_ids,
                  max_batch=max_batch, max_len=max_len, kv_cache_bytes=kv)


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError("nvlm serve needs FastAPI and uvicorn: pip install 'nvlm[serve]'") from None
    from ..cli import default_model_path
    from ..image import DEFAULT_MAX_PIXELS
    from ..pipeline import load
    from .app import create_app
    from .protocol import ServeOptions

    for flag, v in (("--max-images", args.max_images), ("--max-tokens", args.max_tokens),
                    ("--max-tiles", args.max_tiles), ("--max-image-pixels", args.max_image_pixels)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a directory")
    path = args.model or default_model_path()
    if path is None:
        raise ValueError("no --model given and this nvlm build bundles no default model")
    pipe = load(path, dtype=args.dtype, device=args.device, device_map=args.device_map, quantize=args.quantize,
                progress=sys.stderr.isatty())
    engine = build_engine(pipe, max_batch=args.max_batch, max_len=args.max_len, kv_cache_gb=args.kv_cache_gb)
    name = args.served_model_name or os.path.basename(os.path.normpath(str(path))) or "nvlm"
    opts = ServeOptions(model_name=name, api_key=args.api_key, max_images=args.max_images,
                        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS, max_tiles=args.max_tiles,
                        allowed_local_media_path=args.allowed_local_media_path,
                        allow_remote_images=args.allow_remote_images, default_max_tokens=args.max_tokens)
    app = create_app(pipe, engine, opts)
    print(f"nvlm serve: {name} at http://{args.host}:{args.port}/v1 (max batch {engine.max_batch}, max len "
          f"{engine.max_len}, {len(engine.slots)} K/V slots{', API key required' if args.api_key else ''})",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
