"""`nvlm eval run` and `nvlm eval report`: argparse wiring over runner.py and report.py.

Notable:
- `run` needs exactly one of `--model DIR` (local, greedy, batched) or `--endpoint URL --api-model NAME` (an
  OpenAI-compatible server). Results go to `--out` (default runs/eval); rerunning the same command resumes.
- Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) a CPU gloo process group is opened so that rank 0 can wait for
  the other shards at a barrier before merging and scoring; each rank uses `cuda:LOCAL_RANK` unless --device says.
- Errors the user can fix print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from nvlm.eval.metrics import BENCHMARKS, PROTOCOLS

EXIT_USAGE = 2


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _nonnegative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return n


def add_eval_run_parsers(subparsers) -> None:
    """Register `run` and `report` on the `nvlm eval` subparsers object."""
    p = subparsers.add_parser(
        "run", help="generate answers for a benchmark and score them",
        description="Answer every sample of BENCHMARK with a local checkpoint (--model) or an OpenAI-compatible "
        "server (--endpoint), then score the answers. Predictions are appended to OUT/BENCHMARK.predictions.jsonl "
        "as they finish, so rerunning the same command resumes after a crash. Launch with torchrun to shard the "
        "samples over several GPUs.")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="BENCHMARK",
                   help=f"one of: {', '.join(sorted(BENCHMARKS))}")
    p.add_argument("--data", required=True, metavar="PATH", help="the benchmark's data file or directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="checkpoint directory (or Hub repo id) to run locally")
    src.add_argument("--endpoint", metavar="URL", help="OpenAI-compatible server, e.g. http://localhost:8000")
    p.add_argument("--api-model", metavar="NAME", help="model name to request from --endpoint")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("NVLM_API_KEY"),
                   help="bearer token for --endpoint (default: $NVLM_API_KEY)")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="output directory (default runs/eval)")
    p.add_argument("--limit", type=_nonnegative, default=None, metavar="N", help="only the first N samples")
    p.add_argument("--max-tiles", type=_positive, default=None, metavar="N",
                   help="most 448px tiles per image, local model only (default: the checkpoint's, 6)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="nvlm",
                   help="nvlm: Megatron-LM's NVLM scripts (default); official: each benchmark's own scorer")
    p.add_argument("--batch-size", type=_positive, default=8, help="samples per local batch (default 8)")
    p.add_argument("--concurrency", type=_positive, default=8, help="requests in flight to --endpoint (default 8)")
    p.add_argument("--retries", type=_nonnegative, default=3, help="retries per request on 429/5xx/network errors")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="per-request timeout (default 600)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="local weights/compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "report", help="tabulate the scores in a run directory",
        description="Collect DIR/*.score.json into the model card's tables (missing benchmarks show '–') and "
        "write DIR/report.md and DIR/report.json.")
    p.add_argument("dir", metavar="DIR", help="a directory written by `nvlm eval run --out`")
    p.add_argument("--label", default=None, help="row label (default: the model named in the score files)")
    p.add_argument("--json", action="store_true", help="print report.json instead of the markdown")
    p.set_defaults(func=cmd_report)


def _init_distributed():
    """Open a gloo group when launched by torchrun and none exists; returns it (to destroy) or None."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return None
    # Rank 0 may wait at the barrier for the slowest shard: allow a long generation run.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return dist


def cmd_run(args: argparse.Namespace) -> int:
    from nvlm.eval.endpoint import EndpointError
    from nvlm.eval.runner import run_benchmark
    from nvlm.eval.score import format_table

    if args.endpoint and not args.api_model:
        print("nvlm: error: --endpoint needs --api-model NAME (the model name the server serves)", file=sys.stderr)
        return EXIT_USAGE
    dist = None
    try:
        dist = _init_distributed()
        result = run_benchmark(
            args.benchmark, args.data, model=args.model, endpoint=args.endpoint, api_model=args.api_model,
            api_key=args.api_key, out_dir=args.out, limit=args.limit, max_tiles=args.max_tiles,
            protocol=args.protocol, batch_size=args.batch_size, concurrency=args.concurrency, retries=args.retries,
            timeout=args.timeout, dtype=args.dtype, device=args.device, progress=not args.no_progress)
    except (ValueError, OSError, EndpointError) as exc:
        print(f"nvlm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if dist is not None:
            dist.destroy_process_group()
    if "score" not in result:  # a non-scoring rank, or shards still missing
        if result.get("rank", 0) == 0 and args.json:
            print(json.dumps(result))
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table({k: v for k, v in result.items() if k != "generated"}))
        print(f"wrote {os.path.join(args.out, args.benchmark + '.score.json')} ({result['generated']} answers "
              f"generated this run)", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nvlm.eval.report import write_report

    try:
        report = write_report(args.dir, label=args.label)
    except (ValueError, OSError) as exc:
        print(f"nvlm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    markdown = report.pop("markdown")
    paths = report.pop("paths")
    print(json.dumps(report) if args.json else markdown, end="\n" if args.json else "")
    print(f"wrote {', '.join(paths)}", file=sys.stderr)
    return 0
