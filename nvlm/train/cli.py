"""`nvlm train CONFIG [--set key=value ...]` and `nvlm plot METRICS.jsonl -o loss.png`.

`nvlm train` runs in one process, or on N processes under `torchrun --nproc_per_node N -m nvlm train CONFIG`
(FSDP2; gloo on CPU, nccl on CUDA). Re-running the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def cmd_train(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.set)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .trainer import train

    progress = None if args.progress == "auto" else args.progress == "on"
    history = train(cfg, progress=progress)
    if history and args.json:
        print(json.dumps(history[-1]))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank that finished cleanly (checkpoints and metrics written and closed, process group
        # destroyed) leaves without interpreter finalisation: gloo's threads can otherwise abort the process at
        # exit ("terminate called without an active exception", exit code -6), failing a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return rows


def plot_metrics(paths: list[str | Path], out: str | Path, *, keys: tuple[str, ...] = ("loss", "lr"),
                 smooth: int = 1) -> Path:
    """One panel per metric (x = step), one line per metrics file; `smooth` = moving-average window."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'nvlm[train]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(p), read_metrics(p)) for p in paths]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.8 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for path, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth > 1:
                ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1])
                      for i in range(len(ys))]
            label = path.parent.name or path.name if len(runs) > 1 else None
            ax.plot(xs, ys, label=label, linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if len(runs) > 1 and ax is axes[0, 0]:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cmd_plot(args) -> int:
    keys = tuple(k.strip() for k in args.metrics.split(",") if k.strip())
    out = plot_metrics(args.metrics_files, args.output, keys=keys, smooth=args.smooth)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_train_parsers(sub) -> None:
    p = sub.add_parser(
        "train", help="train NVLM-D (stage 1 pretrain / stage 2 sft) from a TOML config",
        description="Train from a TOML config (see configs/*.toml). Stage presets follow the paper's tables: "
        "pretrain trains mlp1 only (lr 1e-4 -> 2.5e-5, warmup 500, betas 0.9/0.95), sft trains the LLM + mlp1 "
        "(lr 2e-6 -> 2.5e-7, warmup 1000, betas 0.9/0.98) with the ViT frozen; full (not in the paper, for training "
        "from scratch) trains everything, ViT included. Writes OUTPUT/metrics.jsonl, "
        "checkpoints under OUTPUT/checkpoints (resumed automatically) and OUTPUT/final in the official layout. "
        "Several processes: torchrun --nproc_per_node N -m nvlm train CONFIG.")
    p.add_argument("config", help="TOML training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.lr=1e-5 --set data.packing=true (repeatable; "
                   "values are TOML: numbers, true/false, [lists], \"strings\")")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar on rank 0 (auto: when stderr is a terminal; otherwise a line per log_every)")
    p.add_argument("--json", action="store_true", help="print the last step's metrics as one JSON line")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="plot a training run's metrics.jsonl (loss, lr, ...) to an image",
                       description="Plot metrics written by `nvlm train` (one panel per metric, one line per file).")
    p.add_argument("metrics_files", nargs="+", metavar="METRICS.jsonl")
    p.add_argument("-o", "--output", default="loss.png", help="output image (default loss.png)")
    p.add_argument("--metrics", default="loss,lr", help="comma-separated keys to plot (default loss,lr; also "
                   "grad_norm, tokens_per_s, efficiency, supervised_tokens)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (default 1 = raw)")
    p.set_defaults(func=cmd_plot)

