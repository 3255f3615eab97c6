"""Checkpoint I/O in the official Hugging Face layout: config.json + safetensors shards + index + tokenizer files.

Notable:
- The model is built on the `meta` device and tensors are attached with `load_state_dict(assign=True)`. On the CPU,
  a tensor already in the requested dtype is memory-mapped from its shard (copy-on-write, zero-copy); any other is
  read with `readinto` straight into a buffer and cast/moved one tensor at a time. Peak RAM stays near the size of
  the weights (benchmarks/bench_load.py).
- The official checkpoint mixes fp32 (ViT qkv/proj/q_norm/k_norm, LLM q/k/v) and bf16 tensors; each tensor is read
  in its stored dtype and cast deliberately.
- InternViT-6B's 7 all-zero dummy heads (32 stored, 25 real) are detected from the `attn.qkv.weight` shape, checked
  to contribute nothing, and sliced away; `save_checkpoint` pads them back so the written layout matches.
- Missing, unexpected and misshaped keys are all collected and reported in one error.
- Checkpoints are written atomically: into a temporary sibling directory that is renamed into place at the end.
- `resolve_checkpoint` accepts a local directory or a Hub repo id (downloaded with huggingface_hub).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import NVLMConfig
from .model import NVLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class CheckpointError(ValueError):
    """The checkpoint on disk does not match what the config describes; the message lists every problem."""


# ---- reading -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise CheckpointError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from None
    size = path.stat().st_size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        info = _TensorInfo(path, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, 8 + n + end)
        if info.end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {info.end}, file has {size}")
        out[name] = info
    return out


def checkpoint_tensors(directory: Path) -> dict[str, _TensorInfo]:
    """All tensors of a checkpoint directory (sharded with an index, or a single model.safetensors)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{directory}: shards listed in {INDEX_NAME} are missing: {', '.join(missing)}")
        tensors: dict[str, _TensorInfo] = {}
        for f in files:
            tensors.update(_read_header(directory / f))
        absent = sorted(k for k in weight_map if k not in tensors)
        if absent:
            raise CheckpointError(f"{directory}: the index lists tensors that are not in their shards: "
                                  f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}")
        return tensors
    single = directory / SINGLE_NAME
    if single.exists():
        return _read_header(single)
    if any(directory.glob("*.bin")):
        raise CheckpointError(f"{directory} holds only PyTorch .bin weights; nvlm reads safetensors")
    raise CheckpointError(f"{directory} has neither {INDEX_NAME} nor {SINGLE_NAME}")


def _read(info: _TensorInfo, handle) -> torch.Tensor:
    t = torch.empty(info.shape, dtype=info.dtype)
    nbytes = info.end - info.start
    if t.numel() * t.element_size() != nbytes:
        raise CheckpointError(f"{info.file}: a tensor's byte range ({nbytes} B) does not match its shape {info.shape}")
    if nbytes:
        handle.seek(info.start)
        view = t.view(-1).view(torch.uint8).numpy() if t.dim() else t.reshape(1).view(torch.uint8).numpy()
        if handle.readinto(memoryview(view)) != nbytes:
            raise CheckpointError(f"{info.file} is truncated")
    return t


def _dummy_head_plan(config: NVLMConfig, tensors: dict[str, _TensorInfo]) -> int:
    """Number of dummy ViT heads stored in the checkpoint (0 for a plain InternViT)."""
    v = config.vision_config
    info = tensors.get("vision_model.encoder.layers.0.attn.qkv.weight")
    if info is None:
        return v.num_dummy_heads
    rows = info.shape[0]
    if rows % (3 * v.head_dim):
        return v.num_dummy_heads  # reported as a shape mismatch later
    return rows // (3 * v.head_dim) - v.num_attention_heads


