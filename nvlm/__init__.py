"""nvlm: NVIDIA NVLM-D (InternViT + pixel shuffle + MLP projector + Qwen2) as a clean PyTorch package.

    import nvlm
    pipe = nvlm.load("path/to/checkpoint")          # or a Hub repo id such as "nvidia/NVLM-D-72B"
    print(pipe.chat("What is in the image?", "photo.jpg").text)
"""

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "ChatResult", "SamplingParams", "NVLMConfig"]


def __getattr__(name):  # lazy: `import nvlm` stays cheap for tools that only need a submodule
    if name in ("load", "Pipeline", "ChatResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "SamplingParams":
        from .generate import SamplingParams

        return SamplingParams
    if name == "NVLMConfig":
        from .config import NVLMConfig

        return NVLMConfig
    raise AttributeError(f"module 'nvlm' has no attribute {name!r}")
