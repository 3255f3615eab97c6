"""Training-run configuration: a TOML file -> frozen dataclasses, on top of the paper's stage presets.

Notable:
- Precedence: stage preset (SPEC 5, NVLM-D columns of the paper's Tables 10-11) < the TOML file < `--set a.b=v`.
  The paper's tables rule where the released Megatron scripts disagree (SPEC 11.9).
- `--set` values are parsed as TOML values (`1e-5`, `true`, `[0.9, 0.95]`, `"text"`); anything that does not parse
  is taken as a bare string, so `--set output_dir=runs/x` works.
- Unknown keys and wrong types are errors naming the dotted key (a typo must not silently train with a default).
- A `[lora]` table switches LoRA on (`lora.enabled = false` switches it off again); an `[attention_loss]` table
  switches the auxiliary attention loss on (records' `attend` entries, see `nvlm.train.data`).
- Relative paths are relative to the working directory the run is launched from (as the header command shows).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STAGES = ("pretrain", "sft", "full")
DTYPES = ("auto", "float32", "bfloat16")
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Paper Tables 10-11, NVLM-D column (SPEC 5). Sequence length = the LLM sequence length of the table.
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "pretrain": {
        "global_batch_size": 2048,
        "data": {"max_len": 512, "max_tiles": 1},
        "optimizer": {"lr": 1e-4, "min_lr": 2.5e-5, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup_steps": 500,
                      "max_steps": 20_000, "grad_clip": 10.0},
    },
    "sft": {
        "global_batch_size": 128,
        "data": {"max_len": 3200, "max_tiles": 6},
        "optimizer": {"lr": 2e-6, "min_lr": 2.5e-7, "betas": [0.9, 0.98], "weight_decay": 0.1, "warmup_steps": 1000,
                      "max_steps": 40_000, "grad_clip": 10.0},
    },
}
# Not in the paper: every parameter learns (ViT included), for training a model from scratch (the tiny default
# model); hyper-parameters as `sft`, to be set by the config.
STAGE_PRESETS["full"] = copy.deepcopy(STAGE_PRESETS["sft"])


class TrainConfigError(ValueError):
    """A training config the run cannot honour; the message names the key."""


@dataclass(frozen=True)
class Source:
    """One data source of the blend: a JSONL/JSON file of conversations, its sampling weight and image folder."""

    path: str
    weight: float = 1.0
    image_root: str | None = None


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[Source, ...] = ()
    max_len: int = 4096  # longest sample (tokens, image tokens included); longer samples are skipped
    max_tiles: int = 6  # tiles per image, thumbnail included when > 1
    packing: bool = False  # pack samples of a micro-batch into rows of `max_tokens`
    max_tokens: int | None = None  # packed row length (default: max_len)
    system: str = "Answer the questions."
    use_thumbnail: bool = True
    tile_tags: bool = True  # false: no <tile_k> tags before the tiles (an ablation; NVLM-D uses them)
    workers: int = 0  # threads building samples (image decoding, tiling); the stream does not depend on it


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + linear warmup + cosine decay to `min_lr` at `max_steps` (Megatron's schedule)."""

    lr: float = 2e-6
    min_lr: float = 2.5e-7
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to biases and norm weights (1-D tensors), as in Megatron
    warmup_steps: int = 1000
    max_steps: int = 40_000
    grad_clip: float = 10.0  # 0 = no clipping (the norm is still reported)


@dataclass(frozen=True)
class LoraConfig:
    """peft LoRA on the LLM's linear layers, optionally also on the projector (`mlp1`) and the ViT."""

    enabled: bool = True
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LLM_LORA_TARGETS  # LLM linear names (suffixes under language_model.)
    projector: bool = False  # LoRA on mlp1's two linears instead of training mlp1 fully
    vision: bool = False  # LoRA on the ViT's attention and MLP linears (the ViT base stays frozen)


@dataclass(frozen=True)
class AttentionLossConfig:
    """Auxiliary loss on one decoder attention head: from a question's key word to the image tokens of the boxes
    its record names (`attend`), -log(attention mass on them), averaged over the entries of the global batch."""

    weight: float = 1.0  # added to the per-token CE (both are means over the global batch)
    layer: int = 0
    head: int = 0


