"""The NVLM-D training loop: stage 1 `pretrain` (only `mlp1` learns) and stage 2 `sft` (LLM + `mlp1` learn).

Notable:
- Freezing (SPEC 5): the ViT is frozen in both paper stages; `pretrain` trains `mlp1` only; `sft` trains the LLM and
  `mlp1`; with LoRA only the adapters (and `mlp1`, unless it has adapters itself) learn. A third stage, `full`
  (not in the paper), trains everything, ViT included: a model trained from scratch has no pretrained ViT to keep.
- Loss = per-token mean over the supervised tokens of the whole *global* batch (SPEC 5/11.9, Megatron's
  `calculate_per_token_loss`): each step first counts the supervised targets of all its micro-batches on all ranks
  (one all-reduce), then every micro-batch backpropagates `sum CE / global count`. The gradient is therefore the
  same for any micro-batch split and any number of ranks (FSDP2 averages over ranks, so the loss is also multiplied
  by the world size).
- Optional auxiliary attention loss (`[attention_loss]`, records' `attend` entries): each supervised layer's
  attention (the table's `layer`, or the one an entry names) hands its RoPE'd q and k to `attention_mass_loss`
  through `Attention.qk_hook` during the normal forward, and `weight` x the mean over the global batch's entries
  of -log(the entry's head's mass on its keys) joins the loss.
- Data: each step takes `global_batch_size` samples from the deterministic blend; rank r builds only the global
  draws r, r+W, ... (so 2 ranks x micro-batch m see exactly what 1 rank x 2m sees), cut into micro-batches of
  `micro_batch_size` samples, padded (`collate`) or packed into rows of at most `max_tokens` (`pack`, one forward
  pass per row).
- Lockstep under FSDP2: every rank must run the same number of forward passes and use the ViT/projector in the same
  ones. With packing the number of rows may differ, so ranks pad with empty micro-batches (no supervised tokens);
  a rank without images in a micro-batch where another rank has some runs the ViT + `mlp1` on one blank tile and
  adds 0 x its output to the token embeddings (zero gradient, same collectives in the same order; see TrainStep).
- LR: linear warmup then cosine to `min_lr` at `max_steps` (Megatron `OptimizerParamScheduler`); AdamW without
  weight decay on biases and norm weights; gradient clipping by global norm.
- bf16 autocast on CUDA (fp32 master weights); fp32 on CPU unless `dtype = "bfloat16"` (with a warning where the
  CPU has no native bf16: `cpu_has_native_bf16`). Activation checkpointing
  wraps each decoder layer's forward in `torch.utils.checkpoint` (parameter names unchanged).
- Output: `metrics.jsonl` (one line per step), training-state checkpoints (checkpoint.py) and, at the end,
  `final/` in the official HF layout (LoRA merged) that `nvlm chat --model OUTPUT/final` loads.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import NVLM
from .checkpoint import latest_checkpoint, list_checkpoints, load_training_state, save_training_state
from .config import OptimizerConfig, TrainConfig, TrainConfigError
from .distributed import DistEnv, all_reduce, barrier, setup, shard_model
from .lora import apply_lora, is_lora_param, merge_lora

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


# ---- pieces (each usable on its own) -----------------------------------------------------------------------------

def lr_at(step: int, o: OptimizerConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): Megatron's schedule evaluated at n = step + 1.

    n <= warmup: lr * n / warmup; then min_lr + (lr - min_lr) * (1 + cos(pi * (n - warmup) / (max - warmup))) / 2,
    reaching min_lr at n = max_steps and staying there.
    """
    n = step + 1
    if o.warmup_steps > 0 and n <= o.warmup_steps:
        return o.lr * n / o.warmup_steps
    if n >= o.max_steps:
        return o.min_lr
    ratio = (n - o.warmup_steps) / (o.max_steps - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def trainable_rule(name: str, stage: str, lora) -> bool:
    """Whether parameter `name` learns in `stage` (the ViT only in `full`, or through LoRA adapters)."""
    if lora is not None:
        return is_lora_param(name) or (name.startswith("mlp1.") and not lora.projector)
    if stage == "full":
        return True
    if stage == "pretrain":
        return name.startswith("mlp1.")
    return name.startswith(("mlp1.", "language_model."))


def set_trainable(model: nn.Module, stage: str, lora=None) -> list[str]:
    """Set requires_grad per the stage; returns the trainable parameter names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable_rule(name, stage, lora))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"stage {stage!r} leaves no trainable parameter")
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases / norm weights / other 1-D tensors (Megatron)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def checkpoint_layers(layers) -> None:
    """Activation checkpointing: recompute each layer's forward in backward (non-reentrant), names unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


class TrainStep(nn.Module):
    """The FSDP root: one micro-batch -> summed next-token CE over its supervised targets.

    This is `NVLM.forward` + `NVLM.loss` spelled out, with one addition: `vision_dummy` runs the ViT + `mlp1` on one
    blank tile and adds 0 x the result to the token embeddings. A rank whose micro-batch has no image while another
    rank's has does this, so FSDP2 sees the same all-gathers and gradient reductions, in the same order, on every
    rank: as with a real image, the ViT runs before the decoder and `mlp1` sits upstream of the decoder in autograd
    (adding the dummy to the loss instead would let its backward overtake the decoder's and reorder the
    reduce-scatters).
    """

    def __init__(self, model: NVLM, attention_loss=None):
        super().__init__()
        self.model = model
        self.attention_loss = attention_loss  # AttentionLossConfig or None
        self.last_attention_sum = None  # summed auxiliary attention loss of the last forward (detached)

    def forward(self, input_ids, labels, pixel_values=None, position_ids=None, mask=None, vision_dummy: bool = False,
                attend=(), attention_scale: float = 0.0):
        """Summed CE, plus `attention_scale` x the summed attention loss of `attend` (Batch.attend) when set."""
        if not (attend and attention_scale and self.attention_loss is not None):
            return self._ce(input_ids, labels, pixel_values, position_ids, mask, vision_dummy)
        a = self.attention_loss
        layers = self.model.language_model.model.layers
        n_heads = layers[0].self_attn.n_heads
        by_layer: dict[int, dict[int, list]] = {}  # layer -> head -> its entries
        for e in attend:
            layer, head = e[3] if len(e) > 3 and e[3] is not None else (a.layer, a.head)
            if not (0 <= layer < len(layers) and 0 <= head < n_heads):
                raise ValueError(f"attend entry names layer {layer} / head {head}, outside the decoder's "
                                 f"{len(layers)} layers / {n_heads} heads")
            by_layer.setdefault(layer, {}).setdefault(head, []).append(e)
        parts = []

        def hook(heads):
            return lambda q, k: parts.extend(attention_mass_loss(q, k, mask, entries, head)
                                             for head, entries in heads.items())

        for layer, heads in by_layer.items():
            layers[layer].self_attn.qk_hook = hook(heads)
        try:
            ce = self._ce(input_ids, labels, pixel_values, position_ids, mask, vision_dummy)
        finally:
            for layer in by_layer:
                layers[layer].self_attn.qk_hook = None
        total = torch.stack(parts).sum()
        self.last_attention_sum = total.detach()
        return ce + attention_scale * total

    def _ce(self, input_ids, labels, pixel_values, position_ids, mask, vision_dummy):
        m = self.model
        if pixel_values is not None:
            embeds = m.embed(input_ids, m.extract_features(pixel_values))
        elif vision_dummy:
            s = m.config.image_size
            zero = m.extract_features(torch.zeros(1, 3, s, s, device=input_ids.device)).sum() * 0.0
            embeds = m.embed(input_ids) + zero.to(m.embed_tokens.weight.dtype)
        else:
            embeds = m.embed(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        logits = m.language_model(embeds, position_ids, mask)
        return m.loss(logits, labels)


def attention_mass_loss(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, attend, head: int) -> torch.Tensor:
    """sum over `attend` entries (row, query position, key positions[, (layer, head)]) of -log(attention mass of
    `head` on the keys); the entries' own (layer, head) is the caller's business (TrainStep groups by it).

    q (B, H, L, hd) and k (B, Hkv, L, hd) as the attention layer computes them (RoPE applied); the softmax is over
    the keys the query may attend to (causal, and `mask`'s packed-sample blocks).
    """
    rows = torch.tensor([e[0] for e in attend], device=q.device)
    qpos = torch.tensor([e[1] for e in attend], device=q.device)
    L, hd = k.shape[2], q.shape[-1]
    kv = head // (q.shape[1] // k.shape[1])
    with torch.autocast(q.device.type, enabled=False):  # fp32 throughout, as the softmax of SDPA
        scores = torch.einsum("ed,eld->el", q[rows, head, qpos].float(), k[rows, kv].float()) * hd ** -0.5
        allowed = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        if mask is not None:
            allowed = allowed & mask[rows, 0, qpos]
        target = torch.zeros_like(allowed)
        for e, (_, p, keys, *_) in enumerate(attend):
            if max(keys) > p:
                raise ValueError(f"attend entry {e}: key positions {max(keys)} after the query position {p}")
            target[e, list(keys)] = True
        logp = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        return -torch.logsumexp(logp.masked_fill(~(target & allowed), float("-inf")), -1).sum()


def build_stream(cfg: TrainConfig, tokenizer, model_config, *, rank: int = 0, world_size: int = 1):
    """This rank's part of the deterministic, resumable blend of the configured sources: global draws k with
    k % world_size == rank."""
    from .data import Blend, ConversationDataset, read_records

    sources = []
    for src in cfg.data.sources:
        records = read_records(src.path, image_root=src.image_root)
        ds = ConversationDataset(records, tokenizer, tokens_per_tile=model_config.tokens_per_tile,
                                 image_size=model_config.image_size, max_tiles=cfg.data.max_tiles,
                                 max_len=cfg.data.max_len, system=cfg.data.system,
                                 use_thumbnail=cfg.data.use_thumbnail, tile_tags=cfg.data.tile_tags)
        sources.append((ds, src.weight))
    return Blend(sources, seed=cfg.seed, rank=rank, world_size=world_size, workers=cfg.data.workers)


# ---- the trainer -------------------------------------------------------------------------------------------------

def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo's flags);
    None where that cannot be read (not Linux). Without them PyTorch emulates bf16 on the CPU, and autocast is slower
    than fp32, not faster: 44.2 vs 3.0 s per step of the tiny recipe's decoder stage on an AMD EPYC with AVX2 only."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; "bf16" is Arm's (Features line)


class Trainer:
    """`Trainer(cfg).fit()` runs (or resumes) a run; `step()` performs one optimizer step."""

    def __init__(self, cfg: TrainConfig, *, env: DistEnv | None = None, progress: bool | None = None):
        from ..tokenizer import Tokenizer
        from ..weights import load_checkpoint

        self.env = env or setup(None if cfg.device == "auto" else cfg.device)
        cfg = cfg.validate(self.env.world_size)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.progress = sys.stderr.isatty() if progress is None else progress
        dev = self.env.device
        self.bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and dev.type == "cuda")
        if self.bf16 and dev.type == "cpu" and cpu_has_native_bf16() is False and self.env.is_main:
            log.warning("dtype = \"bfloat16\" on a CPU without native bf16 (no AVX512-BF16/AMX in /proc/cpuinfo): "
                        "PyTorch emulates it, which is typically several times slower than float32 here; set "
                        "dtype = \"float32\" (or \"auto\")")
        if not cfg.resume and list_checkpoints(self.out):
            raise ValueError(f"{self.out} already holds training checkpoints; set resume = true to continue that "
                             "run, or choose a new output_dir")

        torch.manual_seed(cfg.seed)  # same on every rank: LoRA init must agree before sharding
        self.tokenizer = Tokenizer.from_dir(cfg.model)
        self.pad_id = self.tokenizer.endoftext_id
        model = load_checkpoint(cfg.model, dtype=torch.float32, device="cpu")  # fp32 master weights
        if len(self.tokenizer) > model.config.llm_config.vocab_size:
            raise ValueError(f"{cfg.model}: the tokenizer has {len(self.tokenizer)} tokens but the model only "
                             f"{model.config.llm_config.vocab_size} embedding rows")
        self.base_config = model.config
        self.projector_bias = model.mlp1[1].bias is not None
        model.image_token_id = self.tokenizer.vision_pad_id  # as nvlm.load does: the tokenizer decides
        if cfg.lora is not None:
            apply_lora(model, cfg.lora)
        self.trainable = set_trainable(model, cfg.stage, cfg.lora)
        if cfg.activation_checkpointing:
            checkpoint_layers(model.language_model.model.layers)
        model.train()
        self.model = model
        if cfg.attention_loss is not None:
            lc, a = model.config.llm_config, cfg.attention_loss
            if a.layer >= lc.num_hidden_layers or a.head >= lc.num_attention_heads:
                raise TrainConfigError(f"attention_loss: layer {a.layer} / head {a.head} outside the decoder's "
                                       f"{lc.num_hidden_layers} layers / {lc.num_attention_heads} heads")
        self.root = TrainStep(model, cfg.attention_loss)
        if self.env.distributed:
            shard_model(self.root, self.env, vision_layers=model.vision_model.encoder.layers,
                        decoder_layers=model.language_model.model.layers)
        else:
            self.root.to(dev)
        self.params = [p for p in self.root.parameters() if p.requires_grad]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(param_groups(self.root, o.weight_decay), lr=o.lr, betas=o.betas,
                                           eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, o) / o.lr)

        self.stream = build_stream(cfg, self.tokenizer, model.config, rank=self.env.rank,
                                   world_size=self.env.world_size)
        self.step_count = 0
        resume_from = latest_checkpoint(self.out) if cfg.resume else None
        if resume_from is not None:
            state = load_training_state(resume_from, model=self.root, optimizer=self.optimizer, env=self.env)
            self.step_count = int(state["step"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.stream.load_state_dict(state["rank"]["data"])
            if self.env.is_main:
                print(f"nvlm train: resuming from {resume_from} (step {self.step_count})", file=sys.stderr)
        self.resumed_from = resume_from
        self._iter = iter(self.stream)
        if self.env.is_main:
            n_train = sum(p.numel() for p in self.params)  # a DTensor's numel is the full tensor's
            n_all = sum(p.numel() for p in model.parameters())
            print(f"nvlm train: stage {cfg.stage}, {self.env.world_size} rank(s) on {dev.type}, global batch "
                  f"{cfg.global_batch_size} = {cfg.grad_accum_steps(self.env.world_size)} micro-batch(es) x "
                  f"{cfg.micro_batch_size} x {self.env.world_size} rank(s), "
                  f"{'bf16 autocast' if self.bf16 else 'fp32'}, {n_train:,} of {n_all:,} parameters trainable"
                  f"{' (LoRA)' if cfg.lora else ''}", file=sys.stderr)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            self._trim_metrics(self.step_count)

    # ---- data ----------------------------------------------------------------------------------------------------
    def _draw(self) -> list:
        """This rank's share of the next global batch (the stream is already rank-strided and skips bad samples)."""
        return [next(self._iter) for _ in range(self.cfg.global_batch_size // self.env.world_size)]

    def _units(self, samples: list) -> list:
        """This rank's micro-batches (Batch objects), in order."""
        from .data import collate, pack

        m = self.cfg.micro_batch_size
        units = []
        for i in range(0, len(samples), m):
            chunk = samples[i:i + m]
            if self.cfg.data.packing:
                units.extend(pack(chunk, max_tokens=self.cfg.data.max_tokens or self.cfg.data.max_len,
                                  pad_id=self.pad_id))
            else:
                units.append(collate(chunk, pad_id=self.pad_id))
        return units

    def _empty_unit(self):
        from .data import Sample, collate

        return collate([Sample(input_ids=[self.pad_id] * 2, labels=[-100] * 2, pixel_values=None, num_tiles=[])],
                       pad_id=self.pad_id)

    def _plan(self, units: list) -> tuple[list, list[bool], dict[str, int]]:
        """Pad to the same number of micro-batches on every rank; flag the ones where any rank has images;
        global counts (supervised targets, real and padded tokens)."""
        dev = self.env.device
        n = all_reduce(torch.tensor([len(units)], device=dev), self.env, "max").item()
        real = len(units)
        units = units + [self._empty_unit() for _ in range(n - real)]
        has_img = torch.tensor([u.pixel_values is not None for u in units], dtype=torch.int32, device=dev)
        has_img = all_reduce(has_img, self.env, "max").tolist()
        counts = torch.tensor([sum(u.num_supervised for u in units),
                               sum(int(u.num_tokens) for u in units[:real]),
                               sum(u.input_ids.numel() for u in units[:real]),
                               sum(len(u.attend) for u in units)], dtype=torch.int64, device=dev)
        sup, tokens, padded, attend = all_reduce(counts, self.env, "sum").tolist()
        return units, [bool(f) for f in has_img], {"supervised": sup, "tokens": tokens, "padded": padded,
                                                    "attend": attend}

    # ---- one optimizer step --------------------------------------------------------------------------------------
    def accumulate(self) -> dict[str, Any]:
        """Forward + backward over the next global batch: leaves d(mean loss)/dw in `.grad`; returns counts."""
        units, has_img, counts = self._plan(self._units(self._draw()))
        sup = counts["supervised"]
        # per-token mean over the global batch; x world size because FSDP2 averages gradients over ranks
        scale = self.env.world_size / sup if sup else 0.0
        # the attention loss, a mean over its entries, rides on the CE sum: x sup / entries, then / sup with it
        a = self.cfg.attention_loss
        n_att = counts["attend"]
        att_scale = a.weight * sup / n_att if a is not None and n_att and sup else 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        att_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for unit, img in zip(units, has_img):
            b = unit.to(self.env.device)
            self.root.last_attention_sum = None
            with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.root(b.input_ids, b.labels, b.pixel_values, b.position_ids, b.mask,
                                 vision_dummy=img and b.pixel_values is None, attend=b.attend,
                                 attention_scale=att_scale)
            if loss.requires_grad:  # False only when no trainable weight is reached (pretrain, text only)
                (loss * scale).backward()
            part = self.root.last_attention_sum
            if part is not None:
                att_sum += part.double()
                loss = loss.detach() - att_scale * part
            loss_sum += loss.detach().double()
        loss_sum = all_reduce(loss_sum, self.env, "sum")
        out = {**counts, "loss": loss_sum.item() / sup if sup else float("nan")}
        if a is not None:
            att_sum = all_reduce(att_sum, self.env, "sum")
            out["attention_loss"] = att_sum.item() / n_att if n_att else float("nan")
        return out

    def step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics (the line metrics.jsonl gets)."""
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        counts = self.accumulate()
        clip = self.cfg.optimizer.grad_clip if self.cfg.optimizer.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        if counts["supervised"]:  # no supervised token: do not move the weights (AdamW would still decay them)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"step": self.step_count, "loss": counts["loss"], "lr": lr, "grad_norm": float(grad_norm),
                "supervised_tokens": counts["supervised"], "tokens": counts["tokens"],
                "padded_tokens": counts["padded"],
                "efficiency": counts["tokens"] / counts["padded"] if counts["padded"] else 0.0,
                "tokens_per_s": counts["tokens"] / dt, "samples": self.cfg.global_batch_size,
                "step_time_s": dt,
                **({"attention_loss": counts["attention_loss"], "attention_entries": counts["attend"]}
                   if "attention_loss" in counts else {})}

    # ---- the run -------------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train to `max_steps` (from wherever a resumed run stands), checkpointing and exporting `final/`."""
        cfg = self.cfg
        total = cfg.optimizer.max_steps
        bar = None
        if self.env.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step_count, desc=f"nvlm train ({cfg.stage})", unit="step",
                       dynamic_ncols=True)
        history = []
        saved_at = self.step_count if self.resumed_from is not None else None
        while self.step_count < total:
            m = self.step()
            history.append(m)
            if self.env.is_main:
                with open(self.out / METRICS_FILE, "a") as f:
                    f.write(json.dumps(m) + "\n")
                if bar is not None:
                    bar.update(1)
                if cfg.log_every and (m["step"] % cfg.log_every == 0 or m["step"] == total):
                    line = (f"step {m['step']}/{total} loss {m['loss']:.4f} lr {m['lr']:.3g} "
                            f"grad_norm {m['grad_norm']:.3g} tok/s {m['tokens_per_s']:.0f} "
                            f"efficiency {m['efficiency']:.2f}")
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                    else:
                        print(line, file=sys.stderr, flush=True)
            if cfg.save_every and self.step_count % cfg.save_every == 0:
                self.save()
                saved_at = self.step_count
        if bar is not None:
            bar.close()
        if saved_at != self.step_count:
            self.save()
        self.export(self.out / "final")
        return history

    def save(self) -> Path:
        state = {"scheduler": self.scheduler.state_dict(), "config": self.cfg.to_dict()}
        return save_training_state(self.out, self.step_count, model=self.root, optimizer=self.optimizer,
                                   trainer_state=state, rank_state={"data": self.stream.state_dict()},
                                   env=self.env, keep_last=self.cfg.keep_last)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's complete state under its own names (LoRA unmerged), on CPU, on rank 0 (collective)."""
        if self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().to("cpu", copy=True) for k, v in self.root.state_dict().items()}
        return {k.removeprefix("model."): v for k, v in sd.items()}

    def export(self, directory: str | Path) -> Path | None:
        """Write the trained model (LoRA merged) in the official layout; collective, rank 0 writes."""
        from ..weights import build_model, save_checkpoint
        from ..pipeline import parse_dtype

        sd = self.full_state_dict()
        path = None
        if self.env.is_main:
            model = build_model(self.base_config, projector_bias=self.projector_bias)
            if self.cfg.lora is not None:
                apply_lora(model, self.cfg.lora)
            model.load_state_dict(sd, assign=True)
            if self.base_config.llm_config.tie_word_embeddings:
                model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
            if self.cfg.lora is not None:
                merge_lora(model)
            dtype = (parse_dtype(self.base_config.torch_dtype, "cpu") if self.cfg.export_dtype == "auto"
                     else parse_dtype(self.cfg.export_dtype, "cpu"))
            path = save_checkpoint(model.eval(), directory, tokenizer=self.tokenizer, dtype=dtype)
        barrier(self.env)
        return path

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines past `step` (a killed run may have logged steps its last checkpoint does not hold)."""
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        if step == 0:
            path.unlink()
            return
        keep = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, *, progress: bool | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a training run in this process (one rank of a torchrun job, or alone)."""
    from .distributed import teardown

    try:
        history = Trainer(cfg, progress=progress).fit()
    except BaseException:
        teardown(wait=False)
        raise
    teardown()
    return history
