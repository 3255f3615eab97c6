"""NVLM-D configuration: frozen dataclasses that read and write the checkpoint's own `config.json`.

Notable:
- Field names are the official ones verbatim (`vision_config`, `llm_config`, `select_layer`, `ps_version`, ...),
  so `NVLMConfig.from_dict(json.load(...))` reads `nvidia/NVLM-D-72B/config.json` and `to_dict()` writes a file the
  official remote code and vLLM accept.
- `llm_config.model_type` is "llama" in the official file (a leftover); like the remote code we build Qwen2 whenever
  `architectures[0] == "Qwen2ForCausalLM"` and reject anything else.
- Generation-ish keys that leaked into `llm_config` (`top_p: 0`, `max_length: 20`, ...) are kept for round-tripping
  in `extra` but never used.
- `num_dummy_heads` (vision) is not in the official file: the 7 all-zero heads of InternViT-6B are inferred from the
  checkpoint's tensor shapes at load time; nvlm writes the field only when it is non-zero.
- Unsupported values raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json value nvlm cannot honour; the message names the field."""


def _take(cls, d: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a JSON dict into (known dataclass fields, everything else)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    return known, extra


def _check_type(where: str, name: str, value: Any, types: tuple[type, ...]) -> None:
    # bool is an int subclass: `true` must not pass for a count
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"{where}.{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (`vision_config`). Defaults are InternViT-6B-448px-V1-5 as used by NVLM-D-72B."""

    hidden_size: int = 3200
    num_hidden_layers: int = 45
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    qk_normalization: bool = True
    qkv_bias: bool = False
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    initializer_factor: float = 0.1
    initializer_range: float = 1e-10
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    use_flash_attn: bool = False
    num_dummy_heads: int = 0
    architectures: tuple[str, ...] = ("InternVisionModel",)
    model_type: str = "intern_vit_6b"
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        w = "vision_config"
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                     "image_size", "num_channels"):
            _check_type(w, name, getattr(self, name), (int,))
            if getattr(self, name) <= 0:
                raise ConfigError(f"{w}.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{w}.hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{w}.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act != "gelu":
            raise ConfigError(f"{w}.hidden_act={self.hidden_act!r} is not supported (only 'gelu')")
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ConfigError(f"{w}.norm_type={self.norm_type!r} is not supported (use 'rms_norm' or 'layer_norm')")
        if self.num_dummy_heads < 0:
            raise ConfigError(f"{w}.num_dummy_heads must be >= 0, got {self.num_dummy_heads}")


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder (`llm_config`). Defaults are Qwen2-72B-Instruct as used by NVLM-D-72B."""

    hidden_size: int = 8192
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    intermediate_size: int = 29568
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    vocab_size: int = 152064
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None
    rope_scaling: dict[str, Any] | None = None
    architectures: tuple[str, ...] = ("Qwen2ForCausalLM",)
    model_type: str = "qwen2"
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        w = "llm_config"
        if not self.architectures or self.architectures[0] != "Qwen2ForCausalLM":
            raise ConfigError(f"{w}.architectures={list(self.architectures)!r} is not supported: NVLM-D builds a "
                              "Qwen2 decoder and needs ['Qwen2ForCausalLM']")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            _check_type(w, name, getattr(self, name), (int,))
            if getattr(self, name) <= 0:
                raise ConfigError(f"{w}.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{w}.hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{w}.num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{w}.hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if self.extra.get("use_sliding_window"):
            raise ConfigError(f"{w}.use_sliding_window=true is not supported")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("dynamic", "default", None):
                raise ConfigError(f"{w}.rope_scaling type {kind!r} is not supported (only 'dynamic', which is a "
                                  "no-op up to max_position_embeddings)")


@dataclass(frozen=True)
class NVLMConfig:
    """Top-level NVLM-D `config.json`."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    llm_config: LLMConfig = field(default_factory=LLMConfig)
    select_layer: int = -1
    force_image_size: int | None = 448
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    template: str | None = "chatml"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    architectures: tuple[str, ...] = ("NVLM_D",)
    model_type: str = "NVLM_D"
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision_config.image_size

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens per tile after pixel shuffle: (448/14)^2 * 0.5^2 = 256 for NVLM-D-72B."""
        grid = self.image_size // self.vision_config.patch_size
        return int(grid * grid * self.downsample_ratio ** 2)

    @property
    def projector_input_size(self) -> int:
        return int(self.vision_config.hidden_size * round(1 / self.downsample_ratio) ** 2)

    def validate(self) -> "NVLMConfig":
        if self.model_type != "NVLM_D":
            raise ConfigError(f"model_type={self.model_type!r} is not supported (expected 'NVLM_D')")
        if self.ps_version not in ("v1", "v2"):
            raise ConfigError(f"ps_version={self.ps_version!r} is not supported (use 'v1' or 'v2')")
        if self.downsample_ratio != 0.5:
            raise ConfigError(f"downsample_ratio={self.downsample_ratio!r} is not supported (only 0.5)")
        grid = self.image_size // self.vision_config.patch_size
        if self.image_size % self.vision_config.patch_size or grid % 2:
            raise ConfigError(f"force_image_size={self.image_size} with patch_size "
                              f"{self.vision_config.patch_size} must give an even patch grid for pixel shuffle")
        if self.image_size != self.vision_config.image_size:
            raise ConfigError(f"force_image_size={self.force_image_size} differs from vision_config.image_size="
                              f"{self.vision_config.image_size}; position-embedding interpolation is not supported")
        n = self.vision_config.num_hidden_layers
        if not (-n <= self.select_layer <= n) or self.select_layer == 0:
            raise ConfigError(f"select_layer={self.select_layer} is out of range for {n} vision layers")
        if not (1 <= self.min_dynamic_patch <= self.max_dynamic_patch):
            raise ConfigError(f"min_dynamic_patch={self.min_dynamic_patch} / max_dynamic_patch="
                              f"{self.max_dynamic_patch} must satisfy 1 <= min <= max")
        self.vision_config.validate()
        self.llm_config.validate()
        return self

    # ---- JSON in/out --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NVLMConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        if d.get("model_type") not in (None, "NVLM_D"):
            raise ConfigError(f"model_type={d.get('model_type')!r} is not supported (expected 'NVLM_D')")
        for key in ("vision_config", "llm_config"):
            if key not in d or not isinstance(d[key], dict):
                raise ConfigError(f"config.json has no `{key}` object")
        vknown, vextra = _take(VisionConfig, d["vision_config"], "vision_config")
        lknown, lextra = _take(LLMConfig, d["llm_config"], "llm_config")
        for k in ("architectures",):
            if k in vknown:
                vknown[k] = tuple(vknown[k])
            if k in lknown:
                lknown[k] = tuple(lknown[k] or ())
        # The official llm_config says model_type "llama"; Qwen2 is built regardless (as the remote code does).
        lknown.pop("model_type", None)
        lextra["model_type"] = d["llm_config"].get("model_type", "qwen2")
        vision = VisionConfig(**vknown, extra=vextra)
        llm = LLMConfig(**lknown, extra=lextra)
        top = {k: v for k, v in d.items() if k not in ("vision_config", "llm_config")}
        tknown, textra = _take(cls, top, "")
        if "architectures" in tknown:
            tknown["architectures"] = tuple(tknown["architectures"])
        try:
            cfg = cls(vision_config=vision, llm_config=llm, **tknown, extra=textra)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(str(e)) from None
        return cfg.validate()

    @classmethod
    def from_file(cls, path: str | Path) -> "NVLMConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        def flat(obj) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for f in dataclasses.fields(obj):
                if f.name == "extra" or isinstance(getattr(obj, f.name), (VisionConfig, LLMConfig)):
                    continue
                v = getattr(obj, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
            out.update(obj.extra)
            return out

        vision = flat(self.vision_config)
        if not vision["num_dummy_heads"]:
            del vision["num_dummy_heads"]
        llm = flat(self.llm_config)
        top = flat(self)
        # Ordered like the official file: top-level fields with the two sub-configs in between.
        return {"architectures": top.pop("architectures"), "llm_config": llm, "vision_config": vision, **top}

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **kw) -> "NVLMConfig":
        return dataclasses.replace(self, **kw)


# ---- presets ------------------------------------------------------------------------------------------------
# Small configurations in the official layout. `vocab_size` is set by whoever creates a checkpoint (it must cover
# the tokenizer); the values below are defaults.

def _preset_tiny(vocab_size: int = 151665) -> NVLMConfig:
    """A few-MB model for tests: 56-px tiles (4 image tokens per tile), one dummy ViT head, GQA 4:2."""
    return NVLMConfig(
        vision_config=VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=14, image_size=56, num_dummy_heads=1, initializer_range=0.02),
        llm_config=LLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=4096,
                             rope_theta=10000.0),
        force_image_size=56,
    )


def _preset_1b(vocab_size: int = 151936) -> NVLMConfig:
    """InternViT-300M-448px + Qwen2-0.5B shapes (~0.9B parameters): the CPU benchmark model."""
    return NVLMConfig(
        vision_config=VisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                   intermediate_size=4096, norm_type="layer_norm", qk_normalization=False,
                                   qkv_bias=True, initializer_factor=1.0, initializer_range=0.02,
                                   model_type="intern_vit_300m"),
        llm_config=LLMConfig(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=vocab_size, tie_word_embeddings=True,
                             max_position_embeddings=32768),
    )


def _preset_100m(vocab_size: int = 151936) -> NVLMConfig:
    """~100M parameters besides the embeddings (training benchmark): a 6-layer InternViT + 12-layer decoder."""
    return NVLMConfig(
        vision_config=VisionConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                                   intermediate_size=1536, initializer_range=0.02, model_type="intern_vit"),
        llm_config=LLMConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                             intermediate_size=2048, vocab_size=vocab_size, max_position_embeddings=8192),
    )


def _preset_72b(vocab_size: int = 152064) -> NVLMConfig:
    """nvidia/NVLM-D-72B exactly (build it on the meta device)."""
    return NVLMConfig(vision_config=VisionConfig(num_dummy_heads=7),
                      llm_config=LLMConfig(vocab_size=vocab_size, rope_scaling={"factor": 3.0, "type": "dynamic"}))


PRESETS = {"tiny": _preset_tiny, "100m": _preset_100m, "1b": _preset_1b, "nvlm-d-72b": _preset_72b}


def preset(name: str, **overrides) -> NVLMConfig:
    """A named preset; `overrides` may set `vocab_size`. Unknown names list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**overrides).validate()