def _slice_dummy(name: str, t: torch.Tensor, config: NVLMConfig, padded: int) -> torch.Tensor:
    """Drop the dummy heads from one ViT tensor (rows of q/k/v blocks, norm channels, proj input columns)."""
    d = config.vision_config.hidden_size
    block = padded * config.vision_config.head_dim
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        if name.endswith("weight") and not torch.all(t[2 * block + d:3 * block] == 0):
            raise CheckpointError(f"{name}: the dummy heads' value rows are not zero; nvlm cannot drop them")
        return torch.cat([t[0:d], t[block:block + d], t[2 * block:2 * block + d]])
    if name.endswith("attn.q_norm.weight") or name.endswith("attn.k_norm.weight"):
        return t[:d]
    if name.endswith("attn.proj.weight"):
        return t[:, :d]
    return t


def _pad_dummy(name: str, t: torch.Tensor, config: NVLMConfig) -> torch.Tensor:
    v = config.vision_config
    extra = v.num_dummy_heads * v.head_dim
    if not extra or not name.startswith("vision_model.encoder.layers."):
        return t
    d = v.hidden_size
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        z = t.new_zeros((extra,) + tuple(t.shape[1:]))
        return torch.cat([t[0:d], z, t[d:2 * d], z, t[2 * d:3 * d], z])
    if name.endswith("attn.q_norm.weight") or name.endswith("attn.k_norm.weight"):
        return torch.cat([t, t.new_zeros(extra)])
    if name.endswith("attn.proj.weight"):
        return torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)
    return t


def _is_dummy_sliced(name: str) -> bool:
    return name.startswith("vision_model.encoder.layers.") and name.endswith(
        ("attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.weight"))


@contextlib.contextmanager
def _no_init():
    """Skip the modules' random init while building: the weights are about to be replaced (and on `meta`,
    `normal_` would pull in torch's Python decompositions, a one-off ~1 s import)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_model(config: NVLMConfig, *, projector_bias: bool = False, device="meta") -> NVLM:
    """The module tree without meaningful weights (on `meta` by default: no memory at all)."""
    with torch.device(device), _no_init():
        return NVLM(config, projector_bias=projector_bias)


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    device_map: dict | None = None, progress: bool = False) -> NVLM:
    """Read an NVLM-D checkpoint directory into an `NVLM` module (eval mode) on `device` in `dtype`.

    With a `device_map` ({module prefix: device}, see placement.py) each tensor goes straight to its own device.
    """
    from .placement import device_for

    directory = Path(path)
    config = NVLMConfig.from_file(directory)
    tensors = checkpoint_tensors(directory)
    dummy = _dummy_head_plan(config, tensors)
    if dummy < 0:
        raise CheckpointError(f"vision qkv has fewer heads than vision_config.num_attention_heads="
                              f"{config.vision_config.num_attention_heads}")
    config = config.replace(vision_config=dataclasses.replace(config.vision_config, num_dummy_heads=dummy))
    model = build_model(config, projector_bias="mlp1.1.bias" in tensors)

    expected = dict(model.state_dict(keep_vars=True))
    tied = config.llm_config.tie_word_embeddings
    if tied:
        expected.pop("language_model.lm_head.weight", None)
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    padded = config.vision_config.num_attention_heads + dummy
    misshaped = []
    for k, p in expected.items():
        if k not in tensors:
            continue
        # what the file must hold: the model's shape, with the dummy heads padded back where there are any
        want = tuple(_pad_dummy(k, torch.empty(p.shape, device="meta"), config).shape)
        if tensors[k].shape != want:
            misshaped.append(f"{k}: checkpoint {list(tensors[k].shape)} vs expected {list(want)}")
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        if misshaped:
            parts.append(f"misshaped keys ({len(misshaped)}): {'; '.join(misshaped[:20])}")
        raise CheckpointError(f"{directory} does not match its config.json:\n  " + "\n  ".join(parts))

    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(tensors[k].file, []).append(k)
    state: dict[str, torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(tensors[k].end - tensors[k].start for k in expected), unit="B", unit_scale=True,
                   desc="loading weights")
    for file, keys in by_file.items():
        with open(file, "rb", buffering=0) as handle:
            mapped = None
            for k in sorted(keys, key=lambda k: tensors[k].start):
                info = tensors[k]
                dev = device_for(k, device_map) if device_map else torch.device(device)
                sliced = dummy and _is_dummy_sliced(k)
                if (dev.type == "cpu" and not sliced and info.end > info.start
                        and (info.dtype == dtype or not info.dtype.is_floating_point)
                        and info.start % info.dtype.itemsize == 0):
                    # Zero-copy: the tensor *is* the file's pages (copy-on-write), read in on first use.
                    if mapped is None:
                        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                    t = torch.frombuffer(mapped, dtype=info.dtype, count=(info.end - info.start) // info.dtype.itemsize,
                                         offset=info.start).view(info.shape)
                else:
                    t = _read(info, handle)
                    if sliced:
                        t = _slice_dummy(k, t, config, padded)
                    if t.is_floating_point():
                        t = t.to(dtype)
                    t = t.to(dev).contiguous()
                state[k] = t
                if bar is not None:
                    bar.update(info.end - info.start)
    if bar is not None:
        bar.close()
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model.eval()


# ---- writing -------------------------------------------------------------------------------------------------

def _atomic_dir(target: Path):
    """Context manager: yields a temp dir beside `target`; on success it replaces `target` in one rename."""
    @contextlib.contextmanager
    def cm():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            for f in tmp.iterdir():  # flush file contents before the rename makes them visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return cm()


def export_state_dict(model: NVLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the official names, dummy heads padded back, tied head omitted."""
    config = model.config
    out = {}
    for k, t in model.state_dict().items():
        if config.llm_config.tie_word_embeddings and k == "language_model.lm_head.weight":
            continue
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = _pad_dummy(k, t, config).contiguous()
    return out


