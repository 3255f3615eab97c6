"""LoRA for NVLM-D via `peft`, as a module transform (the model file knows nothing of it).

Notable:
- Adapters go on the LLM's linears by default (q/k/v/o/gate/up/down in every decoder layer); `projector=True` adds
  them to `mlp1`'s two linears and `vision=True` to the ViT's qkv/proj/fc1/fc2. Targets are passed to peft as exact
  module names, so a suffix such as `proj` can never catch an unintended module.
- `peft.inject_adapter_in_model` wraps each target in a `lora.Linear` (base weight under `.base_layer.`, adapters
  under `.lora_A.default.` / `.lora_B.default.`); lora_B starts at zero, so the injected model equals the base.
- `merge_lora` folds W + (alpha/r) * B @ A into each base linear and puts the plain `nn.Linear` back, so the merged
  model has the official parameter names again and `save_checkpoint` writes the official layout.
"""

from __future__ import annotations

from torch import nn

from .config import LoraConfig

VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
PROJECTOR_TARGETS = ("mlp1.1", "mlp1.3")


def lora_target_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the nn.Linear modules that get adapters."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith("language_model.model.layers.") and name.rsplit(".", 1)[-1] in cfg.targets:
            names.append(name)
        elif cfg.projector and name in PROJECTOR_TARGETS:
            names.append(name)
        elif cfg.vision and name.startswith("vision_model.encoder.layers.") and name.endswith(VISION_TARGETS):
            names.append(name)
    return names


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject LoRA adapters in place; returns `model`. Call before sharding/moving to the training device."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError:
        raise ValueError("LoRA needs the `peft` package: pip install 'nvlm[train]'") from None

    targets = lora_target_names(model, cfg)
    if not targets:
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no linear layer of the model")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none")
    return inject_adapter_in_model(peft_cfg, model)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".lora_magnitude_" in name


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear and restore the plain modules (in place); returns `model`."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model