@dataclass(frozen=True)
class TrainConfig:
    model: str  # base checkpoint directory (official NVLM-D layout)
    output_dir: str
    stage: str = "sft"
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoraConfig | None = None
    attention_loss: AttentionLossConfig | None = None
    global_batch_size: int = 128  # samples per optimizer step, all ranks together
    micro_batch_size: int = 1  # samples per forward pass per rank
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; "bfloat16" autocasts on CPU too
    activation_checkpointing: bool = False
    save_every: int = 1000  # training-state checkpoint every N steps (and always at the end); 0 = only at the end
    keep_last: int = 3  # training-state checkpoints kept (0 = all)
    log_every: int = 10  # progress-bar / stderr line every N steps (metrics.jsonl gets every step)
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    export_dtype: str = "auto"  # final checkpoint dtype; auto = the base checkpoint's torch_dtype

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        return self.global_batch_size // per_step

    def validate(self, world_size: int = 1) -> "TrainConfig":
        if self.stage not in STAGES:
            raise TrainConfigError(f"stage={self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.dtype not in DTYPES:
            raise TrainConfigError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device={self.device!r}: choose auto, cpu or cuda")
        if self.export_dtype not in DTYPES:
            raise TrainConfigError(f"export_dtype={self.export_dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % (self.micro_batch_size * world_size):
            raise TrainConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x world size ({world_size})")
        o = self.optimizer
        if o.max_steps < 1 or o.warmup_steps < 0:
            raise TrainConfigError("optimizer.max_steps must be >= 1 and optimizer.warmup_steps >= 0")
        if not 0 <= o.min_lr <= o.lr:
            raise TrainConfigError(f"optimizer.min_lr={o.min_lr} must lie in [0, lr={o.lr}]")
        if len(o.betas) != 2:
            raise TrainConfigError(f"optimizer.betas must hold two numbers, got {list(o.betas)}")
        if not self.data.sources:
            raise TrainConfigError("no data: add at least one [[data.sources]] table with a `path`")
        if self.data.max_tiles < 1 or self.data.max_len < 2:
            raise TrainConfigError("data.max_tiles must be >= 1 and data.max_len >= 2")
        if self.data.packing and (self.data.max_tokens or self.data.max_len) < self.data.max_len:
            raise TrainConfigError(f"data.max_tokens={self.data.max_tokens} must be >= data.max_len="
                                   f"{self.data.max_len} (a sample must fit in a packed row)")
        if self.lora is not None and self.lora.r < 1:
            raise TrainConfigError(f"lora.r must be >= 1, got {self.lora.r}")
        a = self.attention_loss
        if a is not None:
            if a.weight < 0 or a.layer < 0 or a.head < 0:
                raise TrainConfigError(f"attention_loss: weight, layer and head must be >= 0, got {a}")
            if self.activation_checkpointing:
                raise TrainConfigError("attention_loss does not work with activation_checkpointing (the recomputed "
                                       "forward would count the loss twice); switch one off")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# ---- reading ---------------------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                data: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML file (or take `data`), apply `--set key=value` overrides on top of the stage preset."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no training config at {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"{p}: invalid TOML: {e}") from None
    if data is not None:
        raw = _merge(raw, data)
    for item in overrides:
        raw = _merge(raw, parse_override(item))
    stage = raw.get("stage", TrainConfig.stage)
    if stage not in STAGES:
        raise TrainConfigError(f"stage={stage!r}: choose one of {', '.join(STAGES)}")
    merged = _merge(copy.deepcopy(STAGE_PRESETS[stage]), raw)
    return from_dict(merged)


def parse_override(item: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}; the value is read as TOML, else kept as a string."""
    if "=" not in item:
        raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. optimizer.lr=1e-5)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise TrainConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def from_dict(d: dict[str, Any]) -> TrainConfig:
    d = dict(d)
    for key in ("model", "output_dir"):
        if key not in d:
            raise TrainConfigError(f"the config needs `{key}`")
    lora = d.pop("lora", None)
    attn = d.pop("attention_loss", None)
    cfg = _build(TrainConfig, d, "")
    if attn is not None:
        if not isinstance(attn, dict):
            raise TrainConfigError("`attention_loss` must be a table")
        cfg = dataclasses.replace(cfg, attention_loss=_build(AttentionLossConfig, attn, "attention_loss."))
    if lora is not None:
        if not isinstance(lora, dict):
            raise TrainConfigError("`lora` must be a table")
        lc = _build(LoraConfig, lora, "lora.")
        cfg = dataclasses.replace(cfg, lora=lc if lc.enabled else None)
    return cfg.validate()


def _build(cls, d: dict[str, Any], where: str):
    """Dataclass `cls` from dict `d`, recursing into nested dataclass fields and checking every value's type."""
    if not isinstance(d, dict):
        raise TrainConfigError(f"`{where.rstrip('.') or 'config'}` must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise TrainConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(where + k for k in unknown)}; valid: {', '.join(sorted(fields))}")
    kw = {}
    for name, value in d.items():
        kw[name] = _coerce(hints[name], value, where + name)
    return cls(**kw)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None and len(args) != len(value):
            raise TrainConfigError(f"{key} must hold {len(args)} values, got {list(value)}")
        return tuple(_coerce(item or args[i], v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise TrainConfigError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `new` wins. Lists (e.g. data.sources) are replaced, not concatenated."""
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