def stored_shapes(model: NVLM) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor as the official layout stores it (dummy heads included); works on `meta`."""
    tied = model.config.llm_config.tie_word_embeddings
    return {k: tuple(_pad_dummy(k, t, model.config).shape) for k, t in model.state_dict().items()
            if not (tied and k == "language_model.lm_head.weight")}


def save_checkpoint(model: NVLM, directory: str | Path, *, tokenizer=None, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 2 * 1024 ** 3, copy_tokenizer_from: str | Path | None = None) -> Path:
    """Write config.json, safetensors shards + index and tokenizer files, atomically."""
    directory = Path(directory)
    state = export_state_dict(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    with _atomic_dir(directory) as tmp:
        cfg = model.config
        dt = dtype or next(model.parameters()).dtype
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dt, "bfloat16")
        cfg = cfg.replace(torch_dtype=name)
        cfg.save(tmp)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        elif copy_tokenizer_from is not None:
            for f in TOKENIZER_FILES:
                src = Path(copy_tokenizer_from, f)
                if src.exists():
                    shutil.copyfile(src, tmp / f)
    return directory


# ---- locating ------------------------------------------------------------------------------------------------

def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a Hub repo id downloaded (or found in the cache) via huggingface_hub."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; pass the checkpoint directory")
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p} has no config.json: not an NVLM-D checkpoint directory")
        return p
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"no checkpoint directory at {name!r} (and it is not a Hub repo id like "
                              "'nvidia/NVLM-D-72B')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - core dependency
        raise CheckpointError("huggingface_hub is needed to download checkpoints") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # network errors, missing repos, gated repos
        raise CheckpointError(f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}). Without network access, pass a local "
                              "checkpoint directory instead.") from None


# ---- random checkpoints --------------------------------------------------------------------------------------

def random_model(config: NVLMConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02,
                 projector_bias: bool = False) -> NVLM:
    """A model with random weights (for tests, benchmarks and `nvlm init`).

    Every tensor is random, norms and LayerScales included (around their usual values), so parity tests exercise
    every parameter; the checkpoint's dummy heads stay exactly zero because they are added only when saving.
    """
    model = build_model(config, projector_bias=projector_bias).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.startswith("mlp1.0.") \
                    and name.endswith("weight") or ".norm1." in name or ".norm2." in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("ls1", "ls2")):
                p.copy_(config.vision_config.initializer_factor * (1.0 + 0.1 * torch.randn(p.shape, generator=g)))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    if config.llm_config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model.to(dtype).eval()
